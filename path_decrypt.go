package cmk

import (
	"context"
	"encoding/base64"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

type decryptResult struct {
	Plaintext string `json:"plaintext"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
}

func (r *decryptResult) setOutcome(ref, err string) { r.Reference, r.Error = ref, err }

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
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathDecryptWrite), Summary: "Decrypt a ciphertext or a batch of ciphertexts in the HSM."},
		},
		HelpSynopsis:    "Decrypt a ciphertext, or a batch of them, with the named key inside the HSM.",
		HelpDescription: "Returns the base64 plaintext. A ciphertext that is malformed, tampered with, made by another key or below min_decryption_version is refused with HTTP 400.",
	}
}

func (b *backend) pathDecryptWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, batch, u, err := b.ciphertextRequest(ctx, req, d, keys.OpDecrypt)
	if err != nil {
		return respond(err)
	}
	return runBatch(d, req, items, batch, u.Sessions(), func(i int, it *batchItem) (decryptResult, error) {
		aad, err := checkCommon(it)
		if err != nil {
			return decryptResult{}, err
		}
		if !it.hasCiphertext {
			return decryptResult{}, callerf("batch_input[%d]: missing ciphertext to decrypt", i)
		}
		pt, err := u.Decrypt(ctx, it.Ciphertext, aad, it.PaddingScheme)
		if err != nil {
			return decryptResult{}, err
		}
		defer clear(pt)
		return decryptResult{Plaintext: base64.StdEncoding.EncodeToString(pt)}, nil
	}, func(r decryptResult) map[string]interface{} { return map[string]interface{}{"plaintext": r.Plaintext} })
}
