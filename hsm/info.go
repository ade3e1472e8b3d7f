package hsm

import (
	"context"
	"fmt"
	"sort"
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

// Info returns the token's description as read when the connection was made.
func (t *Token) Info() TokenInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.info
}

// mechanismNames are the mechanisms the engine uses, by the names operators know from PKCS#11.
var mechanismNames = map[uint]string{
	pkcs11.CKM_AES_KEY_GEN:            "CKM_AES_KEY_GEN",
	pkcs11.CKM_AES_GCM:                "CKM_AES_GCM",
	pkcs11.CKM_GENERIC_SECRET_KEY_GEN: "CKM_GENERIC_SECRET_KEY_GEN",
	pkcs11.CKM_SHA224_HMAC:            "CKM_SHA224_HMAC",
	pkcs11.CKM_SHA256_HMAC:            "CKM_SHA256_HMAC",
	pkcs11.CKM_SHA384_HMAC:            "CKM_SHA384_HMAC",
	pkcs11.CKM_SHA512_HMAC:            "CKM_SHA512_HMAC",
	pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN:  "CKM_RSA_PKCS_KEY_PAIR_GEN",
	pkcs11.CKM_RSA_PKCS_OAEP:          "CKM_RSA_PKCS_OAEP",
	pkcs11.CKM_RSA_PKCS_PSS:           "CKM_RSA_PKCS_PSS",
	pkcs11.CKM_RSA_PKCS:               "CKM_RSA_PKCS",
	pkcs11.CKM_RSA_X_509:              "CKM_RSA_X_509",
	pkcs11.CKM_EC_KEY_PAIR_GEN:        "CKM_EC_KEY_PAIR_GEN",
	pkcs11.CKM_ECDSA:                  "CKM_ECDSA",
	0x1055:                            "CKM_EC_EDWARDS_KEY_PAIR_GEN",
	0x1057:                            "CKM_EDDSA",
	0x210A:                            "CKM_AES_KEY_WRAP_PAD",
	0x210B:                            "CKM_AES_KEY_WRAP_KWP",
}

// requiredMechanisms are those without which the AES engine cannot work.
var requiredMechanisms = []uint{pkcs11.CKM_AES_KEY_GEN, pkcs11.CKM_AES_GCM, pkcs11.CKM_GENERIC_SECRET_KEY_GEN, pkcs11.CKM_SHA256_HMAC}

// Mechanisms lists, of the mechanisms the engine knows, those the token offers, and names the required ones
// it lacks.
func (t *Token) Mechanisms(ctx context.Context) (offered, missing []string, err error) {
	slot := t.Info().Slot // read before do: no token lock may be taken under a PKCS#11 call
	err = t.do(ctx, "C_GetMechanismList", func(p pkcs11API, s pooledSession) error {
		ms, err := p.GetMechanismList(slot)
		if err != nil {
			return err
		}
		have := map[uint]bool{}
		offered = offered[:0]
		for _, m := range ms {
			have[m.Mechanism] = true
			if name, ok := mechanismNames[m.Mechanism]; ok {
				offered = append(offered, name)
			}
		}
		missing = []string{}
		for _, m := range requiredMechanisms {
			if !have[m] {
				missing = append(missing, mechanismNames[m])
			}
		}
		return nil
	})
	sort.Strings(offered)
	return offered, missing, err
}
