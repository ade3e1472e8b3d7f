package cmk

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/base64"
	"fmt"
	"math/big"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Transit's hash names for sign, verify and hmac.
var signHashes = map[string]crypto.Hash{
	"sha1": crypto.SHA1, "sha2-224": crypto.SHA224, "sha2-256": crypto.SHA256, "sha2-384": crypto.SHA384,
	"sha2-512": crypto.SHA512, "sha3-224": crypto.SHA3_224, "sha3-256": crypto.SHA3_256, "sha3-384": crypto.SHA3_384,
	"sha3-512": crypto.SHA3_512,
}

type signResult struct {
	Signature  string `json:"signature,omitempty"`
	KeyVersion int    `json:"key_version"`
	Error      string `json:"error,omitempty"`
	Reference  string `json:"reference"`
}

type verifyResult struct {
	Valid     bool   `json:"valid"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
}

type hmacResult struct {
	HMAC      string `json:"hmac,omitempty"`
	Valid     bool   `json:"valid"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
}

func (r *signResult) setOutcome(ref, err string)   { r.Reference, r.Error = ref, err }
func (r *verifyResult) setOutcome(ref, err string) { r.Reference, r.Error = ref, err }
func (r *hmacResult) setOutcome(ref, err string)   { r.Reference, r.Error = ref, err }

func signatureFields() map[string]*framework.FieldSchema {
	return withBatch(map[string]*framework.FieldSchema{
		"name":         fieldName,
		"input":        {Type: framework.TypeString, Description: "Base64 input (or its digest, with prehashed)."},
		"urlalgorithm": {Type: framework.TypeString, Description: "Hash algorithm, in the URL."},
		"hash_algorithm": {
			Type:          framework.TypeString,
			Default:       "sha2-256",
			AllowedValues: []interface{}{"sha1", "sha2-224", "sha2-256", "sha2-384", "sha2-512", "sha3-224", "sha3-256", "sha3-384", "sha3-512"},
			Description:   "sha1, sha2-224, sha2-256 (default), sha2-384, sha2-512, sha3-224, sha3-256, sha3-384, sha3-512. Ignored for ed25519.",
		},
		"algorithm": {Type: framework.TypeString, Description: "Deprecated alias of hash_algorithm."},
		"key_version": {
			Type:        framework.TypeInt,
			Description: "Version to sign with: 0 (latest) or at least min_encryption_version.",
		},
		"prehashed": {Type: framework.TypeBool, Description: "The input is already the digest (not for ed25519)."},
		"signature_algorithm": {
			Type:          framework.TypeString,
			AllowedValues: []interface{}{"pss", "pkcs1v15"},
			Description:   `RSA keys: "pss" (default) or "pkcs1v15".`,
		},
		"marshaling_algorithm": {
			Type:          framework.TypeString,
			Default:       "asn1",
			AllowedValues: []interface{}{"asn1", "jws"},
			Description:   `"asn1" (default; base64) or "jws" (ECDSA r‖s, base64url without padding).`,
		},
		"salt_length": {
			Type:        framework.TypeString,
			Default:     "auto",
			Description: `RSA-PSS salt: "auto" (default: the largest when signing, any when verifying), "hash", or a number of bytes.`,
		},
		"context": fieldContext,
	})
}

func (b *backend) pathSign() *framework.Path {
	return &framework.Path{
		Pattern:      "sign/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "sign", OperationSuffix: "|with-algorithm"},
		Fields:       signatureFields(),
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathSignWrite, "signature_context"), Summary: "Sign input with the key's private half, inside the HSM."},
		},
		HelpSynopsis:    "Sign input, or a batch, with an RSA, ECDSA or Ed25519 key held in the HSM.",
		HelpDescription: "The digest is computed here (no secret is involved) and signed in the HSM; Ed25519 signs the input itself. Signatures are Transit's vault:v<N>:<base64> and verify with the version's public key in any standard library.",
	}
}

func (b *backend) pathVerify() *framework.Path {
	fields := signatureFields()
	fields["signature"] = &framework.FieldSchema{Type: framework.TypeString, Description: "Signature to check, as returned by sign."}
	fields["hmac"] = &framework.FieldSchema{Type: framework.TypeString, Description: "HMAC to check, as returned by hmac (instead of signature)."}
	return &framework.Path{
		Pattern:      "verify/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "verify", OperationSuffix: "|with-algorithm"},
		Fields:       fields,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathVerifyWrite, "signature_context", "cmac", "mac_length"), Summary: "Check a signature or an HMAC."},
		},
		HelpSynopsis:    "Check a signature (with the version's public key) or an HMAC (recomputed in the HSM).",
		HelpDescription: "Returns valid true or false. A malformed signature or HMAC, or a version below min_decryption_version, is a 400. HMACs are compared in constant time; an RSA key with allow_pkcs1v15_decryption=true verifies no HMAC (400).",
	}
}

func (b *backend) pathHMAC() *framework.Path {
	return &framework.Path{
		Pattern:      "hmac/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "generate", OperationSuffix: "hmac|hmac-with-algorithm"},
		Fields: withBatch(map[string]*framework.FieldSchema{
			"name":         fieldName,
			"input":        {Type: framework.TypeString, Description: "Base64 input."},
			"urlalgorithm": {Type: framework.TypeString, Description: "Hash algorithm, in the URL."},
			"algorithm": {
				Type:          framework.TypeString,
				Default:       "sha2-256",
				AllowedValues: []interface{}{"sha2-224", "sha2-256", "sha2-384", "sha2-512", "sha3-224", "sha3-256", "sha3-384", "sha3-512"},
				Description:   "sha2-224, sha2-256 (default), sha2-384 or sha2-512 (and sha3-* where the token offers them).",
			},
			"key_version": {Type: framework.TypeInt, Description: "Version whose HMAC secret to use: 0 (latest) or at least min_encryption_version."},
		}),
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathHMACWrite), Summary: "HMAC input with the version's HMAC secret, inside the HSM."},
		},
		HelpSynopsis:    "Compute an HMAC in the HSM with the key version's HMAC secret.",
		HelpDescription: "Every version of every key has an HMAC secret in the HSM, as Transit keys do; for key types other than hmac it is generated in the HSM with the version's first HMAC (so keys never used for HMAC take one object on the token, not two). The result is vault:v<N>:<base64>. An RSA key with allow_pkcs1v15_decryption=true serves no HMAC (400): its HMAC secrets derive PKCS#1 v1.5 implicit rejection.",
	}
}

// signOptions are a request's signature settings.
type signOptions struct {
	hash       crypto.Hash
	prehashed  bool
	rsaPSS     bool
	jws        bool
	saltLength string
}

func readSignOptions(d *framework.FieldData, p *keys.Key) (signOptions, error) {
	o := signOptions{prehashed: d.Get("prehashed").(bool), saltLength: d.Get("salt_length").(string)}
	name := d.Get("hash_algorithm").(string)
	if v, ok := d.GetOk("algorithm"); ok {
		name = v.(string)
	}
	if v, ok := d.Raw["urlalgorithm"].(string); ok && v != "" {
		name = v
	}
	h, ok := signHashes[name]
	if !ok {
		return o, callerf("unsupported hash algorithm %q", name)
	}
	o.hash = h
	switch d.Get("marshaling_algorithm").(string) {
	case "asn1":
	case "jws":
		o.jws = true
	default:
		return o, callerf("marshaling_algorithm must be asn1 or jws")
	}
	switch v, _ := d.Get("signature_algorithm").(string); v {
	case "", "pss":
		o.rsaPSS = true
	case "pkcs1v15":
	default:
		return o, callerf("signature_algorithm must be pss or pkcs1v15, not %q", v)
	}
	if p.Type == keys.TypeEd25519 && o.prehashed {
		return o, callerf("prehashed is not supported with ed25519: it signs the input itself")
	}
	return o, nil
}

func (o signOptions) encoding() *base64.Encoding {
	if o.jws {
		return base64.RawURLEncoding
	}
	return base64.StdEncoding
}

// digest is what gets signed: the input's hash, or the input itself when prehashed.
func (o signOptions) digest(input []byte) ([]byte, error) {
	if o.prehashed {
		if len(input) != o.hash.Size() {
			return nil, callerf("prehashed input is %d bytes; %v digests are %d", len(input), o.hash, o.hash.Size())
		}
		return input, nil
	}
	h := o.hash.New()
	h.Write(input)
	return h.Sum(nil), nil
}

// pssSalt resolves salt_length for an RSA key of the given size. auto means the largest salt when signing and
// any salt when verifying, as Go's (and Transit's) rsa.PSSSaltLengthAuto.
func (o signOptions) pssSalt(pub *rsa.PublicKey, signing bool) (int, error) {
	maxSalt := (pub.N.BitLen()-1+7)/8 - o.hash.Size() - 2
	switch strings.ToLower(o.saltLength) {
	case "", "auto":
		if signing {
			return maxSalt, nil
		}
		return rsa.PSSSaltLengthAuto, nil
	case "hash":
		return o.hash.Size(), nil
	}
	n, err := strconv.Atoi(o.saltLength)
	if err != nil {
		return 0, callerf("salt_length must be auto, hash or a number, not %q", o.saltLength)
	}
	if n == rsa.PSSSaltLengthEqualsHash {
		return o.hash.Size(), nil
	}
	if n < 0 || n > maxSalt {
		return 0, callerf("salt_length %d is invalid: 0 to %d for this key and hash", n, maxSalt)
	}
	return n, nil
}

func (b *backend) pathSignWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, err := b.signatureItems(ctx, req, d, false)
	if err != nil {
		return respond(err)
	}
	p, tok, _, err := b.usableKey(ctx, req.Storage, d.Get("name").(string), "signing")
	if err != nil {
		return respond(err)
	}
	if !p.Type.Info().Sign {
		return respond(p.Type.Unsupported("signing"))
	}
	opts, oerr := readSignOptions(d, p)
	if oerr != nil {
		return respond(oerr)
	}
	return runBatch(d, req, items, batch, tok.PoolSize(), func(i int, it *batchItem) (signResult, error) {
		if it.Context != "" {
			return signResult{}, callerf("%s", msgNoDerivation)
		}
		input, err := base64.StdEncoding.DecodeString(it.Input)
		if err != nil {
			return signResult{}, callerf("input is not valid base64: %v", err)
		}
		v, ver, err := p.EncryptionVersion(it.KeyVersion)
		if err != nil {
			return signResult{}, err
		}
		if err := p.Private(v, "sign"); err != nil {
			return signResult{}, err
		}
		sig, ierr := sign(ctx, tok, p, ver, opts, input)
		if ierr != nil {
			return signResult{}, ierr
		}
		return signResult{Signature: formatVersioned(v, sig, opts.encoding()), KeyVersion: v}, nil
	}, func(r signResult) map[string]interface{} {
		return map[string]interface{}{"signature": r.Signature, "key_version": r.KeyVersion}
	})
}

// sign makes the signature bytes in the HSM.
func sign(ctx context.Context, tok hsmToken, p *keys.Key, ver *keys.Version, o signOptions, input []byte) ([]byte, error) {
	if p.Type == keys.TypeEd25519 {
		return tok.SignEd25519(ctx, ver.ID(), input)
	}
	digest, ierr := o.digest(input)
	if ierr != nil {
		return nil, ierr
	}
	switch {
	case p.Type.IsRSA() && o.rsaPSS:
		salt, ierr := o.pssSalt(ver.Public().(*rsa.PublicKey), true)
		if ierr != nil {
			return nil, ierr
		}
		return tok.SignPSS(ctx, ver.ID(), o.hash, digest, salt)
	case p.Type.IsRSA():
		return tok.SignPKCS1v15(ctx, ver.ID(), o.hash, digest)
	}
	raw, err := tok.SignECDSA(ctx, ver.ID(), digest)
	if err != nil {
		return nil, err
	}
	if o.jws {
		return raw, nil
	}
	return ecdsaASN1(raw)
}

// ecdsaASN1 turns the token's r‖s into the ASN.1 SEQUENCE Transit and X.509 use.
func ecdsaASN1(raw []byte) ([]byte, error) {
	half := len(raw) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(raw[:half]), new(big.Int).SetBytes(raw[half:])})
}

// signatureItems reads the single request or the batch for sign, verify and hmac.
func (b *backend) signatureItems(ctx context.Context, req *logical.Request, d *framework.FieldData, verify bool) ([]batchItem, bool, error) {
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, false, err
	}
	items, err := readBatch(d, cfg.MaxBatchSize)
	if err != nil {
		return nil, false, err
	}
	if items != nil {
		for i := range items {
			if items[i].err == "" && !items[i].hasInput {
				items[i].err = fmt.Sprintf("batch_input[%d]: missing input", i)
			}
		}
		return items, true, nil
	}
	it := singleItem(d)
	if !it.hasInput {
		return nil, false, callerf("missing input")
	}
	if verify && it.Signature == "" && it.HMAC == "" {
		return nil, false, callerf("signature or hmac is required")
	}
	return []batchItem{it}, false, nil
}

func (b *backend) pathVerifyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, err := b.signatureItems(ctx, req, d, true)
	if err != nil {
		return respond(err)
	}
	p, tok, _, err := b.usableKey(ctx, req.Storage, d.Get("name").(string), "verification")
	if err != nil {
		return respond(err)
	}
	if p, err = b.adoptNamed(ctx, req, p, items); err != nil {
		return respond(err)
	}
	// Signature options are read once, before the items (which may run in parallel), if any item needs them.
	var opts signOptions
	var oerr error
	for _, it := range items {
		if it.Signature != "" && p.Type.Info().Sign {
			opts, oerr = readSignOptions(d, p)
			break
		}
	}
	return runBatch(d, req, items, batch, tok.PoolSize(), func(i int, it *batchItem) (verifyResult, error) {
		if it.Context != "" {
			return verifyResult{}, callerf("%s", msgNoDerivation)
		}
		input, err := base64.StdEncoding.DecodeString(it.Input)
		if err != nil {
			return verifyResult{}, callerf("input is not valid base64: %v", err)
		}
		switch {
		case it.HMAC != "" && it.Signature != "":
			return verifyResult{}, callerf("give signature or hmac, not both")
		case it.HMAC != "":
			if err := hmacReserved(p); err != nil {
				return verifyResult{}, err
			}
			valid, ierr := b.verifyHMAC(ctx, req, tok, p, hmacHash(d), it.HMAC, input)
			return verifyResult{Valid: valid}, ierr
		case it.Signature == "":
			return verifyResult{}, callerf("missing signature or hmac")
		case !p.Type.Info().Sign:
			return verifyResult{}, p.Type.Unsupported("signature verification")
		}
		if oerr != nil {
			return verifyResult{}, oerr
		}
		valid, ierr := verifySignature(p, opts, it.Signature, input)
		return verifyResult{Valid: valid}, ierr
	}, func(r verifyResult) map[string]interface{} { return map[string]interface{}{"valid": r.Valid} })
}

// verifySignature checks a signature with the version's public key. Checking needs no secret, so the standard
// library does it.
func verifySignature(p *keys.Key, o signOptions, signature string, input []byte) (bool, error) {
	v, sig, err := parseVersioned("signature", signature, o.encoding())
	if err != nil {
		return false, callerf("%s", err.Error())
	}
	ver, err := p.DecryptionVersion(v, "signature")
	if err != nil {
		return false, err
	}
	if p.Type == keys.TypeEd25519 {
		return ed25519.Verify(ver.Public().(ed25519.PublicKey), input, sig), nil
	}
	digest, ierr := o.digest(input)
	if ierr != nil {
		return false, ierr
	}
	switch pub := ver.Public().(type) {
	case *rsa.PublicKey:
		if !o.rsaPSS {
			return rsa.VerifyPKCS1v15(pub, o.hash, digest, sig) == nil, nil
		}
		salt, ierr := o.pssSalt(pub, false)
		if ierr != nil {
			return false, ierr
		}
		return rsa.VerifyPSS(pub, o.hash, digest, sig, &rsa.PSSOptions{SaltLength: salt}) == nil, nil
	case *ecdsa.PublicKey:
		if !o.jws {
			return ecdsa.VerifyASN1(pub, digest, sig), nil
		}
		size := (pub.Curve.Params().BitSize + 7) / 8
		if len(sig) != 2*size {
			return false, nil
		}
		return ecdsa.Verify(pub, digest, new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])), nil
	}
	return false, fmt.Errorf("version %d of key %q has no public key", v, p.Name)
}

// hmacHash is the hash named by the hmac request (algorithm, or hash_algorithm on verify, or the URL).
func hmacHash(d *framework.FieldData) string {
	if v, ok := d.Raw["urlalgorithm"].(string); ok && v != "" {
		return v
	}
	if v, ok := d.GetOk("algorithm"); ok {
		return v.(string)
	}
	if _, ok := d.Schema["hash_algorithm"]; ok {
		return d.Get("hash_algorithm").(string)
	}
	return "sha2-256"
}

// hmacReserved refuses a caller's HMAC (hmac, verify with hmac) with a key whose HMAC secrets serve PKCS#1 v1.5
// implicit rejection: an HMAC of label ‖ ciphertext is the derivation key of that ciphertext's synthetic message,
// and whoever knows the synthetic message tells valid padding from invalid (the message, or its length through
// rewrap's "message too long"), which is Bleichenbacher's oracle.
func hmacReserved(p *keys.Key) error {
	if p.AllowPKCS1v15Decryption {
		return callerf("key %q serves no hmac or verify with hmac: allow_pkcs1v15_decryption=true reserves its versions' HMAC secrets for PKCS#1 v1.5 implicit rejection, whose messages an HMAC under them would predict", p.Name)
	}
	return nil
}

// computeHMAC computes the HMAC of input with version v's HMAC secret, making the secret first if the version
// has none yet (under the key's lock, where the version's state is checked again). forCaller: the HMAC is a
// caller's (hmac, verify), refused once the key reserves its secrets (hmacReserved), also when it opts in while
// this request runs; otherwise it is the engine's own (implicit rejection).
func (b *backend) computeHMAC(ctx context.Context, req *logical.Request, tok hsmToken, p *keys.Key, v int, ver *keys.Version, hashName string, input []byte, forCaller bool) ([]byte, error) {
	h, ok := signHashes[hashName]
	if !ok {
		return nil, callerf("unsupported hash algorithm %q", hashName)
	}
	if err := p.Private(v, "compute an HMAC"); err != nil {
		return nil, err
	}
	if ver.HMACDeferred {
		if _, err := b.keys.Update(ctx, req.Storage, p.Name, actorOf(req), func(tx *keys.Tx) error {
			if forCaller {
				if err := hmacReserved(tx.Key); err != nil {
					return err
				}
			}
			return tx.EnsureHMACSecret(v)
		}); err != nil {
			return nil, err
		}
	}
	return tok.HMAC(ctx, ver.ID(), h, input)
}

// verifyHMAC recomputes the HMAC in the HSM and compares in constant time.
func (b *backend) verifyHMAC(ctx context.Context, req *logical.Request, tok hsmToken, p *keys.Key, hashName, given string, input []byte) (bool, error) {
	v, mac, err := parseVersioned("hmac", given, base64.StdEncoding)
	if err != nil {
		return false, callerf("%s", err.Error())
	}
	ver, err := p.DecryptionVersion(v, "hmac")
	if err != nil {
		return false, err
	}
	want, err := b.computeHMAC(ctx, req, tok, p, v, ver, hashName, input, true)
	if err != nil {
		return false, err
	}
	return hmac.Equal(want, mac), nil
}

func (b *backend) pathHMACWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, err := b.signatureItems(ctx, req, d, false)
	if err != nil {
		return respond(err)
	}
	p, tok, _, err := b.usableKey(ctx, req.Storage, d.Get("name").(string), "HMAC")
	if err != nil {
		return respond(err)
	}
	if err := hmacReserved(p); err != nil {
		return respond(err)
	}
	hashName := hmacHash(d)
	return runBatch(d, req, items, batch, tok.PoolSize(), func(i int, it *batchItem) (hmacResult, error) {
		input, err := base64.StdEncoding.DecodeString(it.Input)
		if err != nil {
			return hmacResult{}, callerf("input is not valid base64: %v", err)
		}
		v, ver, err := p.EncryptionVersion(it.KeyVersion)
		if err != nil {
			return hmacResult{}, err
		}
		mac, ierr := b.computeHMAC(ctx, req, tok, p, v, ver, hashName, input, true)
		if ierr != nil {
			return hmacResult{}, ierr
		}
		return hmacResult{HMAC: formatVersioned(v, mac, base64.StdEncoding)}, nil
	}, func(r hmacResult) map[string]interface{} { return map[string]interface{}{"hmac": r.HMAC} })
}
