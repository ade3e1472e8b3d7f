package cmk

import (
	"context"
	"encoding/base64"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

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
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathDatakeyWrite), Summary: "Generate a data key from the HSM's RNG, wrapped by the named key."},
		},
		HelpSynopsis:    "Generate a data key from the HSM's RNG, wrapped (encrypted) by the named key.",
		HelpDescription: "The data key's bytes come from C_GenerateRandom and are encrypted with the named key in the HSM. The wrapped form decrypts with decrypt/<name> to the base64 data key.",
	}
}

func (b *backend) pathDatakeyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	form := d.Get("plaintext").(string)
	if form != "plaintext" && form != "wrapped" {
		return respond(callerf("invalid path: must be datakey/plaintext/<name> or datakey/wrapped/<name>"))
	}
	bits := d.Get("bits").(int)
	if bits != 128 && bits != 256 && bits != 512 {
		return respond(callerf("bits must be 128, 256 or 512"))
	}
	it := singleItem(d)
	aad, err := checkCommon(&it)
	if err != nil {
		return respond(err)
	}
	u, err := b.keys.Use(ctx, req.Storage, d.Get("name").(string), b.callerOf(req), keys.OpDatakey, 1)
	if err != nil {
		return respond(err)
	}
	dataKey, ct, v, err := u.Datakey(ctx, bits, aad, it.KeyVersion, it.PaddingScheme)
	if err != nil {
		return respond(err)
	}
	defer clear(dataKey)
	data := map[string]interface{}{"ciphertext": ct, "key_version": v}
	if form == "plaintext" {
		data["plaintext"] = base64.StdEncoding.EncodeToString(dataKey)
	}
	return &logical.Response{Data: data}, nil
}
