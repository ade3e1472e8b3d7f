package keys

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	usagePrefix = "usage/" // usage/<name>: reserved encryption counts per version
	// maxReservationBlock bounds how many encryptions one storage write reserves.
	maxReservationBlock = 1 << 20
)

// ErrVersionExhausted: the version has made every encryption it may; the next one needs a new version.
var ErrVersionExhausted = errors.New("key version has reached its encryption limit")

// usageTracker counts AES-GCM encryptions per key version without a storage write per request: counts are
// reserved in blocks, and only the reservation is persisted. After a crash a version resumes at its reserved
// count, so it may over-count by up to a block but never under-counts: the nonce limit always holds.
//
// Each reservation is first witnessed on the token (hsm's usage witness), then stored. Storage restored from an
// older snapshot forgets reservations made since; the token does not, and a version resumes at the higher of the
// two, so a restore never gives a version back encryptions it has made.
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

// counter is version v's counter, loaded once: the higher of the stored reservation and the token's witness.
func (u *usageTracker) counter(ctx context.Context, s logical.Storage, tok func() (HSM, error), name string, v int, ver *Version) (*versionUsage, error) {
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
	t, err := tok()
	if err != nil {
		return nil, err
	}
	witnessed, _, err := t.UsageWitness(ctx, ver.ID())
	if err != nil {
		return nil, fmt.Errorf("read the usage witness of key %q version %d: %w", name, v, err)
	}
	c := &versionUsage{}
	c.used.Store(max(res[v], witnessed))
	c.reserved.Store(max(res[v], witnessed))
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

// reserve persists a reservation that covers encryption number n: witnessed on the token first, then stored, so
// that neither a crash nor a restore of storage ever leaves a count below what was used.
func (u *usageTracker) reserve(ctx context.Context, s logical.Storage, tok func() (HSM, error), name string, v int, ver *Version, c *versionUsage, n, limit uint64) error {
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
	t, err := tok()
	if err != nil {
		return err
	}
	if err := t.RaiseUsageWitness(ctx, ver.ID(), ver.Label, next); err != nil {
		return fmt.Errorf("witness the usage of key %q version %d on the token: %w", name, v, err)
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
