package cmk

import (
	"context"
	"maps"
	"slices"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// keys/:name/access: a key's access conditions, the second gate after Vault's ACL (internal/keys/access.go).

func (b *backend) pathAccess() *framework.Path {
	ops := make([]interface{}, len(keys.Operations))
	for i, op := range keys.Operations {
		ops[i] = string(op)
	}
	return &framework.Path{
		Pattern:      "keys/" + framework.GenericNameRegex("name") + "/access",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "key-access"},
		Fields: map[string]*framework.FieldSchema{
			"name": fieldName,
			"allowed_cidrs": {
				Type:        framework.TypeCommaStringSlice,
				Description: "CIDR blocks the request's source address must fall in (Vault's view of it: the connection's address, or X-Forwarded-For where the listener trusts it). A bare address means that address alone.",
			},
			"allowed_hours": {
				Type:        framework.TypeStringSlice,
				Description: `Windows in which the key may be used, each "<days> <HH:MM>-<HH:MM>" in time_zone: days are mon…sun, a range (mon-fri), a list (sat,sun) or daily; a window may pass midnight (fri 22:00-06:00 ends on Saturday morning).`,
			},
			"time_zone": {
				Type:        framework.TypeString,
				Description: "IANA time zone allowed_hours are read in (Europe/Paris, America/New_York); UTC when empty.",
			},
			"allowed_entity_ids": {
				Type:        framework.TypeCommaStringSlice,
				Description: "Vault entity ids that may use the key. With allowed_groups: the caller must match one of either, or hold a live grant.",
			},
			"allowed_groups": {
				Type:        framework.TypeCommaStringSlice,
				Description: "Vault identity groups (names or ids) whose member entities may use the key.",
			},
			"required_entity_metadata": {
				Type:        framework.TypeKVPairs,
				Description: "key=value pairs the caller's entity must carry in its metadata (set by an operator or an auth method: device posture, risk, team).",
			},
			"operations": {
				Type:          framework.TypeCommaStringSlice,
				AllowedValues: ops,
				Description:   "Operations the conditions govern (" + keys.OperationNames() + "); empty: all of them.",
			},
			"grants_required": {
				Type:        framework.TypeBool,
				Description: "Only callers holding a live grant (keys/:name/grants) may use the key; the other conditions still apply.",
			},
			"max_grant_ttl": {
				Type:        framework.TypeDurationSecond,
				Description: "Longest ttl a grant on the key may have (at most 30 days, which also bounds grants when unset).",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation:   &framework.PathOperation{Callback: b.pathAccessRead, Summary: "Read the key's access conditions and the uses they denied since the plugin started."},
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathAccessWrite), Summary: "Set access conditions; fields not given keep their value."},
			logical.DeleteOperation: &framework.PathOperation{Callback: b.pathAccessDelete, Summary: "Remove every access condition: the key is governed by Vault's ACL alone."},
		},
		HelpSynopsis: "Conditions every use of the key's material must meet, after Vault's ACL: source network, hours, identity.",
		HelpDescription: `A use of the key (encrypt, decrypt, rewrap, datakey, sign, verify of an HMAC, hmac, csr) that Vault's ACL
admits is then checked against these conditions, from the key's cached settings: the source address must fall in
allowed_cidrs, the time in allowed_hours (time_zone), the caller's entity must carry required_entity_metadata and be
in allowed_entity_ids or allowed_groups — or hold a live grant, which grants_required makes necessary. A request
that fails one is answered 403 naming the condition that failed, never another's values, and is counted on the key
(denials, since the plugin started). A token without an entity (root, orphan tokens) fails every identity
condition. Writing replaces the fields given; delete removes all.`,
	}
}

func (b *backend) pathAccessRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	k, err := b.keys.Get(ctx, req.Storage, d.Get("name").(string))
	if err != nil || k == nil {
		return nil, err
	}
	return &logical.Response{Data: b.formatAccess(k)}, nil
}

// formatAccess is keys/:name/access's answer: the settings (empty lists when none) and the denials counted.
func (b *backend) formatAccess(k *keys.Key) map[string]interface{} {
	a := k.Access
	if a == nil {
		a = &keys.Access{}
	}
	ops := make([]string, len(a.Operations))
	for i, op := range a.Operations {
		ops[i] = string(op)
	}
	meta := map[string]string{}
	for key, v := range a.RequiredEntityMetadata {
		meta[key] = v
	}
	den := b.keys.Denials(k.Name)
	denials := map[string]interface{}{"by_condition": den.ByCondition}
	if !den.Last.IsZero() {
		denials["last_denied_at"] = den.Last.UTC().Format(time.RFC3339Nano)
	}
	return map[string]interface{}{
		"allowed_cidrs":            nonNil(a.AllowedCIDRs),
		"allowed_hours":            nonNil(a.AllowedHours),
		"time_zone":                a.TimeZone,
		"allowed_entity_ids":       nonNil(a.AllowedEntityIDs),
		"allowed_groups":           nonNil(a.AllowedGroups),
		"required_entity_metadata": meta,
		"operations":               ops,
		"grants_required":          a.GrantsRequired,
		"max_grant_ttl":            int64(a.MaxGrantTTL / time.Second),
		"summary":                  k.Access.Summary(),
		"denials":                  denials,
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// accessFrom is cur with the fields the request gives replaced (a write changes only what it names).
func accessFrom(cur *keys.Access, d *framework.FieldData) *keys.Access {
	a := &keys.Access{}
	if cur != nil { // a copy: the snapshot's slices and map are shared with every reader of the key
		*a = *cur
		a.AllowedCIDRs, a.AllowedHours = slices.Clone(cur.AllowedCIDRs), slices.Clone(cur.AllowedHours)
		a.AllowedEntityIDs, a.AllowedGroups = slices.Clone(cur.AllowedEntityIDs), slices.Clone(cur.AllowedGroups)
		a.Operations, a.RequiredEntityMetadata = slices.Clone(cur.Operations), maps.Clone(cur.RequiredEntityMetadata)
	}
	if v, ok := d.GetOk("allowed_cidrs"); ok {
		a.AllowedCIDRs = v.([]string)
	}
	if v, ok := d.GetOk("allowed_hours"); ok {
		a.AllowedHours = v.([]string)
	}
	if v, ok := d.GetOk("time_zone"); ok {
		a.TimeZone = v.(string)
	}
	if v, ok := d.GetOk("allowed_entity_ids"); ok {
		a.AllowedEntityIDs = v.([]string)
	}
	if v, ok := d.GetOk("allowed_groups"); ok {
		a.AllowedGroups = v.([]string)
	}
	if v, ok := d.GetOk("required_entity_metadata"); ok {
		a.RequiredEntityMetadata = v.(map[string]string)
	}
	if v, ok := d.GetOk("operations"); ok {
		a.Operations = nil
		for _, op := range v.([]string) {
			a.Operations = append(a.Operations, keys.Operation(op))
		}
	}
	if v, ok := d.GetOk("grants_required"); ok {
		a.GrantsRequired = v.(bool)
	}
	if v, ok := d.GetOk("max_grant_ttl"); ok {
		a.MaxGrantTTL = time.Duration(v.(int)) * time.Second
	}
	return a
}

func (b *backend) pathAccessWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return respond(callerf("key %q not found", name))
	}
	// Valid and a change, or answered now: no one approves a request that fails anyway or does nothing.
	next := accessFrom(k.Access, d)
	if err := next.Validate(); err != nil {
		return respond(err)
	}
	if next.Summary() == k.Access.Summary() {
		return &logical.Response{Data: b.formatAccess(k)}, nil
	}
	if resp, err := b.holdForApproval(ctx, req, k, "set the key's access conditions to: "+next.Summary()); resp != nil || err != nil {
		return resp, err
	}
	change, err := b.onJudged(ctx, req, k, func(tx *keys.Tx) error { return tx.SetAccess(accessFrom(tx.Key.Access, d)) })
	if err != nil {
		return nil, err
	}
	k, err = b.keys.Update(ctx, req.Storage, name, actorOf(req), change)
	if err != nil {
		return respond(err)
	}
	return &logical.Response{Data: b.formatAccess(k)}, nil
}

func (b *backend) pathAccessDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil || k == nil || k.Access == nil {
		return nil, err // nothing to remove
	}
	if resp, err := b.holdForApproval(ctx, req, k, "remove the key's access conditions ("+k.Access.Summary()+")"); resp != nil || err != nil {
		return resp, err
	}
	change, err := b.onJudged(ctx, req, k, func(tx *keys.Tx) error { return tx.SetAccess(nil) })
	if err != nil {
		return nil, err
	}
	if _, err := b.keys.Update(ctx, req.Storage, name, actorOf(req), change); err != nil {
		return respond(err)
	}
	return nil, nil
}
