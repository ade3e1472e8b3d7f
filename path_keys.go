package cmk

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Transit features the HSM makes impossible; each is refused with a message that says why.
const (
	msgNonExtractable = "key material is non-extractable: it never leaves the HSM"
	msgNoDerivation   = "key derivation (derived/context) is not supported with HSM keys: the HSM holds one key per version and derives none"
	msgNoConvergent   = "convergent encryption (convergent_encryption/nonce) is not supported with HSM keys: nonces are always random"
)

func (b *backend) pathKeys() []*framework.Path {
	return []*framework.Path{
		{
			Pattern: "keys/?$",
			DisplayAttrs: &framework.DisplayAttributes{
				OperationPrefix: "cmk",
				OperationSuffix: "keys",
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{
					Callback: b.pathKeysList,
					Summary:  "List the names of the mount's keys.",
				},
			},
			HelpSynopsis:    "List the keys.",
			HelpDescription: "Lists the names of the keys of this mount, as Transit's keys LIST does.",
		},
		{
			Pattern: "keys/" + framework.GenericNameRegex("name"),
			DisplayAttrs: &framework.DisplayAttributes{
				OperationPrefix: "cmk",
				OperationSuffix: "key",
			},
			Fields: withKeyOptions(map[string]*framework.FieldSchema{
				"name": {Type: framework.TypeString, Required: true, Description: "Name of the key."},
				"type": {
					Type:          framework.TypeString,
					Default:       string(keys.TypeAES256GCM96),
					AllowedValues: allowedKeyTypes(),
					Description:   "Type of key to create, generated inside the HSM: " + strings.Join(keys.TypeNames, ", ") + ".",
				},
				"key_size": {
					Type:        framework.TypeInt,
					Description: fmt.Sprintf("hmac keys only: size of the HMAC secret in bytes, %d to %d (0 or unset: %d). The token may refuse a key shorter than the hash output.", minHMACKeySize, maxHMACKeySize, hsm.HMACKeySize),
				},
				"derived": {
					Type:        framework.TypeBool,
					Description: "Transit's key derivation. Only false is accepted: " + msgNoDerivation + ".",
				},
				"convergent_encryption": {
					Type:        framework.TypeBool,
					Description: "Transit's convergent encryption. Only false is accepted: " + msgNoConvergent + ".",
				},
			}),
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{
					Callback: handle(b.pathKeyWrite, transitKeyFields...),
					Summary:  "Create a key whose first version is generated in the HSM (no change if it exists).",
				},
				logical.ReadOperation: &framework.PathOperation{
					Callback: b.pathKeyRead,
					Summary:  "Read a key's settings and versions, with each version's HSM object identity.",
				},
				logical.DeleteOperation: &framework.PathOperation{
					Callback: b.pathKeyDelete,
					Summary:  "Delete a key and destroy its HSM objects (needs deletion_allowed).",
				},
			},
			HelpSynopsis:    "Create, read or delete an HSM-backed key.",
			HelpDescription: keysHelp,
		},
		{
			Pattern: "keys/" + framework.GenericNameRegex("name") + "/config",
			DisplayAttrs: &framework.DisplayAttributes{
				OperationPrefix: "cmk",
				OperationVerb:   "configure",
				OperationSuffix: "key",
			},
			Fields: withKeyOptions(map[string]*framework.FieldSchema{
				"name": {Type: framework.TypeString, Required: true, Description: "Name of the key."},
				"min_decryption_version": {
					Type:        framework.TypeInt,
					Description: "Lowest version that may decrypt; older ciphertexts are refused. 0 means 1.",
				},
				"min_encryption_version": {
					Type:        framework.TypeInt,
					Description: "Lowest version that may encrypt when key_version is given; 0 means any. Must not be below min_decryption_version.",
				},
				"deletion_allowed": {
					Type:        framework.TypeBool,
					Description: "Whether DELETE keys/<name> may destroy the key.",
				},
				"next_rotation_time": {
					Type:        framework.TypeString,
					Description: "RFC 3339 time of the next rotation; it then continues every auto_rotate_period. Empty string clears it.",
				},
				"allow_pkcs1v15_decryption": {
					Type:        framework.TypeBool,
					Description: "RSA keys (or keys with RSA versions): accept decrypt and rewrap with PKCS#1 v1.5 padding (default false: refused, as a padding oracle). When true, a ciphertext with invalid padding is answered with implicit rejection: a pseudo-random message derived from it under the version's HMAC secret, never an error. The key's HMAC secrets are then reserved for this: hmac and verify with hmac are refused, and opting in is refused while a version already has an HMAC secret (hmac_secret_on_token), which hmac may have used.",
				},
				"decrypt_window": {
					Type: framework.TypeString,
					Description: "Rolling decryption window: a number of versions (3: the latest three decrypt and verify) or a period (2160h or 90d: versions superseded " +
						"less than that ago do). min_decryption_version then advances by itself after rotations, with a decrypt_window_advanced history event, but never past " +
						"a version that decrypted or verified within decrypt_window_quiet_period (keys/:name/migration shows when each last did) or whose use is not counted " +
						"(usage analytics off): raise min_decryption_version here to go further. Empty or 0 turns it off.",
				},
				"decrypt_window_quiet_period": {
					Type:        framework.TypeDurationSecond,
					Description: "How long a version must have gone without decrypting or verifying before the decrypt window passes it; 0 is the default, 7 days.",
				},
				"next_type": {
					Type: framework.TypeString,
					Description: "Type the next rotation of any cause (scheduled, usage or manual without type) gives the new version: another of the key's purpose, " +
						"as keys/:name/rotate's type. Cleared once a version of it is made; an empty string clears it.",
				},
			}),
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{
					Callback: handle(b.pathKeyConfigWrite, providerConfigTypo),
					Summary:  "Change a key's version bounds, deletion, rotation, usage limit, dual control and ownership settings.",
				},
			},
			HelpSynopsis:    "Configure a key's version bounds, deletion, rotation schedule, usage limit, dual control, ownership and anomaly actions.",
			HelpDescription: "Sets min_decryption_version, min_encryption_version and deletion_allowed as Transit does, the rotation schedule (auto_rotate_period, next_rotation_time), max_encryptions_per_version, the type of the next rotation's version (next_type), a rolling decrypt window (decrypt_window, decrypt_window_quiet_period), dual control (approvals_required, approver_groups), who owns the key (owner, description, tags, data_assets: each replaces what the key had) and what an unusual use does (on_anomaly, anomaly_rate_limit, anomaly_action_period; see keys/:name/anomalies). The key's history records config_changed naming each setting that changed. Settings that would expose material are refused.",
		},
	}
}

func (b *backend) pathKeysList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	names, err := keys.List(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return logical.ListResponse(names), nil
}

// withKeyOptions adds the options that keys/<name> and keys/<name>/config share.
func withKeyOptions(fields map[string]*framework.FieldSchema) map[string]*framework.FieldSchema {
	for _, f := range []string{"exportable", "allow_plaintext_backup"} {
		fields[f] = &framework.FieldSchema{Type: framework.TypeBool, Description: "Only false is accepted: " + msgNonExtractable + "."}
	}
	fields["auto_rotate_period"] = &framework.FieldSchema{
		Type:        framework.TypeDurationSecond,
		Description: "Rotate the key automatically this often: 0 disables, else at least 1h. Defaults to config/keys' auto_rotate_period.",
	}
	fields["max_encryptions_per_version"] = &framework.FieldSchema{
		Type:        framework.TypeInt,
		Description: "Rotate after this many encryptions with one version (AES keys). 0 means the AES-GCM random-nonce limit of 2^32, which always applies.",
	}
	fields["approvals_required"] = &framework.FieldSchema{
		Type:        framework.TypeInt,
		Description: fmt.Sprintf("Dual control: how many other Vault entities must approve the key's requests that cannot be undone (0 to %d; see approvals/). The mount's min_approvals_required may require more. Defaults to config/keys' default_approvals_required. Lowering it is itself held.", keys.MaxApprovalsRequired),
	}
	withOwnership(fields)
	withAnomalySettings(fields)
	fields["approver_groups"] = &framework.FieldSchema{
		Type:        framework.TypeCommaStringSlice,
		Description: "Dual control: only members of these Vault groups (names or ids) may approve the key's held requests; empty: any entity Vault's ACL lets call approvals/. Changing it is held.",
	}
	return fields
}

// withOwnership adds the fields that say who owns a key and what it protects: keys/<name>, keys/<name>/config and
// the creation of an imported key.
func withOwnership(fields map[string]*framework.FieldSchema) map[string]*framework.FieldSchema {
	fields["owner"] = &framework.FieldSchema{
		Type:        framework.TypeString,
		Description: fmt.Sprintf("Who answers for the key: a Vault entity id, a group or a team name (at most %d characters; empty clears it). Listed by inventory; reports/compliance names keys without one.", keys.MaxOwner),
	}
	fields["description"] = &framework.FieldSchema{
		Type:        framework.TypeString,
		Description: fmt.Sprintf("What the key is for, in words (at most %d characters).", keys.MaxDescription),
	}
	fields["tags"] = &framework.FieldSchema{
		Type:        framework.TypeKVPairs,
		Description: fmt.Sprintf("Tags as key=value pairs (a map in JSON, or repeated key=value on the CLI): at most %d, keys up to %d characters, values up to %d. Replaces the key's tags; an empty map clears them. inventory filters on them.", keys.MaxTags, keys.MaxTagKey, keys.MaxTagValue),
	}
	fields["data_assets"] = &framework.FieldSchema{
		Type:        framework.TypeCommaStringSlice,
		Description: fmt.Sprintf("What the key protects: names of data stores, tables, buckets or systems (at most %d, each up to %d characters). Replaces the key's list; empty clears it.", keys.MaxDataAssets, keys.MaxDataAssetName),
	}
	return fields
}

// withAnomalySettings adds what a key does when a caller's use of it is unusual (keys/:name/anomalies).
func withAnomalySettings(fields map[string]*framework.FieldSchema) {
	actions := make([]interface{}, len(keys.AnomalyActionNames))
	for i, a := range keys.AnomalyActionNames {
		actions[i] = a
	}
	fields["on_anomaly"] = &framework.FieldSchema{
		Type:          framework.TypeString,
		AllowedValues: actions,
		Description:   "What an anomaly of a caller's use does besides its log line, history event and metric: alert (the default: nothing more), require_grant (the caller may use the key only under a live grant until anomaly_action_period has passed) or block_caller (its uses are denied that long). See keys/:name/anomalies.",
	}
	fields["anomaly_rate_limit"] = &framework.FieldSchema{
		Type:        framework.TypeInt,
		Description: "Uses per minute (of the clock, all operations, a batch's items each) by one caller above which a use is an anomaly (rate_above_limit); 0 (default): no cap.",
	}
	fields["anomaly_action_period"] = &framework.FieldSchema{
		Type:        framework.TypeDurationSecond,
		Description: fmt.Sprintf("How long require_grant or block_caller lasts after an anomaly (0: the default, %s; at most %s).", keys.DefaultAnomalyActionPeriod, keys.MaxAnomalyActionPeriod),
	}
}

// anomalySettingsFrom reads the fields of withAnomalySettings into c.
func anomalySettingsFrom(d *framework.FieldData, c *keys.Settings) {
	if v, ok := d.GetOk("on_anomaly"); ok {
		action := v.(string)
		c.OnAnomaly = &action
	}
	if v, ok := d.GetOk("anomaly_rate_limit"); ok {
		n := v.(int)
		c.AnomalyRateLimit = &n
	}
	if v, ok := d.GetOk("anomaly_action_period"); ok {
		p := time.Duration(v.(int)) * time.Second
		c.AnomalyActionPeriod = &p
	}
}

// ownershipFrom reads the fields of withOwnership into c.
func ownershipFrom(d *framework.FieldData, c *keys.Settings) {
	if v, ok := d.GetOk("owner"); ok {
		owner := v.(string)
		c.Owner = &owner
	}
	if v, ok := d.GetOk("description"); ok {
		description := v.(string)
		c.Description = &description
	}
	if v, ok := d.GetOk("tags"); ok {
		tags := v.(map[string]string)
		c.Tags = &tags
	}
	if v, ok := d.GetOk("data_assets"); ok {
		assets := v.([]string)
		c.DataAssets = &assets
	}
}

// Fields Transit's keys/<name> knows and this engine has no use for; they are accepted and ignored, as Transit
// ignores them for the key types here (managed keys, ML-DSA parameter sets and hybrid keys are not types here;
// context matters only for derived keys).
var transitKeyFields = []string{"context", "managed_key_name", "managed_key_id", "parameter_set", "hybrid_key_type_pqc", "hybrid_key_type_ec"}

// providerConfigTypo is what Terraform's Vault provider sends on keys/<name>/config for every key its
// vault_transit_secret_backend_key creates, instead of min_encryption_version (its update sends the right name).
// Transit ignores it; refusing it would fail every key the provider creates. Accepted, ignored, and warned about.
const providerConfigTypo = "min_encryption_versoin"

// refuseUnsupported checks the Transit options that cannot hold for HSM keys.
func refuseUnsupported(d *framework.FieldData) error {
	for _, field := range []string{"derived", "convergent_encryption", "exportable", "allow_plaintext_backup"} {
		msg := map[string]string{"derived": msgNoDerivation, "convergent_encryption": msgNoConvergent}[field]
		if msg == "" {
			msg = msgNonExtractable
		}
		if v, ok := d.GetOk(field); ok && v.(bool) {
			return callerf("%s=true is not possible: %s", field, msg)
		}
	}
	return nil
}

// settingsFrom reads the fields of keys/<name>/config (and of a key's creation) that change its settings.
func settingsFrom(d *framework.FieldData) (keys.Settings, error) {
	var c keys.Settings
	if v, ok := d.GetOk("min_decryption_version"); ok {
		n := v.(int)
		c.MinDecryptionVersion = &n
	}
	if v, ok := d.GetOk("min_encryption_version"); ok {
		n := v.(int)
		c.MinEncryptionVersion = &n
	}
	if v, ok := d.GetOk("deletion_allowed"); ok {
		b := v.(bool)
		c.DeletionAllowed = &b
	}
	if v, ok := d.GetOk("auto_rotate_period"); ok {
		p := time.Duration(v.(int)) * time.Second
		c.AutoRotatePeriod = &p
	}
	if v, ok := d.GetOk("max_encryptions_per_version"); ok {
		n := v.(int)
		c.MaxEncryptions = &n
	}
	if v, ok := d.GetOk("allow_pkcs1v15_decryption"); ok {
		allow := v.(bool)
		c.AllowPKCS1v15Decryption = &allow
	}
	if v, ok := d.GetOk("next_type"); ok {
		t := v.(string)
		c.NextType = &t
	}
	if v, ok := d.GetOk("decrypt_window"); ok {
		w := v.(string)
		c.DecryptWindow = &w
	}
	if v, ok := d.GetOk("decrypt_window_quiet_period"); ok {
		q := time.Duration(v.(int)) * time.Second
		c.DecryptQuietPeriod = &q
	}
	if v, ok := d.GetOk("approvals_required"); ok {
		n := v.(int)
		c.ApprovalsRequired = &n
	}
	if v, ok := d.GetOk("approver_groups"); ok {
		groups := v.([]string)
		c.ApproverGroups = &groups
	}
	ownershipFrom(d, &c)
	anomalySettingsFrom(d, &c)
	if v, ok := d.GetOk("next_rotation_time"); ok {
		var t time.Time
		if raw := v.(string); raw != "" {
			var err error
			if t, err = time.Parse(time.RFC3339, raw); err != nil {
				return c, callerf("next_rotation_time must be an RFC 3339 time such as 2026-01-02T15:04:05Z: %v", err)
			}
		}
		c.NextRotation = &t
	}
	return c, nil
}

func (b *backend) pathKeyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	if err := refuseUnsupported(d); err != nil {
		return respond(err)
	}
	typ, err := keys.ParseType(d.Get("type").(string))
	if err != nil {
		return respond(err)
	}
	// key_size 0 is "unset", as in Transit: Terraform's vault_transit_secret_backend_key always sends it.
	hmacSize := d.Get("key_size").(int)
	if hmacSize != 0 {
		if typ != keys.TypeHMAC {
			return respond(callerf("key_size is valid for hmac keys only, not %s", typ))
		}
		if hmacSize < minHMACKeySize || hmacSize > maxHMACKeySize {
			return respond(callerf("key_size must be between %d and %d bytes", minHMACKeySize, maxHMACKeySize))
		}
	}
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	k := &keys.Key{Name: name, Type: typ, HMACKeySize: hmacSize, AutoRotatePeriod: cfg.AutoRotatePeriod, ApprovalsRequired: cfg.DefaultApprovalsRequired}
	settings, err := settingsFrom(d)
	if err == nil {
		err = k.Apply(settings)
	}
	if err != nil {
		return respond(err)
	}
	k, created, err := b.keys.Create(ctx, req.Storage, k, actorOf(req), nil)
	if err != nil {
		return respond(err)
	}
	resp := b.formatKey(k)
	if !created {
		resp.AddWarning(fmt.Sprintf("key %s already existed", name))
	}
	return resp, nil
}

func (b *backend) pathKeyRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	k, err := b.keys.Get(ctx, req.Storage, d.Get("name").(string))
	if err != nil || k == nil {
		return nil, err
	}
	return b.formatKey(k), nil
}

// formatVersion describes one version: its state, where it lives in the HSM, its history and use.
func (b *backend) formatVersion(k *keys.Key, n int) map[string]interface{} {
	v := k.Versions[n]
	info := map[string]interface{}{
		"version":       n,
		"type":          string(v.Type), // a rotation may have changed the key's type: each version keeps its own
		"state":         k.VersionState(n),
		"hsm_id":        v.HSMID,
		"label":         v.Label,
		"creation_time": v.CreatedAt.Format(time.RFC3339Nano),
		"created_by":    v.CreatedBy,
		// Whether the version's HMAC secret is on the token yet (it is made with the version's first HMAC), so
		// that an operator counting objects on the token knows what to expect.
		"hmac_secret_on_token": !v.HMACDeferred,
	}
	if tok := b.connectedToken(); tok != nil && v.State != keys.StateDestroyed {
		if missing := tok.MissingObjects(v.ID()); len(missing) > 0 {
			m := map[string]interface{}{}
			for kind, since := range missing {
				m[kind] = keys.FormatTime(since)
			}
			info["hsm_objects_missing"] = m
		}
	}
	if v.Type == keys.TypeHMAC {
		info["key_size"] = v.HMACKeySize
	}
	if v.ImportMethod != "" {
		info["import_method"] = v.ImportMethod
	}
	if v.PublicOnly() {
		info["public_key_only"] = true // nothing on the token until its private key is imported
	}
	if !v.AdoptedAt.IsZero() {
		info["adopted_time"] = keys.FormatTime(v.AdoptedAt)
	}
	if v.EncryptionsUnknown {
		info["encryptions_unknown"] = true
	}
	if !v.DestroyAt.IsZero() {
		info["destruction_scheduled_time"] = keys.FormatTime(v.DestroyAt)
	}
	if !v.DestroyedAt.IsZero() {
		info["destroyed_time"] = keys.FormatTime(v.DestroyedAt)
	}
	if v.Type.IsAES() {
		if used, ok := b.keys.EncryptionCount(k.Name, n); ok {
			info["encryptions"] = used
		}
	}
	return info
}

// formatKey gives Transit's key read response, plus where each version lives in the HSM.
func (b *backend) formatKey(k *keys.Key) *logical.Response {
	symmetric := map[string]int64{}
	asymmetric := map[string]interface{}{}
	versions := map[string]interface{}{}
	for n, v := range k.Versions {
		s := strconv.Itoa(n)
		if k.Type.Asymmetric() {
			asymmetric[s] = map[string]interface{}{
				"name":              v.Type.PublicKeyName(),
				"public_key":        v.PublicKey,
				"certificate_chain": v.CertificateChain,
				"creation_time":     v.CreatedAt.Format(time.RFC3339Nano),
			}
		} else {
			symmetric[s] = v.CreatedAt.Unix()
		}
		versions[s] = b.formatVersion(k, n)
	}
	var keyMap interface{} = symmetric
	if k.Type.Asymmetric() {
		keyMap = asymmetric
	}
	data := map[string]interface{}{
		"name":                        k.Name,
		"type":                        string(k.Type),
		"derived":                     false,
		"exportable":                  false,
		"allow_plaintext_backup":      false,
		"deletion_allowed":            k.DeletionAllowed,
		"access":                      k.Access.Summary(),
		"min_available_version":       k.MinAvailableVersion,
		"min_decryption_version":      k.MinDecryptionVersion,
		"min_encryption_version":      k.MinEncryptionVersion,
		"latest_version":              k.LatestVersion,
		"supports_encryption":         k.Type.Info().Encrypt,
		"supports_decryption":         decrypts(k), // older RSA versions of a key now ECDSA still decrypt
		"supports_signing":            k.Type.Info().Sign,
		"supports_derivation":         false,
		"auto_rotate_period":          int64(k.AutoRotatePeriod.Seconds()),
		"imported_key":                k.Imported,
		"next_rotation_time":          keys.FormatTime(k.NextRotation),
		"last_rotated":                keys.FormatTime(k.LastRotated),
		"max_encryptions_per_version": k.EncryptionLimit(),
		"disabled":                    k.Disabled,
		"deletion_scheduled_time":     keys.FormatTime(k.DeleteAt),
		"keys":                        keyMap,
		"protection_level":            "hsm",
		"versions":                    versions,
		"creation_time":               k.CreatedAt.Format(time.RFC3339Nano),
		"approvals_required":          k.ApprovalsRequired,
		"approver_groups":             append([]string{}, k.ApproverGroups...),
		"owner":                       k.Owner,
		"description":                 k.Description,
		"tags":                        tagsView(k.Tags),
		"data_assets":                 append([]string{}, k.DataAssets...),
		"on_anomaly":                  k.OnAnomalyAction(),
		"anomaly_rate_limit":          k.AnomalyRateLimit,
		"anomaly_action_period":       int64(k.ActionPeriod().Seconds()),
	}
	if k.Deleting {
		data["deletion_in_progress"] = true
	}
	if !k.Type.IsAES() {
		delete(data, "max_encryptions_per_version")
	}
	if k.AnyVersionOf(keys.Type.IsRSA) {
		data["allow_pkcs1v15_decryption"] = k.AllowPKCS1v15Decryption
	}
	if !k.RotationHeldUntil.IsZero() {
		data["rotation_held_until"] = keys.FormatTime(k.RotationHeldUntil)
	}
	if k.Type == keys.TypeHMAC {
		data["key_size"] = k.HMACKeyBytes()
	}
	if k.NextType != "" {
		data["next_type"] = string(k.NextType)
	}
	if k.HasDecryptWindow() {
		data["decrypt_window"] = k.DecryptWindowView()
		data["decrypt_window_quiet_period"] = int64(k.QuietPeriod().Seconds())
		data["decrypt_window_next_check"] = keys.FormatTime(k.WindowCheckAt)
	}
	if k.Imported {
		data["imported_key_allow_rotation"] = k.AllowRotation
	}
	return &logical.Response{Data: data}
}

// decrypts reports whether a version of k that still serves decrypts: the latest's type, or an older one's.
func decrypts(k *keys.Key) bool {
	for n, v := range k.Versions {
		switch k.VersionState(n) {
		case keys.StateActive, keys.StateDecryptOnly, keys.StateRetired:
			if v.Type.Info().Encrypt {
				return true
			}
		}
	}
	return false
}

// tagsView is a key's tags for a response: a copy, never nil.
func tagsView(tags map[string]string) map[string]string {
	out := make(map[string]string, len(tags))
	for k, v := range tags {
		out[k] = v
	}
	return out
}

func (b *backend) pathKeyDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	cur, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if cur != nil && cur.DeletionAllowed && cur.DeleteAt.IsZero() && !cur.Deleting {
		// A deletion already scheduled, or one cut short, is finished without asking again.
		if resp, err := b.holdForApproval(ctx, req, cur, "delete the key"); resp != nil || err != nil {
			return resp, err
		}
	}
	change, err := b.onJudged(ctx, req, cur, func(tx *keys.Tx) error { return tx.Delete(cfg.destructionGrace()) })
	if err != nil {
		return nil, err
	}
	k, err := b.keys.Update(ctx, req.Storage, name, actorOf(req), change)
	switch {
	case errors.Is(err, keys.ErrNotFound):
		return nil, nil // as Transit: deleting what is not there succeeds
	case err != nil:
		return respond(err)
	case k == nil || k.DeleteAt.IsZero():
		return nil, nil
	}
	at := keys.FormatTime(k.DeleteAt)
	return &logical.Response{
		Data:     map[string]interface{}{"deletion_scheduled_time": at},
		Warnings: []string{fmt.Sprintf("the key serves nothing from now on and is destroyed at %s; keys/%s/cancel-deletion restores it until then", at, name)},
	}, nil
}

func (b *backend) pathKeyConfigWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if err := refuseUnsupported(d); err != nil {
		return respond(err)
	}
	settings, err := settingsFrom(d)
	if err != nil {
		return respond(err)
	}
	if settings.NextType != nil && *settings.NextType != "" {
		// A pending type the mount's algorithm policy refuses would only fail at the rotation: refused now.
		cfg, err := b.readKeysConfig(ctx, req.Storage)
		if err != nil {
			return nil, err
		}
		if err := cfg.refusesType(keys.Type(strings.ToLower(*settings.NextType)), time.Now()); err != nil {
			return respond(err)
		}
	}
	judged, err := b.keys.Get(ctx, req.Storage, d.Get("name").(string))
	if err != nil {
		return nil, err
	}
	if resp, err := b.holdWeakerDualControl(ctx, req, judged, settings); resp != nil || err != nil {
		return resp, err
	}
	change, err := b.onJudged(ctx, req, judged, func(tx *keys.Tx) error { return tx.Configure(settings) })
	if err != nil {
		return nil, err
	}
	k, err := b.keys.Update(ctx, req.Storage, d.Get("name").(string), actorOf(req), change)
	if err != nil {
		return respond(err)
	}
	resp := b.formatKey(k)
	if _, ok := req.Data[providerConfigTypo]; ok {
		resp.AddWarning(providerConfigTypo + " is not a field (min_encryption_version is) and was ignored, as Transit ignores it")
	}
	if settings.NextRotation != nil && !settings.NextRotation.IsZero() && settings.NextRotation.Before(time.Now()) {
		resp.AddWarning(fmt.Sprintf("next_rotation_time %s is in the past: the key is rotated at the next periodic run (within about a minute)", keys.FormatTime(*settings.NextRotation)))
	}
	return resp, nil
}

// holdWeakerDualControl holds a configuration of key cur that lowers its approvals_required or changes its
// approver_groups (dual control is weakened only with the approvals it asks for), or lowers its
// min_decryption_version (versions below it serve nothing: lowering it returns them to use, as enabling a
// disabled version does).
func (b *backend) holdWeakerDualControl(ctx context.Context, req *logical.Request, cur *keys.Key, settings keys.Settings) (*logical.Response, error) {
	if cur == nil || (settings.ApprovalsRequired == nil && settings.ApproverGroups == nil && settings.MinDecryptionVersion == nil) {
		return nil, nil
	}
	next := cur.Clone()
	if err := next.Apply(settings); err != nil {
		return respond(err)
	}
	var changes []string
	if next.ApprovalsRequired < cur.ApprovalsRequired {
		changes = append(changes, fmt.Sprintf("lower approvals_required from %d to %d", cur.ApprovalsRequired, next.ApprovalsRequired))
	}
	if next.MinDecryptionVersion < cur.MinDecryptionVersion {
		changes = append(changes, fmt.Sprintf("lower min_decryption_version from %d to %d (versions %d to %d decrypt again)", cur.MinDecryptionVersion, next.MinDecryptionVersion, max(next.MinDecryptionVersion, 1), cur.MinDecryptionVersion-1))
	}
	if !slices.Equal(next.ApproverGroups, cur.ApproverGroups) {
		changes = append(changes, fmt.Sprintf("change approver_groups from [%s] to [%s]", strings.Join(cur.ApproverGroups, ", "), strings.Join(next.ApproverGroups, ", ")))
	}
	if len(changes) == 0 {
		return nil, nil
	}
	return b.holdForApproval(ctx, req, cur, strings.Join(changes, "; "))
}

// pathRefused answers Transit's paths that would reveal key material with a 400 that says why.
func (b *backend) pathRefused() []*framework.Path {
	refuse := func(msg string) framework.OperationFunc {
		return func(context.Context, *logical.Request, *framework.FieldData) (*logical.Response, error) {
			return respond(callerf("%s", msg))
		}
	}
	exportOps := map[logical.Operation]framework.OperationHandler{
		logical.ReadOperation: &framework.PathOperation{Callback: refuse(msgNonExtractable), Summary: "Refused: " + msgNonExtractable + "."},
	}
	return []*framework.Path{
		{
			Pattern:      "backup/" + framework.GenericNameRegex("name"),
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "back-up", OperationSuffix: "key"},
			Fields: map[string]*framework.FieldSchema{
				"name": {Type: framework.TypeString, Description: "Name of the key."},
			},
			Operations:      exportOps,
			HelpSynopsis:    "Refused: " + msgNonExtractable + ".",
			HelpDescription: "Transit's backup returns the key's material in plaintext. Back up the HSM token with the HSM's own tools instead; this path fails with HTTP 400.",
		},
		{
			Pattern:      "restore" + framework.OptionalParamRegex("name"),
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "restore", OperationSuffix: "key|and-rename-key"},
			Fields: map[string]*framework.FieldSchema{
				"name":   {Type: framework.TypeString, Description: "Name of the key."},
				"backup": {Type: framework.TypeString, Description: "Transit backup data."},
				"force":  {Type: framework.TypeBool, Description: "Transit's overwrite flag."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(refuse("restore is not possible: " + msgNonExtractable + ", so no plaintext backup exists to restore")), Summary: "Refused."},
			},
			HelpSynopsis:    "Refused: there are no plaintext backups to restore.",
			HelpDescription: "Transit restores keys from plaintext backups; this engine never makes any, so this path fails with HTTP 400.",
		},
	}
}

// HMAC secret sizes accepted for hmac keys, in bytes.
const (
	minHMACKeySize = 16
	maxHMACKeySize = 512
)

func allowedKeyTypes() []interface{} {
	out := make([]interface{}, len(keys.TypeNames))
	for i, n := range keys.TypeNames {
		out[i] = n
	}
	return out
}

const keysHelp = `
Creates a key whose first version is generated inside the HSM as sensitive, non-extractable token objects: the
AES-GCM key or the private half of an RSA, ECDSA or Ed25519 pair (hmac keys: the HMAC secret). A version of
another type gets the HMAC secret Transit keys carry with its first HMAC, not at creation
(hmac_secret_on_token says whether it has one yet). Asymmetric versions show their public key as Transit does.
Reading a key returns Transit's fields plus protection_level "hsm", who owns it and what it protects (owner,
description, tags, data_assets: set here or on keys/<name>/config) and, per version, its state, HSM object ID
(CKA_ID), label and creation time (the response fields are described at the end of the API reference), and what an unusual use of it does
(on_anomaly, anomaly_rate_limit, anomaly_action_period: see keys/<name>/anomalies). Deleting
a key requires deletion_allowed and destroys its objects on the token.

Transit options that need the material outside the HSM (exportable, allow_plaintext_backup) or derived keys
(derived, convergent_encryption) are refused with HTTP 400.
`
