package hsm

import (
	"context"
	"crypto"
	_ "crypto/sha1" // link every hash hashInfos names, so crypto.Hash.New works for each
	_ "crypto/sha256"
	_ "crypto/sha3"
	_ "crypto/sha512"
	"encoding/asn1"
	"errors"
	"fmt"

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
	err := t.do(ctx, op, func(c pkcs11API, s session) error {
		h, err := t.findKey(c, s, kind, id)
		if err != nil {
			return err
		}
		if err := c.SignInit(s.h, []*pkcs11.Mechanism{mech}, h); err != nil {
			return err
		}
		sig, err = c.Sign(s.h, data)
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
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return nil, err
	}
	if !caps.Offers(pkcs11.CKM_RSA_PKCS_PSS) { // some tokens accept it unlisted; what they do then is unknown
		return nil, unsupported("RSA-PSS signatures", []string{mechanismName(pkcs11.CKM_RSA_PKCS_PSS)})
	}
	params := pkcs11.NewPSSParams(info.mech, info.mgf, uint(saltLen))
	sig, err := t.sign(ctx, "RSA PSS sign", kindRSA, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, params), digest)
	if errors.Is(err, ErrMechanismUnsupported) || errors.Is(err, ErrInvalidArgument) {
		// The token lists PSS but not with these parameters (SoftHSM 2.6 has no SHA-3 here and answers
		// CKR_ARGUMENTS_BAD; tpm2-pkcs11 takes no salt longer than the digest).
		return nil, fmt.Errorf("%w: the token refuses RSA-PSS with %v and a %d-byte salt", ErrMechanismUnsupported, h, saltLen)
	}
	return sig, err
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
