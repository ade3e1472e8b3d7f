package cmk

import (
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

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
			"decrypt_padding_scheme": {
				Type:          framework.TypeString,
				AllowedValues: fieldPadding.AllowedValues,
				Description:   "RSA keys only: the padding the ciphertext was made with, \"oaep\" or \"pkcs1v15\"; padding_scheme when not set.",
			},
			"encrypt_padding_scheme": {
				Type:          framework.TypeString,
				AllowedValues: fieldPadding.AllowedValues,
				Description:   "RSA keys only: the padding of the new ciphertext, \"oaep\" or \"pkcs1v15\"; padding_scheme when not set.",
			},
		}),
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathRewrapWrite), Summary: "Re-encrypt ciphertexts under a newer version without returning the plaintext."},
		},
		HelpSynopsis:    "Re-encrypt a ciphertext, or a batch, under the latest (or given) key version.",
		HelpDescription: "Decrypts and encrypts again inside the engine; the plaintext is never returned to the caller. The associated data, if any, must be given and is kept.",
	}
}

func (b *backend) pathRewrapWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, u, err := b.ciphertextRequest(ctx, req, d, keys.OpRewrap)
	if err != nil {
		return respond(err)
	}
	return runBatch(d, req, items, batch, u.Sessions(), func(i int, it *batchItem) (encryptResult, error) {
		aad, err := checkCommon(it)
		if err != nil {
			return encryptResult{}, err
		}
		if !it.hasCiphertext {
			return encryptResult{}, callerf("batch_input[%d]: missing ciphertext to decrypt", i)
		}
		decryptPadding, encryptPadding := it.PaddingScheme, it.PaddingScheme // RSA keys may use one of each
		if it.DecryptPadding != "" {
			decryptPadding = it.DecryptPadding
		}
		if it.EncryptPadding != "" {
			encryptPadding = it.EncryptPadding
		}
		ct, v, err := u.Rewrap(ctx, it.Ciphertext, aad, it.KeyVersion, decryptPadding, encryptPadding)
		return encryptResult{Ciphertext: ct, KeyVersion: v}, err
	}, singleEncryptResult)
}
