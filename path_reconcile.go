package cmk

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

const reconcileHelp = `Compares what Vault's storage references with what the HSM token holds under this mount's labels
(cmk/<mount>/<key>/v<N>), for one key or the whole mount:

  unreferenced_objects  token objects no stored version references, each with whether it may be adopted and,
                        if not, why (imported or planted material, a number already stored, an unknown key)
  missing_objects       stored versions whose material the token lacks (destroyed outside Vault, or the token
                        is not the one the keys were made on)
  adopted               versions adopted by this call (adopt=true)
  untrusted_objects     objects where the engine makes its own (a version's HMAC secret, made on its first HMAC)
                        that the token cannot show it generated and never let out: never used, since someone
                        holding the PIN may have put a secret they know there; remove each from the token

Storage restored from an older snapshot forgets versions made since; their material stays on the token. The
engine adopts such a version by itself when a request names it or before a rotation would take its number. A
version is adopted only if it was generated on the token and never extractable (CKA_LOCAL, CKA_SENSITIVE,
CKA_NEVER_EXTRACTABLE; or the engine's own WAL entry says it generated it, where the token leaves CKA_LOCAL
false), and only in a row after the key's latest. reconcile/adopt-unverified(/<key>), a sudo path, adopts on
the operator's word protected material whose origin the token cannot show (imported versions; NSS), recorded as
such in the key's history.
Reading, or writing without adopt, changes nothing. Nothing is ever destroyed here.

The mount-wide form reads every object on the token and every key in storage: with many keys it takes time (see
the README's backup and recovery section for a measurement).`

func (b *backend) pathReconcile() []*framework.Path {
	adopt := &framework.FieldSchema{
		Type:        framework.TypeBool,
		Default:     false,
		Description: "Adopt the versions the rule allows (generated on the token, never extractable, in a row after the key's latest). Without it the call only reports.",
	}
	return []*framework.Path{
		{
			Pattern: "keys/" + framework.GenericNameRegex("name") + "/reconcile",
			DisplayAttrs: &framework.DisplayAttributes{
				OperationPrefix: "cmk",
				OperationSuffix: "key-reconciliation",
			},
			Fields: map[string]*framework.FieldSchema{
				"name":  {Type: framework.TypeString, Required: true, Description: "Name of the key."},
				"adopt": adopt,
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback:     handle(b.reconcileHandler(false)),
					Summary:      "Report how the key's stored versions and the token's objects differ.",
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
				},
				logical.UpdateOperation: &framework.PathOperation{
					Callback:     handle(b.reconcileHandler(false)),
					Summary:      "Report, and with adopt=true adopt what the rule allows.",
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "reconcile"},
				},
			},
			HelpSynopsis:    "Compare a key's stored versions with the HSM token's objects, and adopt versions a storage restore lost.",
			HelpDescription: reconcileHelp,
		},
		{
			Pattern: "reconcile",
			DisplayAttrs: &framework.DisplayAttributes{
				OperationPrefix: "cmk",
				OperationSuffix: "mount-reconciliation",
			},
			Fields: map[string]*framework.FieldSchema{"adopt": adopt},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback:     handle(b.reconcileHandler(false)),
					Summary:      "Report how the mount's stored keys and the token's objects differ.",
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
				},
				logical.UpdateOperation: &framework.PathOperation{
					Callback:     handle(b.reconcileHandler(false)),
					Summary:      "Report for the whole mount, and with adopt=true adopt what the rule allows.",
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "reconcile"},
				},
			},
			HelpSynopsis:    "Compare every stored key with the HSM token's objects, and adopt versions a storage restore lost.",
			HelpDescription: reconcileHelp,
		},
		b.adoptUnverifiedPath(adoptUnverifiedPath, "mount", "every key of the mount"),
		b.adoptUnverifiedPath(adoptUnverifiedPath+"/"+framework.GenericNameRegex("name"), "key", "one key"),
	}
}

// adoptUnverifiedPath is reconcile with adoption on an operator's word, for one key or the mount: a path of its
// own because Vault's sudo is per path (PathsSpecial.Root), never per field, so reconcile with adopt=true stays a
// key administrator's while adoption on an operator's word needs sudo; under reconcile/ rather than keys/<name>/
// because a sudo path is matched exactly or by prefix only.
func (b *backend) adoptUnverifiedPath(pattern, suffix, what string) *framework.Path {
	p := &framework.Path{
		Pattern:      pattern,
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "adopt-unverified", OperationSuffix: suffix},
		Fields:       map[string]*framework.FieldSchema{},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback: handle(b.reconcileHandler(true)),
				Summary:  "Reconcile " + what + " with adoption, adopting also, on the operator's word, protected material whose origin the token cannot show (needs sudo).",
			},
		},
		HelpSynopsis:    "Adopt, on the operator's word, versions whose origin the token cannot show (a sudo path).",
		HelpDescription: adoptUnverifiedHelp,
	}
	if suffix == "key" {
		p.Fields["name"] = &framework.FieldSchema{Type: framework.TypeString, Description: "Name of the key."}
	}
	return p
}

// adoptUnverifiedPath is the sudo path for adoption on an operator's word, for one key (…/<name>) or the mount.
const adoptUnverifiedPath = "reconcile/adopt-unverified"

const adoptUnverifiedHelp = `Does what reconcile with adopt=true does, and also adopts material whose origin the token cannot
show (imported with BYOK; a token that leaves CKA_LOCAL false on the keys it generates, such as NSS) if it is
sensitive, never extractable, of the key's type, and in a row after the key's latest version. Use it only for
material you know is that version's (your own import, a key this engine generated): the key's history records it
as adopted on your word. It needs sudo in the caller's policy, beside update; reconcile's
adoptable_by_operator says which objects it would take.`

// reconcileHandler runs a reconciliation; onWord on the sudo path, which always adopts.
func (b *backend) reconcileHandler(onWord bool) framework.OperationFunc {
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
		return b.reconcile(ctx, req, d, onWord)
	}
}

func (b *backend) reconcile(ctx context.Context, req *logical.Request, d *framework.FieldData, onWord bool) (*logical.Response, error) {
	name := ""
	if _, ok := d.Schema["name"]; ok {
		name = d.Get("name").(string)
	}
	adopt := onWord || (req.Operation == logical.UpdateOperation && d.Get("adopt").(bool))
	if _, _, err := b.getToken(ctx, req.Storage); err != nil {
		return respond(err)
	}
	r, err := b.keys.Reconcile(ctx, req.Storage, name, adopt, onWord, actorOf(req))
	if err != nil {
		return respond(err)
	}
	var data map[string]interface{}
	raw, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(raw, &data); err != nil {
		return nil, err
	}
	resp := &logical.Response{Data: data}
	if len(r.Adopted) > 0 {
		resp.AddWarning("versions adopted from the HSM; each key's history records it")
	}
	blocked := 0
	for _, o := range r.Unreferenced {
		if !o.Adoptable {
			blocked++
		}
	}
	if len(r.Untrusted) > 0 {
		resp.AddWarning(fmt.Sprintf("the token holds %d object(s) of unproven origin where the engine makes its own; they are never used: untrusted_objects names them, remove them from the token", len(r.Untrusted)))
	}
	if blocked > 0 {
		resp.AddWarning(fmt.Sprintf("the token holds %d object(s) under this mount's labels that are not adopted; unreferenced_objects says why for each", blocked))
	}
	return resp, nil
}
