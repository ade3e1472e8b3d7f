package cmk

import (
	"context"
	"encoding/base64"
	"maps"
	"slices"
	"sort"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// What the data-plane paths (encrypt, decrypt, rewrap, datakey, sign, verify, hmac) share: their common fields,
// the key a request uses, and the fields of a request that is not a batch.

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
		Type:          framework.TypeString,
		AllowedValues: []interface{}{"oaep", "pkcs1v15"},
		Description:   `RSA keys only: "oaep" (default, with SHA-256) or "pkcs1v15".`,
	}
	fieldNonce = &framework.FieldSchema{
		Type:        framework.TypeString,
		Description: "Transit's convergent-encryption nonce. Not supported: " + msgNoConvergent + ".",
	}
)

func (b *backend) keyExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	k, err := b.keys.Get(ctx, req.Storage, d.Get("name").(string))
	return k != nil, err
}

// usableKey returns the key and the HSM for an operation on key name; role names the key in the error for a
// missing key, as Transit does ("encryption", "signing", "HMAC").
func (b *backend) usableKey(ctx context.Context, s logical.Storage, name, role string) (*keys.Key, hsmToken, *nonceSource, error) {
	k, err := b.keys.Get(ctx, s, name)
	if err != nil {
		return nil, nil, nil, err
	}
	if k == nil {
		return nil, nil, nil, callerf("%s key %q not found", role, name)
	}
	if err := k.Usable(); err != nil {
		return nil, nil, nil, err
	}
	tok, nonces, err := b.getToken(ctx, s)
	if err != nil {
		return nil, nil, nil, err
	}
	return k, tok, nonces, nil
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
	it.DecryptPadding, _ = get("decrypt_padding_scheme")
	it.EncryptPadding, _ = get("encrypt_padding_scheme")
	it.Input, it.hasInput = get("input")
	it.Signature, _ = get("signature")
	it.HMAC, _ = get("hmac")
	if _, ok := d.Schema["key_version"]; ok {
		it.KeyVersion = d.Get("key_version").(int)
	}
	return it
}

// checkCommon refuses what no item may carry with HSM keys and decodes the associated data.
func checkCommon(it *batchItem) ([]byte, error) {
	if it.err != "" {
		return nil, callerf("%s", it.err)
	}
	if it.Context != "" {
		return nil, callerf("%s", msgNoDerivation)
	}
	if it.Nonce != "" {
		return nil, callerf("%s", msgNoConvergent)
	}
	aad, err := base64.StdEncoding.DecodeString(it.AssociatedData)
	if err != nil {
		return nil, callerf("associated_data is not valid base64: %v", err)
	}
	return aad, nil
}

// ciphertextRequest reads what decrypt and rewrap share: the batch, or the single request's item (which must
// carry a ciphertext), and the key with its HSM.
func (b *backend) ciphertextRequest(ctx context.Context, req *logical.Request, d *framework.FieldData) (
	items []batchItem, batch bool, k *keys.Key, tok hsmToken, nonces *nonceSource, err error) {
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, false, nil, nil, nil, err
	}
	if items, err = readBatch(d, cfg.MaxBatchSize); err != nil {
		return nil, false, nil, nil, nil, err
	}
	batch = items != nil
	if !batch {
		it := singleItem(d)
		if !it.hasCiphertext {
			return nil, false, nil, nil, nil, callerf("missing ciphertext to decrypt")
		}
		items = []batchItem{it}
	}
	if k, tok, nonces, err = b.usableKey(ctx, req.Storage, d.Get("name").(string), "encryption"); err != nil {
		return nil, false, nil, nil, nil, err
	}
	k, err = b.adoptNamed(ctx, req, k, items)
	return items, batch, k, tok, nonces, err
}

// adoptNamed makes k know the newest version the items' ciphertexts, signatures or HMACs name. One newer than
// storage knows may be on the token (storage restored from an older snapshot): it is adopted if the rule allows
// (internal/keys/adopt.go), so that what clients were given before the restore still decrypts and verifies. A
// version that is nowhere leaves k as it is, and the item fails as naming an unknown version.
func (b *backend) adoptNamed(ctx context.Context, req *logical.Request, k *keys.Key, items []batchItem) (*keys.Key, error) {
	newest := 0
	for _, it := range items {
		for _, s := range []string{it.Ciphertext, it.Signature, it.HMAC} {
			if v, _, err := parseVersioned("", s, base64.StdEncoding); err == nil && v > newest {
				newest = v
			}
		}
	}
	if newest <= k.LatestVersion {
		return k, nil
	}
	nk, adopted, err := b.keys.Adopt(ctx, req.Storage, k.Name, newest, actorOf(req))
	if err != nil {
		if len(items) == 1 {
			return nil, err // the one item's answer: why its version cannot be served (409, 503)
		}
		// In a batch only the items naming versions after the latest fail (as unknown versions); the others
		// are served.
		b.logger.Warn("versions named by a batch could not be adopted from the HSM", "key", k.Name, "through", newest, "error", err)
		if nk == nil {
			return k, nil
		}
	}
	if len(adopted) > 0 {
		b.logger.Warn("versions adopted from the HSM: a request named them and storage did not know them (restored from an older snapshot?)",
			"key", k.Name, "versions", adopted)
	}
	return nk, nil
}

// refuseUnknownFields refuses a request field that neither the path nor Transit's path of the same name knows, so
// that a typo (typ=rsa-2048) never silently falls back to a default. transitOnly lists the fields Transit knows
// that this path accepts and ignores.
func refuseUnknownFields(req *logical.Request, d *framework.FieldData, transitOnly ...string) error {
	var unknown []string
	for name := range req.Data {
		if _, ok := d.Schema[name]; !ok && !slices.Contains(transitOnly, name) {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	sort.Strings(unknown)
	known := make([]string, 0, len(d.Schema))
	for name := range d.Schema {
		if name != "name" { // the URL's, not the body's
			known = append(known, name)
		}
	}
	sort.Strings(known)
	return callerf("unknown field %s for %s; its fields are %s", strings.Join(unknown, ", "), req.Path, strings.Join(known, ", "))
}
