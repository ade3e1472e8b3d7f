package keys

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Tick runs what the schedule says is due: deletions, version destructions, rotations; and records the end of
// grants that expired or ran out since (grants.go); and signs the history heads left behind while the audit key
// could not sign (chain.go). Vault calls the periodic
// function about once a minute on the active node; the schedule is built from storage once per process (and again
// after another node changed keys), then kept up to date by every change, so a tick's cost grows with the due keys,
// not with all keys.
func (m *Manager) Tick(ctx context.Context, s logical.Storage, now time.Time) error {
	m.sched.mu.Lock()
	ready := m.sched.ready
	m.sched.mu.Unlock()
	if !ready {
		if err := m.buildSchedule(ctx, s); err != nil {
			return err
		}
	}
	for _, name := range m.sched.popDue(now) {
		if err := m.runDue(ctx, s, name, now); err != nil {
			m.log.Warn("scheduled lifecycle work failed; retrying at the next tick", "key", name, "error", err)
			m.sched.set(name, now.Add(time.Minute))
		}
	}
	m.recordEndedGrants(ctx, s)
	m.signHeadsLeftBehind(ctx, s)
	return nil
}

// buildSchedule reads every key once and fills the schedule.
func (m *Manager) buildSchedule(ctx context.Context, s logical.Storage) error {
	names, err := List(ctx, s)
	if err != nil {
		return err
	}
	next := map[string]time.Time{}
	for _, name := range names {
		k, err := m.Get(ctx, s, name)
		if err != nil {
			return err
		}
		if k == nil {
			continue
		}
		if at := k.NextDue(); !at.IsZero() {
			next[name] = at
		}
	}
	m.sched.reset(next)
	m.log.Debug("lifecycle schedule built", "keys", len(names), "scheduled", len(next))
	return nil
}

// runDue does what is due for key name at now: its deletion or its versions' destructions, then its decrypt
// window, then its rotation, each stored on its own, so that what one did is never undone by the next one failing
// (a destruction's objects are gone once it is made: its record must be stored whatever the rotation does).
func (m *Manager) runDue(ctx context.Context, s logical.Storage, name string, now time.Time) error {
	err := m.runDueSteps(ctx, s, name, now)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err == nil {
		if k, _ := m.Get(ctx, s, name); k != nil {
			m.sched.update(k) // anything still pending, also when nothing changed
		}
	}
	return err
}

func (m *Manager) runDueSteps(ctx context.Context, s logical.Storage, name string, now time.Time) error {
	k, err := m.Update(ctx, s, name, SchedulerActor, func(tx *Tx) error {
		k := tx.Key
		if k.Deleting || (!k.DeleteAt.IsZero() && !now.Before(k.DeleteAt)) {
			return tx.DeleteKey("deletion grace period elapsed")
		}
		for n := 1; n <= k.LatestVersion; n++ {
			if v := k.Versions[n]; v.State == StateDestroyScheduled && !now.Before(v.DestroyAt) {
				if err := tx.DestroyVersion(n, "destruction grace period elapsed"); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil || k == nil {
		return err // deleted: nothing else is due
	}
	if windowDue(k, now) {
		// What the key's versions did decides how far the window may go: read before the key's lock, as the
		// analytics take their own.
		uses, countedFrom := m.VersionUses(ctx, s, k)
		if k, err = m.Update(ctx, s, name, SchedulerActor, func(tx *Tx) error {
			if windowDue(tx.Key, now) {
				tx.advanceDecryptWindow(now, uses, countedFrom)
			}
			return nil
		}); err != nil {
			return err
		}
	}
	if !rotationDue(k, now) {
		return nil
	}
	_, err = m.Update(ctx, s, name, SchedulerActor, func(tx *Tx) error {
		k := tx.Key
		if !rotationDue(k, now) {
			return nil // rotated, disabled or deleted meanwhile
		}
		if k.Imported && !k.AllowRotation {
			m.log.Warn("scheduled rotation skipped: imported key without allow_rotation", "key", name)
			k.NextRotation = time.Time{}
			tx.Changed()
			return nil
		}
		return tx.Rotate("scheduled", VersionType{})
	})
	var refused *TypeRefusedError
	if !errors.As(err, &refused) {
		return err
	}
	// The mount's algorithm policy refuses the key's type: the rotation waits, and is tried again an hour later.
	// NextRotation stays, so that the key shows as overdue (metrics, inventory, compliance) until its owner rotates
	// it to another type or gives it a next_type; the history records the first refusal of the run.
	recorded := false
	_, err = m.Update(ctx, s, name, SchedulerActor, func(tx *Tx) error {
		k := tx.Key
		if !rotationDue(k, now) {
			return nil
		}
		if k.RotationHeldUntil.IsZero() {
			tx.Record("rotation_skipped", 0, "scheduled", refused.Error())
			recorded = true
		}
		k.RotationHeldUntil = now.Add(rotationRetry)
		tx.Changed()
		return nil
	})
	if err == nil && recorded {
		m.log.Warn("scheduled rotation refused by the mount's algorithm policy; tried again hourly", "key", name, "error", refused)
	}
	return err
}

// rotationRetry is how long a scheduled rotation the algorithm policy refused waits before it is tried again.
const rotationRetry = time.Hour

// rotationDue reports whether k's scheduled rotation is to be tried now.
func rotationDue(k *Key, now time.Time) bool {
	at := k.rotationDue()
	return !at.IsZero() && !now.Before(at) && !k.Disabled && k.DeleteAt.IsZero() && !k.Deleting
}

// windowDue reports whether k's decrypt window is to be looked at now.
func windowDue(k *Key, now time.Time) bool {
	return !k.WindowCheckAt.IsZero() && !now.Before(k.WindowCheckAt) && !k.Disabled && k.DeleteAt.IsZero() && !k.Deleting
}
