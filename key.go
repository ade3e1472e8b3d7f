package cmk

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
)

const (
	policyPrefix = "policy/"
	// walKindVersion brackets the creation of a version's HSM objects until its metadata is stored.
	walKindVersion = "hsm_key_version"
	// walRollbackMinAge is long enough for any key generation to finish; the rollback also takes the key's
	// lock, so it can never race a creation still in progress.
	walRollbackMinAge = 2 * time.Minute
)

// keyType is a kind of key, named as in Transit.
type keyType string

const (
	typeAES256GCM96 keyType = "aes256-gcm96"
	typeAES128GCM96 keyType = "aes128-gcm96"
)

func (t keyType) aesBits() int {
	switch t {
	case typeAES128GCM96:
		return 128
	case typeAES256GCM96:
		return 256
	}
	return 0
}

func parseKeyType(s string) (keyType, error) {
	switch keyType(s) {
	case typeAES256GCM96, typeAES128GCM96:
		return keyType(s), nil
	case "":
		return typeAES256GCM96, nil
	}
	return "", fmt.Errorf("unsupported key type %q: this engine creates aes256-gcm96 (default) and aes128-gcm96 keys", s)
}

// keyPolicy is a key's metadata as stored in Vault: settings and versions, never material. A *keyPolicy in the
// cache is never modified: changes are made on a clone, persisted, then published (copy on write), so encrypt
// and decrypt read it without locks and never wait for a rotation.
type keyPolicy struct {
	Name                 string              `json:"name"`
	Type                 keyType             `json:"type"`
	LatestVersion        int                 `json:"latest_version"`
	MinDecryptionVersion int                 `json:"min_decryption_version"`
	MinEncryptionVersion int                 `json:"min_encryption_version"`
	DeletionAllowed      bool                `json:"deletion_allowed"`
	Versions             map[int]*keyVersion `json:"versions"`
	CreatedAt            time.Time           `json:"created_at"`
	// Deleting is set before a deletion destroys HSM objects, so that an interrupted deletion is finished by
	// the next attempt and the key serves nothing meanwhile.
	Deleting bool `json:"deleting,omitempty"`
}

// keyVersion is one version's metadata. Its material is on the token, found by HSMID.
type keyVersion struct {
	HSMID     string    `json:"hsm_id"` // hex CKA_ID shared by the version's AES and HMAC objects
	Label     string    `json:"label"`  // CKA_LABEL, for people reading the token
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by,omitempty"`
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

// versionState is derived from the key's settings (DESIGN.md's lifecycle states).
func (p *keyPolicy) versionState(v int) string {
	switch {
	case v < p.MinDecryptionVersion:
		return "disabled"
	case v < p.MinEncryptionVersion:
		return "decrypt_only"
	}
	return "active"
}

// encryptionVersion resolves a requested key_version (0 = latest) for encryption.
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
	case v < p.MinDecryptionVersion:
		return 0, nil, fmt.Errorf("key version %d is below min_decryption_version %d", v, p.MinDecryptionVersion)
	}
	return v, p.Versions[v], nil
}

// decryptionVersion checks that version v may decrypt.
func (p *keyPolicy) decryptionVersion(v int) (*keyVersion, error) {
	switch {
	case v < 1 || v > p.LatestVersion:
		return nil, fmt.Errorf("invalid ciphertext: key version %d does not exist (latest is %d)", v, p.LatestVersion)
	case v < p.MinDecryptionVersion:
		return nil, fmt.Errorf("ciphertext version %d is disallowed by policy: below min_decryption_version %d", v, p.MinDecryptionVersion)
	}
	return p.Versions[v], nil
}

// usable reports why a key serves no operation, if it does not.
func (p *keyPolicy) usable() error {
	if p.Deleting {
		return fmt.Errorf("key %q is being deleted", p.Name)
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
	return &p, nil
}

// storePolicy persists p and publishes it to the cache. Called with the key's lock held.
func (b *backend) storePolicy(ctx context.Context, s logical.Storage, p *keyPolicy) error {
	e, err := logical.StorageEntryJSON(policyPrefix+p.Name, p)
	if err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		return fmt.Errorf("store key %q: %w", p.Name, err)
	}
	b.keys.Store(p.Name, p)
	return nil
}

type walVersion struct {
	Name    string `json:"name"`
	Version int    `json:"version"`
	HSMID   string `json:"hsm_id"`
}

// addVersion creates the next version's objects in the HSM and persists p (a clone, with the key's lock held)
// with it. The WAL entry written first lets the rollback destroy objects whose metadata never reached storage;
// on a failure here they are destroyed at once when the HSM allows.
func (b *backend) addVersion(ctx context.Context, s logical.Storage, tok hsmToken, p *keyPolicy, by string) error {
	rawID := make([]byte, 16) // an identifier, not a secret: the standard library's RNG is fine here
	if _, err := rand.Read(rawID); err != nil {
		return err
	}
	v := p.LatestVersion + 1
	ver := &keyVersion{
		HSMID:     hex.EncodeToString(rawID),
		Label:     fmt.Sprintf("cmk/%s/%s/v%d", b.mountID, p.Name, v),
		CreatedAt: time.Now().UTC(),
		CreatedBy: by,
	}
	walID, err := b.walPut(ctx, s, p.Name, v, rawID)
	if err != nil {
		return fmt.Errorf("write WAL: %w", err)
	}
	undo := func(cause error) error {
		if _, derr := tok.DestroyKeys(ctx, rawID); derr != nil {
			b.logger.Warn("could not destroy uncommitted key version; WAL rollback will retry", "key", p.Name, "version", v, "error", derr)
			return cause
		}
		if werr := framework.DeleteWAL(ctx, s, walID); werr != nil {
			b.logger.Warn("could not delete WAL entry", "error", werr)
		}
		return cause
	}
	if err := tok.GenerateVersionKeys(ctx, rawID, ver.Label, p.Type.aesBits()); err != nil {
		return undo(fmt.Errorf("create key %q version %d in the HSM: %w", p.Name, v, err))
	}
	p.Versions = maps.Clone(p.Versions)
	if p.Versions == nil {
		p.Versions = map[int]*keyVersion{}
	}
	p.Versions[v] = ver
	p.LatestVersion = v
	if p.MinDecryptionVersion == 0 {
		p.MinDecryptionVersion = 1
	}
	if err := b.storePolicy(ctx, s, p); err != nil {
		return undo(err)
	}
	if err := framework.DeleteWAL(ctx, s, walID); err != nil {
		// Harmless: the rollback finds the version referenced and destroys nothing.
		b.logger.Warn("could not delete WAL entry", "error", err)
	}
	b.logger.Info("key version created in the HSM", "key", p.Name, "version", v, "label", ver.Label, "by", by)
	return nil
}

// walPut records that version v of key name is about to get HSM objects with CKA_ID id.
func (b *backend) walPut(ctx context.Context, s logical.Storage, name string, v int, id []byte) (string, error) {
	return framework.PutWAL(ctx, s, walKindVersion, &walVersion{Name: name, Version: v, HSMID: hex.EncodeToString(id)})
}

// walRollback destroys the HSM objects of a version whose metadata never reached storage. Nothing that storage
// references is ever destroyed here.
func (b *backend) walRollback(ctx context.Context, req *logical.Request, kind string, data interface{}) error {
	if kind != walKindVersion {
		return fmt.Errorf("unknown WAL entry kind %q", kind)
	}
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	var w walVersion
	if err := json.Unmarshal(raw, &w); err != nil {
		return err
	}
	id, err := hex.DecodeString(w.HSMID)
	if err != nil || len(id) == 0 {
		return nil // nothing that could be on the token
	}
	lock := b.lockKey(w.Name)
	lock.Lock()
	defer lock.Unlock()
	p, err := loadPolicy(ctx, req.Storage, w.Name)
	if err != nil {
		return err
	}
	if p != nil {
		for _, v := range p.Versions {
			if v.HSMID == w.HSMID {
				return nil // committed
			}
		}
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return err // keep the entry; the next rollback pass tries again
	}
	n, err := tok.DestroyKeys(ctx, id)
	if err != nil {
		return err
	}
	b.logger.Info("WAL rollback destroyed uncommitted HSM objects", "key", w.Name, "version", w.Version, "objects", n)
	return nil
}

// createKey creates key name with its first version unless it exists. It reports whether it created it.
func (b *backend) createKey(ctx context.Context, s logical.Storage, name string, typ keyType, by string) (*keyPolicy, bool, error) {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	p, err := b.policyLocked(ctx, s, name)
	if err != nil || p != nil {
		return p, false, err
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return nil, false, err
	}
	p = &keyPolicy{Name: name, Type: typ, CreatedAt: time.Now().UTC()}
	if err := b.addVersion(ctx, s, tok, p, by); err != nil {
		return nil, false, err
	}
	return p, true, nil
}

// deleteKey destroys every version's HSM objects, then the key's metadata. It is marked as deleting first, so
// a deletion cut short by a crash or an HSM fault is completed by the next DELETE and serves nothing meanwhile.
func (b *backend) deleteKey(ctx context.Context, s logical.Storage, name string) error {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	p, err := b.policyLocked(ctx, s, name)
	if err != nil || p == nil {
		return err
	}
	if !p.DeletionAllowed {
		return errDeletionNotAllowed
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return err
	}
	if !p.Deleting {
		p = p.clone()
		p.Deleting = true
		if err := b.storePolicy(ctx, s, p); err != nil {
			return err
		}
	}
	for v, ver := range p.Versions {
		if _, err := tok.DestroyKeys(ctx, ver.id()); err != nil {
			return fmt.Errorf("destroy key %q version %d: %w", name, v, err)
		}
	}
	if err := s.Delete(ctx, policyPrefix+name); err != nil {
		return err
	}
	b.keys.Delete(name)
	b.logger.Info("key deleted and its HSM objects destroyed", "key", name, "versions", len(p.Versions))
	return nil
}

var errDeletionNotAllowed = errors.New("deletion is not allowed for this key: set deletion_allowed=true on keys/<name>/config first")

// requester names who made a request, for the key's records: the entity when there is one, else the token's
// accessor; never the token itself.
func requester(req *logical.Request) string {
	if req == nil {
		return ""
	}
	switch {
	case req.EntityID != "" && req.DisplayName != "":
		return req.DisplayName + " (entity " + req.EntityID + ")"
	case req.EntityID != "":
		return "entity " + req.EntityID
	case req.ClientTokenAccessor != "":
		return req.DisplayName + " (token accessor " + req.ClientTokenAccessor + ")"
	}
	return req.DisplayName
}
