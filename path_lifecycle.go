package cmk

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
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
			HelpDescription: "States: active, decrypt_only (below min_encryption_version), disabled, destroy_scheduled, destroyed (the HSM objects are gone; the metadata stays as a tombstone), retired (it serves rewrap alone). type is the version's own algorithm: a rotation may change the key's.",
		},
		{
			Pattern:      "keys/" + name + "/versions/" + version + "/(?P<action>disable|enable|destroy|retire)",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "change-state", OperationSuffix: "key-version"},
			Fields: map[string]*framework.FieldSchema{
				"name":    fieldName,
				"version": {Type: framework.TypeInt, Required: true, Description: "Key version."},
				"action":  {Type: framework.TypeString, Required: true, AllowedValues: []interface{}{"disable", "enable", "destroy", "retire"}, Description: "disable, enable, destroy or retire."},
				"reason":  {Type: framework.TypeString, Description: "retire: why (a compromise, an algorithm withdrawn), recorded in the key's history."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathVersionAction), Summary: "Disable, enable, destroy or retire one version."},
			},
			HelpSynopsis: "Disable, enable, destroy or retire one key version.",
			HelpDescription: "disable: the version serves nothing until enabled. destroy: its HSM objects are destroyed after config/keys' " +
				"deletion_grace_period (at once when 0); until then enable restores it. retire (a compromised version, or an algorithm withdrawn): the version " +
				"serves rewrap alone, so that what it protects is moved onto the latest version; decrypt, encrypt, sign, verify and hmac with it are refused, it never " +
				"serves anything else again (disabled or scheduled for destruction, enable returns it to rewrap alone), and it is then destroyed (destroy, under the key's dual control). Retiring a disabled version returns it to rewrap and is held " +
				"for approval as enabling is. keys/:name/migration shows what still relies on it. The latest version cannot be disabled, retired or destroyed: rotate first.",
		},
		{
			Pattern:      "keys/" + name + "/(?P<action>disable|enable)",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "change-state", OperationSuffix: "key"},
			Fields: map[string]*framework.FieldSchema{
				"name":   fieldName,
				"action": {Type: framework.TypeString, Required: true, AllowedValues: []interface{}{"disable", "enable"}, Description: "disable or enable."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathKeyAction), Summary: "Revoke (disable) or restore (enable) every use of the key at once."},
			},
			HelpSynopsis:    "Emergency revoke: a disabled key serves no operation until enabled.",
			HelpDescription: "While disabled, encrypt, decrypt, sign, verify, hmac and every other use fail with HTTP 400; reads of the key, its versions and history still work, and nothing is destroyed. Scheduled rotations wait.",
		},
		{
			Pattern:      "keys/" + name + "/cancel-deletion",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "cancel-deletion", OperationSuffix: "key"},
			Fields:       nameField,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathCancelDeletion), Summary: "Restore a key whose deletion is scheduled."},
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
					Description: "Versions below this one serve nothing from now on and are destroyed in the HSM after config/keys' deletion_grace_period (at once when it is 0, as Transit's trim). Must not exceed min_decryption_version or min_encryption_version, and never goes down.",
				},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathTrim), Summary: "Retire the versions below min_available_version and schedule their destruction."},
			},
			HelpSynopsis:    "Retire old versions, as Transit's trim, under the mount's deletion grace period.",
			HelpDescription: "Raises min_available_version: versions below it decrypt, verify and sign nothing from then on, and their HSM objects are destroyed when config/keys' deletion_grace_period has elapsed, as every other destruction (at once when it is 0). Their metadata stays as tombstones. min_available_version never goes down, so a trimmed version cannot be enabled again.",
		},
		{
			Pattern:      "keys/" + name + "/history",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "key-history"},
			Fields: map[string]*framework.FieldSchema{
				"name":  fieldName,
				"limit": {Type: framework.TypeInt, Query: true, Description: "Return only the newest events, at most this many (0: all)."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: b.pathHistoryRead, Summary: "The key's lifecycle events, oldest first."},
			},
			HelpSynopsis: "Lifecycle events of a key: who did what, when and why.",
			HelpDescription: "Each event (created, rotated with cause manual/scheduled/usage and, when the rotation changed the type, details naming both, imported, config_changed, disabled, enabled, version_disabled, version_enabled, " +
				"version_destroy_scheduled, version_destroyed, version_retired, decrypt_window_advanced, rotation_skipped (a scheduled rotation the mount's algorithm policy refused), deletion_scheduled, deletion_cancelled, deleted; grant_created, grant_revoked, grant_used_up, grant_expired for keys/:name/grants, whose details name the grant and who granted it; access_changed, access_removed for keys/:name/access; and dual control's approval_requested, approval_granted, approval_rejected, approval_executed, approval_failed, approval_expired, whose details name the approval and the action) carries its time, cause and the requester's entity_id and display_name, and token_accessor_hmac: the HMAC-SHA256 of the requester's token accessor under a salt of this mount's own (\"hmac-sha256:<hex>\"), never the accessor itself, as Vault's audit devices record accessors. " +
				"One token's events carry one value on this mount, so events can be told apart by token; the value differs from an audit device's HMAC of the same accessor (each audit device has a salt of its own). Events stored in clear by earlier versions of the engine are shown the same way. Each event also carries its link in the history's hash chain: seq (its place, from 1), prev_hash (the hash of the event before it; absent at seq 1) and hash; events stored before the engine chained history have none (keys/:name/history/verify). History outlives the key. Vault's audit devices still record every request.",
		},
		{
			Pattern:      "keys/" + name + "/history/verify",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "verify", OperationSuffix: "key-history"},
			Fields:       nameField,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: handle(b.pathHistoryVerify), Summary: "Check the key's history chain against its head signed by the audit key."},
			},
			HelpSynopsis: "Verify that a key's history is as recorded: a hash chain whose head the mount's audit key signed in the HSM.",
			HelpDescription: "Each event carries the hash of the one before it, and the chain's head (the last event's seq and hash) is signed by the mount's audit key (audit_key). " +
				"verified is true when every event matches its hash and follows the one before it and the last is the one the head signed. Otherwise first_broken_index " +
				"(from 0, in the order keys/:name/history lists them; the number of events when what is missing is at the end) and first_broken_seq name the first event that " +
				"does not verify, and reason says why: an event altered, removed, added or moved in storage, or a head missing or not signed by the audit key. " +
				"unchained_events counts the events stored before the engine chained history: listed, but nothing vouches for them. " +
				"An event is recorded even when the audit key cannot sign (the HSM is unreachable): lifecycle evidence is never lost, and the head is left behind " +
				"until the key's next event or, on the node that recorded it, the periodic function signs it once the HSM serves; meanwhile the events after head_seq are " +
				"reported as not vouched for. The engine signs a head only over a chain that extends the head before it, so what is changed in storage stays reported. " +
				"The chain begins at the key's creation (created, imported), or, after events stored before the engine chained history, with seq 1 pinning them (its prev_hash is " +
				"their hash): a key with no history at all is reported as history missing, and a chain that begins otherwise (what follows a history deleted whole) " +
				"is reported and never signed. The history of a deleted key is verified alike. The check uses the public keys of the audit key versions the token holds (audit_key); an auditor checks the same chain offline with audit_key's public keys. " +
				"What verification cannot see alone: storage put back whole as it was earlier (an older head with the events it signed) verifies by itself. The engine " +
				"remembers, per key and for as long as the plugin process runs, the highest head it signed or saw signed: a head behind it, or another event at its seq, is " +
				"reported (\"history rolled back: seq N was signed at ...\") and never signed over; the events that follow are recorded all the same. After a storage " +
				"restore made on purpose, reloading the plugin (vault plugin reload) makes it forget what it saw. A rollback " +
				"across a restart of the plugin (or a failover) is caught only by comparing with an evidence bundle taken earlier: cmk-evidence verify --previous old-bundle.json. " +
				"The check asks the token for the audit key versions it has not checked yet: it answers 503 while the HSM cannot be reached.",
		},
	}
}

func (b *backend) pathVersionRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	k, err := b.keys.Get(ctx, req.Storage, d.Get("name").(string))
	if err != nil || k == nil {
		return nil, err
	}
	n := d.Get("version").(int)
	v := k.Versions[n]
	if v == nil {
		return nil, nil
	}
	info := b.formatVersion(k, n)
	if v.PublicKey != "" {
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
	grace := cfg.destructionGrace()
	at := time.Now().UTC().Add(grace)
	change := func(tx *keys.Tx) error { return tx.SetVersionState(n, action, at, grace == 0) }
	if action == "retire" {
		reason := d.Get("reason").(string)
		change = func(tx *keys.Tx) error { return tx.RetireVersion(n, reason) }
	}
	if action != "disable" { // an emergency stop never waits
		judged, err := b.keys.Get(ctx, req.Storage, name)
		if err != nil {
			return nil, err
		}
		if resp, err := b.holdVersionAction(ctx, req, judged, n, action, at); resp != nil || err != nil {
			return resp, err
		}
		if change, err = b.onJudged(ctx, req, judged, change); err != nil {
			return nil, err
		}
	}
	k, err := b.keys.Update(ctx, req.Storage, name, actorOf(req), change)
	if err != nil {
		return respond(err)
	}
	b.logger.Info("key version state changed", "key", name, "version", n, "action", action, "by", actorOf(req).String())
	return &logical.Response{Data: b.formatVersion(k, n)}, nil
}

// holdVersionAction holds a version's destruction, and its enabling when it serves nothing (disabled, or
// scheduled for destruction: enabling cancels that), if they would change it; a disable is never held. A request
// the lifecycle refuses is refused at once, not held.
func (b *backend) holdVersionAction(ctx context.Context, req *logical.Request, k *keys.Key, n int, action string, at time.Time) (*logical.Response, error) {
	if k == nil || action == "disable" {
		return nil, nil
	}
	var changed bool
	var err error
	switch trial := k.Clone(); action {
	case "destroy":
		changed, err = trial.ScheduleVersionDestruction(n, at)
	case "enable":
		changed, _, err = trial.EnableVersion(n)
	case "retire":
		// Retiring restricts a serving version: never held. A disabled version retired serves rewrap again: held
		// as enabling it would be.
		changed, err = trial.RetireVersionFromDisabled(n)
	}
	if err != nil {
		return respond(err)
	}
	if !changed {
		return nil, nil
	}
	what := fmt.Sprintf("destroy version %d", n)
	switch action {
	case "enable":
		what = fmt.Sprintf("enable version %d (%s)", n, k.VersionState(n))
	case "retire":
		what = fmt.Sprintf("retire the disabled version %d (it serves rewrap again)", n)
	}
	return b.holdForApproval(ctx, req, k, what)
}

func (b *backend) pathKeyAction(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name, action := d.Get("name").(string), d.Get("action").(string)
	change := func(tx *keys.Tx) error {
		tx.SetDisabled(action == "disable")
		return nil
	}
	if action == "enable" {
		// Disabling is an emergency stop and never waits; returning a disabled key to use is held.
		judged, err := b.keys.Get(ctx, req.Storage, name)
		if err != nil {
			return nil, err
		}
		if judged != nil && judged.Disabled {
			if resp, err := b.holdForApproval(ctx, req, judged, "enable the disabled key"); resp != nil || err != nil {
				return resp, err
			}
		}
		if change, err = b.onJudged(ctx, req, judged, change); err != nil {
			return nil, err
		}
	}
	k, err := b.keys.Update(ctx, req.Storage, name, actorOf(req), change)
	if err != nil {
		return respond(err)
	}
	b.logger.Info("key "+action+"d", "key", name, "by", actorOf(req).String())
	return b.formatKey(k), nil
}

func (b *backend) pathCancelDeletion(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	// Cancelling a deletion returns the key to use, as enabling it does: held alike.
	judged, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if judged != nil && !judged.DeleteAt.IsZero() && !judged.Deleting {
		if resp, err := b.holdForApproval(ctx, req, judged, "cancel the key's scheduled deletion"); resp != nil || err != nil {
			return resp, err
		}
	}
	change, err := b.onJudged(ctx, req, judged, func(tx *keys.Tx) error { return tx.CancelDeletion() })
	if err != nil {
		return nil, err
	}
	k, err := b.keys.Update(ctx, req.Storage, name, actorOf(req), change)
	if err != nil {
		return respond(err)
	}
	b.logger.Info("key deletion cancelled", "key", name, "by", actorOf(req).String())
	return b.formatKey(k), nil
}

func (b *backend) pathTrim(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	minAvail := d.Get("min_available_version").(int)
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	grace := cfg.destructionGrace()
	at := time.Now().UTC().Add(grace)
	cur, err := b.keys.Get(ctx, req.Storage, d.Get("name").(string))
	if err != nil {
		return nil, err
	}
	if cur != nil && minAvail > cur.MinAvailableVersion {
		if err := cur.Clone().Trim(minAvail); err != nil {
			return respond(err)
		}
		if resp, err := b.holdForApproval(ctx, req, cur, fmt.Sprintf("trim: destroy the versions below %d", minAvail)); resp != nil || err != nil {
			return resp, err
		}
	}
	change, err := b.onJudged(ctx, req, cur, func(tx *keys.Tx) error { return tx.Trim(minAvail, at, grace == 0) })
	if err != nil {
		return nil, err
	}
	k, err := b.keys.Update(ctx, req.Storage, d.Get("name").(string), actorOf(req), change)
	if err != nil {
		return respond(err)
	}
	return b.formatKey(k), nil
}

func (b *backend) pathHistoryRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	events, err := b.keys.History(ctx, req.Storage, name, d.Get("limit").(int))
	if err != nil {
		return nil, err
	}
	if len(events) == 0 {
		if k, err := b.keys.Get(ctx, req.Storage, name); err != nil || k == nil {
			return nil, err
		}
	}
	out := make([]map[string]interface{}, len(events))
	for i, e := range events {
		m := map[string]interface{}{"time": e.Time.Format(time.RFC3339Nano), "event": e.Event}
		for k, v := range map[string]string{"cause": e.Cause, "entity_id": e.EntityID, "display_name": e.DisplayName,
			"token_accessor_hmac": e.AccessorHMAC, "details": e.Details} {
			if v != "" {
				m[k] = v
			}
		}
		if e.Version != 0 {
			m["version"] = e.Version
		}
		if e.Seq != 0 {
			m["seq"], m["hash"] = e.Seq, e.Hash
			if e.PrevHash != "" {
				m["prev_hash"] = e.PrevHash
			}
		}
		out[i] = m
	}
	return &logical.Response{Data: map[string]interface{}{"name": name, "events": out, "count": len(out)}}, nil
}

func (b *backend) pathHistoryVerify(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	events, head, v, err := b.keys.VerifyHistory(ctx, req.Storage, name)
	if err != nil {
		return respond(err)
	}
	if len(events) == 0 && head == nil {
		if k, err := b.keys.Get(ctx, req.Storage, name); err != nil || k == nil {
			return nil, err
		}
	}
	data := map[string]interface{}{
		"name":                   name,
		"verified":               v.Verified,
		"events":                 v.Events,
		"unchained_events":       v.Unchained,
		"first_broken_index":     v.Broken,
		"first_broken_seq":       v.BrokenSeq,
		"reason":                 v.Reason,
		"head_signed":            v.HeadSigned,
		"head_seq":               0,
		"head_hash":              "",
		"head_signed_at":         "",
		"head_audit_key_version": 0,
	}
	if head != nil {
		data["head_seq"], data["head_hash"] = head.Seq, head.Hash
		data["head_signed_at"], data["head_audit_key_version"] = head.SignedAt.UTC().Format(time.RFC3339Nano), head.AuditKeyVersion
	}
	return &logical.Response{Data: data}, nil
}
