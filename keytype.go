package cmk

import (
	"crypto"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"strings"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// keyType is a kind of key, named as in Transit.
type keyType string

const (
	typeAES256GCM96 keyType = "aes256-gcm96"
	typeAES128GCM96 keyType = "aes128-gcm96"
	typeHMAC        keyType = "hmac"
	typeRSA2048     keyType = "rsa-2048"
	typeRSA3072     keyType = "rsa-3072"
	typeRSA4096     keyType = "rsa-4096"
	typeECDSAP256   keyType = "ecdsa-p256"
	typeECDSAP384   keyType = "ecdsa-p384"
	typeECDSAP521   keyType = "ecdsa-p521"
	typeEd25519     keyType = "ed25519"
)

// keyTypeInfo is what a key type is in the HSM and what it can do.
type keyTypeInfo struct {
	alg     hsm.Algorithm
	encrypt bool // encrypt and decrypt (AES-GCM, or RSA-OAEP)
	sign    bool // sign and verify
}

var keyTypes = map[keyType]keyTypeInfo{
	typeAES256GCM96: {hsm.AES256, true, false},
	typeAES128GCM96: {hsm.AES128, true, false},
	typeHMAC:        {hsm.HMACOnly, false, false},
	typeRSA2048:     {hsm.RSA2048, true, true},
	typeRSA3072:     {hsm.RSA3072, true, true},
	typeRSA4096:     {hsm.RSA4096, true, true},
	typeECDSAP256:   {hsm.ECDSAP256, false, true},
	typeECDSAP384:   {hsm.ECDSAP384, false, true},
	typeECDSAP521:   {hsm.ECDSAP521, false, true},
	typeEd25519:     {hsm.Ed25519, false, true},
}

// keyTypeNames lists the types in the order the docs give them.
var keyTypeNames = []string{"aes256-gcm96", "aes128-gcm96", "hmac", "rsa-2048", "rsa-3072", "rsa-4096",
	"ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519"}

func (t keyType) info() keyTypeInfo { return keyTypes[t] }
func (t keyType) isAES() bool       { return t == typeAES256GCM96 || t == typeAES128GCM96 }
func (t keyType) isRSA() bool       { return t == typeRSA2048 || t == typeRSA3072 || t == typeRSA4096 }
func (t keyType) isECDSA() bool {
	return t == typeECDSAP256 || t == typeECDSAP384 || t == typeECDSAP521
}
func (t keyType) asymmetric() bool { return t.isRSA() || t.isECDSA() || t == typeEd25519 }

// publicKeyName is the "name" Transit gives an asymmetric version's public key.
func (t keyType) publicKeyName() string {
	switch t {
	case typeECDSAP256:
		return "P-256"
	case typeECDSAP384:
		return "P-384"
	case typeECDSAP521:
		return "P-521"
	}
	return string(t)
}

// capabilities names what the type supports, for error messages.
func (t keyType) capabilities() string {
	var c []string
	if t.info().encrypt {
		c = append(c, "encrypt/decrypt")
	}
	if t.info().sign {
		c = append(c, "sign/verify")
	}
	return strings.Join(append(c, "hmac"), ", ")
}

// unsupported is the 400 for an operation the key's type cannot do.
func (t keyType) unsupported(op string) error {
	return fmt.Errorf("key type %s does not support %s; it supports %s", t, op, t.capabilities())
}

func parseKeyType(s string) (keyType, error) {
	if s == "" {
		return typeAES256GCM96, nil
	}
	if _, ok := keyTypes[keyType(s)]; ok {
		return keyType(s), nil
	}
	return "", fmt.Errorf("unsupported key type %q: this engine creates %s", s, strings.Join(keyTypeNames, ", "))
}

// formatPublicKey renders a public key as Transit does.
func formatPublicKey(pub crypto.PublicKey) (string, error) {
	if ed, ok := pub.(ed25519.PublicKey); ok {
		return base64.StdEncoding.EncodeToString(ed), nil
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

func parsePublicKey(t keyType, s string) (crypto.PublicKey, error) {
	if t == typeEd25519 {
		raw, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(raw) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("stored Ed25519 public key is malformed")
		}
		return ed25519.PublicKey(raw), nil
	}
	block, _ := pem.Decode([]byte(s))
	if block == nil {
		return nil, fmt.Errorf("stored public key is not PEM")
	}
	return x509.ParsePKIXPublicKey(block.Bytes)
}
