package hsm

import (
	"bytes"
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
// private key (the public half is returned, and kept on the token for Ed25519 only: see generatePair), and an HMAC secret of hmacBytes — always
// for HMACOnly, whose key it is; for the others only when hmacBytes > 0 (0 defers it to EnsureHMACKey, so that
// keys never used for HMAC take one object on the token, not two). id must be fresh (callers draw it at random).
// An algorithm the token cannot serve is refused before anything is made (ErrMechanismUnsupported, naming what
// the token lacks). Attempts repeated inside the call after a fault first look for what the failed attempt may
// have made, so a retry never leaves two objects with one CKA_ID. If the HMAC secret cannot be made, the first
// object is destroyed again. The new objects' handles are cached, so the version's first use searches nothing.
func (t *Token) GenerateVersion(ctx context.Context, alg Algorithm, id []byte, label string, hmacBytes int) (crypto.PublicKey, error) {
	if len(id) == 0 {
		return nil, fmt.Errorf("%w: empty CKA_ID", ErrInvalidArgument)
	}
	if (hmacBytes != 0 || alg == HMACOnly) && (hmacBytes < 16 || hmacBytes > 512) {
		return nil, fmt.Errorf("%w: HMAC key size %d", ErrInvalidArgument, hmacBytes)
	}
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return nil, err
	}
	if ok, missing := caps.Serves(alg); !ok {
		return nil, unsupported(string(alg)+" keys", missing)
	}
	o := templateOptions{allowedMechanisms: caps.AllowedMechanisms}
	var pub crypto.PublicKey
	switch alg.kind() {
	case kindAES:
		bits := 128
		if alg == AES256 {
			bits = 256
		}
		err = t.generateSecret(ctx, kindAES, id, pkcs11.CKM_AES_KEY_GEN, aesKeyTemplate(o, bits, id, label))
	case kindRSA, kindEC, kindEd25519:
		pub, err = t.generatePair(ctx, caps, alg, id, label)
	case kindHMAC:
		if alg != HMACOnly {
			return nil, fmt.Errorf("%w: algorithm %q", ErrInvalidArgument, alg)
		}
		err = t.generateSecret(ctx, kindHMAC, id, pkcs11.CKM_GENERIC_SECRET_KEY_GEN, hmacKeyTemplate(o, hmacBytes, id, label))
		return nil, err
	}
	if err != nil || hmacBytes == 0 {
		return pub, err
	}
	if err := t.makeHMACSecret(ctx, caps, id, label, hmacBytes); err != nil {
		if _, derr := t.DestroyKeys(ctx, id); derr != nil {
			t.log.Warn("could not remove half-created key version; the WAL rollback will", "error", derr)
		}
		return nil, err
	}
	return pub, nil
}

// EnsureHMACKey gives the version with CKA_ID id its HMAC secret of hmacBytes, unless the token already holds
// one (made by an earlier call whose caller did not get to record it, or by an earlier engine under the version's
// own CKA_ID). One found is taken when the token shows it generated it and never let it out (Found.ProvenSecret),
// or, when vouched (the engine's own record, written before it made the secret, says it did), when it is still
// protected (Found.VouchedSecret): the only way where the token proves nothing (NSS). Anything else is an
// *UntrustedObjectError and is never used. It searches the token, so it belongs on a version's first HMAC, not on
// every one.
func (t *Token) EnsureHMACKey(ctx context.Context, id []byte, versionLabel string, hmacBytes int, vouched bool) error {
	if len(id) == 0 || hmacBytes < 16 || hmacBytes > 512 {
		return fmt.Errorf("%w: CKA_ID of %d bytes, HMAC key size %d", ErrInvalidArgument, len(id), hmacBytes)
	}
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return err
	}
	if found, err := t.existingHMACSecret(ctx, caps, id, hmacBytes, vouched); err != nil || found {
		return err
	}
	return t.makeHMACSecret(ctx, caps, id, versionLabel, hmacBytes)
}

// CheckHMACSecret says whether the HMAC secret the token holds for version id, if any, would be taken by
// EnsureHMACKey with the same vouched: nil when there is none or it would be, an *UntrustedObjectError otherwise.
// The engine asks it before it writes its record of a secret it is about to make, and reconcile reports with it
// what a version's first HMAC would refuse.
func (t *Token) CheckHMACSecret(ctx context.Context, id []byte, hmacBytes int, vouched bool) error {
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return err
	}
	_, err = t.existingHMACSecret(ctx, caps, id, hmacBytes, vouched)
	return err
}

// existingHMACSecret looks for version id's HMAC secret under each CKA_ID it may carry (objectIDs) and takes the
// one found (its handle cached) only when it is proven, or vouched for and protected (examineHMACSecret). A record
// vouches for the current layout's CKA_ID only (hmacSecretID): the engine never made one under the version's own.
func (t *Token) existingHMACSecret(ctx context.Context, caps *Capabilities, id []byte, hmacBytes int, vouched bool) (bool, error) {
	found := false
	err := t.do(ctx, "look for HMAC secret", func(c pkcs11API, s session) error {
		found = false
		for _, oid := range kindHMAC.objectIDs(id) {
			legacy := bytes.Equal(oid, id)
			h, why, err := t.examineHMACSecret(c, s.h, caps, oid, hmacBytes, legacy, vouched && !legacy)
			if err != nil {
				return err
			}
			if h == 0 {
				continue
			}
			if why != "" {
				label := ""
				if a, err := c.GetAttributeValue(s.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)}); err == nil {
					label = string(a[0].Value)
				}
				return &UntrustedObjectError{Kind: "generic secret (HMAC key)", Label: label, ID: oid, Reason: why}
			}
			t.handles.put(kindHMAC, id, h, s)
			found = true
			return nil
		}
		return nil
	})
	return found, err
}

// makeHMACSecret makes the HMAC secret beside version id, under its own CKA_ID.
func (t *Token) makeHMACSecret(ctx context.Context, caps *Capabilities, id []byte, versionLabel string, hmacBytes int) error {
	if ok, missing := caps.Serves(HMACOnly); !ok {
		return unsupported("HMAC", missing)
	}
	o := templateOptions{allowedMechanisms: caps.AllowedMechanisms}
	tmpl := hmacKeyTemplate(o, hmacBytes, hmacSecretID(id), versionLabel+"/hmac")
	return t.generateSecret(ctx, kindHMAC, id, pkcs11.CKM_GENERIC_SECRET_KEY_GEN, tmpl)
}

// generateSecret makes a secret key object from tmpl for version id. A repeated attempt after a fault first looks
// for what the failed one may have made (a fresh CKA_ID cannot exist otherwise, and searching a token with many
// objects is slow: SoftHSM re-indexes).
func (t *Token) generateSecret(ctx context.Context, kind keyKind, id []byte, mech uint, tmpl []*pkcs11.Attribute) error {
	attempts := 0
	return t.doObjects(ctx, "C_GenerateKey "+kind.String(), func(c pkcs11API, s session) error {
		if attempts++; attempts > 1 {
			for _, oid := range kind.objectIDs(id) {
				existing, err := findObjects(c, s.h, kind.searchTemplate(oid), 2)
				if err != nil {
					return err
				}
				if len(existing) > 0 {
					t.handles.put(kind, id, existing[0], s)
					return nil
				}
			}
		}
		h, err := c.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, tmpl)
		if err == nil {
			t.handles.put(kind, id, h, s) // the version's first use needs no search either
		}
		return err
	})
}

// generatePair makes a key pair, keeps the private half on the token and returns the public one.
func (t *Token) generatePair(ctx context.Context, caps *Capabilities, alg Algorithm, id []byte, label string) (crypto.PublicKey, error) {
	templates := func(o templateOptions) (mech uint, pubT, privT []*pkcs11.Attribute) {
		switch alg.kind() {
		case kindRSA:
			pubT, privT = rsaKeyTemplates(o, caps.Offers(pkcs11.CKM_RSA_X_509), alg.rsaBits(), id, label)
			return pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pubT, privT
		case kindEC:
			_, params := alg.curve()
			pubT, privT = ecKeyTemplates(o, params, id, label)
			return pkcs11.CKM_EC_KEY_PAIR_GEN, pubT, privT
		}
		pubT, privT = ed25519KeyTemplates(o, id, label)
		return ckmEdwardsKeyPairGen, pubT, privT
	}
	var pub crypto.PublicKey
	// An Ed25519 private key does not reveal its public key on every token (SoftHSM keeps no CKA_EC_POINT on it),
	// and unlike ECDSA's it cannot be recovered from signatures: its public half stays on the token beside it, so
	// that the version can be adopted from the token after a storage restore (adopt.go).
	keepPublic := alg == Ed25519
	err := t.generatePairWith(ctx, caps, "C_GenerateKeyPair "+string(alg), id, keepPublic, templates, func(c pkcs11API, s session, pubH, privH pkcs11.ObjectHandle) error {
		var err error
		if pub, err = readPublicKey(c, s.h, pubH, alg); err != nil {
			// A pair whose public half is not a key of the algorithm (tpm2-pkcs11 answers P-521 with a point of
			// another curve): the token cannot make such keys. Nothing of it stays.
			_ = c.DestroyObject(s.h, privH)
			why := fmt.Sprintf("a valid %s key pair (it returned one whose public key is unusable: %v)", alg, err)
			caps.refused.Store(alg, why)
			return unsupported(string(alg)+" keys", []string{why})
		}
		t.handles.put(alg.kind(), id, privH, s)
		return nil
	})
	return pub, err
}

// generatePairWith runs C_GenerateKeyPair with templates made for what the token accepts, then done with both
// handles, and destroys the public half unless keepPublic. A token that refuses the templates is asked again with the public half
// as a token object (tpm2-pkcs11 refuses session objects), then also without the usage flags that have no meaning
// for the key type; what works is remembered for the token. A repeated attempt after a fault first destroys what
// an earlier one made: its public half is gone with that attempt.
func (t *Token) generatePairWith(ctx context.Context, caps *Capabilities, op string, id []byte, keepPublic bool,
	templates func(templateOptions) (uint, []*pkcs11.Attribute, []*pkcs11.Attribute),
	done func(c pkcs11API, s session, pubH, privH pkcs11.ObjectHandle) error) error {
	state := t.pool.tokenState()
	refusalsPass := t.quirks().retryGeneralError
	attempts := 0
	return t.doObjects(ctx, op, func(c pkcs11API, s session) error {
		if attempts++; attempts > 1 {
			if err := destroyAll(c, s, id); err != nil {
				return err
			}
		}
		learnt := pairTemplateOptions(state.pairTemplates.Load())
		tries := []pairTemplateOptions{learnt, learnt | publicOnToken, learnt | publicOnToken | omitMeaningless}
		var pubH, privH pkcs11.ObjectHandle
		var err error
		for i, try := range tries {
			// A module that also gives template errors to passing faults (SoftHSM under parallel writes: see
			// doObjects, which repeats the call) teaches nothing by refusing: learning from it once made SoftHSM's EC
			// keys able to decrypt for good (omitting the flags that have no meaning for them).
			if i > 0 && (!refusesTemplate(err) || refusalsPass) {
				break
			}
			if i > 0 && try == tries[i-1] {
				continue
			}
			o := templateOptions{allowedMechanisms: caps.AllowedMechanisms, publicOnToken: keepPublic || try&publicOnToken != 0, omitMeaningless: try&omitMeaningless != 0}
			mech, pubT, privT := templates(o)
			pubH, privH, err = c.GenerateKeyPair(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pubT, privT)
			if err == nil {
				if try != learnt {
					state.pairTemplates.Store(uint32(try))
					t.log.Info("the token refused the key-pair template; it is asked with what it accepts from now on",
						"public_key_on_token", o.publicOnToken, "meaningless_flags_omitted", o.omitMeaningless)
				}
				break
			}
		}
		if err != nil {
			return err
		}
		if !keepPublic {
			defer func() { _ = c.DestroyObject(s.h, pubH) }()
		}
		return done(c, s, pubH, privH)
	})
}

// pairTemplateOptions are what a token was found to need in key-pair templates.
type pairTemplateOptions uint32

const (
	publicOnToken pairTemplateOptions = 1 << iota
	omitMeaningless
)

// refusesTemplate: the token refused an attribute or value of the template (not a fault).
func refusesTemplate(err error) bool {
	rv, ok := rvOf(err)
	if !ok {
		return false
	}
	switch rv {
	case pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_TEMPLATE_INCOMPLETE, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID,
		pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_READ_ONLY, pkcs11.CKR_FUNCTION_FAILED, pkcs11.CKR_GENERAL_ERROR:
		return true
	}
	return false
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
