package hsm

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// keyKind is a kind of key object the engine keeps on the token.
type keyKind int

const (
	kindAES     keyKind = iota + 1 // AES-GCM encryption key of a key version
	kindHMAC                       // generic secret for HMAC: an hmac key's material, or the secret beside a version
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

// hmacSecretID is the CKA_ID of the HMAC secret kept beside a version's main key (AES, RSA, EC): its own, because
// tokens such as NSS keep one secret key per CKA_ID and a second one silently replaces the first. An hmac key's
// material is its version's main key and carries the version's CKA_ID.
func hmacSecretID(id []byte) []byte {
	return append(append(make([]byte, 0, len(id)+5), id...), "/hmac"...)
}

// objectIDs are the CKA_IDs an object of this kind of version id may carry, the current layout first. Engines
// before hmacSecretID gave the HMAC secret the version's own CKA_ID; such objects are still found and destroyed.
func (k keyKind) objectIDs(id []byte) [][]byte {
	if k == kindHMAC {
		return [][]byte{hmacSecretID(id), id}
	}
	return [][]byte{id}
}

// usage is the usage flags of one kind of object: those granted, those denied, and those denied that have no
// meaning for its key type. Tokens default usage flags as they like (SoftHSM makes an EC private key able to
// decrypt and unwrap unless told otherwise), so every flag is set false explicitly; but some tokens
// (tpm2-pkcs11) refuse an explicit CKA_DECRYPT=false on an EC key, and there the meaningless ones are left out.
type usage struct {
	granted     []uint
	denied      []uint
	meaningless []uint
}

var (
	aesUsage  = usage{granted: []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT}, denied: []uint{pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE}}
	hmacUsage = usage{granted: []uint{pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY}, denied: []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE}}
	rsaUsage  = usage{granted: []uint{pkcs11.CKA_SIGN, pkcs11.CKA_DECRYPT}, denied: []uint{pkcs11.CKA_UNWRAP, pkcs11.CKA_SIGN_RECOVER}, meaningless: []uint{pkcs11.CKA_DERIVE}}
	ecUsage   = usage{granted: []uint{pkcs11.CKA_SIGN}, denied: []uint{pkcs11.CKA_DERIVE}, meaningless: []uint{pkcs11.CKA_DECRYPT, pkcs11.CKA_UNWRAP, pkcs11.CKA_SIGN_RECOVER}}
)

// templateOptions are what a token's capabilities change in templates.
type templateOptions struct {
	allowedMechanisms bool // store CKA_ALLOWED_MECHANISMS (where the token can)
	omitMeaningless   bool // leave flags without meaning for the key type out (where the token refuses them)
	publicOnToken     bool // make a pair's public half a token object (where the token refuses session objects)
	nssDB             bool // give an unwrapped EC private key CKA_NSS_DB (quirks.nssDBOnUnwrappedEC)
}

// protected is what every key object the engine keeps shares: stored on the token, readable only after login,
// never revealed, never wrapped out, never changed, the usage u grants and no other that applies, and (where the
// token stores it) the mechanisms it may be used with.
func protected(o templateOptions, class, keyType uint, id []byte, label string, u usage, mechs []uint) []*pkcs11.Attribute {
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
	}
	if o.allowedMechanisms {
		attrs = append(attrs, pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, mechanismList(mechs)))
	}
	for _, a := range u.granted {
		attrs = append(attrs, pkcs11.NewAttribute(a, true))
	}
	for _, a := range u.denied {
		attrs = append(attrs, pkcs11.NewAttribute(a, false))
	}
	if !o.omitMeaningless {
		for _, a := range u.meaningless {
			attrs = append(attrs, pkcs11.NewAttribute(a, false))
		}
	}
	return attrs
}

// protectedSecretKey is a secret key of valueLen bytes with the protection above.
func protectedSecretKey(o templateOptions, keyType uint, valueLen int, id []byte, label string, u usage, mechs []uint) []*pkcs11.Attribute {
	return append(protected(o, pkcs11.CKO_SECRET_KEY, keyType, id, label, u, mechs),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, valueLen))
}

// aesKeyTemplate: AES-GCM encryption and decryption, nothing else.
func aesKeyTemplate(o templateOptions, bits int, id []byte, label string) []*pkcs11.Attribute {
	return protectedSecretKey(o, pkcs11.CKK_AES, bits/8, id, label, aesUsage, []uint{pkcs11.CKM_AES_GCM})
}

// hmacMechanisms are the HMACs Transit offers (sha2-224 … sha2-512).
var hmacMechanisms = []uint{pkcs11.CKM_SHA224_HMAC, pkcs11.CKM_SHA256_HMAC, pkcs11.CKM_SHA384_HMAC, pkcs11.CKM_SHA512_HMAC}

// hmacKeyTemplate: a generic secret that can only compute and check HMACs. id is the object's own CKA_ID.
func hmacKeyTemplate(o templateOptions, bytes int, id []byte, label string) []*pkcs11.Attribute {
	return protectedSecretKey(o, pkcs11.CKK_GENERIC_SECRET, bytes, id, label, hmacUsage, hmacMechanisms)
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
func protectedPrivateKey(o templateOptions, keyType uint, id []byte, label string, u usage, mechs []uint) []*pkcs11.Attribute {
	return protected(o, pkcs11.CKO_PRIVATE_KEY, keyType, id, label, u, mechs)
}

// publicKeyTemplate is the public half of a generated pair, read once into metadata and destroyed, so that only
// the private key lives on the token. It is a session object where the token allows (tpm2-pkcs11 refuses
// session objects: there it is a token object for the moment it exists).
func publicKeyTemplate(o templateOptions, keyType uint, id []byte, extra ...*pkcs11.Attribute) []*pkcs11.Attribute {
	onToken := o.publicOnToken
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, onToken),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
	}
	if onToken {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false))
	}
	return append(t, extra...)
}

// rsaMechanisms: signing (PKCS#1 v1.5 and PSS over a digest) and decryption (OAEP), and raw RSA where the token
// offers it: PKCS#1 v1.5 decryption, and OAEP where the token's lacks SHA-256, decode the padding in the plugin
// (DecryptPKCS1v15, DecryptRSA). Keys made before raw RSA was listed wherever the token offers it (on a token that
// stores allowed mechanisms and whose OAEP takes SHA-256) cannot decrypt PKCS#1 v1.5: ErrMechanismUnsupported.
func rsaMechanisms(rawRSA bool) []uint {
	m := []uint{pkcs11.CKM_RSA_PKCS, pkcs11.CKM_RSA_PKCS_PSS, pkcs11.CKM_RSA_PKCS_OAEP}
	if rawRSA {
		m = append(m, pkcs11.CKM_RSA_X_509)
	}
	return m
}

func rsaKeyTemplates(o templateOptions, rawRSA bool, bits int, id []byte, label string) (pub, priv []*pkcs11.Attribute) {
	pub = publicKeyTemplate(o, pkcs11.CKK_RSA, id,
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
	priv = protectedPrivateKey(o, pkcs11.CKK_RSA, id, label, rsaUsage, rsaMechanisms(rawRSA))
	return pub, priv
}

func ecKeyTemplates(o templateOptions, params []byte, id []byte, label string) (pub, priv []*pkcs11.Attribute) {
	pub = publicKeyTemplate(o, pkcs11.CKK_EC, id, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params))
	priv = protectedPrivateKey(o, pkcs11.CKK_EC, id, label, ecUsage, []uint{pkcs11.CKM_ECDSA})
	return pub, priv
}

func ed25519KeyTemplates(o templateOptions, id []byte, label string) (pub, priv []*pkcs11.Attribute) {
	// The public half stays on the token (see generatePair): it verifies, and nothing else, and is never changed.
	pub = publicKeyTemplate(o, ckkECEdwards, id, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidEd25519DER),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label+"/public"), pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false), pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false))
	priv = protectedPrivateKey(o, ckkECEdwards, id, label, ecUsage, []uint{ckmEdDSA})
	return pub, priv
}

// wrappingKeyTemplates: the mount's RSA-4096 import key may only unwrap with RSA-OAEP, and, on a token whose OAEP
// lacks SHA-256, decrypt with raw RSA for the fallback the operator may choose.
func wrappingKeyTemplates(o templateOptions, rawRSA bool, id []byte, label string) (pub, priv []*pkcs11.Attribute) {
	pub = publicKeyTemplate(o, pkcs11.CKK_RSA, id,
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 4096),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
	u := usage{granted: []uint{pkcs11.CKA_UNWRAP}, denied: []uint{pkcs11.CKA_SIGN, pkcs11.CKA_SIGN_RECOVER, pkcs11.CKA_DECRYPT}}
	mechs := []uint{pkcs11.CKM_RSA_PKCS_OAEP}
	if rawRSA {
		u = usage{granted: []uint{pkcs11.CKA_UNWRAP, pkcs11.CKA_DECRYPT}, denied: []uint{pkcs11.CKA_SIGN, pkcs11.CKA_SIGN_RECOVER}}
		mechs = append(mechs, pkcs11.CKM_RSA_X_509)
	}
	priv = protectedPrivateKey(o, pkcs11.CKK_RSA, id, label, u, mechs)
	return pub, priv
}
