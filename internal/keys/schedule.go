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
// It holds one entry per scheduled key: a key whose due time changes moves its entry, so the queue never grows
// beyond the number of keys however often their times change.
type schedule struct {
	mu    sync.Mutex
	ready bool
	byKey map[string]*dueEntry // the one entry of each scheduled key, also in queue
	queue dueQueue
}

type dueEntry struct {
	at    time.Time
	name  string
	index int // position in queue, kept by the heap's Swap
}

type dueQueue []*dueEntry

func (q dueQueue) Len() int           { return len(q) }
func (q dueQueue) Less(i, j int) bool { return q[i].at.Before(q[j].at) }
func (q dueQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index, q[j].index = i, j
}
func (q *dueQueue) Push(x interface{}) {
	e := x.(*dueEntry)
	e.index = len(*q)
	*q = append(*q, e)
}
func (q *dueQueue) Pop() interface{} {
	old := *q
	e := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	return e
}

// reset replaces the schedule with the due times read from storage.
func (s *schedule) reset(next map[string]time.Time) {
	byKey := make(map[string]*dueEntry, len(next))
	queue := make(dueQueue, 0, len(next))
	for name, at := range next {
		e := &dueEntry{at: at, name: name, index: len(queue)}
		byKey[name] = e
		queue = append(queue, e)
	}
	heap.Init(&queue)
	s.mu.Lock()
	s.byKey, s.queue, s.ready = byKey, queue, true
	s.mu.Unlock()
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
	e, ok := s.byKey[name]
	switch {
	case at.IsZero() && ok:
		heap.Remove(&s.queue, e.index)
		delete(s.byKey, name)
	case at.IsZero():
	case ok:
		if !e.at.Equal(at) {
			e.at = at
			heap.Fix(&s.queue, e.index)
		}
	default:
		e = &dueEntry{at: at, name: name}
		s.byKey[name] = e
		heap.Push(&s.queue, e)
	}
}

func (s *schedule) remove(name string) { s.set(name, time.Time{}) }

// invalidate makes the next tick rebuild the schedule from storage.
func (s *schedule) invalidate() {
	s.mu.Lock()
	s.ready = false
	s.mu.Unlock()
}

// len is how many keys have something scheduled.
func (s *schedule) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queue.Len()
}

// popDue removes and returns the keys due at now.
func (s *schedule) popDue(now time.Time) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var due []string
	for s.queue.Len() > 0 && !s.queue[0].at.After(now) {
		e := heap.Pop(&s.queue).(*dueEntry)
		delete(s.byKey, e.name)
		due = append(due, e.name)
	}
	return due
}
