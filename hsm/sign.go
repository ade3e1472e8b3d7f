package hsm

import (
	"context"
	"crypto"
	_ "crypto/sha1" // link every hash hashInfos names, so crypto.Hash.New works for each
	_ "crypto/sha256"
	_ "crypto/sha3"
	_ "crypto/sha512"
	"crypto/subtle"
	"encoding/asn1"
	"errors"
	"fmt"
	"hash"

	"github.com/miekg/pkcs11"
)

// Hash functions known to PKCS#11 by mechanism, MGF and DigestInfo OID.
type hashInfo struct {
	mech uint // CKM_SHA*
	mgf  uint // CKG_MGF1_*
	hmac uint // CKM_SHA*_HMAC, 0 if none
	oid  asn1.ObjectIdentifier
}

// CKG_MGF1_SHA3_* (0x6–0x9) are not named by miekg/pkcs11.
var hashInfos = map[crypto.Hash]hashInfo{
	crypto.SHA1:     {pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKM_SHA_1_HMAC, asn1.ObjectIdentifier{1, 3, 14, 3, 2, 26}},
	crypto.SHA224:   {pkcs11.CKM_SHA224, pkcs11.CKG_MGF1_SHA224, pkcs11.CKM_SHA224_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 4}},
	crypto.SHA256:   {pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKM_SHA256_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}},
	crypto.SHA384:   {pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384, pkcs11.CKM_SHA384_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 2}},
	crypto.SHA512:   {pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512, pkcs11.CKM_SHA512_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 3}},
	crypto.SHA3_224: {pkcs11.CKM_SHA3_224, 0x6, pkcs11.CKM_SHA3_224_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 7}},
	crypto.SHA3_256: {pkcs11.CKM_SHA3_256, 0x7, pkcs11.CKM_SHA3_256_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 8}},
	crypto.SHA3_384: {pkcs11.CKM_SHA3_384, 0x8, pkcs11.CKM_SHA3_384_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 9}},
	crypto.SHA3_512: {pkcs11.CKM_SHA3_512, 0x9, pkcs11.CKM_SHA3_512_HMAC, asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 10}},
}

func lookupHash(h crypto.Hash) (hashInfo, error) {
	info, ok := hashInfos[h]
	if !ok || !h.Available() {
		return hashInfo{}, fmt.Errorf("%w: hash %v", ErrInvalidArgument, h)
	}
	return info, nil
}

// digestInfo is PKCS#1's DigestInfo, which CKM_RSA_PKCS signs.
func digestInfo(h crypto.Hash, digest []byte) ([]byte, error) {
	info, err := lookupHash(h)
	if err != nil {
		return nil, err
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("%w: digest of %d bytes for %v", ErrInvalidArgument, len(digest), h)
	}
	type algorithmIdentifier struct {
		Algorithm  asn1.ObjectIdentifier
		Parameters asn1.RawValue
	}
	return asn1.Marshal(struct {
		Algorithm algorithmIdentifier
		Digest    []byte
	}{algorithmIdentifier{info.oid, asn1.NullRawValue}, digest})
}

// sign runs C_SignInit + C_Sign with the version's object of kind.
func (t *Token) sign(ctx context.Context, op string, kind keyKind, id []byte, mech *pkcs11.Mechanism, data []byte) ([]byte, error) {
	var sig []byte
	err := t.do(ctx, op, func(p pkcs11API, s pooledSession) error {
		h, err := t.findKey(p, s, kind, id)
		if err != nil {
			return err
		}
		if err := p.SignInit(s.h, []*pkcs11.Mechanism{mech}, h); err != nil {
			return err
		}
		sig, err = p.Sign(s.h, data)
		return err
	})
	return sig, err
}

// SignPKCS1v15 signs a digest with the RSA key of id, RSASSA-PKCS1-v1_5.
func (t *Token) SignPKCS1v15(ctx context.Context, id []byte, h crypto.Hash, digest []byte) ([]byte, error) {
	di, err := digestInfo(h, digest)
	if err != nil {
		return nil, err
	}
	return t.sign(ctx, "RSA PKCS#1 v1.5 sign", kindRSA, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil), di)
}

// SignPSS signs a digest with the RSA key of id, RSASSA-PSS with MGF1 of the same hash and saltLen bytes of salt.
func (t *Token) SignPSS(ctx context.Context, id []byte, h crypto.Hash, digest []byte, saltLen int) ([]byte, error) {
	info, err := lookupHash(h)
	if err != nil {
		return nil, err
	}
	if len(digest) != h.Size() || saltLen < 0 {
		return nil, fmt.Errorf("%w: PSS digest or salt length", ErrInvalidArgument)
	}
	params := pkcs11.NewPSSParams(info.mech, info.mgf, uint(saltLen))
	return t.sign(ctx, "RSA PSS sign", kindRSA, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, params), digest)
}

// SignECDSA signs a digest with the EC key of id and returns r‖s, each as long as the curve's order.
func (t *Token) SignECDSA(ctx context.Context, id, digest []byte) ([]byte, error) {
	if len(digest) == 0 {
		return nil, fmt.Errorf("%w: empty digest", ErrInvalidArgument)
	}
	return t.sign(ctx, "ECDSA sign", kindEC, id, pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil), digest)
}

// SignEd25519 signs a message (not a digest: pure Ed25519) with the Ed25519 key of id.
func (t *Token) SignEd25519(ctx context.Context, id, message []byte) ([]byte, error) {
	return t.sign(ctx, "Ed25519 sign", kindEd25519, id, pkcs11.NewMechanism(ckmEdDSA, nil), message)
}

// HMAC computes the HMAC of data with the version's HMAC secret.
func (t *Token) HMAC(ctx context.Context, id []byte, h crypto.Hash, data []byte) ([]byte, error) {
	info, err := lookupHash(h)
	if err != nil {
		return nil, err
	}
	mac, err := t.sign(ctx, "HMAC", kindHMAC, id, pkcs11.NewMechanism(info.hmac, nil), data)
	if rv, ok := rvOf(err); ok && rv == pkcs11.CKR_KEY_SIZE_RANGE {
		return nil, fmt.Errorf("%w: the token requires an HMAC key at least as long as the %v output", ErrInvalidArgument, h)
	}
	return mac, err
}

// DecryptRSA decrypts with the RSA key of id: OAEP with hash h (MGF1 of the same hash, empty label), or
// PKCS#1 v1.5 when h is 0. Tokens whose OAEP lacks the hash (SoftHSM 2.6 offers SHA-1 only) get a raw RSA
// decryption and the padding is checked here, in constant time.
func (t *Token) DecryptRSA(ctx context.Context, id []byte, h crypto.Hash, ciphertext []byte) ([]byte, error) {
	if h == 0 {
		return t.rsaDecrypt(ctx, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil), ciphertext)
	}
	info, err := lookupHash(h)
	if err != nil {
		return nil, err
	}
	if _, raw := t.rawOAEP.Load(h); !raw {
		params := pkcs11.NewOAEPParams(info.mech, info.mgf, pkcs11.CKZ_DATA_SPECIFIED, nil)
		pt, err := t.rsaDecrypt(ctx, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params), ciphertext)
		if !errors.Is(err, ErrMechanismUnsupported) && !isArgumentsBad(err) {
			return pt, err
		}
		t.rawOAEP.Store(h, true) // the token's OAEP lacks this hash: remember, do not ask again
		t.log.Debug("token lacks OAEP with this hash; decrypting raw and checking the padding in the plugin", "hash", h.String())
	}
	em, err := t.rsaDecrypt(ctx, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil), ciphertext)
	if err != nil {
		return nil, err
	}
	defer clear(em)
	return oaepUnpad(h.New(), em)
}

func isArgumentsBad(err error) bool {
	rv, ok := rvOf(err)
	return ok && rv == pkcs11.CKR_ARGUMENTS_BAD
}

func (t *Token) rsaDecrypt(ctx context.Context, id []byte, mech *pkcs11.Mechanism, ciphertext []byte) ([]byte, error) {
	var out []byte
	err := t.do(ctx, "RSA decrypt", func(p pkcs11API, s pooledSession) error {
		h, err := t.findKey(p, s, kindRSA, id)
		if err != nil {
			return err
		}
		if err := p.DecryptInit(s.h, []*pkcs11.Mechanism{mech}, h); err != nil {
			return err
		}
		out, err = p.Decrypt(s.h, ciphertext)
		if rv, ok := rvOf(err); ok {
			switch rv {
			case pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE, pkcs11.CKR_GENERAL_ERROR:
				return ErrInvalidCiphertext
			}
		}
		return err
	})
	return out, err
}

// oaepUnpad checks and removes EME-OAEP padding (RFC 8017 §7.1.2, empty label) from em, the raw RSA result,
// without branching on secret data until the single verdict, so that it gives no padding oracle.
func oaepUnpad(h hash.Hash, em []byte) ([]byte, error) {
	hLen := h.Size()
	k := len(em)
	if k < 2*hLen+2 {
		return nil, ErrInvalidCiphertext
	}
	h.Reset()
	lHash := h.Sum(nil)
	firstByteIsZero := subtle.ConstantTimeByteEq(em[0], 0)
	seed := make([]byte, hLen)
	db := make([]byte, k-hLen-1)
	copy(seed, em[1:1+hLen])
	copy(db, em[1+hLen:])
	defer clear(seed)
	defer clear(db)
	mgf1XOR(seed, h, db)
	mgf1XOR(db, h, seed)
	lHashGood := subtle.ConstantTimeCompare(db[:hLen], lHash)
	// The rest of db is zero or more 0x00 bytes, one 0x01, then the message.
	var lookingForIndex, index, invalid int
	lookingForIndex = 1
	rest := db[hLen:]
	for i := 0; i < len(rest); i++ {
		equals0 := subtle.ConstantTimeByteEq(rest[i], 0)
		equals1 := subtle.ConstantTimeByteEq(rest[i], 1)
		index = subtle.ConstantTimeSelect(lookingForIndex&equals1, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(equals1, 0, lookingForIndex)
		invalid = subtle.ConstantTimeSelect(lookingForIndex&^equals0, 1, invalid)
	}
	if firstByteIsZero&lHashGood&^invalid&^lookingForIndex != 1 {
		return nil, ErrInvalidCiphertext
	}
	return append([]byte(nil), rest[index+1:]...), nil
}

// mgf1XOR xors out with MGF1(seed) using h.
func mgf1XOR(out []byte, h hash.Hash, seed []byte) {
	var counter [4]byte
	var digest []byte
	done := 0
	for done < len(out) {
		h.Reset()
		h.Write(seed)
		h.Write(counter[:])
		digest = h.Sum(digest[:0])
		for i := 0; i < len(digest) && done < len(out); i++ {
			out[done] ^= digest[i]
			done++
		}
		for i := 3; i >= 0; i-- {
			counter[i]++
			if counter[i] != 0 {
				break
			}
		}
	}
	clear(digest)
}
