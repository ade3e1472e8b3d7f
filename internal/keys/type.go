package keys

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"strings"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// Type is a kind of key, named as in Transit.
type Type string

const (
	TypeAES256GCM96 Type = "aes256-gcm96"
	TypeAES128GCM96 Type = "aes128-gcm96"
	TypeHMAC        Type = "hmac"
	TypeRSA2048     Type = "rsa-2048"
	TypeRSA3072     Type = "rsa-3072"
	TypeRSA4096     Type = "rsa-4096"
	TypeECDSAP256   Type = "ecdsa-p256"
	TypeECDSAP384   Type = "ecdsa-p384"
	TypeECDSAP521   Type = "ecdsa-p521"
	TypeEd25519     Type = "ed25519"
)

// TypeInfo is what a key type is in the HSM and what it can do.
type TypeInfo struct {
	Alg     hsm.Algorithm
	Encrypt bool    // encrypt and decrypt (AES-GCM, or RSA-OAEP)
	Sign    bool    // sign and verify
	Purpose Purpose // what its keys are for: a rotation changes a key's type only within it
}

var types = map[Type]TypeInfo{
	TypeAES256GCM96: {hsm.AES256, true, false, PurposeEncryption},
	TypeAES128GCM96: {hsm.AES128, true, false, PurposeEncryption},
	TypeHMAC:        {hsm.HMACOnly, false, false, PurposeHMAC},
	TypeRSA2048:     {hsm.RSA2048, true, true, PurposeSigning},
	TypeRSA3072:     {hsm.RSA3072, true, true, PurposeSigning},
	TypeRSA4096:     {hsm.RSA4096, true, true, PurposeSigning},
	TypeECDSAP256:   {hsm.ECDSAP256, false, true, PurposeSigning},
	TypeECDSAP384:   {hsm.ECDSAP384, false, true, PurposeSigning},
	TypeECDSAP521:   {hsm.ECDSAP521, false, true, PurposeSigning},
	TypeEd25519:     {hsm.Ed25519, false, true, PurposeSigning},
}

// TypeNames lists the types in the order the docs give them.
var TypeNames = []string{"aes256-gcm96", "aes128-gcm96", "hmac", "rsa-2048", "rsa-3072", "rsa-4096",
	"ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519"}

func (t Type) Info() TypeInfo { return types[t] }
func (t Type) IsAES() bool    { return t == TypeAES256GCM96 || t == TypeAES128GCM96 }
func (t Type) IsRSA() bool    { return t == TypeRSA2048 || t == TypeRSA3072 || t == TypeRSA4096 }
func (t Type) IsECDSA() bool {
	return t == TypeECDSAP256 || t == TypeECDSAP384 || t == TypeECDSAP521
}
func (t Type) Asymmetric() bool { return t.IsRSA() || t.IsECDSA() || t == TypeEd25519 }

// Purpose is what a type is for; a key's versions all share one, and a rotation may change the type only within it.
type Purpose string

const (
	PurposeEncryption Purpose = "encryption" // AES-GCM
	PurposeSigning    Purpose = "signing"    // RSA, ECDSA, Ed25519 (RSA versions also encrypt, with OAEP)
	PurposeHMAC       Purpose = "hmac"
)

// Purpose is the type's purpose, as the types table gives it: a type added later (a post-quantum signature, or a
// KEM with a purpose of its own) names its purpose there, and nothing assumes that a type is RSA, EC or AES.
func (t Type) Purpose() Purpose { return types[t].Purpose }

// TypesOf lists the types of purpose p, in the docs' order.
func TypesOf(p Purpose) []Type {
	var out []Type
	for _, name := range TypeNames {
		if t := Type(name); t.Purpose() == p {
			out = append(out, t)
		}
	}
	return out
}

// ChangeTo says why a key of type t may not have versions of type to: another purpose.
func (t Type) ChangeTo(to Type) error {
	if t.Purpose() == to.Purpose() {
		return nil
	}
	names := make([]string, 0, 4)
	for _, o := range TypesOf(t.Purpose()) {
		names = append(names, string(o))
	}
	return Callerf("a %s key cannot have versions of type %s (%s): a rotation may change the type only within the key's purpose (%s: %s); create another key for %s",
		t, to, to.Purpose(), t.Purpose(), strings.Join(names, ", "), to.Purpose())
}

// VersionType is what a new version is made as: a type and, for hmac, its secret's size in bytes.
type VersionType struct {
	Type        Type
	HMACKeySize int // hmac only
}

// HMACBytes is the size of the version's HMAC secret, its own (hmac) or the one kept beside other material.
func (vt VersionType) HMACBytes() int {
	if vt.Type == TypeHMAC && vt.HMACKeySize > 0 {
		return vt.HMACKeySize
	}
	return hsm.HMACKeySize
}

func (vt VersionType) String() string {
	if vt.Type == TypeHMAC && vt.HMACKeySize > 0 {
		return fmt.Sprintf("%s (%d bytes)", vt.Type, vt.HMACKeySize)
	}
	return string(vt.Type)
}

// NewVersionType is what k's versions are made as unless a rotation says otherwise: its current type.
func (k *Key) NewVersionType() VersionType {
	vt := VersionType{Type: k.Type}
	if k.Type == TypeHMAC {
		vt.HMACKeySize = k.HMACKeyBytes()
	}
	return vt
}

// VersionType is what version v was made as.
func (v *Version) VersionType() VersionType {
	return VersionType{Type: v.Type, HMACKeySize: v.HMACKeySize}
}

// publicKeyName is the "name" Transit gives an asymmetric version's public key.
func (t Type) PublicKeyName() string {
	switch t {
	case TypeECDSAP256:
		return "P-256"
	case TypeECDSAP384:
		return "P-384"
	case TypeECDSAP521:
		return "P-521"
	}
	return string(t)
}

// capabilities names what the type supports, for error messages.
func (t Type) Capabilities() string {
	var c []string
	if t.Info().Encrypt {
		c = append(c, "encrypt/decrypt")
	}
	if t.Info().Sign {
		c = append(c, "sign/verify")
	}
	return strings.Join(append(c, "hmac"), ", ")
}

// unsupported is the 400 for an operation the key's type cannot do.
func (t Type) Unsupported(op string) error {
	return Callerf("key type %s does not support %s; it supports %s", t, op, t.Capabilities())
}

func ParseType(s string) (Type, error) {
	if s == "" {
		return TypeAES256GCM96, nil
	}
	if _, ok := types[Type(s)]; ok {
		return Type(s), nil
	}
	return "", Callerf("unsupported key type %q: this engine creates %s", s, strings.Join(TypeNames, ", "))
}

// FormatPublicKey renders a public key as Transit does.
func FormatPublicKey(pub crypto.PublicKey) (string, error) {
	if ed, ok := pub.(ed25519.PublicKey); ok {
		return base64.StdEncoding.EncodeToString(ed), nil
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

func parsePublicKey(t Type, s string) (crypto.PublicKey, error) {
	if t == TypeEd25519 {
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

// ParsePublicKeyPEM reads a public key given for import (PEM, PKIX) and checks that it is one of type t.
func ParsePublicKeyPEM(t Type, s string) (crypto.PublicKey, error) {
	block, _ := pem.Decode([]byte(s))
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("expected a PEM PUBLIC KEY block (PKIX, as openssl pkey -pubout writes)")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	var got string
	switch p := pub.(type) {
	case *rsa.PublicKey:
		got = fmt.Sprintf("rsa-%d", p.N.BitLen())
	case *ecdsa.PublicKey:
		got = "ecdsa-p" + strings.TrimPrefix(p.Curve.Params().Name, "P-")
	case ed25519.PublicKey:
		got = string(TypeEd25519)
	default:
		return nil, fmt.Errorf("unsupported public key %T", pub)
	}
	if got != string(t) {
		return nil, fmt.Errorf("the key is %s, not %s", got, t)
	}
	return pub, nil
}
