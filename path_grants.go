package cmk

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

func (b *backend) pathGrants() []*framework.Path {
	name := framework.GenericNameRegex("name")
	return []*framework.Path{
		{
			Pattern:      "keys/" + name + "/grants$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "create", OperationSuffix: "key-grant"},
			Fields: map[string]*framework.FieldSchema{
				"name":      fieldName,
				"entity_id": {Type: framework.TypeString, Description: "The Vault entity the grant lets use the key. Give entity_id or group, not both."},
				"group": {Type: framework.TypeString, Description: "The Vault group (its name or id) whose members the grant lets use the key. " +
					"Give entity_id or group, not both."},
				"operations": {Type: framework.TypeCommaStringSlice, Description: "The operations granted, of encrypt, decrypt, rewrap, datakey, sign, " +
					"verify (with an HMAC), hmac, csr. Default: all of them."},
				"ttl": {Type: framework.TypeDurationSecond, Description: "How long the grant lasts from its creation: at most the key's max_grant_ttl " +
					"(keys/:name/access), or 30 days (720h) when the key sets none. Default: that longest ttl. ttl or max_uses (or both) is required."},
				"max_uses": {Type: framework.TypeInt, Description: "How many uses the grant allows (a batch of n items is n uses); 0 or unset: any " +
					"number until it expires. ttl or max_uses (or both) is required."},
				"reason": {Type: framework.TypeString, Description: "Why the grant is given (a ticket, an incident), at most 1024 bytes: kept with the grant and in the key's history."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathGrantCreate), Summary: "Grant an entity or a group the use of the key, for a time and/or a number of uses."},
			},
			HelpSynopsis: "Just-in-time grants: an entity or group may use the key for given operations until a time and/or for a number of uses.",
			HelpDescription: "A grant names one grantee (entity_id, or group by name or id), the operations it covers, and ends at its expiry " +
				"(ttl, judged against the stored time across restarts and failover), after max_uses uses, or when revoked (DELETE keys/:name/grants/:id). " +
				"A live grant admits its grantee where the key's access settings (keys/:name/access) name neither its entity nor its groups, and with " +
				"grants_required only callers holding one may use the key (the other conditions still apply). A batch of n items uses n uses, and a " +
				"batch larger than the uses left is refused whole (HTTP 403). Uses are reserved in blocks stored before they are used, so a crash " +
				"loses at most the unused part of a block: a grant never allows more uses than max_uses. " +
				"Each grant's creation, revocation, use-out and expiry is an event in keys/:name/history naming who granted it. Grants are deleted with their key.",
		},
		{
			Pattern:      "keys/" + name + "/grants/$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "list", OperationSuffix: "key-grants"},
			Fields:       map[string]*framework.FieldSchema{"name": fieldName},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: b.pathGrantsList, Summary: "List the key's grants, live and ended, with their state."},
			},
			HelpSynopsis:    "List a key's grants.",
			HelpDescription: "The ids of the key's grants, oldest first, and in key_info each grant as keys/:name/grants/:id reads it: live, expired, used_up and revoked ones alike.",
		},
		{
			Pattern:      "keys/" + name + "/grants/" + framework.GenericNameRegex("id"),
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "key-grant"},
			Fields: map[string]*framework.FieldSchema{
				"name": fieldName,
				"id":   {Type: framework.TypeString, Required: true, Description: "The grant's id, as its creation returned it."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation:   &framework.PathOperation{Callback: b.pathGrantRead, Summary: "Read a grant: grantee, operations, expiry, uses so far and left, state."},
				logical.DeleteOperation: &framework.PathOperation{Callback: b.pathGrantRevoke, Summary: "Revoke a grant: it admits nothing from now on."},
			},
			HelpSynopsis: "Read or revoke one grant.",
			HelpDescription: "state is live, expired, used_up or revoked. uses counts the uses made, including those a crash lost from a reserved " +
				"block; remaining_uses is what max_uses leaves. Revoking keeps the grant, revoked, as a record (revoked_at, revoked_by) and " +
				"records the revocation in the key's history; revoking it again changes nothing.",
		},
	}
}

func (b *backend) pathGrantCreate(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	maxUses := d.Get("max_uses").(int)
	if maxUses < 0 {
		return nil, callerf("max_uses must not be negative")
	}
	ops, err := keys.ParseOperations(d.Get("operations").([]string))
	if err != nil {
		return nil, err
	}
	r := keys.GrantRequest{EntityID: d.Get("entity_id").(string), Group: d.Get("group").(string), Operations: ops,
		TTL: time.Duration(d.Get("ttl").(int)) * time.Second, MaxUses: uint64(maxUses), Reason: d.Get("reason").(string)}
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	required := k != nil && k.Access != nil && k.Access.GrantsRequired
	if !isApprovedExecution(ctx, req) {
		r.GrantsRequiredJudged = &required // judged outside the key's lock: refused if it changed meanwhile
	}
	if required {
		// On a key that only grants open, a grant is the key's use given away: dual control holds it.
		if resp, err := b.holdForApproval(ctx, req, k, "grant "+grantee(r)+" "+grantedOps(ops)); resp != nil || err != nil {
			return resp, err
		}
	}
	g, err := b.keys.CreateGrant(ctx, req.Storage, name, actorOf(req), r)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: formatGrant(g)}, nil
}

func (b *backend) pathGrantsList(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	grants, err := b.keys.Grants(ctx, req.Storage, d.Get("name").(string))
	if errors.Is(err, keys.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return respond(err)
	}
	ids := make([]string, len(grants))
	info := make(map[string]interface{}, len(grants))
	for i, g := range grants {
		ids[i] = g.ID
		info[g.ID] = formatGrant(g)
	}
	return logical.ListResponseWithInfo(ids, info), nil
}

func (b *backend) pathGrantRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	return grantResponse(b.keys.GrantByID(ctx, req.Storage, d.Get("name").(string), d.Get("id").(string)))
}

func (b *backend) pathGrantRevoke(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	return grantResponse(b.keys.RevokeGrant(ctx, req.Storage, d.Get("name").(string), d.Get("id").(string), actorOf(req)))
}

// grantResponse answers with one grant: 404 when the key or the grant does not exist.
func grantResponse(g *keys.GrantStatus, err error) (*logical.Response, error) {
	if errors.Is(err, keys.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return respond(err)
	}
	if g == nil {
		return nil, nil
	}
	return &logical.Response{Data: formatGrant(*g)}, nil
}

// formatGrant is a grant as responses show it.
func formatGrant(g keys.GrantStatus) map[string]interface{} {
	ops := make([]string, len(g.Operations))
	for i, op := range g.Operations {
		ops[i] = string(op)
	}
	out := map[string]interface{}{
		"id":         g.ID,
		"operations": ops,
		"expires_at": keys.FormatTime(g.ExpiresAt),
		"max_uses":   g.MaxUses,
		"uses":       g.Uses,
		"state":      string(g.State),
		"created_at": keys.FormatTime(g.CreatedAt),
		"created_by": formatRecorder(g.CreatedBy),
	}
	if g.EntityID != "" {
		out["entity_id"] = g.EntityID
	} else {
		out["group"] = g.Group
	}
	if g.MaxUses > 0 {
		out["remaining_uses"] = g.Remaining
	}
	if g.Reason != "" {
		out["reason"] = g.Reason
	}
	if g.RevokedAt != nil {
		out["revoked_at"] = keys.FormatTime(*g.RevokedAt)
	}
	if g.RevokedBy != nil {
		out["revoked_by"] = formatRecorder(*g.RevokedBy)
	}
	return out
}

// formatRecorder is who made or revoked a grant: entity, display name, and the token accessor's HMAC only.
func formatRecorder(r keys.Recorder) map[string]interface{} {
	out := map[string]interface{}{}
	for k, v := range map[string]string{"entity_id": r.EntityID, "display_name": r.DisplayName, "token_accessor_hmac": r.AccessorHMAC} {
		if v != "" {
			out[k] = v
		}
	}
	return out
}

// grantee names a grant request's grantee for an approval's action.
func grantee(r keys.GrantRequest) string {
	if r.EntityID != "" {
		return "entity " + r.EntityID
	}
	return "group " + r.Group
}

// grantedOps names the operations of a grant request for an approval's action.
func grantedOps(ops []keys.Operation) string {
	if len(ops) == 0 {
		return "every operation"
	}
	names := make([]string, len(ops))
	for i, op := range ops {
		names[i] = string(op)
	}
	return strings.Join(names, ", ")
}
