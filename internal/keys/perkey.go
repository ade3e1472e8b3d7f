package keys

import "sync"

// perKey holds a value per key (or per key and version): what the manager keeps of each of a mount's keys.
//
// A map under a read-write lock, not a sync.Map: with ten thousand keys, each held in several of these, a sync.Map's
// trie nodes cost some 300 bytes an entry where a map's cost some 40 (issue 22's memory measurement), and the read
// lock a request takes is nothing beside the request.
type perKey[V any] struct {
	mu sync.RWMutex
	m  map[string]V
}

func (p *perKey[V]) Load(name string) (V, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	v, ok := p.m[name]
	return v, ok
}

func (p *perKey[V]) Store(name string, v V) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[string]V{}
	}
	p.m[name] = v
}

// LoadOrStore returns the value held for name, or holds v and returns it (loaded false).
func (p *perKey[V]) LoadOrStore(name string, v V) (actual V, loaded bool) {
	if cur, ok := p.Load(name); ok {
		return cur, true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if cur, ok := p.m[name]; ok {
		return cur, true
	}
	if p.m == nil {
		p.m = map[string]V{}
	}
	p.m[name] = v
	return v, false
}

func (p *perKey[V]) Delete(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.m, name)
}

// DeleteIf drops name's value if drop says so, judged under the lock so that no Store slips in between.
func (p *perKey[V]) DeleteIf(name string, drop func(V) bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if v, ok := p.m[name]; ok && drop(v) {
		delete(p.m, name)
	}
}

// Range calls f for each name held when it began and still held when its turn comes, with the value held then,
// until f returns false. f may change the map: it runs on a copy of the names, not under the lock.
func (p *perKey[V]) Range(f func(name string, v V) bool) {
	p.mu.RLock()
	names := make([]string, 0, len(p.m))
	for name := range p.m {
		names = append(names, name)
	}
	p.mu.RUnlock()
	for _, name := range names {
		if v, ok := p.Load(name); ok && !f(name, v) {
			return
		}
	}
}

func (p *perKey[V]) Len() int {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.m)
}

// Clear drops every value, and the map's room with them.
func (p *perKey[V]) Clear() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.m = nil
}
