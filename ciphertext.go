package cmk

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// Ciphertexts use Transit's layout, byte for byte: "vault:v<N>:" + base64(nonce(12) ‖ ciphertext ‖ tag(16)).
const ciphertextPrefix = "vault:v"

func formatCiphertext(version int, nonce, sealed []byte) string {
	buf := make([]byte, 0, len(nonce)+len(sealed))
	buf = append(append(buf, nonce...), sealed...)
	return formatVersioned(version, buf, base64.StdEncoding)
}

// parseVersioned splits Transit's "vault:v<N>:" + encoded form (ciphertexts, signatures, HMACs) into the version
// and the decoded bytes. Only the canonical encoding is accepted: one value, one spelling.
func parseVersioned(what, s string, enc *base64.Encoding) (int, []byte, error) {
	if !strings.HasPrefix(s, ciphertextPrefix) {
		return 0, nil, fmt.Errorf("invalid %s: no vault:v<N>: prefix", what)
	}
	rest := s[len(ciphertextPrefix):]
	colon := strings.IndexByte(rest, ':')
	if colon <= 0 {
		return 0, nil, fmt.Errorf("invalid %s: no version", what)
	}
	version, err := strconv.Atoi(rest[:colon])
	if err != nil || version < 1 || rest[0] == '+' || rest[0] == '0' {
		return 0, nil, fmt.Errorf("invalid %s: version is not a positive number", what)
	}
	payload := rest[colon+1:]
	if strings.ContainsAny(payload, "\r\n") { // the decoder would skip them
		return 0, nil, fmt.Errorf("invalid %s: line breaks in base64", what)
	}
	raw, err := enc.Strict().DecodeString(payload)
	if err != nil {
		return 0, nil, fmt.Errorf("invalid %s: %v", what, err)
	}
	return version, raw, nil
}

func formatVersioned(version int, raw []byte, enc *base64.Encoding) string {
	return ciphertextPrefix + strconv.Itoa(version) + ":" + enc.EncodeToString(raw)
}

// parseCiphertext splits an AES-GCM ciphertext into version, nonce and ciphertext‖tag. Every malformed input
// gives an error that names the problem; nothing reaches the HSM unless its shape is right.
func parseCiphertext(s string) (version int, nonce, sealed []byte, err error) {
	version, raw, err := parseVersioned("ciphertext", s, base64.StdEncoding)
	if err != nil {
		return 0, nil, nil, err
	}
	if len(raw) < hsm.GCMNonceSize+hsm.GCMTagSize {
		return 0, nil, nil, errors.New("invalid ciphertext: too short")
	}
	return version, raw[:hsm.GCMNonceSize], raw[hsm.GCMNonceSize:], nil
}

// IV sources for GCM nonces, set by config/hsm's iv_source.
const (
	ivSourceHSM = "hsm" // the token's RNG (C_GenerateRandom), fetched in blocks
	ivSourceOS  = "os"  // the operating system's RNG; a nonce needs uniqueness, not secrecy
)

// nonceBlock is how many bytes one C_GenerateRandom call fetches: 256 nonces per HSM round trip.
const nonceBlock = 256 * hsm.GCMNonceSize

// nonceSource hands out 96-bit random GCM nonces.
type nonceSource struct {
	source string
	tok    hsmToken
	mu     sync.Mutex
	buf    []byte
}

func newNonceSource(source string, tok hsmToken) *nonceSource {
	if source == "" {
		source = ivSourceHSM
	}
	return &nonceSource{source: source, tok: tok}
}

func (n *nonceSource) next(ctx context.Context) ([]byte, error) {
	nonce := make([]byte, hsm.GCMNonceSize)
	if n.source == ivSourceOS {
		_, err := rand.Read(nonce)
		return nonce, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.buf) < hsm.GCMNonceSize {
		b, err := n.tok.GenerateRandom(ctx, nonceBlock)
		if err != nil {
			return nil, err
		}
		n.buf = b
	}
	copy(nonce, n.buf)
	clear(n.buf[:hsm.GCMNonceSize]) // a nonce is handed out once
	n.buf = n.buf[hsm.GCMNonceSize:]
	return nonce, nil
}
