package cmk

import (
	"context"
	"encoding/base64"
	"slices"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Transit-compatible result items; field names and omitempty exactly as Transit's.
type encryptResult struct {
	Ciphertext string `json:"ciphertext,omitempty"`
	KeyVersion int    `json:"key_version,omitempty"`
	Error      string `json:"error,omitempty"`
	Reference  string `json:"reference"`
}

func (r *encryptResult) setOutcome(ref, err string) { r.Reference, r.Error = ref, err }

func singleEncryptResult(r encryptResult) map[string]interface{} {
	return map[string]interface{}{"ciphertext": r.Ciphertext, "key_version": r.KeyVersion}
}

// upsertTypes are the key types encrypt creates for a missing key.
var upsertTypes = []interface{}{string(keys.TypeAES256GCM96), string(keys.TypeAES128GCM96)}

const upsertTypeNames = "aes256-gcm96, aes128-gcm96"

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
				Type:          framework.TypeString,
				Default:       string(keys.TypeAES256GCM96),
				AllowedValues: upsertTypes,
				Description:   "Type of the key to create when it does not exist (upsert): aes256-gcm96 or aes128-gcm96.",
			},
			"convergent_encryption": {
				Type:        framework.TypeBool,
				Description: "For upsert. Only false is accepted: " + msgNoConvergent + ".",
			},
		}),
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.CreateOperation: &framework.PathOperation{Callback: handle(b.pathEncryptWrite, "iv"), Summary: "Encrypt, creating the key first if it does not exist (needs create capability)."},
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathEncryptWrite, "iv"), Summary: "Encrypt a plaintext or a batch of plaintexts in the HSM."},
		},
		ExistenceCheck:  b.keyExists,
		HelpSynopsis:    "Encrypt a base64 plaintext, or a batch of them, with the named key inside the HSM.",
		HelpDescription: "AES-GCM with a random 96-bit nonce, computed by the HSM. The ciphertext is Transit's vault:v<N>:base64(nonce‖ciphertext‖tag). As in Transit, a missing key is created unless config/keys disables upsert.",
	}
}

func (b *backend) pathEncryptWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	items, err := readBatch(d, cfg.MaxBatchSize)
	if err != nil {
		return respond(err)
	}
	batch := items != nil
	if !batch {
		it := singleItem(d)
		if !it.hasPlaintext {
			return respond(callerf("missing plaintext to encrypt"))
		}
		items = []batchItem{it}
	}
	if req.Operation == logical.CreateOperation {
		if err := b.upsert(ctx, req, d, cfg, name, items); err != nil {
			return respond(err)
		}
	}
	u, err := b.keys.Use(ctx, req.Storage, name, b.callerOf(req), keys.OpEncrypt, len(items))
	if err != nil {
		return respond(err)
	}
	return runBatch(d, req, items, batch, u.Sessions(), func(i int, it *batchItem) (encryptResult, error) {
		aad, err := checkCommon(it)
		if err != nil {
			return encryptResult{}, err
		}
		if !it.hasPlaintext {
			return encryptResult{}, callerf("batch_input[%d]: missing plaintext to encrypt", i)
		}
		pt, err := base64.StdEncoding.DecodeString(it.Plaintext)
		if err != nil {
			return encryptResult{}, callerf("plaintext is not valid base64: %v", err)
		}
		defer clear(pt)
		ct, v, err := u.Encrypt(ctx, pt, aad, it.KeyVersion, it.PaddingScheme)
		return encryptResult{Ciphertext: ct, KeyVersion: v}, err
	}, singleEncryptResult)
}

// upsert creates the key on an encrypt to a missing key, as Transit does, unless config/keys forbids it.
func (b *backend) upsert(ctx context.Context, req *logical.Request, d *framework.FieldData, cfg *keysConfig, name string, items []batchItem) error {
	if cfg.DisableUpsert {
		return callerf("encryption key %q not found (upsert is disabled in config/keys)", name)
	}
	if d.Get("convergent_encryption").(bool) {
		return callerf("%s", msgNoConvergent)
	}
	if items[0].Context != "" {
		return callerf("%s", msgNoDerivation)
	}
	// Only the types the field lists: the framework does not enforce AllowedValues, and an RSA-4096 generation
	// on every encrypt/<new name> would tie up the token for anyone with create on encrypt/*.
	typ := d.Get("type").(string)
	if !slices.Contains(upsertTypes, interface{}(typ)) {
		return callerf("type %q cannot be created by encrypt: upsert creates %s keys only; create other types with keys/%s", typ, upsertTypeNames, name)
	}
	_, _, err := b.keys.Create(ctx, req.Storage, &keys.Key{Name: name, Type: keys.Type(typ), AutoRotatePeriod: cfg.AutoRotatePeriod, ApprovalsRequired: cfg.DefaultApprovalsRequired}, actorOf(req), nil)
	return err
}
