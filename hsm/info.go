package hsm

import (
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// TokenInfo is what the token says of itself (C_GetTokenInfo), for operators.
type TokenInfo struct {
	Slot            uint
	Label           string
	ManufacturerID  string
	Model           string
	SerialNumber    string
	HardwareVersion string
	FirmwareVersion string
	// MaxSessionCount is the token's session cap; 0 when it reports none.
	MaxSessionCount uint
}

func tokenInfoFrom(slot uint, ti pkcs11.TokenInfo) TokenInfo {
	maxSessions := ti.MaxSessionCount
	if maxSessions == pkcs11.CK_UNAVAILABLE_INFORMATION || maxSessions == pkcs11.CK_EFFECTIVELY_INFINITE {
		maxSessions = 0
	}
	return TokenInfo{
		Slot:            slot,
		Label:           strings.TrimSpace(ti.Label),
		ManufacturerID:  strings.TrimSpace(ti.ManufacturerID),
		Model:           strings.TrimSpace(ti.Model),
		SerialNumber:    strings.TrimSpace(ti.SerialNumber),
		HardwareVersion: fmt.Sprintf("%d.%d", ti.HardwareVersion.Major, ti.HardwareVersion.Minor),
		FirmwareVersion: fmt.Sprintf("%d.%d", ti.FirmwareVersion.Major, ti.FirmwareVersion.Minor),
		MaxSessionCount: maxSessions,
	}
}

// KeyTypeSupport says, for one algorithm, whether the token can serve it and, if not, what it lacks.
type KeyTypeSupport struct {
	Algorithm Algorithm
	Supported bool
	Missing   []string
}

// Support lists every algorithm with whether the token can serve it.
func (c *Capabilities) Support() []KeyTypeSupport {
	out := make([]KeyTypeSupport, 0, len(Algorithms))
	for _, a := range Algorithms {
		ok, missing := c.Serves(a)
		out = append(out, KeyTypeSupport{Algorithm: a, Supported: ok, Missing: missing})
	}
	return out
}
