package cmk

import (
	"context"
	"encoding/base64"
	"fmt"
	"runtime"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

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

// readSignOptions reads a request's signature settings (what a version's type refuses, Ed25519 with prehashed, is refused per item).
func readSignOptions(d *framework.FieldData) (keys.SignOptions, error) {
	o := keys.SignOptions{Prehashed: d.Get("prehashed").(bool), SaltLength: d.Get("salt_length").(string)}
	name := d.Get("hash_algorithm").(string)
	if v, ok := d.GetOk("algorithm"); ok {
		name = v.(string)
	}
	if v, ok := d.Raw["urlalgorithm"].(string); ok && v != "" {
		name = v
	}
	h, ok := keys.HashNamed(name)
	if !ok {
		return o, callerf("unsupported hash algorithm %q", name)
	}
	o.Hash = h
	switch d.Get("marshaling_algorithm").(string) {
	case "asn1":
	case "jws":
		o.JWS = true
	default:
		return o, callerf("marshaling_algorithm must be asn1 or jws")
	}
	switch v, _ := d.Get("signature_algorithm").(string); v {
	case "", "pss":
		o.PSS = true
	case "pkcs1v15":
	default:
		return o, callerf("signature_algorithm must be pss or pkcs1v15, not %q", v)
	}
	return o, nil
}

func (b *backend) pathSignWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, err := b.signatureItems(ctx, req, d, false)
	if err != nil {
		return respond(err)
	}
	u, err := b.keys.Use(ctx, req.Storage, d.Get("name").(string), b.callerOf(req), keys.OpSign, len(items))
	if err != nil {
		return respond(err)
	}
	opts, err := readSignOptions(d)
	if err != nil {
		return respond(err)
	}
	return runBatch(d, req, items, batch, u.Sessions(), func(i int, it *batchItem) (signResult, error) {
		if it.Context != "" {
			return signResult{}, callerf("%s", msgNoDerivation)
		}
		input, err := base64.StdEncoding.DecodeString(it.Input)
		if err != nil {
			return signResult{}, callerf("input is not valid base64: %v", err)
		}
		sig, v, err := u.Sign(ctx, input, it.KeyVersion, opts)
		return signResult{Signature: sig, KeyVersion: v}, err
	}, func(r signResult) map[string]interface{} {
		return map[string]interface{}{"signature": r.Signature, "key_version": r.KeyVersion}
	})
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

// verifyKey is the key a verify request checks against. Only an HMAC's verification uses key material (the HMAC
// is computed again with the version's secret), so a request with HMACs passes the door (OpVerify) once for
// them; a signature is checked with the version's public key, which needs no admission. Versions the items name
// that storage does not know are adopted as for decrypt.
func (b *backend) verifyKey(ctx context.Context, req *logical.Request, name string, items []batchItem) (*keys.Key, *keys.Use, error) {
	hmacs := 0
	for _, it := range items {
		if it.err == "" && it.HMAC != "" {
			hmacs++
		}
	}
	if hmacs == 0 {
		k, err := b.keys.Usable(ctx, req.Storage, name, keys.OpVerify)
		if err != nil {
			return nil, nil, err
		}
		k, err = b.keys.AdoptNamed(ctx, req.Storage, k, newestNamed(items), len(items), actorOf(req))
		return k, nil, err
	}
	u, err := b.keys.Use(ctx, req.Storage, name, b.callerOf(req), keys.OpVerify, hmacs)
	if err != nil {
		return nil, nil, err
	}
	if err := u.AdoptNamed(ctx, newestNamed(items), len(items)); err != nil {
		return nil, nil, err
	}
	return u.Key(), u, nil
}

func (b *backend) pathVerifyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, err := b.signatureItems(ctx, req, d, true)
	if err != nil {
		return respond(err)
	}
	k, u, err := b.verifyKey(ctx, req, d.Get("name").(string), items)
	if err != nil {
		return respond(err)
	}
	// Signature options are read once, before the items (which may run in parallel), if any item needs them.
	var opts keys.SignOptions
	var oerr error
	for _, it := range items {
		if it.Signature != "" && k.Type.Info().Sign {
			opts, oerr = readSignOptions(d)
			break
		}
	}
	workers := runtime.GOMAXPROCS(0) // public-key checks: no HSM session involved
	if u != nil {
		workers = u.Sessions()
	}
	return runBatch(d, req, items, batch, workers, func(i int, it *batchItem) (verifyResult, error) {
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
			valid, err := u.VerifyHMAC(ctx, it.HMAC, input, hmacHash(d))
			return verifyResult{Valid: valid}, err
		case it.Signature == "":
			return verifyResult{}, callerf("missing signature or hmac")
		case !k.Type.Info().Sign:
			return verifyResult{}, k.Type.Unsupported("signature verification")
		}
		if oerr != nil {
			return verifyResult{}, oerr
		}
		valid, err := b.keys.VerifySignature(ctx, req.Storage, k, it.Signature, input, opts)
		return verifyResult{Valid: valid}, err
	}, func(r verifyResult) map[string]interface{} { return map[string]interface{}{"valid": r.Valid} })
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

func (b *backend) pathHMACWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, err := b.signatureItems(ctx, req, d, false)
	if err != nil {
		return respond(err)
	}
	u, err := b.keys.Use(ctx, req.Storage, d.Get("name").(string), b.callerOf(req), keys.OpHMAC, len(items))
	if err != nil {
		return respond(err)
	}
	hashName := hmacHash(d)
	return runBatch(d, req, items, batch, u.Sessions(), func(i int, it *batchItem) (hmacResult, error) {
		input, err := base64.StdEncoding.DecodeString(it.Input)
		if err != nil {
			return hmacResult{}, callerf("input is not valid base64: %v", err)
		}
		mac, err := u.HMAC(ctx, input, it.KeyVersion, hashName)
		return hmacResult{HMAC: mac}, err
	}, func(r hmacResult) map[string]interface{} { return map[string]interface{}{"hmac": r.HMAC} })
}
