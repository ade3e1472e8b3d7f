package cmk

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

const wrappingKeyPath = "wrapping_key"

// wrappingKey is the mount's RSA-4096 import key; its private half is on the token.
type wrappingKey struct {
	HSMID     string    `json:"hsm_id"`
	PublicKey string    `json:"public_key"` // PEM, PKIX
	CreatedAt time.Time `json:"created_at"`
}

func readWrappingKey(ctx context.Context, s logical.Storage) (*wrappingKey, error) {
	e, err := s.Get(ctx, wrappingKeyPath)
	if err != nil || e == nil {
		return nil, err
	}
	var w wrappingKey
	if err := e.DecodeJSON(&w); err != nil {
		return nil, err
	}
	return &w, nil
}

// walKindWrappingKey brackets the creation of the mount's wrapping key until it is stored.
const walKindWrappingKey = "hsm_wrapping_key"

// getWrappingKey returns the mount's wrapping key, creating it in the HSM on first use (as Transit does). The
// creation is bracketed by a WAL entry: if the key cannot be stored, nothing is destroyed here (a failed write may
// have stored it), and the rollback, which reads storage first, destroys it only if storage never came to hold it.
func (b *backend) getWrappingKey(ctx context.Context, s logical.Storage, tok hsmToken) (*wrappingKey, error) {
	if w, err := readWrappingKey(ctx, s); err != nil || w != nil {
		return w, err
	}
	b.wrappingMu.Lock()
	defer b.wrappingMu.Unlock()
	if w, err := readWrappingKey(ctx, s); err != nil || w != nil {
		return w, err
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	walID, err := framework.PutWAL(ctx, s, walKindWrappingKey, &keys.WALEntry{HSMID: hex.EncodeToString(id)})
	if err != nil {
		return nil, err
	}
	pub, err := tok.GenerateWrappingKey(ctx, id, fmt.Sprintf("cmk/%s/wrapping_key", b.mountID))
	if err != nil {
		if _, derr := tok.DestroyKeys(ctx, id); derr == nil { // nothing was stored: what the failed call left can go
			_ = framework.DeleteWAL(ctx, s, walID)
		}
		return nil, fmt.Errorf("create the wrapping key in the HSM: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	w := &wrappingKey{HSMID: hex.EncodeToString(id), PublicKey: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), CreatedAt: time.Now().UTC()}
	e, err := logical.StorageEntryJSON(wrappingKeyPath, w)
	if err == nil {
		err = s.Put(ctx, e)
	}
	if err != nil {
		return nil, err // the WAL rollback decides, from storage, whether the key is to go
	}
	_ = framework.DeleteWAL(ctx, s, walID)
	b.logger.Info("wrapping key created in the HSM", "hsm_id", w.HSMID)
	return w, nil
}

// rollbackWrappingKey destroys a wrapping key whose creation never reached storage.
func (b *backend) rollbackWrappingKey(ctx context.Context, s logical.Storage, data interface{}) error {
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	var entry keys.WALEntry
	if err := json.Unmarshal(raw, &entry); err != nil {
		return err
	}
	id, err := hex.DecodeString(entry.HSMID)
	if err != nil || len(id) == 0 {
		return nil
	}
	b.wrappingMu.Lock()
	defer b.wrappingMu.Unlock()
	w, err := readWrappingKey(ctx, s)
	if err != nil || (w != nil && w.HSMID == entry.HSMID) {
		return err
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return err
	}
	n, err := tok.DestroyKeys(ctx, id)
	if err == nil {
		b.logger.Info("WAL rollback destroyed an unstored wrapping key", "objects", n)
	}
	return err
}

func (b *backend) pathWrappingKey() *framework.Path {
	return &framework.Path{
		Pattern:      "wrapping_key",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "wrapping-key"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathWrappingKeyRead, Summary: "The public half of the mount's RSA-4096 import key."},
		},
		HelpSynopsis:    "Read the public key that wraps keys for import.",
		HelpDescription: "Returns, as Transit does, the PEM public key of an RSA-4096 key whose private half lives in the HSM. It is created on first read. `vault transit import` reads it and wraps the key to import with it.",
	}
}

func (b *backend) pathWrappingKeyRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return respond(err)
	}
	w, err := b.getWrappingKey(ctx, req.Storage, tok)
	if err != nil {
		return respond(err)
	}
	return &logical.Response{Data: map[string]interface{}{"public_key": w.PublicKey}}, nil
}

// oaepHashes are Transit's hash_function values.
var oaepHashes = map[string]crypto.Hash{
	"SHA1": crypto.SHA1, "SHA224": crypto.SHA224, "SHA256": crypto.SHA256, "SHA384": crypto.SHA384, "SHA512": crypto.SHA512,
}

func (b *backend) pathImport(version bool) *framework.Path {
	fields := map[string]*framework.FieldSchema{
		"name": fieldName,
		"ciphertext": {
			Type:        framework.TypeString,
			Description: "Base64 of RSA-OAEP(wrapping key, ephemeral AES-256 key) ‖ AES-KWP(ephemeral key, key to import): what `vault transit import` sends.",
			// Wrapped key material: an import_version held for approval shows approvers only its hash and length.
			DisplayAttrs: &framework.DisplayAttributes{Sensitive: true},
		},
		"hash_function": {
			Type:          framework.TypeString,
			Default:       "SHA256",
			AllowedValues: []interface{}{"SHA1", "SHA224", "SHA256", "SHA384", "SHA512"},
			Description:   "Hash of the RSA-OAEP that wraps the ephemeral key: SHA1, SHA224, SHA256 (default), SHA384 or SHA512.",
		},
		"public_key": {Type: framework.TypeString, Description: "PEM public key (PKIX) of an RSA, ECDSA or Ed25519 key, instead of ciphertext: the version holds only this public key, verifies signatures (RSA: also encrypts), and nothing goes to the HSM until its private key is imported with import_version."},
	}
	pattern, summary := "keys/"+framework.GenericNameRegex("name")+"/import", "Import a key: it is unwrapped inside the HSM."
	if version {
		pattern, summary = "keys/"+framework.GenericNameRegex("name")+"/import_version", "Import a new version of an imported key."
		fields["version"] = &framework.FieldSchema{Type: framework.TypeInt, Description: "A public-key-only version whose private key the ciphertext holds: it is imported into that version (checked against its public key). Without it, a private key goes to the latest version if that holds only a public key, else to a new version."}
	} else {
		fields["type"] = &framework.FieldSchema{
			Type:        framework.TypeString,
			Default:     string(keys.TypeAES256GCM96),
			Description: "Type of the imported key: " + strings.Join(keys.TypeNames, ", ") + ". AES and HMAC keys are raw bytes; RSA, ECDSA and Ed25519 keys PKCS#8.",
		}
		fields["allow_rotation"] = &framework.FieldSchema{Type: framework.TypeBool, Description: "Allow keys/<name>/rotate to add generated versions to the imported key."}
		for _, f := range []string{"derived", "exportable", "allow_plaintext_backup"} {
			fields[f] = &framework.FieldSchema{Type: framework.TypeBool, Description: "Only false is accepted."}
		}
		fields["context"] = fieldContext
		fields["auto_rotate_period"] = &framework.FieldSchema{Type: framework.TypeDurationSecond, Description: "Rotate automatically this often (needs allow_rotation): 0 disables, else at least 1h."}
		withOwnership(fields)
	}
	verb := "import"
	if version {
		verb = "import-version"
	}
	return &framework.Path{
		Pattern:      pattern,
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: verb, OperationSuffix: "key"},
		Fields:       fields,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.importHandler(version), "convergent_encryption"), Summary: summary},
		},
		HelpSynopsis:    "Bring your own key: " + summary,
		HelpDescription: importHelp,
	}
}

func (b *backend) importHandler(version bool) framework.OperationFunc {
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
		return b.importKey(ctx, req, d, version)
	}
}

func (b *backend) importKey(ctx context.Context, req *logical.Request, d *framework.FieldData, version bool) (*logical.Response, error) {
	name := d.Get("name").(string)
	if _, ok := d.Raw["convergent_encryption"]; ok {
		return nil, callerf("%s", msgNoConvergent)
	}
	publicPEM := d.Get("public_key").(string)
	raw, ok := d.GetOk("ciphertext")
	switch {
	case publicPEM != "" && ok && raw.(string) != "":
		return nil, callerf("give ciphertext (a wrapped private key) or public_key, not both")
	case publicPEM != "":
		return b.importPublicKey(ctx, req, d, name, publicPEM, version)
	case !ok || raw.(string) == "":
		return nil, callerf("ciphertext is required (or public_key, for a version that only verifies)")
	}
	wrapped, err := base64.StdEncoding.DecodeString(raw.(string))
	if err != nil {
		return nil, callerf("ciphertext is not valid base64: %v", err)
	}
	hashName := strings.ToUpper(d.Get("hash_function").(string))
	h, ok := oaepHashes[hashName]
	if !ok {
		return nil, callerf("unsupported hash_function %q: SHA1, SHA224, SHA256, SHA384 or SHA512", hashName)
	}
	w, err := readWrappingKey(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if w == nil {
		return nil, callerf("no wrapping key yet: read %s first and wrap the key with it", wrappingKeyPath)
	}
	cfg, err := readHSMConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	wrappingID, _ := hex.DecodeString(w.HSMID)
	// The material as the version it goes to is typed (keys.Tx.ImportVersion): a new version takes the key's
	// current type, a public-key-only version's private key its own.
	material := func(vt keys.VersionType) keys.Material {
		return func(ctx context.Context, tok keys.HSM, id []byte, label string) (crypto.PublicKey, string, error) {
			pub, method, err := tok.ImportVersion(ctx, hsm.ImportRequest{
				Algorithm: vt.Type.Info().Alg, WrappingID: wrappingID, OAEPHash: h, WrappedKey: wrapped,
				KeyWrapMech: cfg.keyWrapMechanism(), ID: id, Label: label, HMACBytes: vt.HMACBytes(),
			})
			if errors.Is(err, hsm.ErrInvalidArgument) || errors.Is(err, hsm.ErrMechanismUnsupported) || errors.Is(err, hsm.ErrInvalidCiphertext) {
				err = callerf("import failed: %v", err)
			}
			return pub, method, err
		}
	}
	who := actorOf(req)
	if version {
		if resp, err := b.holdImportVersion(ctx, req, name); resp != nil || err != nil {
			return resp, err
		}
		target, _ := d.Get("version").(int)
		_, err := b.keys.Update(ctx, req.Storage, name, who, func(tx *keys.Tx) error { return tx.ImportVersion(material, false, target) })
		if errors.Is(err, keys.ErrNotFound) {
			return nil, callerf("no key found with name %s; to import a new key, use the import endpoint", name)
		}
		return nil, err
	}
	k, err := importedKey(d, name)
	if err != nil {
		return nil, err
	}
	return b.createImported(ctx, req, k, material(k.NewVersionType()))
}

// holdImportVersion holds an import_version into key name: material from outside joins the key only with the
// approvals it asks for. Requests that fail anyway (no such key, a key not imported) and Vault's retry of an import
// that completed are not held.
func (b *backend) holdImportVersion(ctx context.Context, req *logical.Request, name string) (*logical.Response, error) {
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil || k == nil || !k.Imported || (req.ID != "" && k.LastRequestID == req.ID) {
		return nil, err
	}
	return b.holdForApproval(ctx, req, k, "import a version")
}

// importedKey reads the settings of a key being imported.
func importedKey(d *framework.FieldData, name string) (*keys.Key, error) {
	if err := refuseUnsupported(d); err != nil {
		return nil, err
	}
	if d.Get("context").(string) != "" {
		return nil, callerf("%s", msgNoDerivation)
	}
	typ, err := keys.ParseType(strings.ToLower(d.Get("type").(string)))
	if err != nil {
		return nil, err
	}
	k := &keys.Key{Name: name, Type: typ, Imported: true, AllowRotation: d.Get("allow_rotation").(bool)}
	var ownership keys.Settings
	ownershipFrom(d, &ownership)
	if err := k.Apply(ownership); err != nil {
		return nil, err
	}
	if v, ok := d.GetOk("auto_rotate_period"); ok && v.(int) != 0 {
		if !k.AllowRotation {
			return nil, callerf("allow_rotation must be set to true if auto-rotation is enabled")
		}
		if k.AutoRotatePeriod = time.Duration(v.(int)) * time.Second; k.AutoRotatePeriod < keys.MinAutoRotatePeriod {
			return nil, callerf("auto_rotate_period must be 0 to disable or at least an hour")
		}
	}
	return k, nil
}

// createImported creates imported key k with its first version from material.
func (b *backend) createImported(ctx context.Context, req *logical.Request, k *keys.Key, material keys.Material) (*logical.Response, error) {
	name := k.Name
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	k.ApprovalsRequired = cfg.DefaultApprovalsRequired // as every key made: dual control by default where the mount asks
	cur, created, err := b.keys.Create(ctx, req.Storage, k, actorOf(req), material)
	switch {
	case err != nil:
		return nil, err
	case !created && req.ID != "" && cur.LastRequestID == req.ID:
		return nil, nil // Vault's retry of an import that completed before the plugin died
	case !created:
		return nil, callerf("key %q already exists: the import path cannot be used with an existing key; use import_version", name)
	}
	return nil, nil
}

// importPublicKey imports a version that holds only a public key: a new key, or a new version of one.
func (b *backend) importPublicKey(ctx context.Context, req *logical.Request, d *framework.FieldData, name, publicPEM string, version bool) (*logical.Response, error) {
	parse := func(typ keys.Type) (crypto.PublicKey, error) {
		pub, err := keys.ParsePublicKeyPEM(typ, publicPEM)
		if err != nil {
			return nil, callerf("public_key: %v", err)
		}
		return pub, nil
	}
	if version {
		if v, _ := d.Get("version").(int); v != 0 {
			return nil, callerf("version names a public-key-only version whose private key to import: give ciphertext, not public_key")
		}
		if resp, err := b.holdImportVersion(ctx, req, name); resp != nil || err != nil {
			return resp, err
		}
		_, err := b.keys.Update(ctx, req.Storage, name, actorOf(req), func(tx *keys.Tx) error {
			pub, err := parse(tx.Key.Type)
			if err != nil {
				return err
			}
			return tx.ImportVersion(func(keys.VersionType) keys.Material { return keys.PublicKeyOnly(pub) }, true, 0)
		})
		if errors.Is(err, keys.ErrNotFound) {
			return nil, callerf("no key found with name %s; to import a new key, use the import endpoint", name)
		}
		return nil, err
	}
	k, err := importedKey(d, name)
	if err != nil {
		return nil, err
	}
	if !k.Type.Asymmetric() {
		return nil, callerf("public_key imports need an asymmetric type (rsa-2048, rsa-3072, rsa-4096, ecdsa-p256, ecdsa-p384, ecdsa-p521, ed25519), not %s", k.Type)
	}
	pub, err := parse(k.Type)
	if err != nil {
		return nil, err
	}
	return b.createImported(ctx, req, k, keys.PublicKeyOnly(pub))
}

const importHelp = `
Imports key material the caller holds, in the format of Transit's BYOK and of 'vault transit import': the key is
wrapped with AES key wrap with padding (RFC 5649) under an ephemeral AES-256 key, which is wrapped with RSA-OAEP
under this mount's wrapping_key. Both unwraps happen in the HSM where the token allows: the imported key becomes a
sensitive, non-extractable token object and never exists in plaintext in the plugin. Tokens whose RSA-OAEP lacks
the requested hash (SoftHSM 2.6 offers SHA-1 only) recover the ephemeral key with raw RSA in the HSM and decode
its OAEP padding in the plugin; it is then held only as a session object for the unwrap, and zeroised. Each
version records which path was used (import_method on keys/<name>). The key wrap mechanism is set in config/hsm.
`
