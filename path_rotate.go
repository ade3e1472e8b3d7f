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
			"type": {Type: framework.TypeString, Description: "Type of the new version, another of the key's purpose (crypto-agility): " +
				"aes128-gcm96 or aes256-gcm96 for encryption keys; rsa-2048, rsa-3072, rsa-4096, ecdsa-p256, ecdsa-p384, ecdsa-p521 or ed25519 for signing keys; " +
				"hmac for hmac keys. Empty: the key's pending next_type, else its current type. Older versions keep their own type."},
			"key_size": {Type: framework.TypeInt, Description: "hmac keys: the new version's secret size in bytes (16 to 512); 0 keeps the key's."},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback: handle(b.pathRotateWrite, "managed_key_name", "managed_key_id"),
				Summary:  "Create a new key version in the HSM; new encryptions use it.",
			},
		},
		HelpSynopsis: "Rotate a key: a new version is generated in the HSM.",
		HelpDescription: "Generates the next version's objects inside the HSM and makes it the latest. Older versions keep decrypting while they are at or above min_decryption_version. " +
			"With type (and key_size for hmac keys) the new version is of another algorithm of the key's purpose: encryption, signing or hmac; a change of purpose is refused. " +
			"Encrypt and sign then use the new type, while decrypt, verify and rewrap use each version's own; the key read shows each version's type. " +
			"The mount's config/keys allowed_types and deprecated_types apply.",
	}
}

func (b *backend) pathRotateWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	var to keys.VersionType
	if raw := d.Get("type").(string); raw != "" {
		t, err := keys.ParseType(raw)
		if err != nil {
			return respond(err)
		}
		to.Type = t
	}
	if size := d.Get("key_size").(int); size != 0 {
		if size < minHMACKeySize || size > maxHMACKeySize {
			return respond(callerf("key_size must be between %d and %d bytes", minHMACKeySize, maxHMACKeySize))
		}
		to.HMACKeySize = size
	}
	k, err := b.keys.Update(ctx, req.Storage, d.Get("name").(string), actorOf(req), func(tx *keys.Tx) error {
		if err := tx.Key.Usable(); err != nil {
			return err
		}
		return tx.Rotate("manual", to)
	})
	if err != nil {
		return respond(err)
	}
	return b.formatKey(k), nil
}
