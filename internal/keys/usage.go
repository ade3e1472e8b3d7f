package keys

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	usagePrefix = "usage/" // usage/<name>: reserved encryption counts per version
	// maxReservationBlock bounds how many encryptions one reservation covers; minReservationBlock keeps a small
	// limit from costing a token write and a storage write per encryption.
	maxReservationBlock = 1 << 20
	minReservationBlock = 16
)

// ErrVersionExhausted: the version has made every encryption it may; the next one needs a new version.
var ErrVersionExhausted = errors.New("key version has reached its encryption limit")

// countEncryption counts one encryption with version v of k (Use.Encrypt). It reports whether this was the version's
// last allowed encryption, and fails with ErrVersionExhausted once the limit is passed.
func (m *Manager) countEncryption(ctx context.Context, s logical.Storage, k *Key, v int) (last bool, err error) {
	ver := k.Versions[v]
	if ver == nil {
		return false, Callerf("key %q has no version %d", k.Name, v)
	}
	if !ver.Type.IsAES() {
		return false, nil // the GCM nonce limit is what is counted
	}
	if ver.EncryptionsUnknown {
		return false, fmt.Errorf("%w: version %d was adopted after a storage restore and how many encryptions it made is unknown", ErrVersionExhausted, v)
	}
	tok := func() (HSM, error) { return m.connect(ctx, s) } // only when the count is loaded or a block reserved
	c, err := m.usage.counter(ctx, s, tok, k.Name, v, ver)
	if err != nil {
		return false, err
	}
	limit := k.EncryptionLimit()
	n := c.used.Add(1)
	if n > limit {
		c.used.Add(^uint64(0))
		return false, ErrVersionExhausted
	}
	if n > c.reserved.Load() {
		if err := m.usage.reserve(ctx, s, tok, k.Name, v, ver, c, n, limit); err != nil {
			if !errors.Is(err, ErrVersionExhausted) { // an exhausted count stays at the limit
				c.used.Add(^uint64(0))
			}
			return false, err
		}
	}
	return n == limit, nil
}

// EncryptionCount returns the encryptions counted for a version, for reads (no storage access when unknown).
func (m *Manager) EncryptionCount(name string, v int) (uint64, bool) { return m.usage.count(name, v) }

// rotateForUsage rotates key name if version v is still its latest: called when v has used its last allowed
// encryption, so that the next one uses a fresh key. who is the requester whose encryption used it up. However
// often it is called for v (items of one batch, Vault's retry of the request), it adds one version.
func (m *Manager) rotateForUsage(ctx context.Context, s logical.Storage, name string, v int, who Actor) (*Key, error) {
	return m.Update(ctx, s, name, who, func(tx *Tx) error {
		if tx.Key.LatestVersion != v {
			return nil
		}
		return tx.Rotate("usage", VersionType{})
	})
}

// ForgetUsage drops a key's usage counters (after invalidation by another node).
func (m *Manager) ForgetUsage(name string) { m.usage.forget(name) }

// usageTracker counts AES-GCM encryptions per key version without a storage write per request: counts are
// reserved in blocks, and only the reservation is persisted. After a crash a version resumes at its reserved
// count, so it may over-count by up to a block but never under-counts: the nonce limit always holds.
//
// Each reservation is first witnessed on the token (hsm's usage witness), then stored. Storage restored from an
// older snapshot forgets reservations made since; the token does not, and a version resumes at the higher of the
// two, so a restore never gives a version back encryptions it has made.
//
// Locks: a version's own mutex covers its load and its reservations, HSM calls included, so that a slow token
// holds up only that version's next block; the tracker's mutex covers the per-key storage entry, and is never
// held across an HSM call.
type usageTracker struct {
	versions perKey[*versionUsage] // by usageKey

	mu       sync.Mutex              // guards reserved and the usage/<name> entries' read-modify-write
	reserved map[string]reservations // name → persisted reservations
}

// reservations are a key's persisted reservations, by version: a slice, as most keys have a version or two in
// use, where a map of one entry costs some 200 bytes (with ten thousand keys, 2 MB).
type reservations []reservation

type reservation struct {
	version int
	n       uint64
}

// of is version v's reservation (0 when none).
func (r reservations) of(v int) (uint64, bool) {
	for _, x := range r {
		if x.version == v {
			return x.n, true
		}
	}
	return 0, false
}

// raised is r with version v's reservation raised to n, in a new slice: r may be in use.
func (r reservations) raised(v int, n uint64) reservations {
	next := make(reservations, 0, len(r)+1)
	found := false
	for _, x := range r {
		if x.version == v {
			x.n, found = max(x.n, n), true
		}
		next = append(next, x)
	}
	if !found {
		next = append(next, reservation{v, n})
	}
	return next
}

func (r reservations) entry() usageEntry {
	e := usageEntry{Reserved: make(map[int]uint64, len(r))}
	for _, x := range r {
		e.Reserved[x.version] = x.n
	}
	return e
}

type versionUsage struct {
	mu       sync.Mutex // its load and reservations
	loaded   atomic.Bool
	used     atomic.Uint64
	reserved atomic.Uint64
}

type usageEntry struct {
	Reserved map[int]uint64 `json:"reserved"`
}

func usageKey(name string, v int) string { return name + "\x00" + strconv.Itoa(v) }

// counter is version v's counter, loaded once: the higher of the stored reservation and the token's witness.
func (u *usageTracker) counter(ctx context.Context, s logical.Storage, tok func() (HSM, error), name string, v int, ver *Version) (*versionUsage, error) {
	c, _ := u.versions.LoadOrStore(usageKey(name, v), &versionUsage{})
	if c.loaded.Load() {
		return c, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loaded.Load() {
		return c, nil
	}
	stored, err := u.stored(ctx, s, name, v)
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
	c.used.Store(max(stored, witnessed))
	c.reserved.Store(max(stored, witnessed))
	c.loaded.Store(true)
	return c, nil
}

// stored is version v's persisted reservation.
func (u *usageTracker) stored(ctx context.Context, s logical.Storage, name string, v int) (uint64, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	res, err := u.loadLocked(ctx, s, name)
	if err != nil {
		return 0, err
	}
	n, _ := res.of(v)
	return n, nil
}

func (u *usageTracker) loadLocked(ctx context.Context, s logical.Storage, name string) (reservations, error) {
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
	res := make(reservations, 0, len(entry.Reserved))
	for v, n := range entry.Reserved {
		res = append(res, reservation{v, n})
	}
	if u.reserved == nil {
		u.reserved = map[string]reservations{}
	}
	u.reserved[name] = res
	return res, nil
}

// reserve persists a reservation that covers encryption number n: witnessed on the token first, then stored, so
// that neither a crash nor a restore of storage ever leaves a count below what was used. A token that witnessed
// this block already (another process raised the witness since this one read it: a second active node) means the
// count is behind what may have been used: the version encrypts no more. Whether the token holds a witness at all
// is answered from its object index (hsm.objectIndex), which sees another process's witness from this process's
// next opening of the token on.
func (u *usageTracker) reserve(ctx context.Context, s logical.Storage, tok func() (HSM, error), name string, v int, ver *Version, c *versionUsage, n, limit uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n <= c.reserved.Load() {
		return nil
	}
	block := min(max(limit/100, minReservationBlock), maxReservationBlock)
	next := min(n-1+block, limit)
	t, err := tok()
	if err != nil {
		return err
	}
	before, err := t.RaiseUsageWitness(ctx, ver.ID(), ver.Label, next)
	if err != nil {
		return fmt.Errorf("witness the usage of key %q version %d on the token: %w", name, v, err)
	}
	if before >= n {
		c.reserved.Store(limit)
		c.used.Store(limit)
		return fmt.Errorf("%w: the token witnessed %d encryptions of version %d, more than this process counted (%d): it encrypts no more",
			ErrVersionExhausted, before, v, n-1)
	}
	if err := u.store(ctx, s, name, v, next); err != nil {
		return err
	}
	c.reserved.Store(next)
	return nil
}

// store writes version v's reservation into the key's usage entry.
func (u *usageTracker) store(ctx context.Context, s logical.Storage, name string, v int, next uint64) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	res, err := u.loadLocked(ctx, s, name)
	if err != nil {
		return err
	}
	updated := res.raised(v, next)
	e, err := logical.StorageEntryJSON(usagePrefix+name, updated.entry())
	if err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		return err
	}
	u.reserved[name] = updated
	return nil
}

// count returns the encryptions counted for a version, for reads (no storage or HSM access).
func (u *usageTracker) count(name string, v int) (uint64, bool) {
	if c, ok := u.versions.Load(usageKey(name, v)); ok && c.loaded.Load() {
		return c.used.Load(), true
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.reserved[name].of(v)
}

func (u *usageTracker) forgetVersion(name string, v int) { u.versions.Delete(usageKey(name, v)) }

// forget drops a key's counters (deleted, or changed by another node).
func (u *usageTracker) forget(name string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.reserved, name)
	u.versions.Range(func(k string, _ *versionUsage) bool {
		if strings.HasPrefix(k, name+"\x00") {
			u.versions.Delete(k)
		}
		return true
	})
}
