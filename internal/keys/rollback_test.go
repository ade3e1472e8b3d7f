package keys

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// The regressions of issue 19's data findings (1–4 and 16), on the model with a token kept in memory; the same
// paths run on real tokens through the backend's tests.

// storageWithWAL is storage restored from a snapshot taken while version n of key name was being made: the WAL
// entry is there, the version (and, for n == 1, the key) is not.
func storageWithWAL(t *testing.T, s logical.Storage, w *WALEntry) {
	t.Helper()
	if _, err := framework.PutWAL(context.Background(), s, WALKindVersion, w); err != nil {
		t.Fatal(err)
	}
}

// Finding 1: a key whose creation straddled the snapshot storage was restored from. Its material (which may
// protect data) was destroyed by the rollback; now it stays, is reported, and is adopted when the key is made again.
func TestRollbackKeepsMaterialOfAKeyStorageLost(t *testing.T) {
	for _, again := range []string{"create", "reconcile"} {
		t.Run(again, func(t *testing.T) {
			m, f, s := newManager(t)
			ctx := context.Background()
			k, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil)
			if err != nil {
				t.Fatal(err)
			}
			id := k.Versions[1].HSMID
			m2, s2 := restored(f, &logical.InmemStorage{})
			w := &WALEntry{Name: "k", Version: 1, HSMID: id, RequestID: who.RequestID, Generated: true, Type: TypeAES256GCM96}
			storageWithWAL(t, s2, w)
			if err := m2.RollbackVersion(ctx, s2, w); err != nil {
				t.Fatal(err)
			}
			if !f.has(id) {
				t.Fatal("the rollback destroyed the material of a key storage lost")
			}
			r, err := m2.Reconcile(ctx, s2, "", false, false, who)
			if err != nil {
				t.Fatal(err)
			}
			if len(r.Unreferenced) != 1 || r.Unreferenced[0].HSMID != id || r.Unreferenced[0].Key != "k" {
				t.Fatalf("reconcile reports %+v", r.Unreferenced)
			}
			var got *Key
			if again == "create" {
				got, _, err = m2.Create(ctx, s2, &Key{Name: "k", Type: TypeAES256GCM96}, Actor{RequestID: "req-again"}, nil)
			} else {
				r, err = m2.Reconcile(ctx, s2, "", true, false, who)
				if err == nil && len(r.Adopted) != 1 {
					t.Fatalf("reconcile adopted %+v", r.Adopted)
				}
				got, _ = m2.Get(ctx, s2, "k")
			}
			if err != nil {
				t.Fatal(err)
			}
			if got == nil || got.Versions[1] == nil || got.Versions[1].HSMID != id || !got.Versions[1].EncryptionsUnknown {
				t.Fatalf("key made again: %+v", got)
			}
			if claims, _ := s2.List(ctx, claimsPrefix); len(claims) != 0 {
				t.Fatalf("claims left after adoption: %v", claims)
			}
			labelsUnique(t, f)
		})
	}
}

// Finding 1 and 5: a rotation's number storage no longer knows, now held by other material (a search that missed
// the original let the number be taken again). The rollback left the original only when nothing else held its
// number; it destroyed it otherwise. Now it never does.
func TestRollbackKeepsMaterialWhoseNumberIsTaken(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	rotate(t, m, s, "k", "req-2")
	original := "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
	f.objects[original], f.labels[original] = true, versionLabel("mount", "k", 2)
	w := &WALEntry{Name: "k", Version: 2, HSMID: original, RequestID: "req-lost", Generated: true, Type: TypeAES256GCM96}
	storageWithWAL(t, s, w)
	if err := m.RollbackVersion(ctx, s, w); err != nil {
		t.Fatal(err)
	}
	if !f.has(original) {
		t.Fatal("the rollback destroyed material under a number storage gave to other material")
	}
}

// Finding 2: the rollback adopted under the WAL entry's own request ID, so the adoption took itself for the
// request's retry and gave the version a fresh encryption budget.
func TestRollbackAdoptionHasUnknownUsage(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	id := "b0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
	f.objects[id], f.labels[id] = true, versionLabel("mount", "k", 2)
	w := &WALEntry{Name: "k", Version: 2, HSMID: id, RequestID: "req-rotate", Generated: true, Type: TypeAES256GCM96}
	storageWithWAL(t, s, w)
	if err := m.RollbackVersion(ctx, s, w); err != nil {
		t.Fatal(err)
	}
	k, _ := m.Get(ctx, s, "k")
	if k.LatestVersion != 2 || k.Versions[2].HSMID != id {
		t.Fatalf("not adopted: latest %d", k.LatestVersion)
	}
	if !k.Versions[2].EncryptionsUnknown {
		t.Fatal("a version adopted by the rollback got a fresh encryption budget")
	}
	if _, err := m.countEncryption(ctx, s, k, 2); !errors.Is(err, ErrVersionExhausted) {
		t.Fatalf("the adopted version encrypted: %v", err)
	}
}

// failingDeletes fails the first delete of a storage key with the prefix, after the deletes before it happened.
type failingDeletes struct {
	logical.Storage
	mu     sync.Mutex
	prefix string
}

func (s *failingDeletes) Delete(ctx context.Context, key string) error {
	s.mu.Lock()
	fail := s.prefix != "" && strings.HasPrefix(key, s.prefix)
	if fail {
		s.prefix = ""
	}
	s.mu.Unlock()
	if fail {
		return errors.New("storage unavailable")
	}
	return s.Storage.Delete(ctx, key)
}

// Finding 3: a deletion whose storage removal failed half-way left the key unreadable ("version 1 is missing from
// storage") for every later request, a second delete included. Now the key serves nothing and the next attempt
// finishes.
func TestInterruptedDeletionIsFinished(t *testing.T) {
	m, f, inner := newManager(t)
	s := &failingDeletes{Storage: inner}
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96, DeletionAllowed: true}, who, nil); err != nil {
		t.Fatal(err)
	}
	for i := 2; i <= VersionChunk+1; i++ { // two chunks of versions
		rotate(t, m, s, "k", fmt.Sprint("req-", i))
	}
	s.prefix = VersionsKey("k", 1) // the second chunk: the first is gone by then
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.Delete(0) }); err == nil {
		t.Fatal("the failed removal was not reported")
	}
	fresh, _ := restored(f, nil)
	k, err := fresh.Get(ctx, s, "k")
	if err != nil {
		t.Fatalf("after an interrupted deletion the key cannot be read: %v", err)
	}
	if k == nil || k.Usable() == nil {
		t.Fatalf("the half-deleted key serves: %+v", k)
	}
	if _, err := fresh.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.Delete(0) }); err != nil {
		t.Fatalf("a second delete: %v", err)
	}
	if k, err := fresh.Get(ctx, s, "k"); err != nil || k != nil {
		t.Fatalf("after the second delete: %v, %v", k, err)
	}
	if keys, _ := logical.CollectKeys(ctx, inner); len(keys) != 0 {
		for _, key := range keys {
			if !strings.HasPrefix(key, "history/") {
				t.Fatalf("left in storage: %v", keys)
			}
		}
	}
	if len(f.objects) != 0 {
		t.Fatalf("%d objects left on the token", len(f.objects))
	}
}

// Finding 4: trim and delete published the snapshot they were still changing (a data race with every reader of the
// cached key; in a multiplexed plugin a concurrent map write kills every mount). Readers run throughout; -race
// reports any write to a published snapshot.
func TestReadersDuringTrimAndDelete(t *testing.T) {
	m, _, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96, DeletionAllowed: true}, who, nil); err != nil {
		t.Fatal(err)
	}
	for i := 2; i <= 30; i++ {
		rotate(t, m, s, "k", fmt.Sprint("req-", i))
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if k, err := m.Get(ctx, s, "k"); err == nil && k != nil {
					for n := range k.Versions {
						_ = k.VersionState(n)
					}
				}
			}
		}()
	}
	min := 25
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error {
		return tx.Configure(Settings{MinEncryptionVersion: &min, MinDecryptionVersion: &min})
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.Trim(min, time.Now(), true) }); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.Delete(0) }); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
}

// Finding 16: the schedule's heap grew with every change of a key's due time (20,000 writes left 20,000 entries).
func TestScheduleHoldsOneEntryPerKey(t *testing.T) {
	m, _, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Tick(ctx, s, time.Now()); err != nil { // builds the schedule
		t.Fatal(err)
	}
	base := time.Now().Add(time.Hour)
	for i := 0; i < 2000; i++ {
		at := base.Add(time.Duration(i) * time.Second)
		if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.Configure(Settings{NextRotation: &at}) }); err != nil {
			t.Fatal(err)
		}
	}
	if n := m.sched.len(); n != 1 {
		t.Fatalf("the schedule holds %d entries for one key", n)
	}
	if due := m.sched.popDue(base.Add(2001 * time.Second)); len(due) != 1 || due[0] != "k" {
		t.Fatalf("due %v", due)
	}
}

// Finding 2, the witness as the bound: a count loaded behind the token's witness (a search that missed it, another
// process on the same version) is found out at the next reservation, and the version encrypts no more.
func TestUsageBehindTheTokenEncryptsNoMore(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	k, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96, MaxEncryptions: 1000}, who, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.countEncryption(ctx, s, k, 1); err != nil { // reserves the first block
		t.Fatal(err)
	}
	f.mu.Lock()
	f.uses[k.Versions[1].HSMID] = 500 // what the token witnessed elsewhere
	f.mu.Unlock()
	var last error
	for i := 2; i <= minReservationBlock+1 && last == nil; i++ {
		_, last = m.countEncryption(ctx, s, k, 1)
	}
	if !errors.Is(last, ErrVersionExhausted) {
		t.Fatalf("a count behind the token's witness went on: %v", last)
	}
	if _, err := m.countEncryption(ctx, s, k, 1); !errors.Is(err, ErrVersionExhausted) {
		t.Fatalf("and after: %v", err)
	}
}

// A version adopted after a restore whose usage the token witnessed keeps encrypting, from the witnessed count, up
// to its limit; one without a witness encrypts no more (TestRestoredStorageAdoptsNeverReuses).
func TestAdoptedVersionWithAWitnessKeepsItsCount(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96, MaxEncryptions: 1000}, who, nil); err != nil {
		t.Fatal(err)
	}
	snap := snapshot(t, s)
	k := rotate(t, m, s, "k", "req-2")
	for i := 0; i < 40; i++ { // three blocks of 16 witnessed: 48
		if _, err := m.countEncryption(ctx, s, k, 2); err != nil {
			t.Fatal(err)
		}
	}
	m2, s2 := restored(f, snap)
	k2, adopted, err := m2.Adopt(ctx, s2, "k", 2, who)
	if err != nil || len(adopted) != 1 {
		t.Fatalf("adopted %v, %v", adopted, err)
	}
	if k2.Versions[2].EncryptionsUnknown {
		t.Fatal("a version whose usage the token witnessed was adopted with an unknown count")
	}
	if _, err := m2.countEncryption(ctx, s2, k2, 2); err != nil {
		t.Fatalf("the adopted version does not encrypt: %v", err)
	}
	if n, _ := m2.EncryptionCount("k", 2); n != 49 {
		t.Fatalf("the adopted version resumed at %d, want 49 (after the 48 witnessed)", n)
	}
}
