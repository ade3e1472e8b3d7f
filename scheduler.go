package cmk

import (
	"container/heap"
	"context"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
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

// nextDue is the earliest lifecycle event of p, zero when none.
func (p *keyPolicy) nextDue() time.Time {
	var at time.Time
	consider := func(t time.Time) {
		if !t.IsZero() && (at.IsZero() || t.Before(at)) {
			at = t
		}
	}
	consider(p.DeleteAt)
	if p.Deleting {
		consider(time.Unix(0, 0)) // an interrupted deletion: finish it at once
	}
	if !p.Disabled && p.DeleteAt.IsZero() {
		consider(p.NextRotation)
	}
	for _, v := range p.Versions {
		if v.State == stateDestroyScheduled {
			consider(v.DestroyAt)
		}
	}
	return at
}

// update records p's next due time (called on every write of a key).
func (s *schedule) update(p *keyPolicy) {
	s.set(p.Name, p.nextDue())
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

// build reads every key once and fills the schedule.
func (b *backend) buildSchedule(ctx context.Context, st logical.Storage) error {
	names, err := st.List(ctx, policyPrefix)
	if err != nil {
		return err
	}
	next := map[string]time.Time{}
	var queue dueQueue
	for _, name := range names {
		p, err := b.policy(ctx, st, name)
		if err != nil {
			return err
		}
		if p == nil {
			continue
		}
		if at := p.nextDue(); !at.IsZero() {
			next[name] = at
			queue = append(queue, dueEntry{at: at, name: name})
		}
	}
	heap.Init(&queue)
	b.sched.mu.Lock()
	b.sched.next, b.sched.queue, b.sched.ready = next, queue, true
	b.sched.mu.Unlock()
	b.logger.Debug("lifecycle schedule built", "keys", len(names), "scheduled", len(next))
	return nil
}

// periodic is Vault's periodic function: it runs what the schedule says is due.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if !b.WriteSafeReplicationState() {
		return nil // a replica: the primary's active node manages the lifecycle
	}
	if cfg, err := readHSMConfig(ctx, req.Storage); err != nil || cfg == nil {
		return err // nothing can be due before the HSM is configured
	}
	b.sched.mu.Lock()
	ready := b.sched.ready
	b.sched.mu.Unlock()
	if !ready {
		if err := b.buildSchedule(ctx, req.Storage); err != nil {
			return err
		}
	}
	now := time.Now()
	for _, name := range b.sched.popDue(now) {
		if err := b.runDue(ctx, req.Storage, name, now); err != nil {
			b.logger.Warn("scheduled lifecycle work failed; retrying at the next tick", "key", name, "error", err)
			b.sched.set(name, now.Add(time.Minute))
		}
	}
	return nil
}

// runDue does what is due for key name: deletion, version destructions, rotation.
func (b *backend) runDue(ctx context.Context, s logical.Storage, name string, now time.Time) error {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	p, err := b.policyLocked(ctx, s, name)
	if err != nil || p == nil {
		return err
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return err
	}
	if p.Deleting || (!p.DeleteAt.IsZero() && !now.Before(p.DeleteAt)) {
		return b.destroyKeyLocked(ctx, s, tok, p, schedulerActor, "deletion grace period elapsed")
	}
	for n := 1; n <= p.LatestVersion; n++ {
		v := p.Versions[n]
		if v.State == stateDestroyScheduled && !now.Before(v.DestroyAt) {
			if p, err = b.destroyVersionLocked(ctx, s, tok, p, n, schedulerActor, "destruction grace period elapsed"); err != nil {
				return err
			}
		}
	}
	if !p.NextRotation.IsZero() && !now.Before(p.NextRotation) && !p.Disabled && p.DeleteAt.IsZero() {
		if p.Imported && !p.AllowRotation {
			b.logger.Warn("scheduled rotation skipped: imported key without allow_rotation", "key", name)
			p = p.clone()
			p.NextRotation = time.Time{}
			return b.storePolicy(ctx, s, p)
		}
		if _, err = b.rotateLocked(ctx, s, tok, p, schedulerActor, "scheduled"); err != nil {
			return err
		}
		return nil
	}
	b.sched.update(p) // anything still pending
	return nil
}
