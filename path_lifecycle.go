package cmk

import (
	"context"
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

func (b *backend) pathLifecycle() []*framework.Path {
	name := framework.GenericNameRegex("name")
	version := `(?P<version>\d+)`
	nameField := map[string]*framework.FieldSchema{"name": fieldName}
	withVersion := map[string]*framework.FieldSchema{
		"name":    fieldName,
		"version": {Type: framework.TypeInt, Required: true, Description: "Key version."},
	}
	return []*framework.Path{
		{
			Pattern:      "keys/" + name + "/versions/" + version,
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "key-version"},
			Fields:       withVersion,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: b.pathVersionRead, Summary: "Read one version: state, HSM object, times, encryptions."},
			},
			HelpSynopsis:    "Read one key version.",
			HelpDescription: "States: active, decrypt_only (below min_encryption_version), disabled, destroy_scheduled, destroyed (the HSM objects are gone; the metadata stays as a tombstone).",
		},
		{
			Pattern:      "keys/" + name + "/versions/" + version + "/(?P<action>disable|enable|destroy)",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "change-state", OperationSuffix: "key-version"},
			Fields: map[string]*framework.FieldSchema{
				"name":    fieldName,
				"version": {Type: framework.TypeInt, Required: true, Description: "Key version."},
				"action":  {Type: framework.TypeString, Required: true, Description: "disable, enable or destroy."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathVersionAction, Summary: "Disable, enable or destroy one version."},
			},
			HelpSynopsis: "Disable, enable or destroy one key version.",
			HelpDescription: "disable: the version serves nothing until enabled. destroy: its HSM objects are destroyed after config/keys' " +
				"deletion_grace_period (at once when 0); until then enable restores it. The latest version cannot be disabled or destroyed: rotate first.",
		},
		{
			Pattern:      "keys/" + name + "/(?P<action>disable|enable)",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "change-state", OperationSuffix: "key"},
			Fields: map[string]*framework.FieldSchema{
				"name":   fieldName,
				"action": {Type: framework.TypeString, Required: true, Description: "disable or enable."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathKeyAction, Summary: "Revoke (disable) or restore (enable) every use of the key at once."},
			},
			HelpSynopsis:    "Emergency revoke: a disabled key serves no operation until enabled.",
			HelpDescription: "While disabled, encrypt, decrypt, sign, verify, hmac and every other use fail with HTTP 400; reads of the key, its versions and history still work, and nothing is destroyed. Scheduled rotations wait.",
		},
		{
			Pattern:      "keys/" + name + "/cancel-deletion",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "cancel-deletion", OperationSuffix: "key"},
			Fields:       nameField,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathCancelDeletion, Summary: "Restore a key whose deletion is scheduled."},
			},
			HelpSynopsis:    "Restore a deleted key within its grace period.",
			HelpDescription: "A deleted key is destroyed only after config/keys' deletion_grace_period. Until then this restores it, with every version as it was.",
		},
		{
			Pattern:      "keys/" + name + "/trim",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "trim", OperationSuffix: "key"},
			Fields: map[string]*framework.FieldSchema{
				"name": fieldName,
				"min_available_version": {
					Type:        framework.TypeInt,
					Required:    true,
					Description: "Versions below this one are destroyed in the HSM now (as Transit's trim). Must not exceed min_decryption_version or min_encryption_version.",
				},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathTrim, Summary: "Destroy the versions below min_available_version."},
			},
			HelpSynopsis:    "Destroy old versions, as Transit's trim.",
			HelpDescription: "Destroys the HSM objects of every version below min_available_version at once; their metadata stays as tombstones and ciphertexts of those versions can no longer be decrypted.",
		},
		{
			Pattern:      "keys/" + name + "/history",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "key-history"},
			Fields: map[string]*framework.FieldSchema{
				"name":  fieldName,
				"limit": {Type: framework.TypeInt, Description: "Return only the newest events, at most this many (0: all)."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: b.pathHistoryRead, Summary: "The key's lifecycle events, oldest first."},
			},
			HelpSynopsis: "Lifecycle events of a key: who did what, when and why.",
			HelpDescription: "Each event (created, rotated with cause manual/scheduled/usage, imported, config_changed, disabled, enabled, version_disabled, version_enabled, " +
				"version_destroy_scheduled, version_destroyed, deletion_scheduled, deletion_cancelled, deleted) carries its time, cause and the requester's entity ID, display name and token accessor. History outlives the key. Vault's audit devices still record every request.",
		},
	}
}

// changeKey runs f on a clone of the key under its lock and persists the result.
func (b *backend) changeKey(ctx context.Context, req *logical.Request, name string, f func(p *keyPolicy) (changed []int, resp *logical.Response)) (*keyPolicy, *logical.Response, error) {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	cur, err := b.policyLocked(ctx, req.Storage, name)
	if err != nil {
		return nil, nil, err
	}
	if cur == nil {
		return nil, logical.ErrorResponse("key %q not found", name), nil
	}
	p := cur.clone()
	changed, resp := f(p)
	if resp != nil {
		return nil, resp, nil
	}
	if err := b.storePolicy(ctx, req.Storage, p, changed...); err != nil {
		return nil, nil, err
	}
	return p, nil, nil
}

func (b *backend) pathVersionRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	p, err := b.policy(ctx, req.Storage, d.Get("name").(string))
	if err != nil || p == nil {
		return nil, err
	}
	n := d.Get("version").(int)
	if p.Versions[n] == nil {
		return nil, nil
	}
	info := b.formatVersion(p, n)
	if v := p.Versions[n]; v.PublicKey != "" {
		info["public_key"] = v.PublicKey
	}
	return &logical.Response{Data: info}, nil
}

func (b *backend) pathVersionAction(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name, n, action := d.Get("name").(string), d.Get("version").(int), d.Get("action").(string)
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	who := actorOf(req)
	var ev event
	var destroyNow, unchanged bool
	p, resp, err := b.changeKey(ctx, req, name, func(p *keyPolicy) ([]int, *logical.Response) {
		v := p.Versions[n]
		if v == nil {
			return nil, logical.ErrorResponse("key %q has no version %d", name, n)
		}
		state := p.versionState(n)
		// Repeating what already happened changes nothing (Vault retries a request once if the plugin died).
		if (action == "disable" && v.State == stateDisabled) || (action == "destroy" && (state == stateDestroyScheduled || state == stateDestroyed)) ||
			(action == "enable" && v.State == "" && (state == stateActive || state == stateDecryptOnly)) {
			unchanged = true
			return nil, nil
		}
		if state == stateDestroyed {
			return nil, logical.ErrorResponse("version %d is destroyed: its HSM objects are gone", n)
		}
		switch action {
		case "disable":
			if n == p.LatestVersion {
				return nil, logical.ErrorResponse("version %d is the latest: rotate first, or disable the whole key with keys/%s/disable", n, name)
			}
			if v.State == stateDestroyScheduled {
				return nil, logical.ErrorResponse("version %d is scheduled for destruction; enable it first to cancel that", n)
			}
			p.withVersion(n, func(v *keyVersion) { v.State = stateDisabled })
			ev = who.event("version_disabled", n, "", "")
		case "enable":
			if v.State == "" {
				return nil, logical.ErrorResponse("version %d is not disabled nor scheduled for destruction (state %s); its key's min_*_version bounds decide the rest", n, state)
			}
			detail := ""
			if v.State == stateDestroyScheduled {
				detail = "destruction cancelled"
			}
			p.withVersion(n, func(v *keyVersion) { v.State, v.DestroyAt = "", time.Time{} })
			ev = who.event("version_enabled", n, "", detail)
		case "destroy":
			if n == p.LatestVersion {
				return nil, logical.ErrorResponse("version %d is the latest: rotate first", n)
			}
			at := time.Now().UTC().Add(cfg.DeletionGracePeriod)
			p.withVersion(n, func(v *keyVersion) { v.State, v.DestroyAt = stateDestroyScheduled, at })
			ev = who.event("version_destroy_scheduled", n, "", "destruction at "+formatTime(at))
			destroyNow = cfg.DeletionGracePeriod == 0
		}
		return []int{n}, nil
	})
	if err != nil || resp != nil {
		return resp, errOrInvalid(err, resp)
	}
	if unchanged {
		return &logical.Response{Data: b.formatVersion(p, n)}, nil
	}
	b.record(ctx, req.Storage, name, ev)
	b.logger.Info("key version state changed", "key", name, "version", n, "action", action, "by", who.String())
	if destroyNow {
		if p, err = b.destroyScheduledNow(ctx, req, name, n); err != nil {
			return hsmErrorResponse(err)
		}
	}
	return &logical.Response{Data: b.formatVersion(p, n)}, nil
}

// destroyScheduledNow destroys a version scheduled with no grace period, in the request.
func (b *backend) destroyScheduledNow(ctx context.Context, req *logical.Request, name string, n int) (*keyPolicy, error) {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	cur, err := b.policyLocked(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if cur == nil || cur.Versions[n] == nil || cur.Versions[n].State != stateDestroyScheduled {
		return cur, nil
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return b.destroyVersionLocked(ctx, req.Storage, tok, cur, n, actorOf(req), "destroyed without grace period")
}

// errOrInvalid pairs an error response with ErrInvalidRequest (400).
func errOrInvalid(err error, resp *logical.Response) error {
	if err == nil && resp != nil {
		return logical.ErrInvalidRequest
	}
	return err
}

func (b *backend) pathKeyAction(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name, action := d.Get("name").(string), d.Get("action").(string)
	who := actorOf(req)
	p, resp, err := b.changeKey(ctx, req, name, func(p *keyPolicy) ([]int, *logical.Response) {
		p.Disabled = action == "disable"
		return nil, nil
	})
	if err != nil || resp != nil {
		return resp, errOrInvalid(err, resp)
	}
	kind := "disabled"
	if action == "enable" {
		kind = "enabled"
	}
	b.record(ctx, req.Storage, name, who.event(kind, 0, "", ""))
	b.logger.Info("key "+kind, "key", name, "by", who.String())
	return b.formatKey(p), nil
}

func (b *backend) pathCancelDeletion(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	who := actorOf(req)
	p, resp, err := b.changeKey(ctx, req, name, func(p *keyPolicy) ([]int, *logical.Response) {
		switch {
		case p.Deleting:
			return nil, logical.ErrorResponse("key %q is already being destroyed", name)
		case p.DeleteAt.IsZero():
			return nil, logical.ErrorResponse("key %q is not scheduled for deletion", name)
		}
		p.DeleteAt = time.Time{}
		return nil, nil
	})
	if err != nil || resp != nil {
		return resp, errOrInvalid(err, resp)
	}
	b.record(ctx, req.Storage, name, who.event("deletion_cancelled", 0, "", ""))
	b.logger.Info("key deletion cancelled", "key", name, "by", who.String())
	return b.formatKey(p), nil
}

func (b *backend) pathTrim(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	minAvail := d.Get("min_available_version").(int)
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
	switch {
	case minAvail < 1:
		return logical.ErrorResponse("min_available_version must be at least 1"), logical.ErrInvalidRequest
	case minAvail < cur.MinAvailableVersion:
		return logical.ErrorResponse("min_available_version cannot go down: it is %d", cur.MinAvailableVersion), logical.ErrInvalidRequest
	case minAvail > cur.MinDecryptionVersion:
		return logical.ErrorResponse("min_available_version %d must not exceed min_decryption_version %d", minAvail, cur.MinDecryptionVersion), logical.ErrInvalidRequest
	case cur.MinEncryptionVersion > 0 && minAvail > cur.MinEncryptionVersion:
		return logical.ErrorResponse("min_available_version %d must not exceed min_encryption_version %d", minAvail, cur.MinEncryptionVersion), logical.ErrInvalidRequest
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return hsmErrorResponse(err)
	}
	who := actorOf(req)
	// Raise the bound first, so no version about to be destroyed is used meanwhile.
	p := cur.clone()
	p.MinAvailableVersion = minAvail
	if err := b.storePolicy(ctx, req.Storage, p); err != nil {
		return nil, err
	}
	for n := 1; n < minAvail; n++ {
		if p.Versions[n].State == stateDestroyed {
			continue
		}
		if p, err = b.destroyVersionLocked(ctx, req.Storage, tok, p, n, who, "trim"); err != nil {
			return hsmErrorResponse(err)
		}
	}
	b.record(ctx, req.Storage, name, who.event("trimmed", 0, "", "min_available_version "+strconv.Itoa(minAvail)))
	return b.formatKey(p), nil
}

func (b *backend) pathHistoryRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	events, err := readHistory(ctx, req.Storage, name, d.Get("limit").(int))
	if err != nil {
		return nil, err
	}
	if len(events) == 0 {
		if p, err := b.policy(ctx, req.Storage, name); err != nil || p == nil {
			return nil, err
		}
	}
	out := make([]map[string]interface{}, len(events))
	for i, e := range events {
		m := map[string]interface{}{"time": e.Time.Format(time.RFC3339Nano), "event": e.Event}
		for k, v := range map[string]string{"cause": e.Cause, "entity_id": e.EntityID, "display_name": e.DisplayName,
			"token_accessor": e.Accessor, "details": e.Details} {
			if v != "" {
				m[k] = v
			}
		}
		if e.Version != 0 {
			m["version"] = e.Version
		}
		out[i] = m
	}
	return &logical.Response{Data: map[string]interface{}{"name": name, "events": out, "count": len(out)}}, nil
}
