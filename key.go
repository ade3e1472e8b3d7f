package cmk

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"time"

	"crypto"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// Storage layout. Everything that grows with a key's life has entries of bounded size: versions in chunks of
// versionChunk, history in pages (history.go), usage reservations in one small entry per key (usage.go).
const (
	policyPrefix   = "policy/"   // policy/<name>: settings, no versions
	versionsPrefix = "versions/" // versions/<name>/<chunk>: versions chunk*256+1 … (chunk+1)*256
	versionChunk   = 256

	// walKindVersion brackets the creation of a version's HSM objects until its metadata is stored.
	walKindVersion = "hsm_key_version"
	// walKindWrappingKey brackets the creation of the mount's wrapping key.
	walKindWrappingKey = "hsm_wrapping_key"
	// walRollbackMinAge is long enough for any key generation to finish; the rollback also takes the key's
	// lock, so it can never race a creation still in progress.
	walRollbackMinAge = 2 * time.Minute
)

// Explicit version states; a version without one is "active" or "decrypt_only" by the key's bounds.
const (
	stateActive           = "active"
	stateDecryptOnly      = "decrypt_only"
	stateDisabled         = "disabled"
	stateDestroyScheduled = "destroy_scheduled"
	stateDestroyed        = "destroyed"
)

// keyPolicy is a key's metadata as stored in Vault: settings and versions, never material. A *keyPolicy in the
// cache is never modified: changes are made on a clone, persisted, then published (copy on write), so encrypt
// and decrypt read it without locks and never wait for a rotation.
type keyPolicy struct {
	Name                 string    `json:"name"`
	Type                 keyType   `json:"type"`
	LatestVersion        int       `json:"latest_version"`
	MinDecryptionVersion int       `json:"min_decryption_version"`
	MinEncryptionVersion int       `json:"min_encryption_version"`
	MinAvailableVersion  int       `json:"min_available_version,omitempty"`
	DeletionAllowed      bool      `json:"deletion_allowed"`
	CreatedAt            time.Time `json:"created_at"`
	// HMACKeySize is the size in bytes of each version's HMAC secret (key_size for hmac keys).
	HMACKeySize int `json:"hmac_key_size,omitempty"`
	// Imported keys were brought in with import; rotation then needs AllowRotation, as in Transit.
	Imported      bool `json:"imported,omitempty"`
	AllowRotation bool `json:"allow_rotation,omitempty"`

	// Rotation schedule: every AutoRotatePeriod (0: none), next at NextRotation (zero: none).
	AutoRotatePeriod time.Duration `json:"auto_rotate_period,omitempty"`
	NextRotation     time.Time     `json:"next_rotation_time,omitempty"`
	LastRotated      time.Time     `json:"last_rotated,omitempty"`
	// MaxEncryptions per version before it is rotated; 0 means the AES-GCM random-nonce limit.
	MaxEncryptions uint64 `json:"max_encryptions_per_version,omitempty"`

	// Disabled keys serve no operation (emergency revoke).
	Disabled bool `json:"disabled,omitempty"`
	// DeleteAt is when a scheduled deletion destroys the key; zero when none is scheduled.
	DeleteAt time.Time `json:"delete_at,omitempty"`
	// Deleting is set before the deletion destroys HSM objects, so that an interrupted deletion is finished by
	// the next attempt and the key serves nothing meanwhile.
	Deleting bool `json:"deleting,omitempty"`

	// LastRequestID is the Vault request that added the latest version. Vault retries a request once when the
	// plugin dies under it; a retry of a rotation or import that did complete must not add a second version.
	LastRequestID string `json:"last_request_id,omitempty"`

	Versions map[int]*keyVersion `json:"-"` // stored in chunks under versions/<name>/
}

// keyVersion is one version's metadata. Its material is on the token, found by HSMID.
type keyVersion struct {
	HSMID     string    `json:"hsm_id"` // hex CKA_ID shared by the version's objects
	Label     string    `json:"label"`  // CKA_LABEL, for people reading the token
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by,omitempty"`
	// PublicKey of an asymmetric version as Transit shows it: PEM (PKIX) for RSA and ECDSA, base64 for Ed25519.
	PublicKey string `json:"public_key,omitempty"`
	// ImportMethod says how imported material reached the token (see BYOK); empty for generated versions.
	ImportMethod string `json:"import_method,omitempty"`
	// HMACDeferred: the version's HMAC secret is not on the token yet; it is made on first use. False for
	// versions created with one (hmac keys, imports, and every version made before secrets were deferred).
	HMACDeferred bool `json:"hmac_deferred,omitempty"`
	// State is disabled, destroy_scheduled or destroyed; empty otherwise.
	State       string    `json:"state,omitempty"`
	DestroyAt   time.Time `json:"destroy_at,omitempty"`
	DestroyedAt time.Time `json:"destroyed_at,omitempty"`

	pub crypto.PublicKey // PublicKey parsed, set when the version is loaded or created
}

func (p *keyPolicy) hmacKeySize() int {
	if p.HMACKeySize > 0 {
		return p.HMACKeySize
	}
	return hsm.HMACKeySize
}

func (v *keyVersion) id() []byte {
	b, _ := hex.DecodeString(v.HSMID)
	return b
}

func (p *keyPolicy) clone() *keyPolicy {
	c := *p
	c.Versions = maps.Clone(p.Versions)
	return &c
}

// withVersion returns p with version n replaced by a copy changed by f (versions are never modified in place:
// snapshots in the cache share them).
func (p *keyPolicy) withVersion(n int, f func(v *keyVersion)) {
	v := *p.Versions[n]
	f(&v)
	p.Versions[n] = &v
}

// versionState is DESIGN.md's lifecycle state of version v.
func (p *keyPolicy) versionState(v int) string {
	ver := p.Versions[v]
	switch {
	case ver == nil:
		return ""
	case ver.State != "":
		return ver.State
	case v < p.MinDecryptionVersion || v < p.MinAvailableVersion:
		return stateDisabled // below the key's bounds: serves nothing until they are lowered
	case v < p.MinEncryptionVersion:
		return stateDecryptOnly
	}
	return stateActive
}

// encryptionVersion resolves a requested key_version (0 = latest) for encryption, signing and HMAC.
func (p *keyPolicy) encryptionVersion(requested int) (int, *keyVersion, error) {
	v := requested
	if v == 0 {
		v = p.LatestVersion
	}
	switch {
	case v < 0 || v > p.LatestVersion:
		return 0, nil, fmt.Errorf("invalid key version %d: key %q has versions 1 to %d", requested, p.Name, p.LatestVersion)
	case v < p.MinEncryptionVersion:
		return 0, nil, fmt.Errorf("key version %d is below min_encryption_version %d", v, p.MinEncryptionVersion)
	}
	if s := p.versionState(v); s != stateActive && s != stateDecryptOnly {
		return 0, nil, fmt.Errorf("key version %d is %s", v, s)
	}
	return v, p.Versions[v], nil
}

// decryptionVersion checks that version v may decrypt (or verify).
func (p *keyPolicy) decryptionVersion(v int) (*keyVersion, error) {
	switch {
	case v < 1 || v > p.LatestVersion:
		return nil, fmt.Errorf("invalid ciphertext: key version %d does not exist (latest is %d)", v, p.LatestVersion)
	case v < p.MinDecryptionVersion:
		return nil, fmt.Errorf("ciphertext version %d is disallowed by policy: below min_decryption_version %d", v, p.MinDecryptionVersion)
	case v < p.MinAvailableVersion:
		return nil, fmt.Errorf("ciphertext version %d was trimmed: below min_available_version %d", v, p.MinAvailableVersion)
	}
	if s := p.versionState(v); s != stateActive && s != stateDecryptOnly {
		return nil, fmt.Errorf("key version %d is %s", v, s)
	}
	return p.Versions[v], nil
}

// usable reports why a key serves no operation, if it does not.
func (p *keyPolicy) usable() error {
	switch {
	case p.Deleting:
		return fmt.Errorf("key %q is being deleted", p.Name)
	case !p.DeleteAt.IsZero():
		return fmt.Errorf("key %q is scheduled for deletion at %s and serves nothing; restore it with keys/%s/cancel-deletion",
			p.Name, p.DeleteAt.Format(time.RFC3339), p.Name)
	case p.Disabled:
		return fmt.Errorf("key %q is disabled: it serves no operation until keys/%s/enable", p.Name, p.Name)
	}
	return nil
}

// lockKey returns the key's lock; writers hold it from load to publish.
func (b *backend) lockKey(name string) *locksutil.LockEntry {
	return locksutil.LockForKey(b.keyLocks, name)
}

// policy returns the key's current snapshot, nil if it does not exist. Once cached, no storage read happens.
func (b *backend) policy(ctx context.Context, s logical.Storage, name string) (*keyPolicy, error) {
	if p, ok := b.keys.Load(name); ok {
		return p.(*keyPolicy), nil
	}
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	return b.policyLocked(ctx, s, name)
}

// policyLocked is policy for callers already holding the key's lock.
func (b *backend) policyLocked(ctx context.Context, s logical.Storage, name string) (*keyPolicy, error) {
	if p, ok := b.keys.Load(name); ok {
		return p.(*keyPolicy), nil
	}
	p, err := loadPolicy(ctx, s, name)
	if err != nil || p == nil {
		return nil, err
	}
	b.keys.Store(name, p)
	return p, nil
}

func versionsKey(name string, chunk int) string {
	return fmt.Sprintf("%s%s/%d", versionsPrefix, name, chunk)
}

func chunkOf(v int) int { return (v - 1) / versionChunk }

// loadPolicy reads a key and its versions. Versions above LatestVersion are ignored: they belong to a rotation
// whose policy write never happened, and the WAL rollback destroys their objects.
func loadPolicy(ctx context.Context, s logical.Storage, name string) (*keyPolicy, error) {
	e, err := s.Get(ctx, policyPrefix+name)
	if err != nil {
		return nil, fmt.Errorf("read key %q: %w", name, err)
	}
	if e == nil {
		return nil, nil
	}
	var p keyPolicy
	if err := e.DecodeJSON(&p); err != nil {
		return nil, fmt.Errorf("decode key %q: %w", name, err)
	}
	p.Versions = map[int]*keyVersion{}
	for c := 0; p.LatestVersion > 0 && c <= chunkOf(p.LatestVersion); c++ {
		ce, err := s.Get(ctx, versionsKey(name, c))
		if err != nil {
			return nil, fmt.Errorf("read key %q versions: %w", name, err)
		}
		if ce == nil {
			continue
		}
		var chunk map[int]*keyVersion
		if err := json.Unmarshal(ce.Value, &chunk); err != nil {
			return nil, fmt.Errorf("decode key %q versions: %w", name, err)
		}
		for n, v := range chunk {
			if n <= p.LatestVersion {
				p.Versions[n] = v
			}
		}
	}
	for n := 1; n <= p.LatestVersion; n++ {
		v := p.Versions[n]
		if v == nil {
			return nil, fmt.Errorf("key %q: version %d is missing from storage", name, n)
		}
		if v.PublicKey != "" {
			if v.pub, err = parsePublicKey(p.Type, v.PublicKey); err != nil {
				return nil, fmt.Errorf("key %q version %d: %w", name, n, err)
			}
		}
	}
	return &p, nil
}

// storePolicy persists p, with the version chunks holding the versions listed in changed, then publishes it
// to the cache and the scheduler. Called with the key's lock held. Chunks are written before the policy, so a
// crash in between leaves at most a version above LatestVersion, which loadPolicy ignores.
func (b *backend) storePolicy(ctx context.Context, s logical.Storage, p *keyPolicy, changed ...int) error {
	chunks := map[int]bool{}
	for _, v := range changed {
		chunks[chunkOf(v)] = true
	}
	for c := range chunks {
		part := map[int]*keyVersion{}
		for n := c*versionChunk + 1; n <= (c+1)*versionChunk && n <= p.LatestVersion; n++ {
			part[n] = p.Versions[n]
		}
		e, err := logical.StorageEntryJSON(versionsKey(p.Name, c), part)
		if err != nil {
			return err
		}
		if err := s.Put(ctx, e); err != nil {
			return fmt.Errorf("store key %q versions: %w", p.Name, err)
		}
	}
	e, err := logical.StorageEntryJSON(policyPrefix+p.Name, p)
	if err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		return fmt.Errorf("store key %q: %w", p.Name, err)
	}
	b.keys.Store(p.Name, p)
	b.sched.update(p)
	return nil
}

// deletePolicyStorage removes a key's metadata (its history stays, as evidence).
func deletePolicyStorage(ctx context.Context, s logical.Storage, p *keyPolicy) error {
	for c := 0; p.LatestVersion > 0 && c <= chunkOf(p.LatestVersion); c++ {
		if err := s.Delete(ctx, versionsKey(p.Name, c)); err != nil {
			return err
		}
	}
	if err := s.Delete(ctx, usagePrefix+p.Name); err != nil {
		return err
	}
	return s.Delete(ctx, policyPrefix+p.Name)
}
