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
	kindAES  keyKind = iota + 1 // AES-GCM encryption key of a key version
	kindHMAC                    // generic secret for HMAC beside each version, as Transit keys carry
)

func (k keyKind) String() string {
	switch k {
	case kindAES:
		return "AES key"
	case kindHMAC:
		return "HMAC key"
	}
	return fmt.Sprintf("key kind %d", int(k))
}

func (k keyKind) keyType() uint {
	if k == kindAES {
		return pkcs11.CKK_AES
	}
	return pkcs11.CKK_GENERIC_SECRET
}

// searchTemplate finds the object of this kind with the given CKA_ID.
func (k keyKind) searchTemplate(id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, k.keyType()),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	}
}

// protectedSecretKey is what every secret key the engine creates shares: stored on the token, readable only
// after login, never revealed, never wrapped out, never changed, and no usage beyond what usage grants.
func protectedSecretKey(keyType uint, valueLen int, id []byte, label string, usage map[uint]bool, mechs []uint) []*pkcs11.Attribute {
	attrs := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, valueLen),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, mechanismList(mechs)),
	}
	for _, a := range []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY,
		pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE} {
		attrs = append(attrs, pkcs11.NewAttribute(a, usage[a]))
	}
	return attrs
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
