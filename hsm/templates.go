package hsm

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// KeyKind is a kind of key object the engine keeps on the token.
type keyKind int

const (
	kindAES     keyKind = iota + 1 // AES-GCM encryption key of a key version
	kindHMAC                       // generic secret for HMAC beside each version, as Transit keys carry
	kindRSA                        // RSA private key
	kindEC                         // ECDSA private key
	kindEd25519                    // Ed25519 private key
)

// ckkECEdwards is CKK_EC_EDWARDS (PKCS#11 3.0), which miekg/pkcs11 does not name.
const ckkECEdwards = 0x40

func (k keyKind) String() string {
	switch k {
	case kindAES:
		return "AES key"
	case kindHMAC:
		return "HMAC key"
	case kindRSA:
		return "RSA private key"
	case kindEC:
		return "ECDSA private key"
	case kindEd25519:
		return "Ed25519 private key"
	}
	return fmt.Sprintf("key kind %d", int(k))
}

func (k keyKind) keyType() uint {
	switch k {
	case kindAES:
		return pkcs11.CKK_AES
	case kindRSA:
		return pkcs11.CKK_RSA
	case kindEC:
		return pkcs11.CKK_EC
	case kindEd25519:
		return ckkECEdwards
	}
	return pkcs11.CKK_GENERIC_SECRET
}

func (k keyKind) class() uint {
	switch k {
	case kindRSA, kindEC, kindEd25519:
		return pkcs11.CKO_PRIVATE_KEY
	}
	return pkcs11.CKO_SECRET_KEY
}

// searchTemplate finds the object of this kind with the given CKA_ID.
func (k keyKind) searchTemplate(id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, k.class()),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, k.keyType()),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	}
}

// protected is what every key object the engine keeps shares: stored on the token, readable only after login,
// never revealed, never wrapped out, never changed, and every usage flag in flags false unless usage grants it.
func protected(class, keyType uint, id []byte, label string, flags []uint, usage map[uint]bool, mechs []uint) []*pkcs11.Attribute {
	attrs := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, mechanismList(mechs)),
	}
	for _, a := range flags {
		attrs = append(attrs, pkcs11.NewAttribute(a, usage[a]))
	}
	return attrs
}

// Usage flags each object class has.
var (
	secretKeyFlags  = []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE}
	privateKeyFlags = []uint{pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE, pkcs11.CKA_SIGN_RECOVER}
)

// protectedSecretKey is a secret key of valueLen bytes with the protection above.
func protectedSecretKey(keyType uint, valueLen int, id []byte, label string, usage map[uint]bool, mechs []uint) []*pkcs11.Attribute {
	return append(protected(pkcs11.CKO_SECRET_KEY, keyType, id, label, secretKeyFlags, usage, mechs),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, valueLen))
}

// aesKeyTemplate: AES-GCM encryption and decryption, nothing else.
func aesKeyTemplate(bits int, id []byte, label string) []*pkcs11.Attribute {
	return protectedSecretKey(pkcs11.CKK_AES, bits/8, id, label,
		map[uint]bool{pkcs11.CKA_ENCRYPT: true, pkcs11.CKA_DECRYPT: true},
		[]uint{pkcs11.CKM_AES_GCM})
}

// hmacMechanisms are the HMACs Transit offers (sha2-224 … sha2-512).
var hmacMechanisms = []uint{pkcs11.CKM_SHA224_HMAC, pkcs11.CKM_SHA256_HMAC, pkcs11.CKM_SHA384_HMAC, pkcs11.CKM_SHA512_HMAC}

// hmacKeyTemplate: a generic secret that can only compute and check HMACs.
func hmacKeyTemplate(bytes int, id []byte, label string) []*pkcs11.Attribute {
	return protectedSecretKey(pkcs11.CKK_GENERIC_SECRET, bytes, id, label,
		map[uint]bool{pkcs11.CKA_SIGN: true, pkcs11.CKA_VERIFY: true},
		hmacMechanisms)
}

// mechanismList encodes a CK_MECHANISM_TYPE array as the library expects it: native unsigned longs.
func mechanismList(mechs []uint) []byte {
	size := int(unsafe.Sizeof(uint(0)))
	out := make([]byte, size*len(mechs))
	for i, m := range mechs {
		if size == 8 {
			binary.NativeEndian.PutUint64(out[i*8:], uint64(m))
		} else {
			binary.NativeEndian.PutUint32(out[i*4:], uint32(m))
		}
	}
	return out
}

// protectedPrivateKey is the private half of every key pair, with the same protection.
func protectedPrivateKey(keyType uint, id []byte, label string, usage map[uint]bool, mechs []uint) []*pkcs11.Attribute {
	return protected(pkcs11.CKO_PRIVATE_KEY, keyType, id, label, privateKeyFlags, usage, mechs)
}

// sessionPublicKey is the public half of a generated pair: a session object, read once into metadata and
// destroyed, so that only the private key lives on the token.
func sessionPublicKey(keyType uint, extra ...*pkcs11.Attribute) []*pkcs11.Attribute {
	return append([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
	}, extra...)
}

// rsaMechanisms: signing (PKCS#1 v1.5 and PSS over a digest) and decryption (OAEP; raw RSA for tokens whose
// OAEP lacks SHA-2, whose padding is then checked in the plugin).
var rsaMechanisms = []uint{pkcs11.CKM_RSA_PKCS, pkcs11.CKM_RSA_PKCS_PSS, pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.CKM_RSA_X_509}

func rsaKeyTemplates(bits int, id []byte, label string) (pub, priv []*pkcs11.Attribute) {
	pub = sessionPublicKey(pkcs11.CKK_RSA,
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
	priv = protectedPrivateKey(pkcs11.CKK_RSA, id, label,
		map[uint]bool{pkcs11.CKA_SIGN: true, pkcs11.CKA_DECRYPT: true}, rsaMechanisms)
	return pub, priv
}

func ecKeyTemplates(params []byte, id []byte, label string) (pub, priv []*pkcs11.Attribute) {
	pub = sessionPublicKey(pkcs11.CKK_EC, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params))
	priv = protectedPrivateKey(pkcs11.CKK_EC, id, label, map[uint]bool{pkcs11.CKA_SIGN: true}, []uint{pkcs11.CKM_ECDSA})
	return pub, priv
}

func ed25519KeyTemplates(id []byte, label string) (pub, priv []*pkcs11.Attribute) {
	pub = sessionPublicKey(ckkECEdwards, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidEd25519DER))
	priv = protectedPrivateKey(ckkECEdwards, id, label, map[uint]bool{pkcs11.CKA_SIGN: true}, []uint{ckmEdDSA})
	return pub, priv
}
