package keys

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// The rules of a key's lifecycle, as plain methods on a Key being changed (a clone inside Update). They touch
// neither storage nor the HSM, so they are table-tested alone (lifecycle_test.go). Each reports whether it changed
// anything: repeating a change that already happened changes nothing, as Vault retries a request once when the
// plugin dies under it.

// MinAutoRotatePeriod is Transit's lower bound for auto_rotate_period.
const MinAutoRotatePeriod = time.Hour

// canRotate says why a new generated version may not be added.
func (k *Key) canRotate() error {
	if k.Imported && !k.AllowRotation {
		return Callerf("imported key %q does not allow rotation: it was imported without allow_rotation; use import_version to add a version", k.Name)
	}
	return nil
}

// AnyVersionOf reports whether a version of k has a type of which is reports true (its older versions may be of
// other types than its current one).
func (k *Key) AnyVersionOf(is func(Type) bool) bool {
	for _, v := range k.Versions {
		if is(v.Type) {
			return true
		}
	}
	return false
}

// rotationType is what a rotation's new version is made as: to when it names a type, else the pending NextType,
// else the current type; an hmac version keeps the key's secret size unless to gives one.
func (k *Key) rotationType(to VersionType) (VersionType, error) {
	if to.Type == "" {
		switch {
		case to.HMACKeySize != 0 && k.Type != TypeHMAC:
			return VersionType{}, Callerf("key_size applies to hmac versions only, not %s", k.Type)
		case to.HMACKeySize != 0:
			to.Type = TypeHMAC
		default:
			to.Type = k.NextType
		}
	}
	if to.Type == "" {
		return k.NewVersionType(), nil
	}
	if err := k.Type.ChangeTo(to.Type); err != nil {
		return VersionType{}, err
	}
	switch {
	case to.Type != TypeHMAC && to.HMACKeySize != 0:
		return VersionType{}, Callerf("key_size applies to hmac versions only, not %s", to.Type)
	case to.Type == TypeHMAC && to.HMACKeySize == 0:
		to.HMACKeySize = k.HMACKeyBytes()
	}
	return to, nil
}

// rotated moves the schedule on after a rotation at now.
func (k *Key) rotated(now time.Time) {
	k.LastRotated = now
	k.NextRotation, k.RotationHeldUntil = time.Time{}, time.Time{}
	if k.AutoRotatePeriod > 0 {
		k.NextRotation = now.Add(k.AutoRotatePeriod)
	}
}

// addVersion makes v the latest version, and its type the key's. retyped reports that the key's type (or an hmac
// key's secret size) changed with it: then every version must be stored again, with its own type (typeLegacy).
func (k *Key) addVersion(v *Version) (n int, retyped bool) {
	n = k.LatestVersion + 1
	if k.Versions == nil {
		k.Versions = map[int]*Version{}
	}
	if v.Type == "" {
		v.Type = k.Type
	}
	if v.Type == TypeHMAC && v.HMACKeySize == 0 {
		v.HMACKeySize = k.HMACKeyBytes()
	}
	retyped = k.LatestVersion > 0 && (v.Type != k.Type || (v.Type == TypeHMAC && v.HMACKeySize != k.HMACKeyBytes()))
	k.Type = v.Type
	if v.Type == TypeHMAC {
		k.HMACKeySize = v.HMACKeySize
	}
	k.Versions[n] = v
	k.LatestVersion = n
	if k.MinDecryptionVersion == 0 {
		k.MinDecryptionVersion = 1
	}
	return n, retyped
}

// DisableVersion stops version n from serving anything until it is enabled.
func (k *Key) DisableVersion(n int) (bool, error) {
	v := k.Versions[n]
	switch {
	case v == nil:
		return false, Callerf("key %q has no version %d", k.Name, n)
	case v.State == StateDisabled:
		return false, nil
	case v.State == StateDestroyed:
		return false, Callerf("version %d of key %q is destroyed: its HSM objects are gone", n, k.Name)
	case n == k.LatestVersion:
		return false, Callerf("version %d is the latest of key %q: rotate first, or disable the whole key with keys/%s/disable", n, k.Name, k.Name)
	case v.State == StateDestroyScheduled:
		return false, Callerf("version %d of key %q is scheduled for destruction; enable it first to cancel that", n, k.Name)
	}
	k.withVersion(n, func(v *Version) {
		if v.State == StateRetired && v.RetiredAt.IsZero() {
			v.RetiredAt = time.Now().UTC() // retirement outlives the disable (enable returns it to retired)
		}
		v.State = StateDisabled
	})
	return true, nil
}

// EnableVersion restores a disabled version, or cancels its scheduled destruction (cancelled reports which).
func (k *Key) EnableVersion(n int) (changed, cancelled bool, err error) {
	v := k.Versions[n]
	switch {
	case v == nil:
		return false, false, Callerf("key %q has no version %d", k.Name, n)
	case v.State == StateDestroyed:
		return false, false, Callerf("version %d of key %q is destroyed: its HSM objects are gone", n, k.Name)
	case n < k.MinAvailableVersion:
		return false, false, Callerf("version %d of key %q was trimmed (below min_available_version %d, which never goes down): its destruction cannot be cancelled", n, k.Name, k.MinAvailableVersion)
	case v.State == StateRetired:
		return false, false, Callerf("version %d of key %q is retired and is never enabled again: rewrap what it protects, then destroy it", n, k.Name)
	case !v.RetiredAt.IsZero():
		// A retired version disabled, or whose destruction was scheduled, goes back to serving rewrap alone.
		cancelled = v.State == StateDestroyScheduled
		k.withVersion(n, func(v *Version) { v.State, v.DestroyAt = StateRetired, time.Time{} })
		return true, cancelled, nil
	case v.State == "":
		if s := k.VersionState(n); s == StateActive || s == StateDecryptOnly {
			return false, false, nil
		}
		return false, false, Callerf("version %d of key %q is not disabled nor scheduled for destruction (state %s); its key's min_*_version bounds decide the rest", n, k.Name, k.VersionState(n))
	}
	cancelled = v.State == StateDestroyScheduled
	k.withVersion(n, func(v *Version) { v.State, v.DestroyAt = "", time.Time{} })
	return true, cancelled, nil
}

// RetireVersion makes version n serve rewrap alone (a compromised version, or an algorithm withdrawn): nothing
// is encrypted, decrypted, signed or verified with it any more, while rewrap moves its data onto the latest
// version; it is then destroyed. A disabled version may be retired (fromDisabled: it serves rewrap again).
func (k *Key) RetireVersion(n int) (changed, fromDisabled bool, err error) {
	v := k.Versions[n]
	switch {
	case v == nil:
		return false, false, Callerf("key %q has no version %d", k.Name, n)
	case v.State == StateRetired:
		return false, false, nil
	case !v.RetiredAt.IsZero():
		return false, false, Callerf("version %d of key %q was retired and is %s: enable returns it to serving rewrap alone", n, k.Name, v.State)
	case v.State == StateDestroyed || v.State == StateDestroyScheduled:
		return false, false, Callerf("version %d of key %q is %s", n, k.Name, v.State)
	case n == k.LatestVersion:
		return false, false, Callerf("version %d is the latest of key %q: rotate first (to another type, if its algorithm is what is retired)", n, k.Name)
	case n < k.MinDecryptionVersion || n < k.MinAvailableVersion:
		return false, false, Callerf("version %d of key %q is below the key's min_decryption_version or min_available_version: it serves nothing already", n, k.Name)
	case v.PublicOnly():
		return false, false, Callerf("version %d of key %q holds only a public key: there is nothing to rewrap; disable or destroy it", n, k.Name)
	}
	fromDisabled = v.State == StateDisabled
	k.withVersion(n, func(v *Version) { v.State, v.RetiredAt = StateRetired, time.Now().UTC() })
	return true, fromDisabled, nil
}

// RetireVersionFromDisabled reports whether retiring version n would return a disabled version to service (rewrap).
func (k *Key) RetireVersionFromDisabled(n int) (bool, error) {
	_, fromDisabled, err := k.RetireVersion(n)
	return fromDisabled, err
}

// ScheduleVersionDestruction schedules version n's destruction at at.
func (k *Key) ScheduleVersionDestruction(n int, at time.Time) (bool, error) {
	v := k.Versions[n]
	switch {
	case v == nil:
		return false, Callerf("key %q has no version %d", k.Name, n)
	case v.State == StateDestroyScheduled || v.State == StateDestroyed:
		return false, nil
	case n == k.LatestVersion:
		return false, Callerf("version %d is the latest of key %q: rotate first", n, k.Name)
	}
	k.withVersion(n, func(v *Version) {
		if v.State == StateRetired && v.RetiredAt.IsZero() {
			v.RetiredAt = time.Now().UTC() // retirement outlives the scheduled destruction, should enable cancel it
		}
		v.State, v.DestroyAt = StateDestroyScheduled, at.UTC()
	})
	return true, nil
}

// markDestroyed records that version n's objects are gone; its metadata stays as a tombstone.
func (k *Key) markDestroyed(n int, now time.Time) {
	k.withVersion(n, func(v *Version) { v.State, v.DestroyAt, v.DestroyedAt = StateDestroyed, time.Time{}, now.UTC() })
}

// SetDisabled revokes (or restores) every use of the key at once.
func (k *Key) SetDisabled(disabled bool) bool {
	if k.Disabled == disabled {
		return false
	}
	k.Disabled = disabled
	return true
}

// ScheduleDeletion schedules the key's destruction at at (deletion_allowed needed).
func (k *Key) ScheduleDeletion(at time.Time) (bool, error) {
	switch {
	case !k.DeletionAllowed:
		return false, Callerf("deletion is not allowed for key %q: set deletion_allowed=true on keys/%s/config first", k.Name, k.Name)
	case !k.DeleteAt.IsZero() || k.Deleting:
		return false, nil
	}
	k.DeleteAt = at.UTC()
	return true, nil
}

// CancelDeletion restores a key whose deletion is scheduled.
func (k *Key) CancelDeletion() error {
	switch {
	case k.Deleting:
		return Callerf("key %q is already being destroyed", k.Name)
	case k.DeleteAt.IsZero():
		return Callerf("key %q is not scheduled for deletion", k.Name)
	}
	k.DeleteAt = time.Time{}
	return nil
}

// Trim raises min_available_version; the versions below it are then scheduled for destruction by the caller. As Transit, it is
// refused while min_encryption_version is not set, and may exceed neither bound.
func (k *Key) Trim(minAvail int) error {
	switch {
	case k.MinEncryptionVersion == 0:
		return Callerf("cannot trim key %q while min_encryption_version is not set: set it with keys/%s/config first", k.Name, k.Name)
	case minAvail < 1:
		return Callerf("min_available_version must be at least 1")
	case minAvail < k.MinAvailableVersion:
		return Callerf("min_available_version of key %q cannot go down: it is %d", k.Name, k.MinAvailableVersion)
	case minAvail > k.MinDecryptionVersion:
		return Callerf("min_available_version %d must not exceed min_decryption_version %d", minAvail, k.MinDecryptionVersion)
	case minAvail > k.MinEncryptionVersion:
		return Callerf("min_available_version %d must not exceed min_encryption_version %d", minAvail, k.MinEncryptionVersion)
	}
	k.MinAvailableVersion = minAvail
	return nil
}

// Settings are what keys/<name>/config and a key's creation may change; nil fields are left as they are.
type Settings struct {
	MinDecryptionVersion *int
	MinEncryptionVersion *int
	DeletionAllowed      *bool
	AutoRotatePeriod     *time.Duration
	MaxEncryptions       *int
	// NextRotation: a time, or the zero time to clear it.
	NextRotation *time.Time
	// AllowPKCS1v15Decryption: RSA keys only.
	AllowPKCS1v15Decryption *bool
	// ApprovalsRequired (0 to MaxApprovalsRequired) and ApproverGroups (empty: any entity) set dual control.
	ApprovalsRequired *int
	ApproverGroups    *[]string
	// Ownership (see Key.Owner): each replaces what the key had; empty clears it.
	Owner       *string
	Description *string
	Tags        *map[string]string
	DataAssets  *[]string
	// Anomaly settings (see Key.OnAnomaly).
	OnAnomaly           *string
	AnomalyRateLimit    *int
	AnomalyActionPeriod *time.Duration
	// NextType: the type the next rotation makes (another of the key's purpose); empty clears it.
	NextType *string
	// DecryptWindow: a number of versions, or a period ("2160h", "90d"); "" or "0" clears it. DecryptQuietPeriod:
	// 0 is the default.
	DecryptWindow      *string
	DecryptQuietPeriod *time.Duration
}

// Bounds of a key's ownership fields: the inventory lists every key with its owner and tags, and the key read
// shows them all.
const (
	MaxOwner         = 256
	MaxDescription   = 1024
	MaxTags          = 50
	MaxTagKey        = 128
	MaxTagValue      = 256
	MaxDataAssets    = 32
	MaxDataAssetName = 512
)

// MaxApprovalsRequired bounds approvals_required: more distinct custodians than this is a typo, and a key that
// needs more approvers than exist can never be destroyed.
const MaxApprovalsRequired = 10

// Bounds of approver_groups: every held request of the key carries it.
const (
	maxApproverGroups = 32
	maxGroupName      = 256
)

// Apply changes k's settings and checks the result; on an error k is left unusable (it is a clone).
func (k *Key) Apply(c Settings) error {
	if c.MinDecryptionVersion != nil {
		k.MinDecryptionVersion = max(*c.MinDecryptionVersion, 1)
	}
	if c.MinEncryptionVersion != nil {
		k.MinEncryptionVersion = *c.MinEncryptionVersion
	}
	if c.DeletionAllowed != nil {
		k.DeletionAllowed = *c.DeletionAllowed
	}
	if c.AutoRotatePeriod != nil {
		k.AutoRotatePeriod = *c.AutoRotatePeriod
		if k.AutoRotatePeriod != 0 && k.AutoRotatePeriod < MinAutoRotatePeriod {
			return Callerf("auto_rotate_period must be 0 to disable or at least an hour")
		}
		k.NextRotation = time.Time{}
		if base := k.LastRotated; k.AutoRotatePeriod > 0 && k.LatestVersion > 0 {
			if base.IsZero() {
				base = k.CreatedAt
			}
			k.NextRotation = base.Add(k.AutoRotatePeriod)
		} // a key being created is scheduled from its creation (Manager.Create)
	}
	if c.MaxEncryptions != nil {
		switch {
		case *c.MaxEncryptions < 0:
			return Callerf("max_encryptions_per_version must not be negative")
		case *c.MaxEncryptions > 0 && !k.Type.IsAES():
			return Callerf("max_encryptions_per_version applies to AES keys, not %s", k.Type)
		}
		k.MaxEncryptions = uint64(*c.MaxEncryptions)
	}
	if c.DecryptWindow != nil || c.DecryptQuietPeriod != nil {
		if err := k.applyDecryptWindow(c); err != nil {
			return err
		}
	}
	if c.NextType != nil {
		k.NextType = ""
		if *c.NextType != "" {
			t, err := ParseType(*c.NextType)
			if err != nil {
				return err
			}
			if err := k.Type.ChangeTo(t); err != nil {
				return err
			}
			k.NextType = t
			k.RotationHeldUntil = time.Time{} // a rotation the policy held may be made now
		}
	}
	if c.AllowPKCS1v15Decryption != nil {
		if *c.AllowPKCS1v15Decryption && !k.Type.IsRSA() && !k.AnyVersionOf(Type.IsRSA) {
			return Callerf("allow_pkcs1v15_decryption applies to RSA keys, not %s", k.Type)
		}
		if *c.AllowPKCS1v15Decryption && !k.AllowPKCS1v15Decryption {
			if err := k.hmacSecretsUnused(); err != nil {
				return err
			}
		}
		k.AllowPKCS1v15Decryption = *c.AllowPKCS1v15Decryption
	}
	if c.ApprovalsRequired != nil {
		if *c.ApprovalsRequired < 0 || *c.ApprovalsRequired > MaxApprovalsRequired {
			return Callerf("approvals_required must be between 0 and %d", MaxApprovalsRequired)
		}
		k.ApprovalsRequired = *c.ApprovalsRequired
	}
	if c.ApproverGroups != nil {
		groups, err := nameList("approver_groups", *c.ApproverGroups, maxApproverGroups, maxGroupName, "groups", "a group's name or id")
		if err != nil {
			return err
		}
		slices.Sort(groups)
		k.ApproverGroups = groups
	}
	if err := k.applyOwnership(c); err != nil {
		return err
	}
	if err := k.applyAnomalySettings(c); err != nil {
		return err
	}
	if c.NextRotation != nil {
		k.NextRotation = c.NextRotation.UTC()
		if c.NextRotation.IsZero() {
			k.NextRotation = time.Time{}
		}
	}
	if k.Imported && !k.AllowRotation && (k.AutoRotatePeriod > 0 || k.MaxEncryptions > 0 || !k.NextRotation.IsZero()) {
		return Callerf("imported key %q does not allow rotation: it was imported without allow_rotation", k.Name)
	}
	if k.LatestVersion == 0 {
		return nil // a key being created: bounds are set with its first version
	}
	switch {
	case k.MinDecryptionVersion < 1 || k.MinDecryptionVersion > k.LatestVersion:
		return Callerf("min_decryption_version must be between 1 and the latest version %d", k.LatestVersion)
	case k.MinEncryptionVersion < 0 || k.MinEncryptionVersion > k.LatestVersion:
		return Callerf("min_encryption_version must be between 0 and the latest version %d", k.LatestVersion)
	case k.MinEncryptionVersion != 0 && k.MinEncryptionVersion < k.MinDecryptionVersion:
		return Callerf("min_encryption_version %d must not be below min_decryption_version %d", k.MinEncryptionVersion, k.MinDecryptionVersion)
	}
	return nil
}

// applyOwnership sets the key's owner, description, tags and data assets, within their bounds.
func (k *Key) applyOwnership(c Settings) error {
	if c.Owner != nil {
		if len(*c.Owner) > MaxOwner {
			return Callerf("owner has at most %d characters", MaxOwner)
		}
		k.Owner = strings.TrimSpace(*c.Owner)
	}
	if c.Description != nil {
		if len(*c.Description) > MaxDescription {
			return Callerf("description has at most %d characters", MaxDescription)
		}
		k.Description = *c.Description
	}
	if c.Tags != nil {
		if len(*c.Tags) > MaxTags {
			return Callerf("tags: at most %d tags", MaxTags)
		}
		tags := make(map[string]string, len(*c.Tags))
		for key, value := range *c.Tags {
			key = strings.TrimSpace(key)
			switch {
			case key == "":
				return Callerf("tags: a tag's key must not be empty (give key=value pairs)")
			case len(key) > MaxTagKey:
				return Callerf("tags: tag key %.32q… has more than %d characters", key, MaxTagKey)
			case len(value) > MaxTagValue:
				return Callerf("tags: the value of tag %q has more than %d characters", key, MaxTagValue)
			}
			tags[key] = value
		}
		k.Tags = tags
		if len(tags) == 0 {
			k.Tags = nil
		}
	}
	if c.DataAssets != nil {
		assets, err := nameList("data_assets", *c.DataAssets, MaxDataAssets, MaxDataAssetName, "assets", "an asset's name")
		if err != nil {
			return err
		}
		k.DataAssets = assets
	}
	return nil
}

// applyAnomalySettings sets what the key does on an anomaly, its rate cap and its actions' period.
func (k *Key) applyAnomalySettings(c Settings) error {
	if c.OnAnomaly != nil {
		action := strings.TrimSpace(*c.OnAnomaly)
		if action != "" && !slices.Contains(AnomalyActionNames, action) {
			return Callerf("on_anomaly must be one of %s, not %q", strings.Join(AnomalyActionNames, ", "), action)
		}
		if action == ActionAlert {
			action = ""
		}
		k.OnAnomaly = action
	}
	if c.AnomalyRateLimit != nil {
		if *c.AnomalyRateLimit < 0 {
			return Callerf("anomaly_rate_limit must not be negative (0: no cap)")
		}
		k.AnomalyRateLimit = uint64(*c.AnomalyRateLimit)
	}
	if c.AnomalyActionPeriod != nil {
		if p := *c.AnomalyActionPeriod; p < 0 || p > MaxAnomalyActionPeriod {
			return Callerf("anomaly_action_period must be between 0 (the default, %s) and %s", DefaultAnomalyActionPeriod, MaxAnomalyActionPeriod)
		}
		k.AnomalyActionPeriod = *c.AnomalyActionPeriod
	}
	return nil
}

// nameList checks a list of names given to field (at most maxItems, each of at most maxLen characters) and returns
// it trimmed, without empty names or repeats, in the order given; nil when none is left.
func nameList(field string, names []string, maxItems, maxLen int, items, item string) ([]string, error) {
	if len(names) > maxItems {
		return nil, Callerf("%s names at most %d %s", field, maxItems, items)
	}
	var out []string
	for _, name := range names {
		if len(name) > maxLen {
			return nil, Callerf("%s: %s has at most %d characters", field, item, maxLen)
		}
		if name = strings.TrimSpace(name); name != "" && !slices.Contains(out, name) {
			out = append(out, name)
		}
	}
	return out, nil
}

// FormatTags renders tags as sorted key=value pairs.
func FormatTags(tags map[string]string) []string {
	out := make([]string, 0, len(tags))
	for key, value := range tags {
		out = append(out, key+"="+value)
	}
	slices.Sort(out)
	return out
}

// settingsChanges describes what a settings change did, for the key's history.
func settingsChanges(a, b *Key) string {
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
	add("next_rotation_time", FormatTime(a.NextRotation), FormatTime(b.NextRotation))
	add("max_encryptions_per_version", a.EncryptionLimit(), b.EncryptionLimit())
	add("allow_pkcs1v15_decryption", a.AllowPKCS1v15Decryption, b.AllowPKCS1v15Decryption)
	add("next_type", fmt.Sprintf("%q", a.NextType), fmt.Sprintf("%q", b.NextType))
	add("decrypt_window", fmt.Sprintf("%q", a.DecryptWindowView()), fmt.Sprintf("%q", b.DecryptWindowView()))
	add("decrypt_window_quiet_period", a.QuietPeriod(), b.QuietPeriod())
	add("approvals_required", a.ApprovalsRequired, b.ApprovalsRequired)
	add("approver_groups", a.ApproverGroups, b.ApproverGroups)
	add("owner", fmt.Sprintf("%q", a.Owner), fmt.Sprintf("%q", b.Owner))
	add("description", fmt.Sprintf("%q", a.Description), fmt.Sprintf("%q", b.Description))
	add("tags", FormatTags(a.Tags), FormatTags(b.Tags))
	add("data_assets", a.DataAssets, b.DataAssets)
	add("on_anomaly", a.OnAnomalyAction(), b.OnAnomalyAction())
	add("anomaly_rate_limit", a.AnomalyRateLimit, b.AnomalyRateLimit)
	add("anomaly_action_period", a.ActionPeriod(), b.ActionPeriod())
	if len(out) == 0 {
		return "no change"
	}
	return strings.Join(out, "; ")
}

// FormatTime renders a time for responses and history: RFC 3339, or "" for none.
func FormatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

// hmacSecretsUnused refuses opting in to PKCS#1 v1.5 decryption while a version has an HMAC secret on the token.
// Implicit rejection derives each invalid ciphertext's message from that secret, and hmac/ may have used it
// before: an HMAC of label ‖ ciphertext, asked ahead (the ciphertexts of an attack's first steps follow from the
// target alone), predicts the message and tells valid padding from invalid. Secrets made after opting in have
// served no caller (hmac and verify are refused from then on): so the rule holds only for secrets made before,
// including while the key was opted out.
func (k *Key) hmacSecretsUnused() error {
	for n := 1; n <= k.LatestVersion; n++ {
		v := k.Versions[n]
		if v == nil || v.State == StateDestroyed || v.HMACDeferred || v.PublicOnly() {
			continue
		}
		return Callerf("allow_pkcs1v15_decryption cannot be set on key %q: version %d already has an HMAC secret on the token (hmac_secret_on_token), which hmac may have used, and PKCS#1 v1.5 implicit rejection needs secrets no caller has used; destroy the versions that have one (keys/%s/trim, or keys/%s/versions/:version), or use a new key", k.Name, n, k.Name, k.Name)
	}
	return nil
}
