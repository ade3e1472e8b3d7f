package cmk

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
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
// carry a ciphertext), and the key's use for op, admitted once for all the items, knowing the versions they name.
func (b *backend) ciphertextRequest(ctx context.Context, req *logical.Request, d *framework.FieldData, op keys.Operation) (
	items []batchItem, batch bool, u *keys.Use, err error) {
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, false, nil, err
	}
	if items, err = readBatch(d, cfg.MaxBatchSize); err != nil {
		return nil, false, nil, err
	}
	batch = items != nil
	if !batch {
		it := singleItem(d)
		if !it.hasCiphertext {
			return nil, false, nil, callerf("missing ciphertext to decrypt")
		}
		items = []batchItem{it}
	}
	if u, err = b.keys.Use(ctx, req.Storage, d.Get("name").(string), b.callerOf(req), op, len(items)); err != nil {
		return nil, false, nil, err
	}
	return items, batch, u, u.AdoptNamed(ctx, newestNamed(items), len(items))
}

// newestNamed is the newest version the items' ciphertexts, signatures or HMACs name: one newer than storage knows
// is adopted from the token if the rule allows (keys.Manager.AdoptNamed).
func newestNamed(items []batchItem) int {
	newest := 0
	for _, it := range items {
		for _, s := range []string{it.Ciphertext, it.Signature, it.HMAC} {
			newest = max(newest, keys.NamedVersion(s))
		}
	}
	return newest
}

// handle is how every operation that takes fields is registered (gcpkms's withFieldValidator): it refuses a field
// that neither the path nor Transit's path of the same name knows, so that a typo (typ=rsa-2048, plaintxt,
// asociated_data) never falls back to a default or drops a protection, then runs fn and turns an error fn
// returns as it is into the caller's response (respond). transitOnly lists the fields Transit's path knows and
// this one does not: accepted and ignored, or refused when set if transitUnsupported names them.
//
// A request that asks for a key (keys.Manager.Usable, which every use passes) is counted once it is answered, by
// operation, key type and the status Vault answers it with (metrics.go): denials and failures included.
func handle(fn framework.OperationFunc, transitOnly ...string) framework.OperationFunc {
	run := func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
		if err := refuseUnknownFields(req, d, transitOnly...); err != nil {
			return respond(err)
		}
		resp, err := fn(ctx, req, d)
		var coded logical.HTTPCodedError
		if err != nil && resp == nil && !errors.As(err, &coded) {
			return respond(err)
		}
		return resp, err
	}
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
		ctx, note := withRequestNote(ctx)
		resp, err := run(ctx, req, d)
		note.warn(resp)
		note.count(req, resp, err)
		return resp, err
	}
}

// fieldRefusal is the message that refuses a request field, naming why.
type fieldRefusal = string

// transitUnsupported are Transit fields accepted by name and refused when set: what they ask for cannot be done
// with this engine's keys.
var transitUnsupported = map[string]fieldRefusal{
	"iv":                "iv is not supported: the HSM draws every nonce (Transit's iv applies to managed keys only)",
	"signature_context": "signature_context is not supported: Ed25519ctx signatures are not offered",
	"cmac":              "cmac is not supported: CMAC keys are not offered",
	"mac_length":        "mac_length is not supported: CMAC keys are not offered",
}

// notAField explains fields that callers try and that must never be fields.
var notAField = map[string]fieldRefusal{
	"adopt_unverified": "adopt_unverified is not a field: adoption on an operator's word is the sudo path " + adoptUnverifiedPath + " (mount-wide) or " + adoptUnverifiedPath + "/<key>",
	"library":          "library is not a field: the PKCS#11 module's path comes only from " + LibraryEnv + " in the plugin's environment, set by the operator when registering the plugin (vault plugin register -env=" + LibraryEnv + "=…)",
}

// refuseUnknownFields refuses a request field that neither the path nor Transit's path of the same name knows
// (see handle), and a Transit field in transitOnly that asks for what cannot be done.
func refuseUnknownFields(req *logical.Request, d *framework.FieldData, transitOnly ...string) error {
	var unknown []string
	for name, v := range req.Data {
		if _, ok := d.Schema[name]; ok {
			continue
		}
		if why, ok := notAField[name]; ok {
			return callerf("%s", why)
		}
		if !slices.Contains(transitOnly, name) {
			unknown = append(unknown, name)
		} else if why, ok := transitUnsupported[name]; ok && isSet(v) {
			return callerf("%s", why)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	sort.Strings(unknown)
	return callerf("unknown field %s for %s; its fields are %s", strings.Join(unknown, ", "), req.Path, strings.Join(bodyFields(d.Schema), ", "))
}

// bodyFields are the names of a path's fields a request body may carry, sorted.
func bodyFields(schema map[string]*framework.FieldSchema) []string {
	known := make([]string, 0, len(schema))
	for name := range schema {
		if name != "name" && !strings.HasPrefix(name, "url") { // the URL's, not the body's
			known = append(known, name)
		}
	}
	sort.Strings(known)
	return known
}

// isSet says whether a field's value asks for something: not null, empty, false or zero.
func isSet(v interface{}) bool {
	switch x := v.(type) {
	case nil:
		return false
	case string:
		return x != ""
	case bool:
		return x
	case json.Number:
		return x.String() != "0"
	case float64:
		return x != 0
	case int:
		return x != 0
	}
	return true
}
