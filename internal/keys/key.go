// Package keys is the engine's key model: a key, its versions and their states, the rules of its lifecycle as plain
// methods, the storage of keys, versions, history and usage counts, and the use of keys in Transit's formats. A
// Manager holds the keys' locks and cached snapshots; its Update funnel is the only way a key changes, and its Use
// door, which admits a request's use of a key, the only way to key material. Key material is never here: the model
// reaches the HSM through the small HSM interface (generate, import, destroy, encrypt, sign, ...) and knows no
// PKCS#11.
package keys

import (
	"crypto"
	"encoding/hex"
	"fmt"
	"maps"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// Explicit version states; a version without one is active or decrypt_only by the key's bounds.
const (
	StateActive           = "active"
	StateDecryptOnly      = "decrypt_only"
	StateDisabled         = "disabled"
	StateDestroyScheduled = "destroy_scheduled"
	StateDestroyed        = "destroyed"
	// StateRetired: the version is compromised or its algorithm withdrawn; it serves rewrap alone, so that data is
	// moved off it, and is then destroyed. It is never enabled again.
	StateRetired = "retired"
)

// Key is a key's metadata as stored in Vault: settings and versions, never material. A *Key from the Manager is a
// snapshot that nobody modifies: changes are made on a clone inside Update, persisted, then published, so that
// encrypt and decrypt read it without locks and never wait for a rotation.
type Key struct {
	Name string `json:"name"`
	// Type is the key's current type: its latest version's, the one new versions are made with. Each version keeps
	// its own (Version.Type): a rotation may change the type within the key's purpose (crypto-agility).
	Type                 Type      `json:"type"`
	LatestVersion        int       `json:"latest_version"`
	MinDecryptionVersion int       `json:"min_decryption_version"`
	MinEncryptionVersion int       `json:"min_encryption_version"`
	MinAvailableVersion  int       `json:"min_available_version,omitempty"`
	DeletionAllowed      bool      `json:"deletion_allowed"`
	CreatedAt            time.Time `json:"created_at"`
	// HMACKeySize is the size in bytes of the HMAC secret of new versions (key_size for hmac keys); each version
	// keeps its own (Version.HMACKeySize).
	HMACKeySize int `json:"hmac_key_size,omitempty"`
	// NextType, when set, is the type the next rotation of any cause gives the new version, unless the rotation
	// names one itself (keys/:name/config next_type); it is cleared once a version of it is made.
	NextType Type `json:"next_type,omitempty"`
	// Imported keys were brought in with import; rotation then needs AllowRotation, as in Transit.
	Imported      bool `json:"imported,omitempty"`
	AllowRotation bool `json:"allow_rotation,omitempty"`

	// Rotation schedule: every AutoRotatePeriod (0: none), next at NextRotation (zero: none).
	AutoRotatePeriod time.Duration `json:"auto_rotate_period,omitempty"`
	NextRotation     time.Time     `json:"next_rotation_time,omitempty"`
	LastRotated      time.Time     `json:"last_rotated,omitempty"`
	// MaxEncryptions per version before it is rotated; 0 means the AES-GCM random-nonce limit.
	MaxEncryptions uint64 `json:"max_encryptions_per_version,omitempty"`
	// AllowPKCS1v15Decryption opts an RSA key in to decrypt and rewrap with PKCS#1 v1.5 padding, answered with
	// implicit rejection. Off, they are refused: the padding's validity is Bleichenbacher's oracle.
	AllowPKCS1v15Decryption bool `json:"allow_pkcs1v15_decryption,omitempty"`

	// Access holds the key's access conditions and grant settings (keys/:name/access); nil: none. Replaced whole
	// on change, never modified in place (snapshots share it).
	Access *Access `json:"access,omitempty"`

	// ApprovalsRequired is how many other Vault entities must approve a request that cannot be undone (dual
	// control, see approvals.go in the backend); the mount's floor may require more. ApproverGroups, when set,
	// restricts approvers to members of these Vault groups (names or ids).
	ApprovalsRequired int      `json:"approvals_required,omitempty"`
	ApproverGroups    []string `json:"approver_groups,omitempty"`

	// Ownership: who answers for the key (an entity id, a group or a team name), what it is, its tags and the
	// data it protects, for inventory and reports/compliance. Tags and DataAssets are replaced whole on change,
	// never modified in place (snapshots share them).
	Owner       string            `json:"owner,omitempty"`
	Description string            `json:"description,omitempty"`
	Tags        map[string]string `json:"tags,omitempty"`
	DataAssets  []string          `json:"data_assets,omitempty"`

	// Anomalies (anomaly.go): what the key does when a caller's use is unusual (OnAnomaly: "" is alert), the
	// uses per minute per caller above which a use is one (0: no cap), and how long require_grant or
	// block_caller last (0: DefaultAnomalyActionPeriod).
	OnAnomaly           string        `json:"on_anomaly,omitempty"`
	AnomalyRateLimit    uint64        `json:"anomaly_rate_limit,omitempty"`
	AnomalyActionPeriod time.Duration `json:"anomaly_action_period,omitempty"`

	// Disabled keys serve no operation (emergency revoke).
	Disabled bool `json:"disabled,omitempty"`
	// DeleteAt is when a scheduled deletion destroys the key; zero when none is scheduled.
	DeleteAt time.Time `json:"delete_at,omitempty"`
	// Deleting is set before the deletion destroys HSM objects, so that an interrupted deletion is finished by
	// the next attempt and the key serves nothing meanwhile.
	Deleting bool `json:"deleting,omitempty"`

	// Decrypt window (keys/:name/config decrypt_window): MinDecryptionVersion advances by itself so that only the
	// latest DecryptWindowVersions versions, or the versions superseded less than DecryptWindowPeriod ago, decrypt
	// and verify; never past a version that decrypted or verified within DecryptQuietPeriod (0: the default).
	// WindowCheckAt is when the periodic function looks at the window next (zero: at the next rotation).
	DecryptWindowVersions int           `json:"decrypt_window_versions,omitempty"`
	DecryptWindowPeriod   time.Duration `json:"decrypt_window_period,omitempty"`
	DecryptQuietPeriod    time.Duration `json:"decrypt_quiet_period,omitempty"`
	WindowCheckAt         time.Time     `json:"decrypt_window_check_at,omitzero"`
	// RotationHeldUntil: the mount's algorithm policy refused the scheduled rotation; it is tried again then.
	// NextRotation stays, so that the key shows as overdue meanwhile.
	RotationHeldUntil time.Time `json:"rotation_held_until,omitzero"`

	// UsesCounted: usage analytics were on when the key was made, so what each version did is counted from its
	// creation (the migration view's counts_complete), unless analytics were turned off since.
	UsesCounted bool `json:"uses_counted,omitempty"`

	// LastRequestID is the Vault request that added the latest version by rotation or import. Vault retries a
	// request once when the plugin dies under it; a retry of one that completed must not add a second version.
	LastRequestID string `json:"last_request_id,omitempty"`

	Versions map[int]*Version `json:"-"` // stored in chunks under versions/<name>/
}

// Version is one version's metadata. Its material is on the token, found by HSMID.
type Version struct {
	// Type is the version's algorithm. Versions stored before types could change have none in storage: they
	// take the key's type when loaded, and a rotation that changes the type stores every version's (load, Rotate).
	Type Type `json:"type,omitempty"`
	// HMACKeySize is the size in bytes of an hmac version's secret (0 for other types).
	HMACKeySize int `json:"key_size,omitempty"`

	HSMID     string    `json:"hsm_id"` // hex CKA_ID of the version's objects
	Label     string    `json:"label"`  // CKA_LABEL, for people reading the token
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by,omitempty"`
	// PublicKey of an asymmetric version as Transit shows it: PEM (PKIX) for RSA and ECDSA, base64 for Ed25519.
	PublicKey string `json:"public_key,omitempty"`
	// CertificateChain is the PEM chain an operator set for the version (keys/:name/set-certificate), leaf first;
	// its leaf certifies the version's public key.
	CertificateChain string `json:"certificate_chain,omitempty"`
	// ImportMethod says how imported material reached the token (see BYOK); empty for generated versions;
	// MethodPublicKeyOnly for a version that holds only a public key.
	ImportMethod string `json:"import_method,omitempty"`
	// HMACDeferred: the version's HMAC secret is not on the token yet; it is made on first use. False for versions
	// created with one (hmac keys, imports, and every version made before secrets were deferred).
	HMACDeferred bool `json:"hmac_deferred,omitempty"`
	// AdoptedAt: the version's material was found on the token after storage had lost (or never stored) its
	// metadata, and taken back as this version (see adopt.go).
	AdoptedAt time.Time `json:"adopted_at,omitempty"`
	// EncryptionsUnknown: how many encryptions the version made is unknown (adopted after a storage restore), so
	// it makes no more: the GCM nonce limit could not be kept.
	EncryptionsUnknown bool `json:"encryptions_unknown,omitempty"`
	// State is disabled, destroy_scheduled, destroyed or retired; empty otherwise.
	State string `json:"state,omitempty"`
	// RetiredAt: when the version was retired (versions/:v/retire). It stays when the version is disabled or its
	// destruction scheduled, and enabling it returns it to retired, never to service.
	RetiredAt   time.Time `json:"retired_at,omitzero"`
	DestroyAt   time.Time `json:"destroy_at,omitempty"`
	DestroyedAt time.Time `json:"destroyed_at,omitempty"`

	pub crypto.PublicKey // PublicKey parsed, set when the version is loaded or created
}

// referenced reports whether a version of k has the HSM ID id.
func (k *Key) referenced(id string) bool {
	for _, v := range k.Versions {
		if v.HSMID == id {
			return true
		}
	}
	return false
}

// PublicOnly: the version holds a public key and no material on the token (Transit's public-key import): it
// verifies signatures (and RSA versions encrypt) until its private key is imported.
func (v *Version) PublicOnly() bool { return v.HSMID == "" }

// ID is the version's CKA_ID.
func (v *Version) ID() []byte {
	b, _ := hex.DecodeString(v.HSMID)
	return b
}

// Public is the version's public key (asymmetric types), nil for the others.
func (v *Version) Public() crypto.PublicKey { return v.pub }

// HMACBytes is the size of the version's HMAC secret: an hmac version's own, the default for the secret that
// versions of other types keep beside their material.
func (v *Version) HMACBytes() int {
	if v.HMACKeySize > 0 {
		return v.HMACKeySize
	}
	return hsm.HMACKeySize
}

// HMACKeyBytes is the size of the HMAC secret of the key's new versions.
func (k *Key) HMACKeyBytes() int {
	if k.HMACKeySize > 0 {
		return k.HMACKeySize
	}
	return hsm.HMACKeySize
}

// Clone copies k for a change; versions are shared until withVersion replaces one.
func (k *Key) Clone() *Key {
	c := *k
	c.Versions = maps.Clone(k.Versions)
	return &c
}

// withVersion replaces version n with a copy changed by f (versions are never modified in place: snapshots
// share them).
func (k *Key) withVersion(n int, f func(v *Version)) {
	v := *k.Versions[n]
	f(&v)
	k.Versions[n] = &v
}

// VersionState is the lifecycle state of version n ("" if there is none).
func (k *Key) VersionState(n int) string {
	ver := k.Versions[n]
	switch {
	case ver == nil:
		return ""
	case ver.State != "" && ver.State != StateRetired:
		return ver.State
	case n < k.MinDecryptionVersion || n < k.MinAvailableVersion:
		return StateDisabled // below the key's bounds: serves nothing until they are lowered
	case ver.State == StateRetired:
		return StateRetired
	case n < k.MinEncryptionVersion:
		return StateDecryptOnly
	}
	return StateActive
}

// serves reports whether version n may serve any operation now: the key is neither disabled nor being deleted,
// and the version is active, decrypt-only, or retired (it serves rewrap).
func (k *Key) serves(n int) bool {
	if k.Disabled || k.Deleting || !k.DeleteAt.IsZero() {
		return false
	}
	s := k.VersionState(n)
	return s == StateActive || s == StateDecryptOnly || s == StateRetired
}

// EncryptionVersion resolves a requested key_version (0 = latest) for encryption, signing and HMAC.
func (k *Key) EncryptionVersion(requested int) (int, *Version, error) {
	v := requested
	if v == 0 {
		v = k.LatestVersion
	}
	switch {
	case v < 0 || v > k.LatestVersion:
		return 0, nil, Callerf("invalid key version %d: key %q has versions 1 to %d", requested, k.Name, k.LatestVersion)
	case v < k.MinEncryptionVersion:
		return 0, nil, Callerf("key version %d of key %q is below min_encryption_version %d", v, k.Name, k.MinEncryptionVersion)
	}
	if s := k.VersionState(v); s != StateActive && s != StateDecryptOnly {
		return 0, nil, Callerf("key version %d of key %q is %s", v, k.Name, s)
	}
	return v, k.Versions[v], nil
}

// DecryptionVersion checks that version v may decrypt (or verify) what names it: a "ciphertext", "signature" or
// "hmac", named so in the messages.
func (k *Key) DecryptionVersion(v int, what string) (*Version, error) {
	return k.decryptionVersion(v, what, false)
}

// decryptionVersion is DecryptionVersion; forRewrap also admits a retired version, which serves rewrap alone.
func (k *Key) decryptionVersion(v int, what string, forRewrap bool) (*Version, error) {
	switch {
	case v < 1 || v > k.LatestVersion:
		return nil, Callerf("invalid %s: version %d of key %q does not exist (latest is %d)", what, v, k.Name, k.LatestVersion)
	case v < k.MinDecryptionVersion:
		return nil, Callerf("%s version %d is disallowed by policy: below min_decryption_version %d of key %q", what, v, k.MinDecryptionVersion, k.Name)
	case v < k.MinAvailableVersion:
		return nil, Callerf("%s version %d was trimmed: below min_available_version %d of key %q", what, v, k.MinAvailableVersion, k.Name)
	}
	switch s := k.VersionState(v); {
	case s == StateRetired && forRewrap:
	case s == StateRetired:
		return nil, Callerf("key version %d of key %q is retired: it serves only rewrap, to move data onto the latest version", v, k.Name)
	case s != StateActive && s != StateDecryptOnly:
		return nil, Callerf("key version %d of key %q is %s", v, k.Name, s)
	}
	return k.Versions[v], nil
}

// Private checks that version n has its private half on the token, for an operation (op) that needs it.
func (k *Key) Private(n int, op string) error {
	if v := k.Versions[n]; v != nil && v.PublicOnly() {
		return Callerf("version %d of key %q holds only a public key: it cannot %s until its private key is imported (import_version with version=%d)", n, k.Name, op, n)
	}
	return nil
}

// Usable reports why a key serves no operation, if it does not.
func (k *Key) Usable() error {
	switch {
	case k.Deleting:
		return Callerf("key %q is being deleted", k.Name)
	case !k.DeleteAt.IsZero():
		return Callerf("key %q is scheduled for deletion at %s and serves nothing; restore it with keys/%s/cancel-deletion",
			k.Name, k.DeleteAt.Format(time.RFC3339), k.Name)
	case k.Disabled:
		return Callerf("key %q is disabled: it serves no operation until keys/%s/enable", k.Name, k.Name)
	}
	return nil
}

// GCMEncryptionLimit is NIST SP 800-38D's bound for AES-GCM with random 96-bit nonces: at most 2^32 encryptions
// under one key.
const GCMEncryptionLimit = uint64(1) << 32

// EncryptionLimit is how many encryptions one version of k may make.
func (k *Key) EncryptionLimit() uint64 {
	if k.MaxEncryptions > 0 && k.MaxEncryptions < GCMEncryptionLimit {
		return k.MaxEncryptions
	}
	return GCMEncryptionLimit
}

// NextDue is the earliest lifecycle event of k, zero when none.
func (k *Key) NextDue() time.Time {
	var at time.Time
	consider := func(t time.Time) {
		if !t.IsZero() && (at.IsZero() || t.Before(at)) {
			at = t
		}
	}
	consider(k.DeleteAt)
	if k.Deleting {
		consider(time.Unix(0, 0)) // an interrupted deletion: finish it at once
	}
	if !k.Disabled && k.DeleteAt.IsZero() {
		consider(k.rotationDue())
		consider(k.WindowCheckAt)
	}
	for _, v := range k.Versions {
		if v.State == StateDestroyScheduled {
			consider(v.DestroyAt)
		}
	}
	return at
}

// rotationDue is when the scheduled rotation is to be tried: NextRotation, or later while the mount's algorithm
// policy holds it (RotationHeldUntil). Zero when none is scheduled.
func (k *Key) rotationDue() time.Time {
	if k.NextRotation.IsZero() || k.RotationHeldUntil.Before(k.NextRotation) {
		return k.NextRotation
	}
	return k.RotationHeldUntil
}

// versionLabel is the CKA_LABEL of version n of key name on mount mountID: for people reading the token.
func versionLabel(mountID, name string, n int) string {
	return fmt.Sprintf("%s%s/v%d", LabelPrefix(mountID), name, n)
}

// LabelPrefix begins the label of every object of the mount mountID on the token.
func LabelPrefix(mountID string) string { return "cmk/" + mountID + "/" }
