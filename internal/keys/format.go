package keys

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// Transit's formats for what a use of a key gives the caller. Ciphertexts, signatures and HMACs are
// "vault:v<N>:" + the encoded bytes; an AES-GCM ciphertext's bytes are nonce(12) ‖ ciphertext ‖ tag(16), byte for
// byte as Transit's.
const versionedPrefix = "vault:v"

// FormatVersioned writes raw, made by version, in Transit's "vault:v<N>:" form.
func FormatVersioned(version int, raw []byte, enc *base64.Encoding) string {
	return versionedPrefix + strconv.Itoa(version) + ":" + enc.EncodeToString(raw)
}

// ParseVersioned splits Transit's "vault:v<N>:" + encoded form (ciphertexts, signatures, HMACs; what names it in
// the messages) into the version and the decoded bytes. Only the canonical encoding is accepted: one value, one
// spelling.
func ParseVersioned(what, s string, enc *base64.Encoding) (int, []byte, error) {
	if !strings.HasPrefix(s, versionedPrefix) {
		return 0, nil, fmt.Errorf("invalid %s: no vault:v<N>: prefix", what)
	}
	rest := s[len(versionedPrefix):]
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

// NamedVersion is the version a ciphertext, signature or HMAC in Transit's form names, 0 when s is not one.
func NamedVersion(s string) int {
	v, _, err := ParseVersioned("", s, base64.StdEncoding)
	if err != nil {
		return 0
	}
	return v
}

func formatCiphertext(version int, nonce, sealed []byte) string {
	buf := make([]byte, 0, len(nonce)+len(sealed))
	buf = append(append(buf, nonce...), sealed...)
	return FormatVersioned(version, buf, base64.StdEncoding)
}

// parseCiphertext splits an AES-GCM ciphertext into version, nonce and ciphertext‖tag. Every malformed input
// gives an error that names the problem; nothing reaches the HSM unless its shape is right.
func parseCiphertext(s string) (version int, nonce, sealed []byte, err error) {
	version, raw, err := ParseVersioned("ciphertext", s, base64.StdEncoding)
	if err != nil {
		return 0, nil, nil, err
	}
	if len(raw) < hsm.GCMNonceSize+hsm.GCMTagSize {
		return 0, nil, nil, errors.New("invalid ciphertext: too short")
	}
	return version, raw[:hsm.GCMNonceSize], raw[hsm.GCMNonceSize:], nil
}
