package cmk

import (
	"context"
	"crypto"
	"encoding/base64"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
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
	items, batch, k, tok, _, err := b.ciphertextRequest(ctx, req, d)
	if err != nil {
		return respond(err)
	}
	return runBatch(d, req, items, batch, tok.PoolSize(), func(i int, it *batchItem) (decryptResult, error) {
		aad, err := checkCommon(it)
		if err != nil {
			return decryptResult{}, err
		}
		if !it.hasCiphertext {
			return decryptResult{}, callerf("batch_input[%d]: missing ciphertext to decrypt", i)
		}
		pt, err := decrypt(ctx, tok, k, it, aad)
		if err != nil {
			return decryptResult{}, err
		}
		defer clear(pt)
		return decryptResult{Plaintext: base64.StdEncoding.EncodeToString(pt)}, nil
	}, func(r decryptResult) map[string]interface{} { return map[string]interface{}{"plaintext": r.Plaintext} })
}

// decrypt opens a ciphertext of k in the HSM.
func decrypt(ctx context.Context, tok hsmToken, k *keys.Key, it *batchItem, aad []byte) ([]byte, error) {
	if !k.Type.Info().Encrypt {
		return nil, k.Type.Unsupported("decryption")
	}
	if k.Type.IsRSA() {
		v, raw, err := parseVersioned("ciphertext", it.Ciphertext, base64.StdEncoding)
		if err != nil {
			return nil, callerf("%s", err.Error())
		}
		ver, err := k.DecryptionVersion(v, "ciphertext")
		if err != nil {
			return nil, err
		}
		if err := k.Private(v, "decrypt"); err != nil {
			return nil, err
		}
		var h crypto.Hash
		switch it.PaddingScheme {
		case "", "oaep":
			h = crypto.SHA256
		case "pkcs1v15":
		default:
			return nil, callerf("padding_scheme must be oaep or pkcs1v15, not %q", it.PaddingScheme)
		}
		pt, err := tok.DecryptRSA(ctx, ver.ID(), h, raw)
		if err != nil {
			return nil, fmt.Errorf("decrypt with key %q version %d: %w", k.Name, v, err)
		}
		return pt, nil
	}
	v, nonce, sealed, err := parseCiphertext(it.Ciphertext)
	if err != nil {
		return nil, callerf("%s", err.Error())
	}
	ver, err := k.DecryptionVersion(v, "ciphertext")
	if err != nil {
		return nil, err
	}
	pt, err := tok.DecryptGCM(ctx, ver.ID(), nonce, aad, sealed)
	if errors.Is(err, hsm.ErrInvalidCiphertext) {
		hint := "tampered, truncated, or made by another key"
		if len(aad) == 0 {
			hint += ", or encrypted with associated_data that was not given here"
		} else {
			hint += ", or encrypted with other associated_data"
		}
		return nil, callerf("invalid ciphertext: version %d of key %q does not authenticate it (%s)", v, k.Name, hint)
	}
	if err != nil {
		return nil, fmt.Errorf("decrypt with key %q version %d: %w", k.Name, v, err)
	}
	return pt, nil
}
