package cmk

import (
	"context"
	"errors"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
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
				Callback: b.pathRotateWrite,
				Summary:  "Create a new key version in the HSM; new encryptions use it.",
			},
		},
		HelpSynopsis:    "Rotate a key: a new version is generated in the HSM.",
		HelpDescription: "Generates the next version's objects inside the HSM and makes it the latest. Older versions keep decrypting while they are at or above min_decryption_version.",
	}
}

func (b *backend) pathRotateWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	cur, err := b.policyLocked(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if cur == nil {
		return logical.ErrorResponse("key %q not found", name), logical.ErrInvalidRequest
	}
	if err := cur.usable(); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return hsmErrorResponse(err)
	}
	p, err := b.rotateLocked(ctx, req.Storage, tok, cur, actorOf(req), "manual")
	if errors.Is(err, errCallerMistake) {
		return logical.ErrorResponse("%s", strings.TrimPrefix(err.Error(), errCallerMistake.Error()+": ")), logical.ErrInvalidRequest
	}
	if err != nil {
		return hsmErrorResponse(err)
	}
	return b.formatKey(p), nil
}
