package keys

import (
	"container/heap"
	"sync"
	"time"
)

// schedule knows, for every key, the next moment something is due: a rotation, a version's destruction or the
// key's deletion. Vault calls the periodic function about once a minute on the active node; each tick pops only
// what is due, so its cost grows with the due keys, not with all keys. The schedule is built from storage once
// per process (and again after another node changed keys under us), then kept up to date by every key write.
type schedule struct {
	mu    sync.Mutex
	ready bool
	next  map[string]time.Time // the authoritative due time per key
	queue dueQueue             // may hold stale entries; popped ones are checked against next
}

type dueEntry struct {
	at   time.Time
	name string
}

type dueQueue []dueEntry

func (q dueQueue) Len() int            { return len(q) }
func (q dueQueue) Less(i, j int) bool  { return q[i].at.Before(q[j].at) }
func (q dueQueue) Swap(i, j int)       { q[i], q[j] = q[j], q[i] }
func (q *dueQueue) Push(x interface{}) { *q = append(*q, x.(dueEntry)) }
func (q *dueQueue) Pop() interface{} {
	old := *q
	e := old[len(old)-1]
	*q = old[:len(old)-1]
	return e
}

// update records k's next due time (called on every write of a key).
func (s *schedule) update(k *Key) {
	s.set(k.Name, k.NextDue())
}

func (s *schedule) set(name string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.ready {
		return // the build reads everything from storage
	}
	if at.IsZero() {
		delete(s.next, name)
		return
	}
	if cur, ok := s.next[name]; ok && cur.Equal(at) {
		return
	}
	s.next[name] = at
	heap.Push(&s.queue, dueEntry{at: at, name: name})
}

func (s *schedule) remove(name string) { s.set(name, time.Time{}) }

// invalidate makes the next tick rebuild the schedule from storage.
func (s *schedule) invalidate() {
	s.mu.Lock()
	s.ready = false
	s.mu.Unlock()
}

// popDue removes and returns the keys due at now.
func (s *schedule) popDue(now time.Time) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var due []string
	for s.queue.Len() > 0 && !s.queue[0].at.After(now) {
		e := heap.Pop(&s.queue).(dueEntry)
		if at, ok := s.next[e.name]; ok && at.Equal(e.at) {
			delete(s.next, e.name)
			due = append(due, e.name)
		}
	}
	return due
}
