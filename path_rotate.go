package cmk

import (
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

func (b *backend) pathRotate() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/rotate",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
			OperationVerb:   "rotate",
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Required: true, Description: "Name of the key."},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback: handle(b.pathRotateWrite, "managed_key_name", "managed_key_id"),
				Summary:  "Create a new key version in the HSM; new encryptions use it.",
			},
		},
		HelpSynopsis:    "Rotate a key: a new version is generated in the HSM.",
		HelpDescription: "Generates the next version's objects inside the HSM and makes it the latest. Older versions keep decrypting while they are at or above min_decryption_version.",
	}
}

func (b *backend) pathRotateWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	k, err := b.keys.Update(ctx, req.Storage, d.Get("name").(string), actorOf(req), func(tx *keys.Tx) error {
		if err := tx.Key.Usable(); err != nil {
			return err
		}
		return tx.Rotate("manual")
	})
	if err != nil {
		return respond(err)
	}
	return b.formatKey(k), nil
}
