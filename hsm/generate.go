package hsm

import (
	"context"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/asn1"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// Mechanisms of PKCS#11 3.0 that miekg/pkcs11 does not name.
const (
	ckmEdwardsKeyPairGen = 0x1055
	ckmEdDSA             = 0x1057
)

// Algorithm is the kind of material one key version holds on the token, besides its HMAC secret.
type Algorithm string

const (
	AES128    Algorithm = "aes128"
	AES256    Algorithm = "aes256"
	HMACOnly  Algorithm = "hmac" // the version's HMAC secret is all it has
	RSA2048   Algorithm = "rsa2048"
	RSA3072   Algorithm = "rsa3072"
	RSA4096   Algorithm = "rsa4096"
	ECDSAP256 Algorithm = "ecdsa-p256"
	ECDSAP384 Algorithm = "ecdsa-p384"
	ECDSAP521 Algorithm = "ecdsa-p521"
	Ed25519   Algorithm = "ed25519"
)

// Named curve OIDs as DER, for CKA_EC_PARAMS.
var (
	oidP256DER    = mustOID(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7})
	oidP384DER    = mustOID(asn1.ObjectIdentifier{1, 3, 132, 0, 34})
	oidP521DER    = mustOID(asn1.ObjectIdentifier{1, 3, 132, 0, 35})
	oidEd25519DER = mustOID(asn1.ObjectIdentifier{1, 3, 101, 112})
)

func mustOID(oid asn1.ObjectIdentifier) []byte {
	b, err := asn1.Marshal(oid)
	if err != nil {
		panic(err)
	}
	return b
}

// kind is the object kind holding the version's main material.
func (a Algorithm) kind() keyKind {
	switch a {
	case AES128, AES256:
		return kindAES
	case RSA2048, RSA3072, RSA4096:
		return kindRSA
	case ECDSAP256, ECDSAP384, ECDSAP521:
		return kindEC
	case Ed25519:
		return kindEd25519
	}
	return kindHMAC
}

func (a Algorithm) curve() (elliptic.Curve, []byte) {
	switch a {
	case ECDSAP256:
		return elliptic.P256(), oidP256DER
	case ECDSAP384:
		return elliptic.P384(), oidP384DER
	case ECDSAP521:
		return elliptic.P521(), oidP521DER
	}
	return nil, nil
}

func (a Algorithm) rsaBits() int {
	switch a {
	case RSA2048:
		return 2048
	case RSA3072:
		return 3072
	case RSA4096:
		return 4096
	}
	return 0
}

// GenerateVersion creates, with CKA_ID id, the material of one key version: for AES the key, for key pairs the
// private key (the public half is returned and not kept on the token), and an HMAC secret of hmacBytes — always
// for HMACOnly, whose key it is; for the others only when hmacBytes > 0 (0 defers it to EnsureHMACKey, so that
// keys never used for HMAC take one object on the token, not two). id must be fresh (callers draw it at random).
// Attempts repeated inside the call after a session, login or device error first look for what the failed attempt may have made, so a retry never leaves two
// objects with one CKA_ID. If the second object cannot be made, the first is destroyed again. The new objects'
// handles are cached, so the version's first use searches nothing.
func (t *Token) GenerateVersion(ctx context.Context, alg Algorithm, id []byte, label string, hmacBytes int) (crypto.PublicKey, error) {
	if len(id) == 0 {
		return nil, fmt.Errorf("%w: empty CKA_ID", ErrInvalidArgument)
	}
	if (hmacBytes != 0 || alg == HMACOnly) && (hmacBytes < 16 || hmacBytes > 512) {
		return nil, fmt.Errorf("%w: HMAC key size %d", ErrInvalidArgument, hmacBytes)
	}
	var pub crypto.PublicKey
	var err error
	switch alg.kind() {
	case kindAES:
		bits := 128
		if alg == AES256 {
			bits = 256
		}
		err = t.generateSecret(ctx, kindAES, pkcs11.CKM_AES_KEY_GEN, aesKeyTemplate(bits, id, label), false)
	case kindRSA, kindEC, kindEd25519:
		pub, err = t.generatePair(ctx, alg, id, label)
	case kindHMAC:
		if alg != HMACOnly {
			return nil, fmt.Errorf("%w: algorithm %q", ErrInvalidArgument, alg)
		}
	}
	if err != nil || hmacBytes == 0 {
		return pub, err
	}
	hmacLabel := label + "/hmac"
	if alg == HMACOnly {
		hmacLabel = label
	}
	err = t.generateSecret(ctx, kindHMAC, pkcs11.CKM_GENERIC_SECRET_KEY_GEN, hmacKeyTemplate(hmacBytes, id, hmacLabel), false)
	if err != nil {
		if _, derr := t.DestroyKeys(ctx, id); derr != nil {
			t.log.Warn("could not remove half-created key version; the WAL rollback will", "error", derr)
		}
		return nil, err
	}
	return pub, nil
}

// GenerateVersionKeys creates an AES version (bits 128 or 256) with a 32-byte HMAC secret.
func (t *Token) GenerateVersionKeys(ctx context.Context, id []byte, label string, bits int) error {
	alg := map[int]Algorithm{128: AES128, 256: AES256}[bits]
	if alg == "" {
		return fmt.Errorf("%w: AES key size %d", ErrInvalidArgument, bits)
	}
	_, err := t.GenerateVersion(ctx, alg, id, label, HMACKeySize)
	return err
}

// EnsureHMACKey gives the version with CKA_ID id its HMAC secret of hmacBytes, unless the token already holds
// one with that CKA_ID (made by an earlier call whose caller did not get to record it). It searches the token,
// so it belongs on a version's first HMAC, not on every one. The object shares the version's CKA_ID, so it is
// destroyed with the version.
func (t *Token) EnsureHMACKey(ctx context.Context, id []byte, versionLabel string, hmacBytes int) error {
	if len(id) == 0 || hmacBytes < 16 || hmacBytes > 512 {
		return fmt.Errorf("%w: CKA_ID of %d bytes, HMAC key size %d", ErrInvalidArgument, len(id), hmacBytes)
	}
	return t.generateSecret(ctx, kindHMAC, pkcs11.CKM_GENERIC_SECRET_KEY_GEN, hmacKeyTemplate(hmacBytes, id, versionLabel+"/hmac"), true)
}

// generateSecret makes a secret key object from tmpl, unless one of its kind and CKA_ID is already on the token:
// that is looked for first when searchFirst is set, and otherwise only by a repeated attempt (a fresh CKA_ID
// cannot exist yet, and searching a token with many objects is slow: SoftHSM re-indexes).
func (t *Token) generateSecret(ctx context.Context, kind keyKind, mech uint, tmpl []*pkcs11.Attribute, searchFirst bool) error {
	var id []byte
	for _, a := range tmpl {
		if a.Type == pkcs11.CKA_ID {
			id = a.Value
		}
	}
	attempts := 0
	return t.doObjects(ctx, "C_GenerateKey "+kind.String(), func(p pkcs11API, s pooledSession) error {
		if attempts++; searchFirst || attempts > 1 {
			existing, err := findObjects(p, s.h, kind.searchTemplate(id), 2)
			if err != nil {
				return err
			}
			if len(existing) > 0 {
				t.cacheHandle(kind, id, existing[0], s.epoch)
				return nil
			}
		}
		h, err := p.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, tmpl)
		if err == nil {
			t.cacheHandle(kind, id, h, s.epoch) // the version's first use needs no search either
		}
		return err
	})
}

func (t *Token) generatePair(ctx context.Context, alg Algorithm, id []byte, label string) (crypto.PublicKey, error) {
	var pubT, privT []*pkcs11.Attribute
	var mech uint
	switch alg.kind() {
	case kindRSA:
		pubT, privT = rsaKeyTemplates(alg.rsaBits(), id, label)
		mech = pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN
	case kindEC:
		_, params := alg.curve()
		pubT, privT = ecKeyTemplates(params, id, label)
		mech = pkcs11.CKM_EC_KEY_PAIR_GEN
	case kindEd25519:
		pubT, privT = ed25519KeyTemplates(id, label)
		mech = ckmEdwardsKeyPairGen
	}
	var pub crypto.PublicKey
	attempts := 0
	err := t.doObjects(ctx, "C_GenerateKeyPair "+string(alg), func(p pkcs11API, s pooledSession) error {
		if attempts++; attempts > 1 {
			existing, err := findObjects(p, s.h, alg.kind().searchTemplate(id), 2)
			if err != nil {
				return err
			}
			for _, h := range existing {
				// An earlier attempt made the pair but its public half is gone with that session: start again.
				if err := p.DestroyObject(s.h, h); err != nil {
					return err
				}
			}
		}
		pubH, privH, err := p.GenerateKeyPair(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pubT, privT)
		if err != nil {
			return err
		}
		t.cacheHandle(alg.kind(), id, privH, s.epoch)
		defer func() { _ = p.DestroyObject(s.h, pubH) }()
		pub, err = readPublicKey(p, s.h, pubH, alg)
		return err
	})
	return pub, err
}

// readPublicKey converts a public key object into Go's type for the algorithm.
func readPublicKey(p pkcs11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, alg Algorithm) (crypto.PublicKey, error) {
	switch alg.kind() {
	case kindRSA:
		a, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil)})
		if err != nil {
			return nil, err
		}
		e := new(big.Int).SetBytes(a[1].Value)
		if !e.IsInt64() || e.Int64() > 1<<31-1 {
			return nil, fmt.Errorf("RSA public exponent out of range")
		}
		return &rsa.PublicKey{N: new(big.Int).SetBytes(a[0].Value), E: int(e.Int64())}, nil
	case kindEC, kindEd25519:
		a, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
		if err != nil {
			return nil, err
		}
		point := a[0].Value
		var inner []byte // CKA_EC_POINT is a DER OCTET STRING; some tokens give the bare point
		if rest, err := asn1.Unmarshal(point, &inner); err == nil && len(rest) == 0 {
			point = inner
		}
		if alg == Ed25519 {
			if len(point) != ed25519.PublicKeySize {
				return nil, fmt.Errorf("Ed25519 public key of %d bytes", len(point))
			}
			return ed25519.PublicKey(point), nil
		}
		return ecdsaPublicKey(alg, point)
	}
	return nil, fmt.Errorf("%w: no public key for %s", ErrInvalidArgument, alg)
}

// ecdsaPublicKey parses an uncompressed point, checking that it is on the curve.
func ecdsaPublicKey(alg Algorithm, point []byte) (*ecdsa.PublicKey, error) {
	var curve ecdh.Curve
	switch alg {
	case ECDSAP256:
		curve = ecdh.P256()
	case ECDSAP384:
		curve = ecdh.P384()
	case ECDSAP521:
		curve = ecdh.P521()
	}
	if _, err := curve.NewPublicKey(point); err != nil { // validates the point
		return nil, fmt.Errorf("token returned an invalid EC point: %w", err)
	}
	c, _ := alg.curve()
	size := (c.Params().BitSize + 7) / 8
	return &ecdsa.PublicKey{
		Curve: c,
		X:     new(big.Int).SetBytes(point[1 : 1+size]),
		Y:     new(big.Int).SetBytes(point[1+size:]),
	}, nil
}
