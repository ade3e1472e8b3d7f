package cmk

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha3"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"maps"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// Transit-compatible result items; field names and omitempty exactly as Transit's.
type encryptResult struct {
	Ciphertext string `json:"ciphertext,omitempty"`
	KeyVersion int    `json:"key_version,omitempty"`
	Error      string `json:"error,omitempty"`
	Reference  string `json:"reference"`
}

type decryptResult struct {
	Plaintext string `json:"plaintext"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
}

func (r *encryptResult) setOutcome(ref, err string) { r.Reference, r.Error = ref, err }
func (r *decryptResult) setOutcome(ref, err string) { r.Reference, r.Error = ref, err }

func singleEncryptResult(r encryptResult) map[string]interface{} {
	return map[string]interface{}{"ciphertext": r.Ciphertext, "key_version": r.KeyVersion}
}

func (b *backend) pathCrypto() []*framework.Path {
	return []*framework.Path{b.pathEncrypt(), b.pathDecrypt(), b.pathRewrap(), b.pathDatakey(), b.pathRandom(), b.pathHash(),
		b.pathSign(), b.pathVerify(), b.pathHMAC()}
}

func withBatch(fields map[string]*framework.FieldSchema) map[string]*framework.FieldSchema {
	maps.Copy(fields, batchFields())
	return fields
}

var (
	fieldName = &framework.FieldSchema{Type: framework.TypeString, Required: true, Description: "Name of the key."}
	fieldAAD  = &framework.FieldSchema{
		Type:        framework.TypeString,
		Description: "Base64 associated data, authenticated with the ciphertext (AES-GCM AAD); decryption needs the same value.",
	}
	fieldContext = &framework.FieldSchema{
		Type:        framework.TypeString,
		Description: "Transit's key derivation context. Not supported: " + msgNoDerivation + ".",
	}
	fieldPadding = &framework.FieldSchema{
		Type:        framework.TypeString,
		Description: `RSA keys only: "oaep" (default, with SHA-256) or "pkcs1v15".`,
	}
	fieldNonce = &framework.FieldSchema{
		Type:        framework.TypeString,
		Description: "Transit's convergent-encryption nonce. Not supported: " + msgNoConvergent + ".",
	}
)

func (b *backend) pathEncrypt() *framework.Path {
	return &framework.Path{
		Pattern:      "encrypt/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "encrypt"},
		Fields: withBatch(map[string]*framework.FieldSchema{
			"name":      fieldName,
			"plaintext": {Type: framework.TypeString, Description: "Base64 plaintext to encrypt."},
			"key_version": {
				Type:        framework.TypeInt,
				Description: "Version to encrypt with: 0 (latest) or at least min_encryption_version.",
			},
			"associated_data": fieldAAD,
			"context":         fieldContext,
			"nonce":           fieldNonce,
			"padding_scheme":  fieldPadding,
			"type": {
				Type:        framework.TypeString,
				Default:     string(typeAES256GCM96),
				Description: "Type of the key to create when it does not exist (upsert): aes256-gcm96 or aes128-gcm96.",
			},
			"convergent_encryption": {
				Type:        framework.TypeBool,
				Description: "For upsert. Only false is accepted: " + msgNoConvergent + ".",
			},
		}),
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.CreateOperation: &framework.PathOperation{Callback: b.pathEncryptWrite, Summary: "Encrypt, creating the key first if it does not exist (needs create capability)."},
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathEncryptWrite, Summary: "Encrypt a plaintext or a batch of plaintexts in the HSM."},
		},
		ExistenceCheck:  b.keyExists,
		HelpSynopsis:    "Encrypt a base64 plaintext, or a batch of them, with the named key inside the HSM.",
		HelpDescription: "AES-GCM with a random 96-bit nonce, computed by the HSM. The ciphertext is Transit's vault:v<N>:base64(nonce‖ciphertext‖tag). As in Transit, a missing key is created unless config/keys disables upsert.",
	}
}

func (b *backend) keyExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	p, err := b.policy(ctx, req.Storage, d.Get("name").(string))
	return p != nil, err
}

// usableKey returns the key and the HSM for an operation, or the response to give instead.
func (b *backend) usableKey(ctx context.Context, s logical.Storage, name string) (*keyPolicy, hsmToken, *nonceSource, *itemError) {
	p, err := b.policy(ctx, s, name)
	if err != nil {
		return nil, nil, nil, &itemError{class: errInternal, msg: err.Error()}
	}
	if p == nil {
		return nil, nil, nil, userError("encryption key not found")
	}
	if err := p.usable(); err != nil {
		return nil, nil, nil, userError("%s", err.Error())
	}
	tok, nonces, err := b.getToken(ctx, s)
	if err != nil {
		return nil, nil, nil, hsmItemError(err)
	}
	return p, tok, nonces, nil
}

// singleItem reads the non-batch fields into one item.
func singleItem(d *framework.FieldData) batchItem {
	it := batchItem{}
	get := func(field string) (string, bool) {
		if _, ok := d.Schema[field]; !ok {
			return "", false
		}
		v, ok := d.GetOk(field)
		if !ok {
			return "", false
		}
		return v.(string), true
	}
	it.Plaintext, it.hasPlaintext = get("plaintext")
	it.Ciphertext, it.hasCiphertext = get("ciphertext")
	it.AssociatedData, _ = get("associated_data")
	it.Context, _ = get("context")
	it.Nonce, _ = get("nonce")
	it.Reference, _ = get("reference")
	it.PaddingScheme, _ = get("padding_scheme")
	it.Input, it.hasInput = get("input")
	it.Signature, _ = get("signature")
	it.HMAC, _ = get("hmac")
	if _, ok := d.Schema["key_version"]; ok {
		it.KeyVersion = d.Get("key_version").(int)
	}
	return it
}

// checkCommon refuses what no item may carry with HSM keys and decodes the associated data.
func checkCommon(it *batchItem) ([]byte, *itemError) {
	if it.err != "" {
		return nil, userError("%s", it.err)
	}
	if it.Context != "" {
		return nil, userError("%s", msgNoDerivation)
	}
	if it.Nonce != "" {
		return nil, userError("%s", msgNoConvergent)
	}
	aad, err := base64.StdEncoding.DecodeString(it.AssociatedData)
	if err != nil {
		return nil, userError("associated_data is not valid base64: %v", err)
	}
	return aad, nil
}

// encrypt seals plaintext under version requested (0 = latest) of p: AES-GCM in the HSM, or RSA with the
// version's public key (no secret is involved, so the standard library does it; decryption is in the HSM).
func (b *backend) encrypt(ctx context.Context, req *logical.Request, tok hsmToken, nonces *nonceSource, p *keyPolicy, it *batchItem, plaintext, aad []byte) (string, int, *itemError) {
	s := req.Storage
	if !p.Type.info().encrypt {
		return "", 0, userError("%s", p.Type.unsupported("encryption"))
	}
	v, ver, err := p.encryptionVersion(it.KeyVersion)
	if err != nil {
		return "", 0, userError("%s", err.Error())
	}
	if p.Type.isRSA() {
		if len(aad) > 0 {
			return "", 0, userError("associated_data provided for non-AEAD key type %s", p.Type)
		}
		pub := ver.pub.(*rsa.PublicKey)
		var ct []byte
		switch it.PaddingScheme {
		case "", "oaep":
			ct, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, plaintext, nil)
		case "pkcs1v15":
			ct, err = rsa.EncryptPKCS1v15(rand.Reader, pub, plaintext)
		default:
			return "", 0, userError("padding_scheme must be oaep or pkcs1v15, not %q", it.PaddingScheme)
		}
		if err != nil {
			return "", 0, userError("cannot encrypt with %s: %v", p.Type, err)
		}
		return formatVersioned(v, ct, base64.StdEncoding), v, nil
	}
	if it.PaddingScheme != "" {
		return "", 0, userError("padding_scheme applies to RSA keys only, not %s", p.Type)
	}
	last, err := b.countEncryption(ctx, s, p, v)
	switch {
	case errors.Is(err, errVersionExhausted) && (it.KeyVersion == 0 || it.KeyVersion == p.LatestVersion):
		// Another request used the last encryption; rotate (or find it rotated) and use the new version.
		np, rerr := b.rotateForUsage(ctx, s, p.Name, v, actorOf(req))
		switch {
		case errors.Is(rerr, errCallerMistake):
			return "", 0, userError("key version %d has reached its encryption limit and %s", v, strings.TrimPrefix(rerr.Error(), errCallerMistake.Error()+": "))
		case rerr != nil:
			return "", 0, hsmItemError(rerr)
		case np == nil || np.LatestVersion == v:
			return "", 0, userError("key version %d has reached its encryption limit", v)
		}
		retry := *it
		retry.KeyVersion = 0
		return b.encrypt(ctx, req, tok, nonces, np, &retry, plaintext, aad)
	case errors.Is(err, errVersionExhausted):
		return "", 0, userError("key version %d has reached its encryption limit (%d)", v, p.encryptionLimit())
	case err != nil:
		return "", 0, &itemError{class: errInternal, msg: err.Error()}
	}
	if last {
		defer func() {
			if _, err := b.rotateForUsage(ctx, s, p.Name, v, actorOf(req)); err != nil {
				b.logger.Warn("usage rotation failed; the next encryption retries it", "key", p.Name, "version", v, "error", err)
			}
		}()
	}
	nonce, err := nonces.next(ctx)
	if err != nil {
		return "", 0, hsmItemError(err)
	}
	used, sealed, err := tok.EncryptGCM(ctx, ver.id(), nonce, aad, plaintext)
	if err != nil {
		return "", 0, hsmItemError(fmt.Errorf("encrypt with %s v%d: %w", p.Name, v, err))
	}
	return formatCiphertext(v, used, sealed), v, nil
}

// decrypt opens a ciphertext of p in the HSM.
func decrypt(ctx context.Context, tok hsmToken, p *keyPolicy, it *batchItem, aad []byte) ([]byte, *itemError) {
	if !p.Type.info().encrypt {
		return nil, userError("%s", p.Type.unsupported("decryption"))
	}
	if p.Type.isRSA() {
		v, raw, err := parseVersioned("ciphertext", it.Ciphertext, base64.StdEncoding)
		if err != nil {
			return nil, userError("%s", err.Error())
		}
		ver, err := p.decryptionVersion(v)
		if err != nil {
			return nil, userError("%s", err.Error())
		}
		var h crypto.Hash
		switch it.PaddingScheme {
		case "", "oaep":
			h = crypto.SHA256
		case "pkcs1v15":
		default:
			return nil, userError("padding_scheme must be oaep or pkcs1v15, not %q", it.PaddingScheme)
		}
		pt, err := tok.DecryptRSA(ctx, ver.id(), h, raw)
		if err != nil {
			return nil, hsmItemError(fmt.Errorf("decrypt with %s v%d: %w", p.Name, v, err))
		}
		return pt, nil
	}
	v, nonce, sealed, err := parseCiphertext(it.Ciphertext)
	if err != nil {
		return nil, userError("%s", err.Error())
	}
	ver, err := p.decryptionVersion(v)
	if err != nil {
		return nil, userError("%s", err.Error())
	}
	pt, err := tok.DecryptGCM(ctx, ver.id(), nonce, aad, sealed)
	if err != nil {
		return nil, hsmItemError(fmt.Errorf("decrypt with %s v%d: %w", p.Name, v, err))
	}
	return pt, nil
}

func (b *backend) pathEncryptWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	items, bad := readBatch(d, cfg.MaxBatchSize)
	if bad != nil {
		return bad, logical.ErrInvalidRequest
	}
	batch := items != nil
	if !batch {
		it := singleItem(d)
		if !it.hasPlaintext {
			return logical.ErrorResponse("missing plaintext to encrypt"), logical.ErrInvalidRequest
		}
		items = []batchItem{it}
	}
	if req.Operation == logical.CreateOperation {
		if ierr := b.upsert(ctx, req, d, cfg, name, items); ierr != nil {
			return singleError(ierr)
		}
	}
	p, tok, nonces, kerr := b.usableKey(ctx, req.Storage, name)
	if kerr != nil {
		return singleError(kerr)
	}
	return runBatch(d, req, items, batch, tok.PoolSize(), func(i int, it *batchItem) (encryptResult, *itemError) {
		aad, ierr := checkCommon(it)
		if ierr != nil {
			return encryptResult{}, ierr
		}
		if !it.hasPlaintext {
			return encryptResult{}, userError("batch_input[%d]: missing plaintext to encrypt", i)
		}
		pt, err := base64.StdEncoding.DecodeString(it.Plaintext)
		if err != nil {
			return encryptResult{}, userError("plaintext is not valid base64: %v", err)
		}
		defer clear(pt)
		ct, v, ierr := b.encrypt(ctx, req, tok, nonces, p, it, pt, aad)
		return encryptResult{Ciphertext: ct, KeyVersion: v}, ierr
	}, singleEncryptResult)
}

// upsert creates the key on an encrypt to a missing key, as Transit does, unless config/keys forbids it.
func (b *backend) upsert(ctx context.Context, req *logical.Request, d *framework.FieldData, cfg *keysConfig, name string, items []batchItem) *itemError {
	if cfg.DisableUpsert {
		return userError("encryption key not found (upsert is disabled in config/keys)")
	}
	if d.Get("convergent_encryption").(bool) {
		return userError("%s", msgNoConvergent)
	}
	if items[0].Context != "" {
		return userError("%s", msgNoDerivation)
	}
	typ, err := parseKeyType(d.Get("type").(string))
	if err != nil {
		return userError("%s", err.Error())
	}
	if !typ.info().encrypt {
		return userError("key type %s not supported for this operation: encrypt creates aes256-gcm96, aes128-gcm96 or rsa keys", typ)
	}
	p := &keyPolicy{Name: name, Type: typ, AutoRotatePeriod: cfg.AutoRotatePeriod}
	if _, _, err := b.createKey(ctx, req.Storage, p, actorOf(req)); err != nil {
		return hsmItemError(err)
	}
	return nil
}

func (b *backend) pathDecrypt() *framework.Path {
	return &framework.Path{
		Pattern:      "decrypt/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "decrypt"},
		Fields: withBatch(map[string]*framework.FieldSchema{
			"name":            fieldName,
			"ciphertext":      {Type: framework.TypeString, Description: "Ciphertext to decrypt, as returned by encrypt (vault:v<N>:…)."},
			"associated_data": fieldAAD,
			"context":         fieldContext,
			"nonce":           fieldNonce,
			"padding_scheme":  fieldPadding,
		}),
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathDecryptWrite, Summary: "Decrypt a ciphertext or a batch of ciphertexts in the HSM."},
		},
		HelpSynopsis:    "Decrypt a ciphertext, or a batch of them, with the named key inside the HSM.",
		HelpDescription: "Returns the base64 plaintext. A ciphertext that is malformed, tampered with, made by another key or below min_decryption_version is refused with HTTP 400.",
	}
}

// ciphertextRequest reads what decrypt and rewrap share: the batch, or the single request's item (which must
// carry a ciphertext), and the key with its HSM. A non-nil response or error is the answer to give instead.
func (b *backend) ciphertextRequest(ctx context.Context, req *logical.Request, d *framework.FieldData) (
	[]batchItem, bool, *keyPolicy, hsmToken, *nonceSource, *logical.Response, error) {
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, false, nil, nil, nil, nil, err
	}
	items, bad := readBatch(d, cfg.MaxBatchSize)
	if bad != nil {
		return nil, false, nil, nil, nil, bad, logical.ErrInvalidRequest
	}
	batch := items != nil
	if !batch {
		it := singleItem(d)
		if !it.hasCiphertext {
			return nil, false, nil, nil, nil, logical.ErrorResponse("missing ciphertext to decrypt"), logical.ErrInvalidRequest
		}
		items = []batchItem{it}
	}
	p, tok, nonces, kerr := b.usableKey(ctx, req.Storage, d.Get("name").(string))
	if kerr != nil {
		resp, err := singleError(kerr)
		return nil, false, nil, nil, nil, resp, err
	}
	return items, batch, p, tok, nonces, nil, nil
}

func (b *backend) pathDecryptWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, p, tok, _, resp, err := b.ciphertextRequest(ctx, req, d)
	if resp != nil || err != nil {
		return resp, err
	}
	return runBatch(d, req, items, batch, tok.PoolSize(), func(i int, it *batchItem) (decryptResult, *itemError) {
		aad, ierr := checkCommon(it)
		if ierr != nil {
			return decryptResult{}, ierr
		}
		if !it.hasCiphertext {
			return decryptResult{}, userError("batch_input[%d]: missing ciphertext to decrypt", i)
		}
		pt, ierr := decrypt(ctx, tok, p, it, aad)
		if ierr != nil {
			return decryptResult{}, ierr
		}
		defer clear(pt)
		return decryptResult{Plaintext: base64.StdEncoding.EncodeToString(pt)}, nil
	}, func(r decryptResult) map[string]interface{} { return map[string]interface{}{"plaintext": r.Plaintext} })
}

func (b *backend) pathRewrap() *framework.Path {
	return &framework.Path{
		Pattern:      "rewrap/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "rewrap"},
		Fields: withBatch(map[string]*framework.FieldSchema{
			"name":       fieldName,
			"ciphertext": {Type: framework.TypeString, Description: "Ciphertext to re-encrypt under the latest (or given) version."},
			"key_version": {
				Type:        framework.TypeInt,
				Description: "Version to re-encrypt with: 0 (latest) or at least min_encryption_version.",
			},
			"associated_data": fieldAAD,
			"context":         fieldContext,
			"nonce":           fieldNonce,
			"padding_scheme":  fieldPadding,
		}),
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRewrapWrite, Summary: "Re-encrypt ciphertexts under a newer version without returning the plaintext."},
		},
		HelpSynopsis:    "Re-encrypt a ciphertext, or a batch, under the latest (or given) key version.",
		HelpDescription: "Decrypts and encrypts again inside the engine; the plaintext is never returned to the caller. The associated data, if any, must be given and is kept.",
	}
}

func (b *backend) pathRewrapWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, p, tok, nonces, resp, err := b.ciphertextRequest(ctx, req, d)
	if resp != nil || err != nil {
		return resp, err
	}
	return runBatch(d, req, items, batch, tok.PoolSize(), func(i int, it *batchItem) (encryptResult, *itemError) {
		aad, ierr := checkCommon(it)
		if ierr != nil {
			return encryptResult{}, ierr
		}
		if !it.hasCiphertext {
			return encryptResult{}, userError("batch_input[%d]: missing ciphertext to decrypt", i)
		}
		pt, ierr := decrypt(ctx, tok, p, it, aad)
		if ierr != nil {
			return encryptResult{}, ierr
		}
		defer clear(pt)
		ct, v, ierr := b.encrypt(ctx, req, tok, nonces, p, it, pt, aad)
		return encryptResult{Ciphertext: ct, KeyVersion: v}, ierr
	}, singleEncryptResult)
}

func (b *backend) pathDatakey() *framework.Path {
	return &framework.Path{
		Pattern:      "datakey/" + framework.GenericNameRegex("plaintext") + "/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "generate", OperationSuffix: "data-key"},
		Fields: map[string]*framework.FieldSchema{
			"name": fieldName,
			"plaintext": {
				Type:        framework.TypeString,
				Required:    true,
				Description: `"plaintext" returns the data key in plaintext and wrapped; "wrapped" returns only the wrapped form.`,
			},
			"bits": {
				Type:          framework.TypeInt,
				Default:       256,
				AllowedValues: []interface{}{128, 256, 512},
				Description:   "Size of the data key in bits: 128, 256 (default) or 512.",
			},
			"key_version": {
				Type:        framework.TypeInt,
				Description: "Version to wrap with: 0 (latest) or at least min_encryption_version.",
			},
			"associated_data": fieldAAD,
			"context":         fieldContext,
			"nonce":           fieldNonce,
			"padding_scheme":  fieldPadding,
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathDatakeyWrite, Summary: "Generate a data key from the HSM's RNG, wrapped by the named key."},
		},
		HelpSynopsis:    "Generate a data key from the HSM's RNG, wrapped (encrypted) by the named key.",
		HelpDescription: "The data key's bytes come from C_GenerateRandom and are encrypted with the named key in the HSM. The wrapped form decrypts with decrypt/<name> to the base64 data key.",
	}
}

func (b *backend) pathDatakeyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	form := d.Get("plaintext").(string)
	if form != "plaintext" && form != "wrapped" {
		return logical.ErrorResponse("invalid path: must be datakey/plaintext/<name> or datakey/wrapped/<name>"), logical.ErrInvalidRequest
	}
	bits := d.Get("bits").(int)
	if bits != 128 && bits != 256 && bits != 512 {
		return logical.ErrorResponse("bits must be 128, 256 or 512"), logical.ErrInvalidRequest
	}
	it := singleItem(d)
	aad, ierr := checkCommon(&it)
	if ierr != nil {
		return singleError(ierr)
	}
	p, tok, nonces, ierr := b.usableKey(ctx, req.Storage, d.Get("name").(string))
	if ierr != nil {
		return singleError(ierr)
	}
	dataKey, err := tok.GenerateRandom(ctx, bits/8)
	if err != nil {
		return hsmErrorResponse(err)
	}
	defer clear(dataKey)
	ct, v, ierr := b.encrypt(ctx, req, tok, nonces, p, &it, dataKey, aad)
	if ierr != nil {
		return singleError(ierr)
	}
	data := map[string]interface{}{"ciphertext": ct, "key_version": v}
	if form == "plaintext" {
		data["plaintext"] = base64.StdEncoding.EncodeToString(dataKey)
	}
	return &logical.Response{Data: data}, nil
}

// randomMaxBytes is Transit's limit for one random request.
const randomMaxBytes = 128 * 1024

func (b *backend) pathRandom() *framework.Path {
	return &framework.Path{
		Pattern:      "random(/" + framework.GenericNameRegex("source") + ")?" + framework.OptionalParamRegex("urlbytes"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "generate", OperationSuffix: "random"},
		Fields: map[string]*framework.FieldSchema{
			"urlbytes": {Type: framework.TypeString, Description: "Number of bytes, in the URL."},
			"bytes":    {Type: framework.TypeInt, Default: 32, Description: fmt.Sprintf("Number of bytes (1 to %d). Defaults to 32.", randomMaxBytes)},
			"format": {
				Type:          framework.TypeString,
				Default:       "base64",
				AllowedValues: []interface{}{"base64", "hex"},
				Description:   `Encoding of the result: "base64" (default) or "hex".`,
			},
			"source": {
				Type:        framework.TypeString,
				Default:     "platform",
				Description: `Accepted for Transit compatibility ("platform", "seal", "all"): the bytes always come from the HSM's RNG (C_GenerateRandom).`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRandomWrite, Summary: "Random bytes from the HSM's RNG."},
		},
		HelpSynopsis:    "Generate random bytes with the HSM's RNG.",
		HelpDescription: "Returns random bytes from C_GenerateRandom on the configured token, base64 or hex encoded. The paths random/<bytes> and random/<source>/<bytes> work as in Transit.",
	}
}

func (b *backend) pathRandomWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	n := d.Get("bytes").(int)
	source, _ := d.Raw["source"].(string)
	urlBytes, _ := d.Raw["urlbytes"].(string)
	// As in Transit, random/<n> puts the count where the source would be.
	if urlBytes == "" && source != "" && source != "platform" && source != "seal" && source != "all" {
		urlBytes, source = source, ""
	}
	if urlBytes != "" {
		v, err := strconv.Atoi(urlBytes)
		if err != nil {
			return logical.ErrorResponse("error parsing url-set byte count: %q is not a number", urlBytes), logical.ErrInvalidRequest
		}
		n = v
	}
	switch source {
	case "", "platform", "seal", "all":
	default:
		return logical.ErrorResponse("unsupported entropy source %q; must be \"platform\", \"seal\" or \"all\"", source), logical.ErrInvalidRequest
	}
	if n < 1 || n > randomMaxBytes {
		return logical.ErrorResponse("bytes must be between 1 and %d", randomMaxBytes), logical.ErrInvalidRequest
	}
	format := d.Get("format").(string)
	if format != "base64" && format != "hex" {
		return logical.ErrorResponse("unsupported encoding format %q; must be \"hex\" or \"base64\"", format), logical.ErrInvalidRequest
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return hsmErrorResponse(err)
	}
	out, err := tok.GenerateRandom(ctx, n)
	if err != nil {
		return hsmErrorResponse(err)
	}
	enc := base64.StdEncoding.EncodeToString(out)
	if format == "hex" {
		enc = hex.EncodeToString(out)
	}
	return &logical.Response{Data: map[string]interface{}{"random_bytes": enc}}, nil
}

// hashes are Transit's hash algorithms; hashing needs no secret, so it is done in software as Transit does.
var hashes = map[string]func() hash.Hash{
	"sha2-224": sha256.New224,
	"sha2-256": sha256.New,
	"sha2-384": sha512.New384,
	"sha2-512": sha512.New,
	"sha3-224": func() hash.Hash { return sha3.New224() },
	"sha3-256": func() hash.Hash { return sha3.New256() },
	"sha3-384": func() hash.Hash { return sha3.New384() },
	"sha3-512": func() hash.Hash { return sha3.New512() },
}

func (b *backend) pathHash() *framework.Path {
	return &framework.Path{
		Pattern:      "hash" + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "hash"},
		Fields: map[string]*framework.FieldSchema{
			"input":        {Type: framework.TypeString, Description: "Base64 input to hash."},
			"urlalgorithm": {Type: framework.TypeString, Description: "Algorithm, in the URL."},
			"algorithm": {
				Type:        framework.TypeString,
				Default:     "sha2-256",
				Description: "sha2-224, sha2-256 (default), sha2-384, sha2-512, sha3-224, sha3-256, sha3-384 or sha3-512.",
			},
			"format": {
				Type:          framework.TypeString,
				Default:       "hex",
				AllowedValues: []interface{}{"hex", "base64"},
				Description:   `Encoding of the sum: "hex" (default) or "base64".`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathHashWrite, Summary: "Hash data, as Transit's hash."},
		},
		HelpSynopsis:    "Hash base64 input with a SHA-2 or SHA-3 function.",
		HelpDescription: "As Transit's hash: no key is involved, so it runs in software.",
	}
}

func (b *backend) pathHashWrite(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	raw, ok := d.GetOk("input")
	if !ok {
		return logical.ErrorResponse("input missing"), logical.ErrInvalidRequest
	}
	input, err := base64.StdEncoding.DecodeString(raw.(string))
	if err != nil {
		return logical.ErrorResponse("unable to decode input as base64: %v", err), logical.ErrInvalidRequest
	}
	algorithm := d.Get("algorithm").(string)
	if u, ok := d.Raw["urlalgorithm"].(string); ok && u != "" {
		algorithm = u
	}
	newHash, ok := hashes[algorithm]
	if !ok {
		return logical.ErrorResponse("unsupported algorithm %q", algorithm), logical.ErrInvalidRequest
	}
	format := d.Get("format").(string)
	if format != "hex" && format != "base64" {
		return logical.ErrorResponse("unsupported encoding format %q; must be \"hex\" or \"base64\"", format), logical.ErrInvalidRequest
	}
	h := newHash()
	h.Write(input)
	sum := h.Sum(nil)
	out := hex.EncodeToString(sum)
	if format == "base64" {
		out = base64.StdEncoding.EncodeToString(sum)
	}
	return &logical.Response{Data: map[string]interface{}{"sum": out}}, nil
}
