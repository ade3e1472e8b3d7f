package cmk

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

const (
	configHSMPath  = "config/hsm"
	configKeysPath = "config/keys"

	defaultPoolSize = 4
	maxPoolSize     = 256
	// listenerMaxJSONArray is Vault's listener cap on a JSON array's elements (its max_json_array_element_count,
	// 10,000 unless the operator changes it): a larger batch_input is answered by the listener with a 500 before
	// it reaches the plugin, so a larger max_batch_size could never be used.
	listenerMaxJSONArray = 10000
	defaultMaxBatchSize  = listenerMaxJSONArray
	// maxWorkingCopies bounds working_copies: each copy is an object in the token's memory.
	maxWorkingCopies = 100000
	maxMaxBatchSize  = listenerMaxJSONArray
)

// hsmConfig selects the token. The library path is not here: it comes from the plugin's environment only.
type hsmConfig struct {
	TokenLabel string `json:"token_label"`
	Slot       uint   `json:"slot"`
	UseSlot    bool   `json:"use_slot"` // select by Slot because no label was given
	PIN        string `json:"pin"`
	PoolSize   int    `json:"pool_size"`
	IVSource   string `json:"iv_source"`
	// KeyWrapMech is the PKCS#11 code of AES key wrap with padding (RFC 5649) used to unwrap imports; 0 chooses it
	// from the token's mechanism list.
	KeyWrapMech uint `json:"key_wrap_mechanism,omitempty"`
	// RawRSAOAEPFallback is the operator's choice to let imports wrapped with an RSA-OAEP hash the token lacks
	// recover the ephemeral key with raw RSA in the HSM and decode OAEP in the plugin (SoftHSM 2.6 and SHA-256).
	RawRSAOAEPFallback bool `json:"raw_rsa_oaep_fallback,omitempty"`
	// WorkingCopies bounds the session-object copies of hot AES keys kept on the token (nil: the default; 0: none).
	WorkingCopies *int `json:"working_copies,omitempty"`
}

// workingCopies is the configured bound on working copies.
func (c *hsmConfig) workingCopies() int {
	if c == nil || c.WorkingCopies == nil {
		return hsm.DefaultWorkingCopies
	}
	return *c.WorkingCopies
}

// Names of the key-wrap-with-padding mechanism codes, for config/hsm.
var keyWrapMechanisms = map[string]uint{
	"CKM_AES_KEY_WRAP_PAD": hsm.MechAESKeyWrapPad,
	"CKM_AES_KEY_WRAP_KWP": hsm.MechAESKeyWrapKWP,
}

// keyWrapMechanism is the configured mechanism, 0 for the token's choice.
func (c *hsmConfig) keyWrapMechanism() uint {
	if c == nil {
		return 0
	}
	return c.KeyWrapMech
}

func keyWrapMechanismName(m uint) string {
	if m == 0 {
		return "auto"
	}
	for name, code := range keyWrapMechanisms {
		if code == m {
			return name
		}
	}
	return fmt.Sprintf("0x%X", m)
}

func readHSMConfig(ctx context.Context, s logical.Storage) (*hsmConfig, error) {
	e, err := s.Get(ctx, configHSMPath)
	if err != nil || e == nil {
		return nil, err
	}
	var c hsmConfig
	if err := e.DecodeJSON(&c); err != nil {
		return nil, err
	}
	return &c, nil
}

func (b *backend) pathConfigHSM() *framework.Path {
	return &framework.Path{
		Pattern: "config/hsm",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
			OperationSuffix: "hsm-configuration",
		},
		Fields: map[string]*framework.FieldSchema{
			"token_label": {
				Type:        framework.TypeString,
				Description: "Label of the PKCS#11 token that holds the keys. Preferred over slot: slots are renumbered when tokens are initialised.",
			},
			"slot": {
				Type:        framework.TypeInt,
				Description: "Slot ID of the token, used only when token_label is empty.",
			},
			"pin": {
				Type:         framework.TypeString,
				Description:  "User PIN of the token. Write-only: never returned or logged. Required on the first write; kept when omitted later.",
				DisplayAttrs: &framework.DisplayAttributes{Sensitive: true},
			},
			"pool_size": {
				Type:        framework.TypeInt,
				Default:     defaultPoolSize,
				Description: fmt.Sprintf("Sessions used for operations at once (1 to %d); capped by the token's own session limit.", maxPoolSize),
			},
			"key_wrap_mechanism": {
				Type:        framework.TypeString,
				Default:     "auto",
				Description: "Mechanism for AES key wrap with padding (RFC 5649), used by key import: auto (default: CKM_AES_KEY_WRAP_KWP, 0x210B, when the token lists it; 0x210A on SoftHSM 2.6, where it means RFC 5649), CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP_KWP, or a hex code such as 0x210B.",
			},
			"raw_rsa_oaep_fallback": {
				Type:        framework.TypeBool,
				Default:     false,
				Description: "Let imports wrapped with an RSA-OAEP hash the token's OAEP lacks (SoftHSM 2.6 offers only SHA-1; vault transit import uses SHA-256) recover the ephemeral AES key by raw RSA in the HSM and decode the OAEP padding in the plugin. The ephemeral key is then in plugin memory for a moment (the imported key itself never is). Off by default. Takes effect for wrapping keys created after it is set.",
			},
			"working_copies": {
				Type:    framework.TypeInt,
				Default: hsm.DefaultWorkingCopies,
				Description: fmt.Sprintf("Most session-object working copies of hot AES keys kept on the token (0 to %d; 0 turns them off). "+
					"A copy is made inside the token with C_CopyObject, stays sensitive and non-extractable, and is destroyed with its version's disable or destruction; "+
					"copies are used only where the token's probe measured them faster than its token objects (working_copies_probe).", maxWorkingCopies),
			},
			"iv_source": {
				Type:          framework.TypeString,
				Default:       keys.IVSourceHSM,
				AllowedValues: []interface{}{keys.IVSourceHSM, keys.IVSourceOS},
				Description:   `Where AES-GCM nonces come from: "hsm" (the token's RNG, fetched in blocks) or "os" (the operating system's RNG).`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathConfigHSMRead,
				Summary:  "Show the token selection, connection state, token information and supported mechanisms (never the PIN).",
			},
			logical.CreateOperation: &framework.PathOperation{
				Callback: handle(b.pathConfigHSMWrite),
				Summary:  "Select the token and log in; the configuration is stored only if the login succeeds.",
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback: handle(b.pathConfigHSMWrite),
				Summary:  "Change the token selection, PIN or pool; the change is stored only if the login succeeds.",
			},
		},
		ExistenceCheck:  b.pathConfigHSMExists,
		HelpSynopsis:    "Connect the engine to its PKCS#11 token.",
		HelpDescription: configHSMHelp,
	}
}

func (b *backend) pathConfigHSMExists(ctx context.Context, req *logical.Request, _ *framework.FieldData) (bool, error) {
	c, err := readHSMConfig(ctx, req.Storage)
	return c != nil, err
}

func (b *backend) pathConfigHSMWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if b.library == "" {
		return respond(callerf("%s is not set in the plugin's environment: register the plugin with -env=%s=/path/to/pkcs11-module.so", LibraryEnv, LibraryEnv))
	}
	prev, err := readHSMConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	c := hsmConfig{PoolSize: defaultPoolSize, IVSource: keys.IVSourceHSM}
	if prev != nil {
		c = *prev
	}
	if v, ok := d.GetOk("slot"); ok {
		if v.(int) < 0 {
			return respond(callerf("slot must not be negative"))
		}
		c.Slot, c.UseSlot, c.TokenLabel = uint(v.(int)), true, ""
	}
	if v, ok := d.GetOk("token_label"); ok {
		c.TokenLabel, c.UseSlot = v.(string), false
	}
	if v, ok := d.GetOk("pin"); ok {
		c.PIN = v.(string)
	}
	if v, ok := d.GetOk("pool_size"); ok {
		c.PoolSize = v.(int)
	}
	if v, ok := d.GetOk("iv_source"); ok {
		c.IVSource = v.(string)
	}
	if v, ok := d.GetOk("working_copies"); ok {
		n := v.(int)
		c.WorkingCopies = &n
	}
	if v, ok := d.GetOk("raw_rsa_oaep_fallback"); ok {
		c.RawRSAOAEPFallback = v.(bool)
	}
	if v, ok := d.GetOk("key_wrap_mechanism"); ok {
		name := strings.ToUpper(strings.TrimSpace(v.(string)))
		code, known := keyWrapMechanisms[name]
		if name == "AUTO" || name == "" {
			code, known = 0, true
		}
		if !known {
			n, err := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(name), "0x"), 16, 32)
			if err != nil || !strings.HasPrefix(strings.ToLower(name), "0x") {
				return respond(callerf("key_wrap_mechanism must be auto, CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP_KWP or a hex code such as 0x210B"))
			}
			code = uint(n)
		}
		c.KeyWrapMech = code
	}
	switch {
	case c.TokenLabel == "" && !c.UseSlot:
		return respond(callerf("token_label (or slot) is required"))
	case c.PIN == "":
		return respond(callerf("pin is required"))
	case c.PoolSize < 1 || c.PoolSize > maxPoolSize:
		return respond(callerf("pool_size must be between 1 and %d", maxPoolSize))
	case c.workingCopies() < 0 || c.workingCopies() > maxWorkingCopies:
		return respond(callerf("working_copies must be between 0 and %d", maxWorkingCopies))
	case c.IVSource != keys.IVSourceHSM && c.IVSource != keys.IVSourceOS:
		return respond(callerf("iv_source must be %q or %q", keys.IVSourceHSM, keys.IVSourceOS))
	}

	tcfg := b.tokenConfig(&c)
	if _, pinGiven := d.GetOk("pin"); !pinGiven {
		// The stored PIN, not the caller's: the mount's connection vouches for it during another mount's wait.
		tcfg.Succeeds, _ = b.connectedToken().(*hsm.Token)
	}
	tok, err := b.openToken(tcfg, b.logger.Named("hsm"))
	switch {
	case errors.Is(err, hsm.ErrPINIncorrect):
		return respond(callerf("login to the token failed: %v", err)) // the error never carries a PIN
	case errors.Is(err, hsm.ErrTokenNotFound), errors.Is(err, hsm.ErrInvalidArgument):
		return respond(err)
	case err != nil:
		return respond(fmt.Errorf("%w: %v", hsm.ErrUnavailable, err))
	}
	e, err := logical.StorageEntryJSON(configHSMPath, &c)
	if err == nil {
		err = req.Storage.Put(ctx, e)
	}
	if err != nil {
		tok.Close()
		return nil, err
	}
	b.setToken(tok, c.IVSource)
	info := tok.Info()
	b.logger.Info("connected to the HSM token", "token", info.Label, "serial", info.SerialNumber, "pool_size", tok.PoolSize())
	resp := &logical.Response{}
	if prev != nil && (prev.TokenLabel != c.TokenLabel || prev.UseSlot != c.UseSlot || prev.Slot != c.Slot) {
		if names, _ := keys.List(ctx, req.Storage); len(names) > 0 {
			resp.AddWarning(fmt.Sprintf("the token changed while %d keys exist: their versions are usable only if their objects are on the new token", len(names)))
		}
	}
	if tok.PoolSize() != c.PoolSize {
		resp.AddWarning(fmt.Sprintf("pool_size %d exceeds the token's session limit; %d sessions are used", c.PoolSize, tok.PoolSize()))
	}
	if len(resp.Warnings) == 0 {
		return nil, nil
	}
	return resp, nil
}

func (b *backend) pathConfigHSMRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	c, err := readHSMConfig(ctx, req.Storage)
	if err != nil || c == nil {
		return nil, err
	}
	data := map[string]interface{}{
		"token_label":           c.TokenLabel,
		"pool_size":             c.PoolSize,
		"iv_source":             c.IVSource,
		"pin_set":               c.PIN != "",
		"key_wrap_mechanism":    keyWrapMechanismName(c.keyWrapMechanism()),
		"raw_rsa_oaep_fallback": c.RawRSAOAEPFallback,
		"working_copies":        c.workingCopies(),
		"library":               b.library,
		// Every object of this mount on the token is labelled under it (cmk/<mount's backend UUID>/<key>/v<N>):
		// the UUID `vault secrets list -detailed` does not show, needed to find the mount's objects with the
		// token's own tools.
		"label_prefix": keys.LabelPrefix(b.mountID),
	}
	if c.UseSlot {
		// Only a slot the operator chose is configuration; the slot in use is the token's (token.slot).
		data["slot"] = c.Slot
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		data["connected"] = false
		data["error"] = err.Error()
		return &logical.Response{Data: data}, nil
	}
	connected, lastErr := tok.Status()
	data["connected"] = connected
	if lastErr != nil {
		data["error"] = lastErr.Error()
	}
	info := tok.Info()
	data["token"] = map[string]interface{}{
		"label":             info.Label,
		"slot":              info.Slot,
		"manufacturer_id":   info.ManufacturerID,
		"model":             info.Model,
		"serial_number":     info.SerialNumber,
		"hardware_version":  info.HardwareVersion,
		"firmware_version":  info.FirmwareVersion,
		"max_session_count": info.MaxSessionCount,
	}
	data["pool_size_in_use"] = tok.PoolSize()
	caps, err := tok.Capabilities(ctx)
	if err != nil {
		data["connected"] = false
		data["error"] = err.Error()
		return &logical.Response{Data: data}, nil
	}
	data["mechanisms"] = caps.MechanismNames()
	data["allowed_mechanisms_stored"] = caps.AllowedMechanisms
	// Whether versions a storage restore lost can be found on the token by label and adopted (see reconcile).
	data["label_search"] = caps.LabelSearch()
	data["oaep_sha256"] = caps.OAEPSHA256
	probe := hsm.WorkingCopyProbe{Refused: "working_copies is 0: not probed"}
	if c.workingCopies() > 0 {
		if probe, err = tok.WorkingCopies(ctx); err != nil {
			probe = hsm.WorkingCopyProbe{Refused: "not probed: " + err.Error()}
		}
	}
	data["working_copies_probe"] = map[string]interface{}{
		"speedup": math.Round(probe.Speedup*100) / 100,
		"faster":  probe.Faster(),
		"refused": probe.Refused,
	}
	data["working_copies_held"] = tok.WorkingCopiesHeld()
	wrap := c.keyWrapMechanism()
	if wrap == 0 {
		wrap = caps.KeyWrap
	}
	if wrap != 0 {
		data["key_wrap_mechanism_in_use"] = keyWrapMechanismName(wrap)
	}
	keyTypes := map[string]interface{}{}
	for _, name := range keys.TypeNames {
		ok, missing := caps.Serves(keys.Type(name).Info().Alg)
		entry := map[string]interface{}{"supported": ok}
		if !ok {
			entry["missing"] = missing
		}
		// Serving a type (generating and using its keys) does not imply importing it (keys/<name>/import).
		imports, why := caps.Imports(keys.Type(name).Info().Alg)
		entry["import_supported"] = ok && imports
		if ok && !imports {
			entry["import_missing"] = why
		}
		keyTypes[name] = entry
	}
	data["key_types"] = keyTypes
	return &logical.Response{Data: data}, nil
}

// keysConfig holds mount-wide defaults for keys.
type keysConfig struct {
	DisableUpsert bool `json:"disable_upsert"`
	MaxBatchSize  int  `json:"max_batch_size"`
	// AutoRotatePeriod is given to keys created without one.
	AutoRotatePeriod time.Duration `json:"auto_rotate_period"`
	// DeletionGracePeriod delays the destruction of deleted keys and versions; 0 destroys at once.
	DeletionGracePeriod time.Duration `json:"deletion_grace_period"`
	// PurgeProtection, once set, is never cleared: from then on every destruction waits at least
	// MinDeletionGracePeriod (Azure Key Vault's purge protection).
	PurgeProtection bool `json:"purge_protection,omitempty"`
	// MinDeletionGracePeriod is purge protection's floor; it only goes up.
	MinDeletionGracePeriod time.Duration `json:"min_deletion_grace_period,omitempty"`
	// DefaultApprovalsRequired is given to keys created without approvals_required; MinApprovalsRequired is the
	// mount's floor of dual control (it only goes up): every key needs at least that many approvals, and so do
	// held changes of the mount's own settings. ApprovalTTL bounds how long a held request waits (0: the default).
	DefaultApprovalsRequired int           `json:"default_approvals_required,omitempty"`
	MinApprovalsRequired     int           `json:"min_approvals_required,omitempty"`
	ApprovalTTL              time.Duration `json:"approval_ttl,omitempty"`
	// The mount's algorithm policy. AllowedTypes, when set, are the only types new keys and versions may have.
	// DeprecatedTypes maps a type to the day from which no key or version of it is made; nil (never set) is
	// defaultDeprecatedTypes, an empty map none.
	AllowedTypes    []string             `json:"allowed_types,omitempty"`
	DeprecatedTypes map[string]time.Time `json:"deprecated_types"`
}

// defaultDeprecatedTypes follows NIST SP 800-131A Rev. 2 (and SP 800-57 Part 1 Rev. 5's strengths): 112-bit
// security, RSA-2048 here, is acceptable for applying protection through 2030 and disallowed after it. Every other
// type here gives at least 128 bits (AES-128 and AES-256, RSA-3072 and up, P-256 and up, Ed25519, HMAC with a
// secret of 16 bytes or more) and is acceptable beyond 2030.
var defaultDeprecatedTypes = map[string]time.Time{
	string(keys.TypeRSA2048): time.Date(2031, 1, 1, 0, 0, 0, 0, time.UTC),
}

// deprecatedTypes is the mount's deprecations in force: its own, or the default when it never set any.
func (c *keysConfig) deprecatedTypes() map[string]time.Time {
	if c.DeprecatedTypes == nil {
		return defaultDeprecatedTypes
	}
	return c.DeprecatedTypes
}

// deprecatedSince says whether type t is deprecated at now, and since when.
func (c *keysConfig) deprecatedSince(t keys.Type, now time.Time) (time.Time, bool) {
	since, ok := c.deprecatedTypes()[string(t)]
	return since, ok && !now.Before(since)
}

// refusesType says why no new key or version of type t may be made at now: the mount's allowed_types does not
// name it, or deprecated_types deprecates it. It is the one place that decides it (keys.Manager.TypeRule).
func (c *keysConfig) refusesType(t keys.Type, now time.Time) error {
	if len(c.AllowedTypes) > 0 && !slices.Contains(c.AllowedTypes, string(t)) {
		return callerf("key type %s is not allowed on this mount: config/keys allowed_types is %s", t, strings.Join(c.AllowedTypes, ", "))
	}
	if since, ok := c.deprecatedSince(t, now); ok {
		return callerf("key type %s is deprecated on this mount since %s (config/keys deprecated_types): no new key or version of it is made; rotate existing keys to another type (keys/:name/rotate with type)", t, formatDay(since))
	}
	return nil
}

// formatDay renders a deprecation date: the day alone when it begins at midnight UTC.
func formatDay(t time.Time) string {
	if t.Equal(t.Truncate(24 * time.Hour)) {
		return t.UTC().Format(time.DateOnly)
	}
	return t.UTC().Format(time.RFC3339)
}

// setAlgorithmPolicy applies allowed_types and deprecated_types from d to c.
func (c *keysConfig) setAlgorithmPolicy(d *framework.FieldData) error {
	if v, ok := d.GetOk("allowed_types"); ok {
		var allowed []string
		for _, name := range v.([]string) {
			t, err := keys.ParseType(strings.ToLower(strings.TrimSpace(name)))
			if err != nil {
				return err
			}
			if !slices.Contains(allowed, string(t)) {
				allowed = append(allowed, string(t))
			}
		}
		c.AllowedTypes = allowed
	}
	if v, ok := d.GetOk("deprecated_types"); ok {
		deprecated := map[string]time.Time{}
		for name, day := range v.(map[string]string) {
			t, err := keys.ParseType(strings.ToLower(strings.TrimSpace(name)))
			if err != nil {
				return err
			}
			at, err := time.Parse(time.DateOnly, day)
			if err != nil {
				if at, err = time.Parse(time.RFC3339, day); err != nil {
					return callerf("deprecated_types: %s's date must be a day (2030-12-31) or an RFC 3339 time, not %q", t, day)
				}
			}
			deprecated[string(t)] = at.UTC()
		}
		c.DeprecatedTypes = deprecated
	}
	return nil
}

// algorithmPolicyView is the policy as config/keys shows it.
func (c *keysConfig) algorithmPolicyView() (allowed []string, deprecated map[string]string) {
	allowed = append([]string{}, c.AllowedTypes...)
	deprecated = map[string]string{}
	for t, since := range c.deprecatedTypes() {
		deprecated[t] = formatDay(since)
	}
	return allowed, deprecated
}

// approvalsRequired is how many approvals a held request on key k needs: the key's own requirement, never less
// than the mount's floor; for the mount's own settings (k nil), the floor. It is the one place that decides it.
func (c *keysConfig) approvalsRequired(k *keys.Key) int {
	if k == nil {
		return c.MinApprovalsRequired
	}
	return max(k.ApprovalsRequired, c.MinApprovalsRequired)
}

// approvalTTL is how long a request held for approval waits before it expires unexecuted.
func (c *keysConfig) approvalTTL() time.Duration {
	if c.ApprovalTTL <= 0 {
		return defaultApprovalTTL
	}
	return c.ApprovalTTL
}

// defaultApprovalTTL is how long a held request waits unless config/keys says: a working day's round of custodians.
const defaultApprovalTTL = 24 * time.Hour

// maxApprovalTTL bounds approval_ttl: a request that waits longer is no longer the requester's current intent.
const maxApprovalTTL = 30 * 24 * time.Hour

// destructionGrace is how long a key deletion, version destruction or trim requested now waits before HSM
// objects are destroyed: the configured grace, and never less than the floor while purge protection is on. It is
// the one place that decides it.
func (c *keysConfig) destructionGrace() time.Duration {
	if c.PurgeProtection && c.DeletionGracePeriod < c.MinDeletionGracePeriod {
		return c.MinDeletionGracePeriod
	}
	return c.DeletionGracePeriod
}

// defaultDeletionGracePeriod is how long a deleted key or version can be restored, unless config/keys says.
const defaultDeletionGracePeriod = 7 * 24 * time.Hour

// minPurgeProtectionFloor is the lowest min_deletion_grace_period, and the floor purge protection starts with when
// none is given: Azure Key Vault's shortest soft-delete retention.
const minPurgeProtectionFloor = 7 * 24 * time.Hour

// minAutoRotatePeriod is Transit's lower bound for auto_rotate_period.
const minAutoRotatePeriod = time.Hour

func (b *backend) readKeysConfig(ctx context.Context, s logical.Storage) (*keysConfig, error) {
	b.configMu.RLock()
	c := b.keysConfig
	b.configMu.RUnlock()
	if c != nil {
		return c, nil
	}
	c = &keysConfig{MaxBatchSize: defaultMaxBatchSize, DeletionGracePeriod: defaultDeletionGracePeriod}
	e, err := s.Get(ctx, configKeysPath)
	if err != nil {
		return nil, err
	}
	if e != nil {
		if err := e.DecodeJSON(c); err != nil {
			return nil, err
		}
	}
	b.configMu.Lock()
	b.keysConfig = c
	b.configMu.Unlock()
	return c, nil
}

func (b *backend) pathConfigKeys() *framework.Path {
	return &framework.Path{
		Pattern: "config/keys",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
			OperationSuffix: "keys-configuration",
		},
		Fields: map[string]*framework.FieldSchema{
			"disable_upsert": {
				Type:        framework.TypeBool,
				Description: "If true, encrypting with a key that does not exist fails instead of creating it (as Transit's disable_upsert).",
			},
			"auto_rotate_period": {
				Type:        framework.TypeDurationSecond,
				Description: "auto_rotate_period given to keys created without one: 0 (default, none) or at least 1h.",
			},
			"deletion_grace_period": {
				Type:        framework.TypeDurationSecond,
				Default:     int(defaultDeletionGracePeriod.Seconds()),
				Description: "How long a deleted key, or a version whose destruction is requested, waits before its HSM objects are destroyed; it can be restored meanwhile. 0 destroys at once (as Transit). Default 7 days. Under purge_protection it may not be set below min_deletion_grace_period, and destructions never wait less.",
			},
			"purge_protection": {
				Type:        framework.TypeBool,
				Description: "One-way: once true it can never be set false again. From then on no key is deleted and no version destroyed (delete, versions/N/destroy, trim) before min_deletion_grace_period has passed, whatever deletion_grace_period and the key's settings say; deletion_grace_period below the floor (0 included) is refused. Deletions and destructions scheduled before it was turned on keep their time.",
			},
			"min_deletion_grace_period": {
				Type:        framework.TypeDurationSecond,
				Description: "Purge protection's floor: the shortest wait before any destruction. Given only with purge_protection=true (in the same write or after it); at least 7 days (168h, the default when purge protection is turned on without one, as Azure Key Vault's shortest retention); it can only be raised.",
			},
			"default_approvals_required": {
				Type:        framework.TypeInt,
				Description: fmt.Sprintf("approvals_required given to keys created without one (0 to %d; default 0: no dual control unless min_approvals_required asks for it).", keys.MaxApprovalsRequired),
			},
			"min_approvals_required": {
				Type:        framework.TypeInt,
				Description: fmt.Sprintf("The mount's floor of dual control (0 to %d): every key's requests that cannot be undone need at least this many approvals by other Vault entities, whatever the key's approvals_required, and so does lowering deletion_grace_period here. It can only be raised.", keys.MaxApprovalsRequired),
			},
			"approval_ttl": {
				Type:        framework.TypeDurationSecond,
				Default:     int(defaultApprovalTTL.Seconds()),
				Description: "How long a request held for approval waits for its approvals before it expires unexecuted (default 24h, at most 720h). Applies to requests held from then on.",
			},
			"allowed_types": {
				Type: framework.TypeCommaStringSlice,
				Description: "The only key types that new keys and versions (creation, import, rotation of any cause) may have; others are refused with a 400 naming these. " +
					"Empty (the default): every type. Existing versions of other types keep serving.",
			},
			"deprecated_types": {
				Type: framework.TypeKVPairs,
				Description: "Type=date pairs (date 2030-12-31 or an RFC 3339 time): from that date no key or version of the type is made (creation, import, rotation " +
					"of any cause). Default, after NIST SP 800-131A Rev. 2: rsa-2048=2031-01-01 (112-bit security is disallowed for applying protection after 2030). " +
					"An empty map clears every deprecation.",
			},
			"max_batch_size": {
				Type:        framework.TypeInt,
				Default:     defaultMaxBatchSize,
				Description: fmt.Sprintf("Largest batch_input accepted by one request (1 to %d, the default): Vault's listener refuses a larger JSON array before the plugin sees it.", maxMaxBatchSize),
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathConfigKeysRead,
				Summary:  "Show the mount's key defaults.",
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback: handle(b.pathConfigKeysWrite),
				Summary:  "Set the mount's key defaults.",
			},
		},
		HelpSynopsis:    "Mount-wide defaults for keys: upsert, batch limit, rotation period, deletion grace period, purge protection, dual control, algorithm policy.",
		HelpDescription: configKeysHelp,
	}
}

func (b *backend) pathConfigKeysRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	c, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	allowed, deprecated := c.algorithmPolicyView()
	return &logical.Response{Data: map[string]interface{}{
		"allowed_types":         allowed,
		"deprecated_types":      deprecated,
		"disable_upsert":        c.DisableUpsert,
		"max_batch_size":        c.MaxBatchSize,
		"auto_rotate_period":    int64(c.AutoRotatePeriod.Seconds()),
		"deletion_grace_period": int64(c.DeletionGracePeriod.Seconds()),
		"purge_protection":      c.PurgeProtection,
		// 0 while purge protection is off: there is no floor.
		"min_deletion_grace_period":  int64(c.MinDeletionGracePeriod.Seconds()),
		"default_approvals_required": c.DefaultApprovalsRequired,
		"min_approvals_required":     c.MinApprovalsRequired,
		"approval_ttl":               int64(c.approvalTTL().Seconds()),
	}}, nil
}

func (b *backend) pathConfigKeysWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	cur, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	c := *cur
	if v, ok := d.GetOk("disable_upsert"); ok {
		c.DisableUpsert = v.(bool)
	}
	if v, ok := d.GetOk("max_batch_size"); ok {
		c.MaxBatchSize = v.(int)
	}
	if v, ok := d.GetOk("auto_rotate_period"); ok {
		c.AutoRotatePeriod = time.Duration(v.(int)) * time.Second
	}
	graceGiven := false
	if v, ok := d.GetOk("deletion_grace_period"); ok {
		c.DeletionGracePeriod, graceGiven = time.Duration(v.(int))*time.Second, true
	}
	if err := c.setPurgeProtection(cur, d, graceGiven); err != nil {
		return respond(err)
	}
	if err := c.setDualControl(cur, d); err != nil {
		return respond(err)
	}
	if err := c.setAlgorithmPolicy(d); err != nil {
		return respond(err)
	}
	if c.AutoRotatePeriod != 0 && c.AutoRotatePeriod < minAutoRotatePeriod {
		return respond(callerf("auto_rotate_period must be 0 to disable or at least an hour"))
	}
	if c.DeletionGracePeriod < 0 {
		return respond(callerf("deletion_grace_period must not be negative"))
	}
	if c.MaxBatchSize < 1 || c.MaxBatchSize > maxMaxBatchSize {
		return respond(callerf("max_batch_size must be between 1 and %d: Vault's listener refuses a JSON array of more than %d elements (its max_json_array_element_count) with a 500 before the request reaches the plugin", maxMaxBatchSize, listenerMaxJSONArray))
	}
	if c.DeletionGracePeriod < cur.DeletionGracePeriod {
		// A shorter grace period shortens every destruction requested from now on: held under the mount's floor.
		if resp, err := b.holdForApproval(ctx, req, nil, fmt.Sprintf("lower the mount's deletion_grace_period from %s to %s", cur.DeletionGracePeriod, c.DeletionGracePeriod)); resp != nil || err != nil {
			return resp, err
		}
	}
	e, err := logical.StorageEntryJSON(configKeysPath, &c)
	if err != nil {
		return nil, err
	}
	if err := req.Storage.Put(ctx, e); err != nil {
		return nil, err
	}
	b.configMu.Lock()
	b.keysConfig = &c
	b.configMu.Unlock()
	// Mount settings have no history of their own (key history is per key): the log records who protected the
	// mount, and Vault's audit devices record the request.
	if c.PurgeProtection && (!cur.PurgeProtection || c.MinDeletionGracePeriod != cur.MinDeletionGracePeriod) {
		b.logger.Info("purge protection set", "min_deletion_grace_period", c.MinDeletionGracePeriod.String(),
			"turned_on", !cur.PurgeProtection, "by", actorOf(req).String())
	}
	if c.MinApprovalsRequired != cur.MinApprovalsRequired {
		b.logger.Info("dual control floor raised", "min_approvals_required", c.MinApprovalsRequired, "by", actorOf(req).String())
	}
	resp, err := b.pathConfigKeysRead(ctx, req, d)
	if err == nil && c.PurgeProtection && c.DeletionGracePeriod < c.MinDeletionGracePeriod {
		resp.AddWarning(fmt.Sprintf("deletion_grace_period %s is below min_deletion_grace_period %s: destructions requested from now on wait %s", c.DeletionGracePeriod, c.MinDeletionGracePeriod, c.destructionGrace()))
	}
	return resp, err
}

// setPurgeProtection applies purge_protection and min_deletion_grace_period from d to c (cur is the stored
// configuration) and refuses what would weaken it: clearing the flag, lowering the floor, a floor without purge
// protection, or deletion_grace_period (when graceGiven) below the floor.
func (c *keysConfig) setPurgeProtection(cur *keysConfig, d *framework.FieldData, graceGiven bool) error {
	if v, ok := d.GetOk("purge_protection"); ok {
		if cur.PurgeProtection && !v.(bool) {
			return callerf("purge_protection is one-way: it is on for this mount and cannot be turned off")
		}
		c.PurgeProtection = v.(bool)
	}
	if v, ok := d.GetOk("min_deletion_grace_period"); ok {
		floor := time.Duration(v.(int)) * time.Second
		switch {
		case !c.PurgeProtection:
			return callerf("min_deletion_grace_period is purge protection's floor: give it with purge_protection=true")
		case floor < cur.MinDeletionGracePeriod:
			return callerf("min_deletion_grace_period can only be raised: it is %s, %s is lower", cur.MinDeletionGracePeriod, floor)
		case floor < minPurgeProtectionFloor:
			return callerf("min_deletion_grace_period must be at least %s", minPurgeProtectionFloor)
		}
		c.MinDeletionGracePeriod = floor
	}
	if !c.PurgeProtection {
		return nil
	}
	if c.MinDeletionGracePeriod == 0 {
		c.MinDeletionGracePeriod = minPurgeProtectionFloor
	}
	if graceGiven && c.DeletionGracePeriod < c.MinDeletionGracePeriod {
		return callerf("deletion_grace_period %s is below min_deletion_grace_period %s, the floor purge protection keeps on this mount", c.DeletionGracePeriod, c.MinDeletionGracePeriod)
	}
	return nil
}

// setDualControl applies default_approvals_required, min_approvals_required and approval_ttl from d to c (cur is
// the stored configuration), refusing a floor that goes down.
func (c *keysConfig) setDualControl(cur *keysConfig, d *framework.FieldData) error {
	if v, ok := d.GetOk("default_approvals_required"); ok {
		if n := v.(int); n < 0 || n > keys.MaxApprovalsRequired {
			return callerf("default_approvals_required must be between 0 and %d", keys.MaxApprovalsRequired)
		}
		c.DefaultApprovalsRequired = v.(int)
	}
	if v, ok := d.GetOk("min_approvals_required"); ok {
		switch n := v.(int); {
		case n < cur.MinApprovalsRequired:
			return callerf("min_approvals_required can only be raised: it is %d, %d is lower", cur.MinApprovalsRequired, n)
		case n > keys.MaxApprovalsRequired:
			return callerf("min_approvals_required must be at most %d", keys.MaxApprovalsRequired)
		}
		c.MinApprovalsRequired = v.(int)
	}
	if v, ok := d.GetOk("approval_ttl"); ok {
		ttl := time.Duration(v.(int)) * time.Second
		if ttl < time.Minute || ttl > maxApprovalTTL {
			return callerf("approval_ttl must be between 1m and %s", maxApprovalTTL)
		}
		c.ApprovalTTL = ttl
	}
	return nil
}

const configKeysHelp = `
disable_upsert stops encrypt from creating missing keys; max_batch_size bounds batch_input on every path;
auto_rotate_period is given to new keys; deletion_grace_period delays the destruction of deleted keys and
versions (0 destroys at once, as Transit).

purge_protection=true is one-way, as Azure Key Vault's purge protection: from then on no key is deleted and no
version destroyed (delete, versions/N/destroy, trim) before min_deletion_grace_period has passed, whatever
deletion_grace_period and the key's settings say, and a deletion_grace_period below the floor (0 included) is
refused. The floor is at least 7 days (the default when purge protection is turned on without one) and can only
be raised; it can be given only with purge protection. Deletions and destructions scheduled before purge
protection was turned on keep their time, as Azure's soft-deleted objects keep their purge date. Restoring a
deleted key or a version scheduled for destruction stays possible until then.

Dual control: default_approvals_required is given to new keys; min_approvals_required is the mount's floor,
which every key's requirement is raised to and which can only be raised. With a requirement of 1 or more, the
requests that cannot be undone (see approvals/) answer 202 with an approval_id and wait, for at most
approval_ttl, for approvals by other Vault entities. Lowering deletion_grace_period here is held under the floor.

Algorithm policy: allowed_types, when set, names the only types new keys and versions may have (creation, import,
and rotation of any cause, scheduled and usage rotations included); deprecated_types gives a type a date from
which no key or version of it is made. The default deprecates rsa-2048 from 2031-01-01, after NIST SP 800-131A Rev. 2 (112-bit security is
disallowed for applying protection after 2030); every other type gives at least 128 bits. A key whose type is
refused rotates only to another type of its purpose (keys/:name/rotate with type, or keys/:name/config next_type).
`

const configHSMHelp = `
Names the token that holds this mount's keys (by token_label, or slot) and the user PIN to log in with. The
PKCS#11 module itself is set by the operator in the plugin's environment (CMK_PKCS11_LIBRARY, at registration),
never through this API. A write connects and logs in before anything is stored, so a wrong label or PIN is
refused. After three wrong PINs in a row for a token, writes that give a PIN wait (1 s, doubling up to 5
minutes) and are refused alike whether the PIN is right or wrong; a write that keeps the stored PIN, and mounts
already connected, go on. Reading shows the connection state, what the token says of itself and which of the
mechanisms the engine uses it offers; the PIN is never returned.

Hot AES keys may be served from working copies: session objects made inside the token from the version's token
object with C_CopyObject, as sensitive and non-extractable as their originals, at most working_copies of them (least
recently used first out). A version gets one at its second use; its copy is destroyed when the version is disabled,
scheduled for destruction or destroyed, when its key is disabled or deleted, and with the connection. They are used
only where the token's probe (working_copies_probe) measured them faster than token objects: SoftHSM re-reads a token
object's file per use, while a network HSM serves both alike. working_copies=0 turns them off.
`
