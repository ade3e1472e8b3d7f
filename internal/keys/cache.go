package keys

import (
	"sync/atomic"

	lru "github.com/hashicorp/golang-lru"
)

// snapshots caches key snapshots by name, so that a request on a cached key reads no storage and takes no lock.
// Unbounded by default (Transit's cache size 0); with a size, the least recently used snapshot is dropped and
// read from storage again when next used: memory traded for storage reads, for mounts with very many keys.
type snapshots struct {
	all     perKey[*Key]              // when unbounded
	bounded atomic.Pointer[lru.Cache] // set when a size is configured
}

func (c *snapshots) Load(name string) (*Key, bool) {
	if b := c.bounded.Load(); b != nil {
		k, ok := b.Get(name)
		if !ok {
			return nil, false
		}
		return k.(*Key), true
	}
	return c.all.Load(name)
}

func (c *snapshots) Store(name string, k *Key) {
	if b := c.bounded.Load(); b != nil {
		b.Add(name, k)
		return
	}
	c.all.Store(name, k)
}

func (c *snapshots) Delete(name string) {
	if b := c.bounded.Load(); b != nil {
		b.Remove(name)
	}
	c.all.Delete(name)
}

// Len is the number of cached snapshots.
func (c *snapshots) Len() int {
	if b := c.bounded.Load(); b != nil {
		return b.Len()
	}
	return c.all.Len()
}

// resize bounds the cache to size snapshots (0: unbounded). What was cached is dropped: the next use of each key
// reads it from storage, under its lock, so no change made meanwhile is missed.
func (c *snapshots) resize(size int) error {
	if size == 0 {
		c.bounded.Store(nil)
	} else {
		b, err := lru.New(size)
		if err != nil {
			return err
		}
		c.bounded.Store(b)
	}
	c.all.Clear()
	return nil
}

// SetCacheSize bounds the number of key snapshots kept in memory (0: unbounded). Each key's lock is taken in turn
// while the cache is replaced, so no change in progress stores into the cache being dropped.
func (m *Manager) SetCacheSize(size int) error {
	for _, l := range m.locks {
		l.Lock()
	}
	defer func() {
		for _, l := range m.locks {
			l.Unlock()
		}
	}()
	return m.cache.resize(size)
}

// CachedKeys is how many key snapshots are cached.
func (m *Manager) CachedKeys() int { return m.cache.Len() }
