package cmk

import (
	"context"
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

type walVersion struct {
	Name    string `json:"name"`
	Version int    `json:"version"`
	HSMID   string `json:"hsm_id"`
}

// materialFunc puts a version's material on the token under CKA_ID id and returns its public key (asymmetric
// types) and, for imports, how the material got there.
type materialFunc func(id []byte, label string) (pub crypto.PublicKey, importMethod string, err error)

// generated is the materialFunc of a key version generated in the HSM.
func generated(ctx context.Context, tok hsmToken, p *keyPolicy) materialFunc {
	return func(id []byte, label string) (crypto.PublicKey, string, error) {
		hmacBytes := 0 // made on the version's first HMAC: most keys are never used for one (ensureHMACSecret)
		if p.Type == typeHMAC {
			hmacBytes = p.hmacKeySize()
		}
		pub, err := tok.GenerateVersion(ctx, p.Type.info().alg, id, label, hmacBytes)
		return pub, "", err
	}
}

// ensureHMACSecret gives version v of key name the HMAC secret it was created without, and records that it has
// one. The token is searched first, so a secret made by an attempt that failed before the record was stored is
// adopted rather than made twice; it shares the version's CKA_ID, so it is destroyed with the version whatever
// storage says. Once recorded, a missing secret is reported as missing, never silently replaced.
func (b *backend) ensureHMACSecret(ctx context.Context, s logical.Storage, tok hsmToken, name string, v int) error {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	cur, err := b.policyLocked(ctx, s, name)
	if err != nil {
		return err
	}
	if cur == nil || cur.Versions[v] == nil || !cur.Versions[v].HMACDeferred {
		return nil // made meanwhile by another request (or the key is gone: the HMAC call says so)
	}
	ver := cur.Versions[v]
	if err := tok.EnsureHMACKey(ctx, ver.id(), ver.Label, cur.hmacKeySize()); err != nil {
		return fmt.Errorf("HMAC secret of key %q version %d: %w", name, v, err)
	}
	p := cur.clone()
	p.withVersion(v, func(x *keyVersion) { x.HMACDeferred = false })
	if err := b.storePolicy(ctx, s, p, v); err != nil {
		return err
	}
	b.logger.Info("HMAC secret created in the HSM on first use", "key", name, "version", v)
	return nil
}

// addVersion puts the next version's material on the token and persists p (a clone, with the key's lock held)
// with it. The WAL entry written first lets the rollback destroy objects whose metadata never reached storage;
// on a failure here they are destroyed at once when the HSM allows.
func (b *backend) addVersion(ctx context.Context, s logical.Storage, tok hsmToken, p *keyPolicy, who actor, material materialFunc) error {
	by := who.String()
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
	walID, err := b.walPut(ctx, s, walKindVersion, p.Name, v, rawID)
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
	pub, method, err := material(rawID, ver.Label)
	if err != nil {
		return undo(fmt.Errorf("key %q version %d in the HSM: %w", p.Name, v, err))
	}
	ver.ImportMethod = method
	ver.HMACDeferred = method == "" && p.Type != typeHMAC // see generated
	if pub != nil {
		if ver.PublicKey, err = formatPublicKey(pub); err != nil {
			return undo(err)
		}
		ver.pub = pub
	}
	p.Versions = maps.Clone(p.Versions)
	if p.Versions == nil {
		p.Versions = map[int]*keyVersion{}
	}
	p.Versions[v] = ver
	p.LatestVersion = v
	p.LastRequestID = who.RequestID
	if p.MinDecryptionVersion == 0 {
		p.MinDecryptionVersion = 1
	}
	if err := b.storePolicy(ctx, s, p, v); err != nil {
		return undo(err)
	}
	if err := framework.DeleteWAL(ctx, s, walID); err != nil {
		// Harmless: the rollback finds the version referenced and destroys nothing.
		b.logger.Warn("could not delete WAL entry", "error", err)
	}
	event := "key version created in the HSM"
	if method != "" {
		event = "key version imported into the HSM"
	}
	b.logger.Info(event, "key", p.Name, "version", v, "label", ver.Label, "by", by, "import_method", method)
	return nil
}

// walPut records that HSM objects with CKA_ID id are about to be made: version v of key name, or the mount's
// wrapping key.
func (b *backend) walPut(ctx context.Context, s logical.Storage, kind, name string, v int, id []byte) (string, error) {
	return framework.PutWAL(ctx, s, kind, &walVersion{Name: name, Version: v, HSMID: hex.EncodeToString(id)})
}

// walRollback destroys the HSM objects of a version whose metadata never reached storage. Nothing that storage
// references is ever destroyed here.
func (b *backend) walRollback(ctx context.Context, req *logical.Request, kind string, data interface{}) error {
	if kind != walKindVersion && kind != walKindWrappingKey {
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
	committed, unlock, err := b.walCommitted(ctx, req.Storage, kind, w)
	defer unlock()
	if err != nil || committed {
		return err
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

// walCommitted reports whether storage references the objects of a WAL entry. It holds the lock that guards
// their creation until unlock is called, so the rollback never races a creation still in progress.
func (b *backend) walCommitted(ctx context.Context, s logical.Storage, kind string, w walVersion) (bool, func(), error) {
	if kind == walKindWrappingKey {
		b.wrappingMu.Lock()
		wk, err := readWrappingKey(ctx, s)
		return err == nil && wk != nil && wk.HSMID == w.HSMID, b.wrappingMu.Unlock, err
	}
	lock := b.lockKey(w.Name)
	lock.Lock()
	p, err := loadPolicy(ctx, s, w.Name)
	if err != nil || p == nil {
		return false, lock.Unlock, err
	}
	for _, v := range p.Versions {
		if v.HSMID == w.HSMID {
			return true, lock.Unlock, nil
		}
	}
	return false, lock.Unlock, nil
}

// createKey creates key name with its first version unless it exists. It reports whether it created it.
func (b *backend) createKey(ctx context.Context, s logical.Storage, p *keyPolicy, who actor) (*keyPolicy, bool, error) {
	lock := b.lockKey(p.Name)
	lock.Lock()
	defer lock.Unlock()
	cur, err := b.policyLocked(ctx, s, p.Name)
	if err != nil || cur != nil {
		return cur, false, err
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return nil, false, err
	}
	p.CreatedAt = time.Now().UTC()
	if p.AutoRotatePeriod > 0 {
		p.NextRotation = p.CreatedAt.Add(p.AutoRotatePeriod)
	}
	if err := b.addVersion(ctx, s, tok, p, who, generated(ctx, tok, p)); err != nil {
		return nil, false, err
	}
	b.record(ctx, s, p.Name, who.event("created", 1, "", fmt.Sprintf("type %s", p.Type)))
	return p, true, nil
}

// rotateLocked adds a generated version to cur (with the key's lock held) and moves the schedule on. cause is
// manual, scheduled or usage.
func (b *backend) rotateLocked(ctx context.Context, s logical.Storage, tok hsmToken, cur *keyPolicy, who actor, cause string) (*keyPolicy, error) {
	if who.RequestID != "" && cur.LastRequestID == who.RequestID {
		return cur, nil // Vault's retry of a rotation that completed before the plugin died
	}
	if cur.Imported && !cur.AllowRotation {
		return nil, fmt.Errorf("%w: imported key %q does not allow rotation: it was imported without allow_rotation; use import_version to add a version", errCallerMistake, cur.Name)
	}
	p := cur.clone()
	now := time.Now().UTC()
	p.LastRotated = now
	p.NextRotation = time.Time{}
	if p.AutoRotatePeriod > 0 {
		p.NextRotation = now.Add(p.AutoRotatePeriod)
	}
	if err := b.addVersion(ctx, s, tok, p, who, generated(ctx, tok, p)); err != nil {
		return nil, err
	}
	b.record(ctx, s, p.Name, who.event("rotated", p.LatestVersion, cause, ""))
	return p, nil
}

// errCallerMistake marks errors that are the caller's to fix (HTTP 400).
var errCallerMistake = errors.New("invalid request")

// destroyVersionLocked destroys version n's objects on the token and keeps its metadata as a tombstone.
func (b *backend) destroyVersionLocked(ctx context.Context, s logical.Storage, tok hsmToken, cur *keyPolicy, n int, who actor, cause string) (*keyPolicy, error) {
	if _, err := tok.DestroyKeys(ctx, cur.Versions[n].id()); err != nil {
		return nil, fmt.Errorf("destroy key %q version %d: %w", cur.Name, n, err)
	}
	p := cur.clone()
	p.withVersion(n, func(v *keyVersion) {
		v.State, v.DestroyAt, v.DestroyedAt = stateDestroyed, time.Time{}, time.Now().UTC()
	})
	if err := b.storePolicy(ctx, s, p, n); err != nil {
		return nil, err
	}
	b.usage.forgetVersion(p.Name, n)
	b.logger.Info("key version destroyed in the HSM", "key", p.Name, "version", n, "cause", cause)
	b.record(ctx, s, p.Name, who.event("version_destroyed", n, cause, ""))
	return p, nil
}

// destroyKeyLocked destroys every version's HSM objects, then the key's metadata (its history stays). The key is
// marked as deleting first, so a deletion cut short by a crash or an HSM fault is completed by the next attempt
// and the key serves nothing meanwhile.
func (b *backend) destroyKeyLocked(ctx context.Context, s logical.Storage, tok hsmToken, p *keyPolicy, who actor, cause string) error {
	if !p.Deleting {
		p = p.clone()
		p.Deleting = true
		if err := b.storePolicy(ctx, s, p); err != nil {
			return err
		}
	}
	for n, v := range p.Versions {
		if v.State == stateDestroyed {
			continue
		}
		if _, err := tok.DestroyKeys(ctx, v.id()); err != nil {
			return fmt.Errorf("destroy key %q version %d: %w", p.Name, n, err)
		}
	}
	if err := deletePolicyStorage(ctx, s, p); err != nil {
		return err
	}
	b.keys.Delete(p.Name)
	b.sched.remove(p.Name)
	b.usage.forget(p.Name)
	b.logger.Info("key deleted and its HSM objects destroyed", "key", p.Name, "versions", len(p.Versions), "cause", cause)
	b.record(ctx, s, p.Name, who.event("deleted", 0, cause, fmt.Sprintf("%d versions destroyed", len(p.Versions))))
	return nil
}

var errDeletionNotAllowed = errors.New("deletion is not allowed for this key: set deletion_allowed=true on keys/<name>/config first")

// deleteKey deletes key name after the mount's deletion_grace_period: at once when it is 0 (as Transit), else
// the key is marked for deletion, serves nothing, and can be restored until then. It returns when destruction
// is scheduled (zero when done at once, or when there was no key).
func (b *backend) deleteKey(ctx context.Context, s logical.Storage, name string, who actor) (time.Time, error) {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	p, err := b.policyLocked(ctx, s, name)
	if err != nil || p == nil {
		return time.Time{}, err
	}
	if !p.DeletionAllowed {
		return time.Time{}, errDeletionNotAllowed
	}
	cfg, err := b.readKeysConfig(ctx, s)
	if err != nil {
		return time.Time{}, err
	}
	if cfg.DeletionGracePeriod == 0 || p.Deleting {
		tok, _, err := b.getToken(ctx, s)
		if err != nil {
			return time.Time{}, err
		}
		return time.Time{}, b.destroyKeyLocked(ctx, s, tok, p, who, "deleted without grace period")
	}
	if !p.DeleteAt.IsZero() {
		return p.DeleteAt, nil // already scheduled: a repeated DELETE changes nothing
	}
	p = p.clone()
	p.DeleteAt = time.Now().UTC().Add(cfg.DeletionGracePeriod)
	if err := b.storePolicy(ctx, s, p); err != nil {
		return time.Time{}, err
	}
	b.logger.Info("key deletion scheduled", "key", name, "at", p.DeleteAt, "by", who.String())
	b.record(ctx, s, name, who.event("deletion_scheduled", 0, "", "destruction at "+p.DeleteAt.Format(time.RFC3339)))
	return p.DeleteAt, nil
}

// actor is who caused a lifecycle event, from the request: the entity and display name, and the token's
// accessor (never the token itself).
type actor struct {
	EntityID    string
	DisplayName string
	Accessor    string
	RequestID   string // the Vault request, to recognise its retry
}

// schedulerActor is the cause of what the periodic function does on its own.
var schedulerActor = actor{DisplayName: "cmk scheduler"}

func actorOf(req *logical.Request) actor {
	if req == nil {
		return actor{}
	}
	return actor{EntityID: req.EntityID, DisplayName: req.DisplayName, Accessor: req.ClientTokenAccessor, RequestID: req.ID}
}

func (a actor) String() string {
	switch {
	case a.EntityID != "" && a.DisplayName != "":
		return a.DisplayName + " (entity " + a.EntityID + ")"
	case a.EntityID != "":
		return "entity " + a.EntityID
	case a.Accessor != "":
		return a.DisplayName + " (token accessor " + a.Accessor + ")"
	}
	return a.DisplayName
}
