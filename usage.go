package cmk

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	usagePrefix = "usage/" // usage/<name>: reserved encryption counts per version
	// gcmEncryptionLimit is NIST SP 800-38D's bound for AES-GCM with random 96-bit nonces: at most 2^32
	// encryptions under one key.
	gcmEncryptionLimit = uint64(1) << 32
	// maxReservationBlock bounds how many encryptions one storage write reserves.
	maxReservationBlock = 1 << 20
)

var errVersionExhausted = errors.New("key version has reached its encryption limit")

// encryptionLimit is how many encryptions one version of p may make.
func (p *keyPolicy) encryptionLimit() uint64 {
	if p.MaxEncryptions > 0 && p.MaxEncryptions < gcmEncryptionLimit {
		return p.MaxEncryptions
	}
	return gcmEncryptionLimit
}

// usageTracker counts AES-GCM encryptions per key version without a storage write per request: counts are
// reserved in blocks, and only the reservation is persisted. After a crash a version resumes at its reserved
// count, so it may over-count by up to a block but never under-counts: the nonce limit always holds.
type usageTracker struct {
	versions sync.Map // name + "\x00" + version → *versionUsage

	mu       sync.Mutex                // guards loads and reservation writes (rare: one per block)
	reserved map[string]map[int]uint64 // name → persisted reservations
}

type versionUsage struct {
	used     atomic.Uint64
	reserved atomic.Uint64
}

type usageEntry struct {
	Reserved map[int]uint64 `json:"reserved"`
}

func usageKey(name string, v int) string { return name + "\x00" + strconv.Itoa(v) }

func (u *usageTracker) counter(ctx context.Context, s logical.Storage, name string, v int) (*versionUsage, error) {
	if c, ok := u.versions.Load(usageKey(name, v)); ok {
		return c.(*versionUsage), nil
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if c, ok := u.versions.Load(usageKey(name, v)); ok {
		return c.(*versionUsage), nil
	}
	res, err := u.loadLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	c := &versionUsage{}
	c.used.Store(res[v])
	c.reserved.Store(res[v])
	u.versions.Store(usageKey(name, v), c)
	return c, nil
}

func (u *usageTracker) loadLocked(ctx context.Context, s logical.Storage, name string) (map[int]uint64, error) {
	if res, ok := u.reserved[name]; ok {
		return res, nil
	}
	e, err := s.Get(ctx, usagePrefix+name)
	if err != nil {
		return nil, err
	}
	var entry usageEntry
	if e != nil {
		if err := e.DecodeJSON(&entry); err != nil {
			return nil, err
		}
	}
	if entry.Reserved == nil {
		entry.Reserved = map[int]uint64{}
	}
	if u.reserved == nil {
		u.reserved = map[string]map[int]uint64{}
	}
	u.reserved[name] = entry.Reserved
	return entry.Reserved, nil
}

// reserve persists a reservation that covers encryption number n.
func (u *usageTracker) reserve(ctx context.Context, s logical.Storage, name string, v int, c *versionUsage, n, limit uint64) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if n <= c.reserved.Load() {
		return nil
	}
	block := min(max(limit/100, 1), maxReservationBlock)
	next := min(n-1+block, limit)
	res, err := u.loadLocked(ctx, s, name)
	if err != nil {
		return err
	}
	updated := make(map[int]uint64, len(res)+1)
	for k, val := range res {
		updated[k] = val
	}
	updated[v] = next
	e, err := logical.StorageEntryJSON(usagePrefix+name, usageEntry{Reserved: updated})
	if err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		return err
	}
	u.reserved[name] = updated
	c.reserved.Store(next)
	return nil
}

// count returns the encryptions counted for a version, for reads (no storage access when unknown).
func (u *usageTracker) count(name string, v int) (uint64, bool) {
	if c, ok := u.versions.Load(usageKey(name, v)); ok {
		return c.(*versionUsage).used.Load(), true
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	n, ok := u.reserved[name][v]
	return n, ok
}

func (u *usageTracker) forgetVersion(name string, v int) { u.versions.Delete(usageKey(name, v)) }

// forget drops a key's counters (deleted, or changed by another node).
func (u *usageTracker) forget(name string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.reserved, name)
	u.versions.Range(func(k, _ any) bool {
		if s := k.(string); len(s) > len(name) && s[:len(name)+1] == name+"\x00" {
			u.versions.Delete(k)
		}
		return true
	})
}

// countEncryption counts one encryption with version v of p. It reports whether this was the version's last
// allowed encryption, and fails with errVersionExhausted once the limit is passed.
func (b *backend) countEncryption(ctx context.Context, s logical.Storage, p *keyPolicy, v int) (last bool, err error) {
	if !p.Type.isAES() {
		return false, nil // the GCM nonce limit is what is counted
	}
	c, err := b.usage.counter(ctx, s, p.Name, v)
	if err != nil {
		return false, err
	}
	limit := p.encryptionLimit()
	n := c.used.Add(1)
	if n > limit {
		c.used.Add(^uint64(0))
		return false, errVersionExhausted
	}
	if n > c.reserved.Load() {
		if err := b.usage.reserve(ctx, s, p.Name, v, c, n, limit); err != nil {
			c.used.Add(^uint64(0))
			return false, err
		}
	}
	return n == limit, nil
}

// rotateForUsage rotates key name if version v is still its latest: called when v has used its last allowed
// encryption, so that the next one uses a fresh key. who is the requester whose encryption used it up.
func (b *backend) rotateForUsage(ctx context.Context, s logical.Storage, name string, v int, who actor) (*keyPolicy, error) {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	cur, err := b.policyLocked(ctx, s, name)
	if err != nil || cur == nil || cur.LatestVersion != v {
		return cur, err
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return nil, err
	}
	return b.rotateLocked(ctx, s, tok, cur, who, "usage")
}
