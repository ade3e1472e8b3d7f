package hsm

import (
	"context"
	"crypto"
	"crypto/rsa"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// How an imported key reached the token, recorded on the key version.
const (
	// ImportUnwrappedInHSM: both unwraps were C_UnwrapKey calls; no key existed in plugin memory.
	ImportUnwrappedInHSM = "hsm-unwrap"
	// ImportEphemeralInPlugin: the token's RSA-OAEP lacks the hash, so the ephemeral AES key was recovered with raw
	// RSA in the HSM and OAEP-decoded in the plugin, held only as a session object for the target's C_UnwrapKey,
	// and zeroised. The target key itself was unwrapped inside the HSM.
	ImportEphemeralInPlugin = "raw-rsa-oaep-decoded-in-plugin"
)

// GenerateWrappingKey creates the RSA-4096 key whose public half clients wrap import keys with. Its private half
// may only unwrap (RSA-OAEP); on tokens whose OAEP lacks SHA-256 (the hash vault transit import uses), it may also
// decrypt with raw RSA, so that the raw-RSA fallback works once the operator chooses it (Config.RawRSAOAEPFallback:
// whether it is used is that choice, made at each import).
func (t *Token) GenerateWrappingKey(ctx context.Context, id []byte, label string) (*rsa.PublicKey, error) {
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return nil, err
	}
	if ok, missing := caps.Serves(RSA4096); !ok {
		return nil, unsupported("the BYOK wrapping key (RSA-4096)", missing)
	}
	if !caps.Offers(pkcs11.CKM_RSA_PKCS_OAEP) {
		return nil, unsupported("BYOK", []string{mechanismName(pkcs11.CKM_RSA_PKCS_OAEP)})
	}
	rawRSA := !caps.OAEPSHA256
	templates := func(o templateOptions) (uint, []*pkcs11.Attribute, []*pkcs11.Attribute) {
		pubT, privT := wrappingKeyTemplates(o, rawRSA, id, label)
		return pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pubT, privT
	}
	var pub *rsa.PublicKey
	err = t.generatePairWith(ctx, caps, "C_GenerateKeyPair wrapping key", id, false, templates, func(c pkcs11API, s session, pubH, privH pkcs11.ObjectHandle) error {
		t.handles.put(kindRSA, id, privH, s)
		k, err := readPublicKey(c, s.h, pubH, RSA4096)
		pub, _ = k.(*rsa.PublicKey)
		return err
	})
	return pub, err
}

// ImportRequest is one import: wrapped material and where it goes.
type ImportRequest struct {
	Algorithm   Algorithm   // what the target is
	WrappingID  []byte      // CKA_ID of the wrapping key
	OAEPHash    crypto.Hash // hash of the RSA-OAEP that wraps the ephemeral key
	WrappedKey  []byte      // RSA-OAEP(ephemeral AES-256 key) ‖ AES-KWP(ephemeral, target)
	KeyWrapMech uint        // RFC 5649's mechanism on this token; 0 chooses it from the token's mechanism list
	ID          []byte      // CKA_ID of the new version
	Label       string
	HMACBytes   int
}

// ImportVersion unwraps an imported key into a token object with the same protection as a generated one, adds
// its HMAC secret, and returns its public key (asymmetric keys) and the import method used. The target key is
// never in plugin memory; the ephemeral key is only where the token's OAEP lacks the requested hash and the
// operator chose the raw-RSA fallback (Config.RawRSAOAEPFallback).
func (t *Token) ImportVersion(ctx context.Context, r ImportRequest) (crypto.PublicKey, string, error) {
	info, err := lookupHash(r.OAEPHash)
	if err != nil {
		return nil, "", err
	}
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return nil, "", err
	}
	if ok, missing := caps.Serves(r.Algorithm); !ok {
		return nil, "", unsupported(string(r.Algorithm)+" keys", missing)
	}
	if r.KeyWrapMech == 0 {
		r.KeyWrapMech = caps.KeyWrap
	}
	if r.KeyWrapMech == 0 || !caps.Offers(r.KeyWrapMech) {
		return nil, "", unsupported("BYOK imports", []string{"AES key wrap with padding (RFC 5649: CKM_AES_KEY_WRAP_KWP)"})
	}
	if ok, why := caps.Imports(r.Algorithm); !ok {
		return nil, "", fmt.Errorf("%w: %s", ErrMechanismUnsupported, why)
	}
	o := templateOptions{allowedMechanisms: caps.AllowedMechanisms, nssDB: t.quirks().nssDBOnUnwrappedEC,
		omitMeaningless: pairTemplateOptions(t.pool.tokenState().pairTemplates.Load())&omitMeaningless != 0}
	rawRSA := caps.Offers(pkcs11.CKM_RSA_X_509)
	kind := r.Algorithm.kind()
	var pub crypto.PublicKey
	method := ImportUnwrappedInHSM
	err = t.doObjects(ctx, "import key", func(p pkcs11API, s session) error {
		wrapping, err := t.findKey(p, s, kindRSA, r.WrappingID)
		if err != nil {
			return err
		}
		// The wrapped ephemeral key is as long as the wrapping key's modulus.
		mod, err := p.GetAttributeValue(s.h, wrapping, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil)})
		if err != nil {
			return err
		}
		k := len(trimLeadingZeros(mod[0].Value))
		if len(r.WrappedKey) <= k {
			return fmt.Errorf("%w: ciphertext is %d bytes; it must hold the %d-byte wrapped ephemeral key and the wrapped target key", ErrInvalidArgument, len(r.WrappedKey), k)
		}
		wrappedEphemeral, wrappedTarget := r.WrappedKey[:k], r.WrappedKey[k:]
		if err := checkWrappedSize(r.Algorithm, len(wrappedTarget)); err != nil {
			return err
		}

		ephemeral, how, err := t.unwrapEphemeral(p, s.h, wrapping, k, info, r.OAEPHash, wrappedEphemeral)
		if err != nil {
			return err
		}
		method = how
		defer func() { _ = p.DestroyObject(s.h, ephemeral) }()

		// Tokens differ on whether the template of an unwrapped EC key names its curve (NSS requires it, others take
		// it from the PKCS#8 structure and some refuse it): without first, then with.
		var target pkcs11.ObjectHandle
		var firstErr error
		for _, withCurve := range []bool{false, true} {
			if withCurve && (kind != kindEC || !refusesTemplate(err)) {
				break
			}
			target, err = p.UnwrapKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(r.KeyWrapMech, nil)}, ephemeral, wrappedTarget, importTemplate(o, rawRSA, withCurve, r))
			if err == nil {
				break
			}
			if firstErr == nil {
				firstErr = err
			} else if refusesTemplate(err) {
				// The curve in the template was refused too (SoftHSM: CKR_ATTRIBUTE_READ_ONLY): the first answer says
				// more about the data.
				err = firstErr
			}
		}
		if err != nil {
			if rv, ok := rvOf(err); ok && (rv == pkcs11.CKR_WRAPPED_KEY_INVALID || rv == pkcs11.CKR_WRAPPED_KEY_LEN_RANGE ||
				rv == pkcs11.CKR_ENCRYPTED_DATA_INVALID || rv == pkcs11.CKR_GENERAL_ERROR || rv == pkcs11.CKR_TEMPLATE_INCONSISTENT ||
				rv == pkcs11.CKR_TEMPLATE_INCOMPLETE || rv == pkcs11.CKR_FUNCTION_FAILED) {
				// SoftHSM 2.6 answers CKR_FUNCTION_FAILED both to a malformed PKCS#8 and to Ed25519 keys it cannot
				// import.
				expected := ""
				if kind != kindAES && kind != kindHMAC {
					// What people most often send instead: an EC key in SEC1 form ("EC PRIVATE KEY"), an RSA key
					// in PKCS#1 ("RSA PRIVATE KEY"). Transit takes PKCS#8 too.
					expected = "; private keys are expected as PKCS#8 DER, as Transit expects them (an EC key in SEC1 form, 'EC PRIVATE KEY', or an RSA key in PKCS#1 form is converted with: openssl pkcs8 -topk8 -nocrypt -outform DER)"
				}
				return fmt.Errorf("%w: the token could not unwrap the key as %s (wrong ephemeral key, corrupt data, wrong type, or a key type this token cannot import): %v%s", ErrInvalidArgument, r.Algorithm, err, expected)
			}
			return err
		}
		pub, err = t.checkImported(p, s.h, target, r.Algorithm)
		if err != nil {
			_ = p.DestroyObject(s.h, target)
			return err
		}
		t.handles.put(kind, r.ID, target, s)
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	if kind != kindHMAC {
		if err := t.makeHMACSecret(ctx, caps, r.ID, r.Label, r.HMACBytes); err != nil {
			if _, derr := t.DestroyKeys(ctx, r.ID); derr != nil {
				t.log.Warn("could not remove half-imported key version; the WAL rollback will", "error", derr)
			}
			return nil, "", err
		}
	}
	return pub, method, nil
}

// unwrapEphemeral recovers the ephemeral AES key as a session object that can only unwrap. k is the wrapping
// key's modulus size in bytes.
func (t *Token) unwrapEphemeral(p pkcs11API, sh pkcs11.SessionHandle, wrapping pkcs11.ObjectHandle, k int, info hashInfo, h crypto.Hash, wrapped []byte) (pkcs11.ObjectHandle, string, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
	}
	if _, raw := t.rawOAEP.Load(h); !raw {
		params := pkcs11.NewOAEPParams(info.mech, info.mgf, pkcs11.CKZ_DATA_SPECIFIED, nil)
		eph, err := p.UnwrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params)}, wrapping, wrapped, tmpl)
		if err == nil {
			return eph, ImportUnwrappedInHSM, nil
		}
		rv, _ := rvOf(err)
		switch rv {
		case pkcs11.CKR_ARGUMENTS_BAD, pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_MECHANISM_PARAM_INVALID:
			t.rawOAEP.Store(h, true)
		case pkcs11.CKR_WRAPPED_KEY_INVALID, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_WRAPPED_KEY_LEN_RANGE:
			return 0, "", fmt.Errorf("%w: the ephemeral key does not unwrap with the wrapping key (wrong wrapping key or hash_function?)", ErrInvalidArgument)
		default:
			return 0, "", err
		}
	}
	if !t.cfg.RawRSAOAEPFallback {
		return 0, "", fmt.Errorf("%w: this token's RSA-OAEP does not take %v, so the ephemeral key cannot be unwrapped inside the HSM; "+
			"wrap it with a hash the token offers (hash_function), or let the plugin decode the OAEP padding after a raw RSA "+
			"decryption in the HSM (config/hsm raw_rsa_oaep_fallback=true, which puts the ephemeral key in plugin memory for a moment)",
			ErrMechanismUnsupported, h)
	}
	if err := p.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil)}, wrapping); err != nil {
		return 0, "", err
	}
	// Every copy of the ephemeral key in plugin memory is zeroed before this returns: the raw decryption (written
	// by the module straight into Go memory, see moduleCalls.Decrypt), its left-padded copy, the decoded key, the
	// hash state that held the OAEP seed (oaepUnpad), and the C copy of the template's CKA_VALUE
	// (moduleCalls.CreateObject). What the Go runtime copies on its own (stack copies made by the hash's Sum,
	// stacks moved as they grow) is out of reach; the README says so.
	em, err := p.Decrypt(sh, wrapped)
	defer clear(em)
	if rv, ok := rvOf(err); ok && (rv == pkcs11.CKR_GENERAL_ERROR || rv == pkcs11.CKR_ENCRYPTED_DATA_INVALID || rv == pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE) {
		// SoftHSM reports a ciphertext larger than the modulus as CKR_GENERAL_ERROR.
		return 0, "", fmt.Errorf("%w: the ephemeral key does not unwrap with the wrapping key (wrong wrapping key?)", ErrInvalidArgument)
	}
	if err != nil {
		return 0, "", err
	}
	padded := leftPad(em, k)
	defer clear(padded)
	keyBytes, err := oaepUnpad(h.New(), padded)
	if err != nil {
		return 0, "", fmt.Errorf("%w: the ephemeral key does not unwrap with the wrapping key (wrong wrapping key or hash_function?)", ErrInvalidArgument)
	}
	defer clear(keyBytes)
	if ephemeralCopies != nil {
		ephemeralCopies(em, padded, keyBytes)
	}
	if len(keyBytes) != 32 {
		return 0, "", fmt.Errorf("%w: the ephemeral key is %d bytes, not 32 (AES-256)", ErrInvalidArgument, len(keyBytes))
	}
	// miekg/pkcs11's NewAttribute keeps a []byte as it is: the attribute's value is keyBytes itself.
	eph, err := p.CreateObject(sh, append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_VALUE, keyBytes)))
	if err != nil {
		return 0, "", err
	}
	return eph, ImportEphemeralInPlugin, nil
}

// ephemeralCopies, set by tests only, is shown the plugin's Go copies of the ephemeral key while they are in use.
var ephemeralCopies func(copies ...[]byte)

// importTemplate is the unwrapped target's template: the same protection and usage as a generated version.
func importTemplate(o templateOptions, rawRSA, withCurve bool, r ImportRequest) []*pkcs11.Attribute {
	var tmpl []*pkcs11.Attribute
	switch r.Algorithm.kind() {
	case kindAES:
		bits := 128
		if r.Algorithm == AES256 {
			bits = 256
		}
		tmpl = aesKeyTemplate(o, bits, r.ID, r.Label)
	case kindHMAC:
		tmpl = hmacKeyTemplate(o, 0, r.ID, r.Label)
	case kindRSA:
		_, tmpl = rsaKeyTemplates(o, rawRSA, r.Algorithm.rsaBits(), r.ID, r.Label)
	case kindEC:
		_, params := r.Algorithm.curve()
		_, tmpl = ecKeyTemplates(o, params, r.ID, r.Label)
	case kindEd25519:
		_, tmpl = ed25519KeyTemplates(o, r.ID, r.Label)
	}
	// The length comes from the unwrapped data (checked afterwards), the EC curve from the PKCS#8 structure (or
	// from the template where the token requires it: withCurve).
	// SoftHSM refuses CKA_MODIFIABLE in an unwrap template (CKR_ATTRIBUTE_READ_ONLY), so imported objects keep
	// the default; the token still never lets them become extractable or non-sensitive.
	out := tmpl[:0:0]
	for _, a := range tmpl {
		if a.Type != pkcs11.CKA_VALUE_LEN && a.Type != pkcs11.CKA_MODIFIABLE {
			out = append(out, a)
		}
	}
	if withCurve && r.Algorithm.kind() == kindEC {
		_, params := r.Algorithm.curve()
		out = append(out, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params))
	}
	if o.nssDB && r.Algorithm.kind() == kindEC {
		out = append(out, pkcs11.NewAttribute(ckaNSSDB, r.ID)) // see quirks.nssDBOnUnwrappedEC
	}
	return out
}

// checkImported checks that the unwrapped object is what the key type says, and reads its public key.
func (t *Token) checkImported(p pkcs11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, alg Algorithm) (crypto.PublicKey, error) {
	switch alg.kind() {
	case kindAES, kindHMAC:
		return nil, nil // sizes checked from the wrapped length before unwrapping
	case kindRSA:
		pub, err := readPublicKey(p, sh, h, alg)
		if err != nil {
			return nil, err
		}
		if bits := pub.(*rsa.PublicKey).N.BitLen(); bits != alg.rsaBits() {
			return nil, fmt.Errorf("%w: imported RSA key has %d bits; %s needs %d", ErrInvalidArgument, bits, alg, alg.rsaBits())
		}
		return pub, nil
	case kindEC, kindEd25519:
		return t.importedCurvePublicKey(p, sh, h, alg)
	}
	return nil, errors.New("unknown key kind")
}

// checkWrappedSize checks a secret key's size before unwrapping, from the wrapped length: RFC 5649 output is
// 8 bytes plus the key padded to a multiple of 8, and AES accepts only 16, 24 or 32-byte keys, so 24 bytes
// wrapped is an AES-128 key and 40 an AES-256 one. (SoftHSM leaves CKA_VALUE_LEN empty on unwrapped keys.)
func checkWrappedSize(alg Algorithm, wrapped int) error {
	switch alg {
	case AES128, AES256:
		want := map[Algorithm]int{AES128: 16, AES256: 32}[alg]
		if wrapped != 8+want {
			return fmt.Errorf("%w: the wrapped key is %d bytes; an %s key wraps to %d (is the key %d bytes?)", ErrInvalidArgument, wrapped, alg, 8+want, want)
		}
	case HMACOnly:
		if wrapped < 8+16 || wrapped > 8+512 {
			return fmt.Errorf("%w: imported HMAC keys must be 16 to 512 bytes", ErrInvalidArgument)
		}
	}
	return nil
}

func trimLeadingZeros(b []byte) []byte {
	for len(b) > 1 && b[0] == 0 {
		b = b[1:]
	}
	return b
}

func leftPad(b []byte, n int) []byte {
	if len(b) >= n {
		return b
	}
	out := make([]byte, n)
	copy(out[n-len(b):], b)
	return out
}
