package cmk

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
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
					Default:       string(typeAES256GCM96),
					AllowedValues: allowedKeyTypes(),
					Description:   "Type of key to create, generated inside the HSM: " + strings.Join(keyTypeNames, ", ") + ".",
				},
				"key_size": {
					Type:        framework.TypeInt,
					Description: fmt.Sprintf("hmac keys only: size of the HMAC secret in bytes, %d to %d (default %d). The token may refuse a key shorter than the hash output.", minHMACKeySize, maxHMACKeySize, hsm.HMACKeySize),
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
					Callback: b.pathKeyWrite,
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
			}),
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{
					Callback: b.pathKeyConfigWrite,
					Summary:  "Change a key's version bounds and deletion setting.",
				},
			},
			HelpSynopsis:    "Configure a key's version bounds, deletion, rotation schedule and usage limit.",
			HelpDescription: "Sets min_decryption_version, min_encryption_version and deletion_allowed as Transit does, and the rotation schedule (auto_rotate_period, next_rotation_time) and max_encryptions_per_version. Settings that would expose material are refused.",
		},
	}
}

func (b *backend) pathKeysList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	names, err := req.Storage.List(ctx, policyPrefix)
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
	return fields
}

// refuseUnsupported checks the Transit options that cannot hold for HSM keys.
func refuseUnsupported(d *framework.FieldData) *logical.Response {
	for field, msg := range map[string]string{
		"derived": msgNoDerivation, "convergent_encryption": msgNoConvergent,
		"exportable": msgNonExtractable, "allow_plaintext_backup": msgNonExtractable,
	} {
		if v, ok := d.GetOk(field); ok && v.(bool) {
			return logical.ErrorResponse("%s=true is not possible: %s", field, msg)
		}
	}
	return nil
}

// readLifecycleFields applies auto_rotate_period and max_encryptions_per_version to p.
func readLifecycleFields(d *framework.FieldData, p *keyPolicy) *logical.Response {
	if v, ok := d.GetOk("auto_rotate_period"); ok {
		p.AutoRotatePeriod = time.Duration(v.(int)) * time.Second
	}
	if p.AutoRotatePeriod != 0 && p.AutoRotatePeriod < minAutoRotatePeriod {
		return logical.ErrorResponse("auto_rotate_period must be 0 to disable or at least an hour")
	}
	if v, ok := d.GetOk("max_encryptions_per_version"); ok {
		if v.(int) < 0 {
			return logical.ErrorResponse("max_encryptions_per_version must not be negative")
		}
		if v.(int) > 0 && !p.Type.isAES() {
			return logical.ErrorResponse("max_encryptions_per_version applies to AES keys, not %s", p.Type)
		}
		p.MaxEncryptions = uint64(v.(int))
	}
	if p.Imported && !p.AllowRotation && (p.AutoRotatePeriod > 0 || p.MaxEncryptions > 0) {
		return logical.ErrorResponse("imported key %q does not allow rotation: it was imported without allow_rotation", p.Name)
	}
	return nil
}

func (b *backend) pathKeyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	if resp := refuseUnsupported(d); resp != nil {
		return resp, logical.ErrInvalidRequest
	}
	typ, err := parseKeyType(d.Get("type").(string))
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	hmacSize := 0
	if v, ok := d.GetOk("key_size"); ok {
		hmacSize = v.(int)
		if typ != typeHMAC {
			return logical.ErrorResponse("key_size is valid for hmac keys only, not %s", typ), logical.ErrInvalidRequest
		}
		if hmacSize < minHMACKeySize || hmacSize > maxHMACKeySize {
			return logical.ErrorResponse("key_size must be between %d and %d bytes", minHMACKeySize, maxHMACKeySize), logical.ErrInvalidRequest
		}
	}
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	p := &keyPolicy{Name: name, Type: typ, HMACKeySize: hmacSize, AutoRotatePeriod: cfg.AutoRotatePeriod}
	if resp := readLifecycleFields(d, p); resp != nil {
		return resp, logical.ErrInvalidRequest
	}
	p, created, err := b.createKey(ctx, req.Storage, p, actorOf(req))
	if err != nil {
		return hsmErrorResponse(err)
	}
	resp := b.formatKey(p)
	if !created {
		resp.AddWarning(fmt.Sprintf("key %s already existed", name))
	}
	return resp, nil
}

func (b *backend) pathKeyRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	p, err := b.policy(ctx, req.Storage, d.Get("name").(string))
	if err != nil || p == nil {
		return nil, err
	}
	return b.formatKey(p), nil
}

// formatVersion describes one version: its state, where it lives in the HSM, its history and use.
func (b *backend) formatVersion(p *keyPolicy, n int) map[string]interface{} {
	v := p.Versions[n]
	info := map[string]interface{}{
		"version":       n,
		"state":         p.versionState(n),
		"hsm_id":        v.HSMID,
		"label":         v.Label,
		"creation_time": v.CreatedAt.Format(time.RFC3339Nano),
		"created_by":    v.CreatedBy,
		// Whether the version's HMAC secret is on the token yet (it is made with the version's first HMAC), so
		// that an operator counting objects on the token knows what to expect.
		"hmac_secret_on_token": !v.HMACDeferred,
	}
	if tok := b.connectedToken(); tok != nil && v.State != stateDestroyed {
		if missing := tok.MissingObjects(v.id()); len(missing) > 0 {
			m := map[string]interface{}{}
			for kind, since := range missing {
				m[kind] = formatTime(since)
			}
			info["hsm_objects_missing"] = m
		}
	}
	if v.ImportMethod != "" {
		info["import_method"] = v.ImportMethod
	}
	if !v.DestroyAt.IsZero() {
		info["destruction_scheduled_time"] = formatTime(v.DestroyAt)
	}
	if !v.DestroyedAt.IsZero() {
		info["destroyed_time"] = formatTime(v.DestroyedAt)
	}
	if p.Type.isAES() {
		if used, ok := b.usage.count(p.Name, n); ok {
			info["encryptions"] = used
		}
	}
	return info
}

// formatTime renders a time for responses: RFC 3339, or "" for none.
func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

// formatKey gives Transit's key read response, plus where each version lives in the HSM.
func (b *backend) formatKey(p *keyPolicy) *logical.Response {
	symmetric := map[string]int64{}
	asymmetric := map[string]interface{}{}
	versions := map[string]interface{}{}
	for n, v := range p.Versions {
		s := strconv.Itoa(n)
		if p.Type.asymmetric() {
			asymmetric[s] = map[string]interface{}{
				"name":          p.Type.publicKeyName(),
				"public_key":    v.PublicKey,
				"creation_time": v.CreatedAt.Format(time.RFC3339Nano),
			}
		} else {
			symmetric[s] = v.CreatedAt.Unix()
		}
		versions[s] = b.formatVersion(p, n)
	}
	var keys interface{} = symmetric
	if p.Type.asymmetric() {
		keys = asymmetric
	}
	data := map[string]interface{}{
		"name":                        p.Name,
		"type":                        string(p.Type),
		"derived":                     false,
		"exportable":                  false,
		"allow_plaintext_backup":      false,
		"deletion_allowed":            p.DeletionAllowed,
		"min_available_version":       p.MinAvailableVersion,
		"min_decryption_version":      p.MinDecryptionVersion,
		"min_encryption_version":      p.MinEncryptionVersion,
		"latest_version":              p.LatestVersion,
		"supports_encryption":         p.Type.info().encrypt,
		"supports_decryption":         p.Type.info().encrypt,
		"supports_signing":            p.Type.info().sign,
		"supports_derivation":         false,
		"auto_rotate_period":          int64(p.AutoRotatePeriod.Seconds()),
		"imported_key":                p.Imported,
		"next_rotation_time":          formatTime(p.NextRotation),
		"last_rotated":                formatTime(p.LastRotated),
		"max_encryptions_per_version": p.encryptionLimit(),
		"disabled":                    p.Disabled,
		"deletion_scheduled_time":     formatTime(p.DeleteAt),
		"keys":                        keys,
		"protection_level":            "hsm",
		"versions":                    versions,
		"creation_time":               p.CreatedAt.Format(time.RFC3339Nano),
	}
	if p.Deleting {
		data["deletion_in_progress"] = true
	}
	if !p.Type.isAES() {
		delete(data, "max_encryptions_per_version")
	}
	if p.Type == typeHMAC {
		data["key_size"] = p.hmacKeySize()
	}
	if p.Imported {
		data["imported_key_allow_rotation"] = p.AllowRotation
	}
	return &logical.Response{Data: data}
}

func (b *backend) pathKeyDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	at, err := b.deleteKey(ctx, req.Storage, d.Get("name").(string), actorOf(req))
	if errors.Is(err, errDeletionNotAllowed) {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if err != nil {
		return hsmErrorResponse(err)
	}
	if at.IsZero() {
		return nil, nil
	}
	return &logical.Response{
		Data:     map[string]interface{}{"deletion_scheduled_time": formatTime(at)},
		Warnings: []string{fmt.Sprintf("the key serves nothing from now on and is destroyed at %s; keys/%s/cancel-deletion restores it until then", formatTime(at), d.Get("name"))},
	}, nil
}

func (b *backend) pathKeyConfigWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	if resp := refuseUnsupported(d); resp != nil {
		return resp, logical.ErrInvalidRequest
	}
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
	p := cur.clone()
	if v, ok := d.GetOk("min_decryption_version"); ok {
		p.MinDecryptionVersion = v.(int)
		if p.MinDecryptionVersion == 0 {
			p.MinDecryptionVersion = 1
		}
	}
	if v, ok := d.GetOk("min_encryption_version"); ok {
		p.MinEncryptionVersion = v.(int)
	}
	if v, ok := d.GetOk("deletion_allowed"); ok {
		p.DeletionAllowed = v.(bool)
	}
	_, periodGiven := d.GetOk("auto_rotate_period")
	if resp := readLifecycleFields(d, p); resp != nil {
		return resp, logical.ErrInvalidRequest
	}
	if periodGiven {
		p.NextRotation = time.Time{}
		if p.AutoRotatePeriod > 0 {
			base := p.LastRotated
			if base.IsZero() {
				base = p.CreatedAt
			}
			p.NextRotation = base.Add(p.AutoRotatePeriod)
		}
	}
	if v, ok := d.GetOk("next_rotation_time"); ok {
		switch raw := v.(string); raw {
		case "":
			p.NextRotation = time.Time{}
		default:
			t, err := time.Parse(time.RFC3339, raw)
			if err != nil {
				return logical.ErrorResponse("next_rotation_time must be an RFC 3339 time such as 2026-01-02T15:04:05Z: %v", err), logical.ErrInvalidRequest
			}
			if p.Imported && !p.AllowRotation {
				return logical.ErrorResponse("imported key %q does not allow rotation: it was imported without allow_rotation", name), logical.ErrInvalidRequest
			}
			p.NextRotation = t.UTC()
		}
	}
	switch {
	case p.MinDecryptionVersion < 1 || p.MinDecryptionVersion > p.LatestVersion:
		return logical.ErrorResponse("min_decryption_version must be between 1 and the latest version %d", p.LatestVersion), logical.ErrInvalidRequest
	case p.MinEncryptionVersion < 0 || p.MinEncryptionVersion > p.LatestVersion:
		return logical.ErrorResponse("min_encryption_version must be between 0 and the latest version %d", p.LatestVersion), logical.ErrInvalidRequest
	case p.MinEncryptionVersion != 0 && p.MinEncryptionVersion < p.MinDecryptionVersion:
		return logical.ErrorResponse("min_encryption_version %d must not be below min_decryption_version %d", p.MinEncryptionVersion, p.MinDecryptionVersion), logical.ErrInvalidRequest
	}
	if err := b.storePolicy(ctx, req.Storage, p); err != nil {
		return nil, err
	}
	who := actorOf(req)
	changes := configChanges(cur, p)
	b.logger.Info("key configuration changed", "key", name, "changes", changes, "by", who.String())
	b.record(ctx, req.Storage, name, who.event("config_changed", 0, "", changes))
	return b.formatKey(p), nil
}

// configChanges describes what a config write changed, for the key's history.
func configChanges(a, b *keyPolicy) string {
	var out []string
	add := func(field string, from, to interface{}) {
		if fmt.Sprint(from) != fmt.Sprint(to) {
			out = append(out, fmt.Sprintf("%s %v → %v", field, from, to))
		}
	}
	add("min_decryption_version", a.MinDecryptionVersion, b.MinDecryptionVersion)
	add("min_encryption_version", a.MinEncryptionVersion, b.MinEncryptionVersion)
	add("deletion_allowed", a.DeletionAllowed, b.DeletionAllowed)
	add("auto_rotate_period", a.AutoRotatePeriod, b.AutoRotatePeriod)
	add("next_rotation_time", formatTime(a.NextRotation), formatTime(b.NextRotation))
	add("max_encryptions_per_version", a.encryptionLimit(), b.encryptionLimit())
	if len(out) == 0 {
		return "no change"
	}
	return strings.Join(out, "; ")
}

// pathRefused answers Transit's paths that would reveal key material with a 400 that says why.
func (b *backend) pathRefused() []*framework.Path {
	refuse := func(msg string) framework.OperationFunc {
		return func(context.Context, *logical.Request, *framework.FieldData) (*logical.Response, error) {
			return logical.ErrorResponse("%s", msg), logical.ErrInvalidRequest
		}
	}
	exportOps := map[logical.Operation]framework.OperationHandler{
		logical.ReadOperation: &framework.PathOperation{Callback: refuse(msgNonExtractable), Summary: "Refused: " + msgNonExtractable + "."},
	}
	return []*framework.Path{
		{
			Pattern: "export/" + framework.GenericNameRegex("type") + "/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("version"),
			Fields: map[string]*framework.FieldSchema{
				"type":    {Type: framework.TypeString, Description: "Transit's export type (encryption-key, hmac-key, …)."},
				"name":    {Type: framework.TypeString, Description: "Name of the key."},
				"version": {Type: framework.TypeString, Description: "Version of the key."},
			},
			Operations:      exportOps,
			HelpSynopsis:    "Refused: " + msgNonExtractable + ".",
			HelpDescription: "Transit's export returns key material. Here the material is a non-extractable HSM object, so every export request fails with HTTP 400.",
		},
		{
			Pattern: "backup/" + framework.GenericNameRegex("name"),
			Fields: map[string]*framework.FieldSchema{
				"name": {Type: framework.TypeString, Description: "Name of the key."},
			},
			Operations:      exportOps,
			HelpSynopsis:    "Refused: " + msgNonExtractable + ".",
			HelpDescription: "Transit's backup returns the key's material in plaintext. Back up the HSM token with the HSM's own tools instead; this path fails with HTTP 400.",
		},
		{
			Pattern: "restore" + framework.OptionalParamRegex("name"),
			Fields: map[string]*framework.FieldSchema{
				"name":   {Type: framework.TypeString, Description: "Name of the key."},
				"backup": {Type: framework.TypeString, Description: "Transit backup data."},
				"force":  {Type: framework.TypeBool, Description: "Transit's overwrite flag."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: refuse("restore is not possible: " + msgNonExtractable + ", so no plaintext backup exists to restore"), Summary: "Refused."},
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
	out := make([]interface{}, len(keyTypeNames))
	for i, n := range keyTypeNames {
		out[i] = n
	}
	return out
}

const keysHelp = `
Creates a key whose first version is generated inside the HSM as sensitive, non-extractable token objects: the
AES-GCM key or the private half of an RSA, ECDSA or Ed25519 pair and, beside it, an HMAC secret, as Transit keys
carry (hmac keys have the HMAC secret only). Asymmetric versions show their public key as Transit does. Reading a key returns Transit's fields plus
protection_level "hsm" and, per version, its state, HSM object ID (CKA_ID), label and creation time. Deleting a
key requires deletion_allowed and destroys its objects on the token.

Transit options that need the material outside the HSM (exportable, allow_plaintext_backup) or derived keys
(derived, convergent_encryption) are refused with HTTP 400.
`
