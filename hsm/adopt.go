package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/miekg/pkcs11"
)

// Found is a key object the token holds under a version's label, and what decides whether the engine may take
// it as that version without an operator's word. Storage restored from an older snapshot forgets versions whose
// material is still on the token: finding them by label is how the engine serves them again instead of giving
// their number to new material.
type Found struct {
	ID      []byte
	Label   string
	Class   string // secret_key or private_key
	KeyType string

	// What the token says of the object's origin. Reported is false when the token does not answer CKA_LOCAL.
	Local            bool
	LocalReported    bool
	Sensitive        bool
	AlwaysSensitive  bool
	Extractable      bool
	NeverExtractable bool
	// SharedID: another object of the same kind carries the same CKA_ID (a copy of a key, or another version's):
	// destroying either would destroy both, and lookups by CKA_ID could not tell them apart.
	SharedID bool

	// Mismatch says how the object differs from the algorithm looked for (another key type or size); empty if it
	// is one.
	Mismatch string
	// SizeUnknown: the token does not report the secret key's size (SoftHSM, for unwrapped keys); ValueLen is the
	// size in bytes it reports otherwise (secret keys only).
	SizeUnknown bool
	ValueLen    int
	// Public is a key pair's public half, read from the token or recovered from it; PublicErr says why not.
	Public    crypto.PublicKey
	PublicErr string
	// KeyGenMechanism is CKA_KEY_GEN_MECHANISM where the token reports it (KeyGenReported): the mechanism that
	// generated the key.
	KeyGenMechanism uint
	KeyGenReported  bool
	// HMACSecret: the secret kept beside the version for HMAC is on the token as well, and shown to be generated
	// there (ProvenSecret); one that is not is left for the version's first HMAC to refuse and reconcile to report.
	HMACSecret bool
	// Created is CKA_START_DATE where the token keeps one; zero otherwise.
	Created time.Time
}

// Adoptable says whether the object may serve as the version it is labelled as, and if not, why. Only material
// generated on the token that never left it qualifies: an imported object or one planted by someone who holds
// the PIN is of unknown provenance, so it is reported and left to the operator.
func (f Found) Adoptable() (bool, string) {
	switch {
	case !f.LocalReported:
		return false, "the token does not report CKA_LOCAL for it, so it cannot be told from imported material"
	case !f.Local:
		return false, "CKA_LOCAL is false: it was not generated on the token (imported, or created outside the engine), or the token does not mark the keys it generates (NSS softokn)"
	case !f.NeverExtractable || !f.AlwaysSensitive:
		return false, "its material was extractable or readable once (CKA_NEVER_EXTRACTABLE or CKA_ALWAYS_SENSITIVE is false)"
	case f.SizeUnknown:
		return false, "the token does not report its size (CKA_VALUE_LEN), so it cannot be checked against the key's type"
	}
	return f.AdoptableOnWord()
}

// AdoptableOnWord says whether the object may serve as its version on an operator's word that it is that
// version's material, whatever its origin: it must be protected now (sensitive, not extractable; an imported
// key was never "never extractable") and a key of the version's algorithm.
func (f Found) AdoptableOnWord() (bool, string) {
	switch {
	case len(f.ID) != 16:
		return false, fmt.Sprintf("its CKA_ID has %d bytes, not the 16 of the CKA_IDs this engine gives", len(f.ID))
	case f.SharedID:
		return false, "another object of its kind carries the same CKA_ID"
	case !f.Sensitive || f.Extractable:
		return false, "its material can be read or extracted (CKA_SENSITIVE false or CKA_EXTRACTABLE true)"
	case f.Mismatch != "":
		return false, f.Mismatch
	case f.Class == "private_key" && f.Public == nil:
		return false, "its public key cannot be read or recovered from the token: " + f.PublicErr
	}
	return true, ""
}

// ProvenSecret says why a secret key found where the engine would have generated one (a version's HMAC secret,
// under CKA_ID want) cannot be taken as one it generated; "" when it can. It decides when no record of the engine
// vouches for the secret (VouchedSecret decides when one does), and one planted by someone holding the PIN, with a
// value they know, would let them forge the version's HMACs for good. What the token reports decides, per token, as found on each (hsm tests,
// TestPlantedHMACSecretIsRefused):
//   - SoftHSM 2.6.1 and opencryptoki 3.8.1 mark generated keys CKA_LOCAL and created ones not; opencryptoki marks
//     a created sensitive key ALWAYS_SENSITIVE and NEVER_EXTRACTABLE as well, so CKA_LOCAL is what tells there.
//   - NSS softokn 3.87 leaves CKA_LOCAL false on every key. Its ALWAYS_SENSITIVE and NEVER_EXTRACTABLE tell a
//     created key from a generated one, but its password-based key generation (C_GenerateKey with
//     CKM_PBA_SHA1_WITH_SHA1_HMAC or CKM_PKCS5_PBKD2) makes a generic secret whose value anyone knowing the
//     password computes, and that reads back exactly as a generated one: nothing found on NSS can be proven.
//   - CKA_KEY_GEN_MECHANISM, where the token reports it (SoftHSM), must be CKM_GENERIC_SECRET_KEY_GEN; where it
//     does not, a token offering password-based key generation (passwordKeyGen) cannot prove the mechanism.
func (f Found) ProvenSecret(want []byte, passwordKeyGen bool) string {
	if why := f.VouchedSecret(want); why != "" {
		return why // what a secret must be whoever vouches for it
	}
	switch {
	case !f.NeverExtractable || !f.AlwaysSensitive:
		return "its material was extractable or readable once (CKA_NEVER_EXTRACTABLE or CKA_ALWAYS_SENSITIVE is false): created or imported, not generated on the token"
	case !f.LocalReported || !f.Local:
		return "CKA_LOCAL is not true: it was not generated on the token, or the token does not mark the keys it generates (NSS softokn, where a secret of known value can also be generated from a password and reads back like any other: nothing found there can be proven)"
	case f.KeyGenReported && f.KeyGenMechanism != pkcs11.CKM_GENERIC_SECRET_KEY_GEN:
		return fmt.Sprintf("it was generated with mechanism %#x, not CKM_GENERIC_SECRET_KEY_GEN", f.KeyGenMechanism)
	case !f.KeyGenReported && passwordKeyGen:
		return "the token offers password-based key generation (a secret of known value) and does not report which mechanism generated it (CKA_KEY_GEN_MECHANISM)"
	}
	return ""
}

// VouchedSecret says why a secret key found where the engine generated one (a version's HMAC secret, under CKA_ID
// want) cannot be taken though the engine's own record vouches for it; "" when it can. The record, written before
// the engine made the secret and kept until storage records it (internal/keys: a WAL entry, then a claim), says
// where the secret came from, which NSS cannot show; what the token reports must still show it protected (never
// readable or extractable), a generic secret of the version's size, and alone under its CKA_ID.
func (f Found) VouchedSecret(want []byte) string {
	switch {
	case !bytes.Equal(f.ID, want):
		return fmt.Sprintf("its CKA_ID is %x, not %x", f.ID, want)
	case f.SharedID:
		return "another object of its kind carries the same CKA_ID"
	case !f.Sensitive || f.Extractable:
		return "its material can be read or extracted (CKA_SENSITIVE false or CKA_EXTRACTABLE true)"
	case f.Mismatch != "":
		return f.Mismatch
	case f.SizeUnknown:
		return "the token does not report its size (CKA_VALUE_LEN)"
	}
	return ""
}

// IDHex is the object's CKA_ID as storage records it.
func (f Found) IDHex() string { return hex.EncodeToString(f.ID) }

// FindVersion looks on the token for the main objects labelled label (a version's CKA_LABEL) and describes each
// as a version of algorithm alg whose HMAC secret, if any, has hmacBytes. A label the token's object index does
// not know is answered with nothing, without a PKCS#11 call (objectIndex); one it knows is looked for on the
// token, by label where the token can search so (probed, see labelSearch), else by reading every object's label.
// A search that finds nothing is believed only while the session is still logged in (modules answer searches with
// nothing, not an error, once a C_Logout elsewhere has made private objects invisible), and only when a second
// search agrees: one SoftHSM search can miss an object another process is writing. Two that agree mean the
// index held an object since gone, which it then forgets unless a search by its CKA_ID still finds it.
func (t *Token) FindVersion(ctx context.Context, alg Algorithm, label string, hmacBytes int) ([]Found, error) {
	if label == "" {
		return nil, fmt.Errorf("%w: empty label", ErrInvalidArgument)
	}
	ids, err := t.LabelledIDs(ctx, label)
	if err != nil || len(ids) == 0 {
		return nil, err
	}
	for range 2 {
		found, labelled, err := t.findVersion(ctx, alg, label, hmacBytes)
		if err != nil || labelled {
			return found, err // objects under the label that are no version's main object are not one
		}
	}
	return nil, t.forgetLabel(ctx, label, ids)
}

// findVersion is FindVersion's search on the token; labelled says whether it found any object under the label.
func (t *Token) findVersion(ctx context.Context, alg Algorithm, label string, hmacBytes int) (out []Found, labelled bool, err error) {
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return nil, false, err
	}
	bySearch, err := t.labelSearch(ctx)
	if err != nil {
		return nil, false, err
	}
	err = t.do(ctx, "find key version by label", func(c pkcs11API, s session) error {
		out, labelled = out[:0], false
		var hs []pkcs11.ObjectHandle
		if bySearch {
			if hs, err = findObjects(c, s.h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0); err != nil {
				return err
			}
		} else {
			all, err := findObjects(c, s.h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
			if err != nil {
				return err
			}
			for _, h := range all {
				a, err := c.GetAttributeValue(s.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
				if err == nil && string(a[0].Value) == label {
					hs = append(hs, h)
				}
			}
		}
		labelled = len(hs) > 0
		for _, h := range hs {
			f, keep, err := t.describe(c, s.h, h, caps, alg, hmacBytes)
			if err != nil {
				return err
			}
			if keep {
				f.Label = label
				out = append(out, f)
			}
		}
		if len(out) == 0 { // a search without the login finds public objects only
			return nothingFoundBelieved(c, s)
		}
		return nil
	})
	return out, labelled, err
}

// describe reads what decides adoption from object h; keep is false for objects that are not a version's main
// object (a key pair's public half).
func (t *Token) describe(c pkcs11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, caps *Capabilities, alg Algorithm, hmacBytes int) (Found, bool, error) {
	a, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
	})
	if err != nil {
		return Found{}, false, err
	}
	class, keyType := ulong(a[0].Value), ulong(a[1].Value)
	if class != pkcs11.CKO_SECRET_KEY && class != pkcs11.CKO_PRIVATE_KEY {
		return Found{}, false, nil
	}
	f := Found{ID: a[2].Value, Class: className(class), KeyType: keyTypeName(keyType)}
	// Attributes a token may not know are read one at a time: one unknown type fails the whole call.
	flag := func(attr uint) (bool, bool) {
		v, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(attr, nil)})
		if err != nil || len(v[0].Value) == 0 {
			return false, false
		}
		return boolean(v[0].Value), true
	}
	f.Local, f.LocalReported = flag(pkcs11.CKA_LOCAL)
	f.Sensitive, _ = flag(pkcs11.CKA_SENSITIVE)
	f.AlwaysSensitive, _ = flag(pkcs11.CKA_ALWAYS_SENSITIVE)
	f.Extractable, _ = flag(pkcs11.CKA_EXTRACTABLE)
	f.NeverExtractable, _ = flag(pkcs11.CKA_NEVER_EXTRACTABLE)
	if v, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_GEN_MECHANISM, nil)}); err == nil &&
		len(v[0].Value) > 0 && ulong(v[0].Value) != ^uint(0) /* CK_UNAVAILABLE_INFORMATION */ {
		f.KeyGenMechanism, f.KeyGenReported = ulong(v[0].Value), true
	}
	if v, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_START_DATE, nil)}); err == nil {
		if d, err := time.Parse("20060102", string(v[0].Value)); err == nil {
			f.Created = d.UTC()
		}
	}

	kind := alg.kind()
	if same, err := findObjects(c, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_ID, f.ID), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 2); err != nil {
		return Found{}, false, err
	} else if len(same) > 1 {
		f.SharedID = true
	}
	if class != kind.class() || keyType != kind.keyType() {
		f.Mismatch = fmt.Sprintf("it is a %s of key type %s, not an %s", strings.ReplaceAll(f.Class, "_", " "), f.KeyType, kind)
		return f, true, nil
	}
	switch kind {
	case kindAES, kindHMAC:
		want := hmacBytes
		if kind == kindAES {
			want = map[Algorithm]int{AES128: 16, AES256: 32}[alg]
		}
		v, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil)})
		switch {
		case err != nil || len(v[0].Value) == 0 || ulong(v[0].Value) == 0: // SoftHSM: 0 on unwrapped keys
			f.SizeUnknown = true
		default:
			f.ValueLen = int(ulong(v[0].Value))
			if f.ValueLen != want {
				f.Mismatch = fmt.Sprintf("it is a %d-byte key; %s versions are %d bytes", f.ValueLen, alg, want)
			}
		}
	case kindRSA, kindEC, kindEd25519:
		f.Public, err = t.versionPublicKey(c, sh, h, f.ID, alg)
		if err != nil {
			f.PublicErr = err.Error()
			if errors.Is(err, ErrInvalidArgument) {
				f.Mismatch = err.Error()
			}
		} else if rsaPub, ok := f.Public.(*rsa.PublicKey); ok && rsaPub.N.BitLen() != alg.rsaBits() {
			f.Mismatch = fmt.Sprintf("it is a %d-bit RSA key; %s versions are %d bits", rsaPub.N.BitLen(), alg, alg.rsaBits())
		}
	}
	if kind != kindHMAC && hmacBytes > 0 {
		_, why, err := t.examineHMACSecret(c, sh, caps, hmacSecretID(f.ID), hmacBytes, false, false)
		if err != nil {
			return Found{}, false, err
		}
		f.HMACSecret = why == ""
	}
	return f, true, nil
}

// examineHMACSecret looks for the generic secret under CKA_ID oid and says why it cannot be taken as an HMAC
// secret of hmacBytes this engine generated ("" when it can); h is 0 when there is none, and then so is the reason.
// besideMain: oid is also the version's main object's (the layout before hmacSecretID), which is then no other
// object sharing it; no second generic secret may. vouched: the engine's record says it generated the secret, so
// the token need not prove it (VouchedSecret instead of ProvenSecret).
func (t *Token) examineHMACSecret(c pkcs11API, sh pkcs11.SessionHandle, caps *Capabilities, oid []byte, hmacBytes int, besideMain, vouched bool) (pkcs11.ObjectHandle, string, error) {
	hs, err := findObjects(c, sh, kindHMAC.searchTemplate(oid), 2)
	switch {
	case err != nil:
		return 0, "", err
	case len(hs) == 0:
		return 0, "", nil
	case len(hs) > 1:
		return hs[0], "several generic secrets carry its CKA_ID", nil
	}
	f, _, err := t.describe(c, sh, hs[0], caps, HMACOnly, hmacBytes)
	if err != nil {
		return 0, "", err
	}
	if besideMain {
		f.SharedID = false
	}
	if vouched {
		return hs[0], f.VouchedSecret(oid), nil
	}
	return hs[0], f.ProvenSecret(oid, caps.passwordKeyGen()), nil
}

// versionPublicKey finds the public half of private key h: from a public-key object with the same CKA_ID where
// the token keeps one (tpm2-pkcs11), else from the private object's attributes, else (ECDSA) recovered from
// signatures the key makes.
func (t *Token) versionPublicKey(c pkcs11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, id []byte, alg Algorithm) (crypto.PublicKey, error) {
	kind := alg.kind()
	pubs, err := findObjects(c, sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, kind.keyType()),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 1)
	if err == nil && len(pubs) == 1 {
		if pub, err := readPublicKey(c, sh, pubs[0], alg); err == nil {
			return pub, nil
		}
	}
	if kind == kindRSA {
		return readPublicKey(c, sh, h, alg)
	}
	return t.importedCurvePublicKey(c, sh, h, alg)
}

// labelSearch reports whether C_FindObjects matches CKA_LABEL on this token, learnt once per token from an
// object it holds: search by that object's label, and the object must be among the results. Until a labelled
// object exists to learn from, objects are found by reading labels (FindVersion), which is always right.
func (t *Token) labelSearch(ctx context.Context) (bool, error) {
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return false, err
	}
	switch caps.labelSearch.Load() {
	case labelSearchWorks:
		return true, nil
	case labelSearchFails:
		return false, nil
	}
	verdict := int32(0)
	err = t.do(ctx, "probe label search", func(c pkcs11API, s session) error {
		hs, err := findObjects(c, s.h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 20)
		if err != nil {
			return err
		}
		for _, h := range hs {
			a, err := c.GetAttributeValue(s.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil || len(a[0].Value) == 0 {
				continue
			}
			found, err := findObjects(c, s.h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, a[0].Value), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
			if err != nil {
				return err
			}
			verdict = labelSearchFails
			for _, f := range found {
				if f == h {
					verdict = labelSearchWorks
				}
			}
			return nil
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	if verdict == 0 {
		return false, nil // nothing labelled to learn from: read labels meanwhile
	}
	caps.labelSearch.Store(verdict)
	if verdict == labelSearchFails {
		t.log.Warn("the token does not find objects by CKA_LABEL: versions are looked for by reading every object's label, which is slow with many objects")
	}
	return verdict == labelSearchWorks, nil
}

const (
	labelSearchWorks int32 = 1
	labelSearchFails int32 = 2
)

// LabelSearch reports what the label-search probe found: "works", "fails" (labels are read one by one) or
// "not probed yet".
func (c *Capabilities) LabelSearch() string {
	switch c.labelSearch.Load() {
	case labelSearchWorks:
		return "works"
	case labelSearchFails:
		return "fails"
	}
	return "not probed yet"
}
