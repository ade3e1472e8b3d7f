package keys

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// snapshot copies every entry of s, as `vault operator raft snapshot save` keeps Vault's storage.
func snapshot(t *testing.T, s logical.Storage) *logical.InmemStorage {
	t.Helper()
	ctx := context.Background()
	keys, err := logical.CollectKeys(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	out := &logical.InmemStorage{}
	for _, k := range keys {
		e, err := s.Get(ctx, k)
		if err != nil || e == nil {
			t.Fatalf("%s: %v", k, err)
		}
		if err := out.Put(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// restored is a manager on a storage snapshot and the same token, as a node restored from the snapshot is.
func restored(f *fakeHSM, snap *logical.InmemStorage) (*Manager, logical.Storage) {
	m := NewManager(hclog.NewNullLogger(), "mount", func(context.Context, logical.Storage) (HSM, *Nonces, error) { return f, nil, nil })
	return m, snap
}

func rotate(t *testing.T, m *Manager, s logical.Storage, name, request string) *Key {
	t.Helper()
	k, err := m.Update(context.Background(), s, name, Actor{DisplayName: "test", RequestID: request}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) })
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func labelsUnique(t *testing.T, f *fakeHSM) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	seen := map[string]string{}
	for id, l := range f.labels {
		if other, ok := seen[l]; ok {
			t.Fatalf("two objects labelled %s: %s and %s", l, other, id)
		}
		seen[l] = id
	}
}

// Storage restored to before a rotation forgets the version it made; its material is still on the token. A request
// naming it adopts it (a ciphertext issued before the restore decrypts); the next rotation makes a new number.
func TestRestoredStorageAdoptsNeverReuses(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	snap := snapshot(t, s)
	lost := rotate(t, m, s, "k", "req-2").Versions[2].HSMID

	m2, s2 := restored(f, snap)
	k, adopted, err := m2.Adopt(ctx, s2, "k", 2, who)
	if err != nil {
		t.Fatal(err)
	}
	if len(adopted) != 1 || adopted[0] != 2 || k.LatestVersion != 2 || k.Versions[2].HSMID != lost {
		t.Fatalf("adopted %v, latest %d", adopted, k.LatestVersion)
	}
	v := k.Versions[2]
	if v.AdoptedAt.IsZero() || !v.EncryptionsUnknown || !v.HMACDeferred {
		t.Fatalf("adopted version metadata %+v", v)
	}
	// Its usage before the restore is unknown: it encrypts no more, and the next encryption rotates.
	if _, err := m2.countEncryption(ctx, s2, k, 2); !errors.Is(err, ErrVersionExhausted) {
		t.Fatalf("an adopted version counted an encryption: %v", err)
	}
	events, err := ReadHistory(ctx, s2, "k", 0)
	if err != nil {
		t.Fatal(err)
	}
	last := events[len(events)-1]
	if last.Event != "version_adopted" || last.Version != 2 || last.Cause != CauseRestore {
		t.Fatalf("last event %+v", last)
	}
	k = rotate(t, m2, s2, "k", "req-3")
	if k.LatestVersion != 3 || k.Versions[3].HSMID == lost {
		t.Fatalf("rotation after adoption: latest %d", k.LatestVersion)
	}
	labelsUnique(t, f)
}

// A rotation after the restore, with no request naming the lost version first, adopts it before it makes a new
// one: the number is never given to other material.
func TestRotationAfterRestoreAdoptsFirst(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	snap := snapshot(t, s)
	rotate(t, m, s, "k", "req-2")
	rotate(t, m, s, "k", "req-3")

	m2, s2 := restored(f, snap)
	k := rotate(t, m2, s2, "k", "req-4")
	if k.LatestVersion != 4 || k.Versions[2].AdoptedAt.IsZero() || k.Versions[3].AdoptedAt.IsZero() || !k.Versions[4].AdoptedAt.IsZero() {
		t.Fatalf("after the rotation: latest %d, versions %v", k.LatestVersion, k.Versions)
	}
	labelsUnique(t, f)
}

// Material that was not generated on the token (imported, or planted by someone with the PIN) is never adopted,
// and it blocks its number: a rotation fails, naming it, and makes nothing.
func TestImportedMaterialIsReportedNotAdopted(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	planted := "00112233445566778899aabbccddeeff"
	f.objects[planted], f.labels[planted], f.imported[planted] = true, versionLabel("mount", "k", 2), true
	before := len(f.objects)
	_, err := m.Update(ctx, s, "k", Actor{RequestID: "req-2"}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) })
	var taken *NumberTakenError
	if !errors.As(err, &taken) || taken.Version != 2 {
		t.Fatalf("rotation over planted material: %v", err)
	}
	if len(f.objects) != before {
		t.Fatal("the refused rotation made objects")
	}
	if _, adopted, err := m.Adopt(ctx, s, "k", 2, who); !errors.As(err, &taken) || len(adopted) != 0 {
		t.Fatalf("adopt of planted material: %v %v", adopted, err)
	}
	r, err := m.Reconcile(ctx, s, "k", false, false, who)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Unreferenced) != 1 || r.Unreferenced[0].Adoptable || r.Unreferenced[0].HSMID != planted || r.Unreferenced[0].Version != 2 {
		t.Fatalf("reconcile: %+v", r)
	}
}

// Vault retries a request the plugin died under. A rotation that made its material and died before storing it is
// completed by the retry, which adopts that material instead of making a second version; another request's
// rotation adopts it and makes its own.
func TestRetryAfterCrashAdoptsItsOwnMaterial(t *testing.T) {
	for _, tc := range []struct {
		retry  string
		latest int
	}{{"req-crashed", 2}, {"req-other", 3}} {
		m, f, s := newManager(t)
		ctx := context.Background()
		if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
			t.Fatal(err)
		}
		// The crashed attempt: WAL entry written, material made, nothing stored.
		id := []byte("0123456789abcdef")
		if _, err := framework.PutWAL(ctx, s, WALKindVersion, &WALEntry{Name: "k", Version: 2, HSMID: "30313233343536373839616263646566", RequestID: "req-crashed"}); err != nil {
			t.Fatal(err)
		}
		if _, err := f.GenerateVersion(ctx, "", id, versionLabel("mount", "k", 2), 0); err != nil {
			t.Fatal(err)
		}
		k := rotate(t, m, s, "k", tc.retry)
		if k.LatestVersion != tc.latest || k.Versions[2].HSMID != "30313233343536373839616263646566" {
			t.Fatalf("retry by %s: latest %d", tc.retry, k.LatestVersion)
		}
		// Only the request's own retry knows the material encrypted nothing: for another request, the WAL entry
		// may have come back with a restored snapshot while the version was used after it.
		if unknown := k.Versions[2].EncryptionsUnknown; unknown != (tc.retry != "req-crashed") {
			t.Fatalf("retry by %s: encryptions_unknown %v", tc.retry, unknown)
		}
		if wals, _ := framework.ListWAL(ctx, s); len(wals) != 0 {
			t.Fatalf("WAL entries left: %v", wals)
		}
		// Retried again: nothing more.
		if again := rotate(t, m, s, "k", tc.retry); again.LatestVersion != tc.latest {
			t.Fatalf("a second retry added version %d", again.LatestVersion)
		}
		labelsUnique(t, f)
	}
}

// The WAL rollback adopts generated material storage does not reference (it may protect data if storage was
// restored from a snapshot taken during the rotation), leaves imported material an operator could adopt (the
// same, for an import), and destroys the rest.
func TestRollbackAdoptsGeneratedLeavesImported(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	gen := "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
	f.objects[gen], f.labels[gen] = true, versionLabel("mount", "k", 2)
	if err := m.RollbackVersion(ctx, s, &WALEntry{Name: "k", Version: 2, HSMID: gen, Generated: true}); err != nil {
		t.Fatal(err)
	}
	k, _ := m.Get(ctx, s, "k")
	if !f.has(gen) || k.LatestVersion != 2 || k.Versions[2].HSMID != gen {
		t.Fatalf("generated material: on token %v, latest %d", f.has(gen), k.LatestVersion)
	}
	imp := "b0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
	f.objects[imp], f.labels[imp], f.imported[imp] = true, versionLabel("mount", "k", 3), true
	if err := m.RollbackVersion(ctx, s, &WALEntry{Name: "k", Version: 3, HSMID: imp}); err != nil {
		t.Fatal(err)
	}
	if k, _ := m.Get(ctx, s, "k"); !f.has(imp) || k.LatestVersion != 2 {
		t.Fatalf("imported material: on token %v, latest %d", f.has(imp), k.LatestVersion)
	}
	stray := "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf" // not under the label of the version its WAL entry names
	f.objects[stray], f.labels[stray] = true, "cmk/mount/k/elsewhere"
	if err := m.RollbackVersion(ctx, s, &WALEntry{Name: "k", Version: 4, HSMID: stray}); err != nil {
		t.Fatal(err)
	}
	if f.has(stray) {
		t.Fatal("material no one could adopt survived the rollback")
	}
}

// Reconcile reports, read-only unless asked to adopt: objects storage does not reference, versions whose material
// is missing; with adopt, it adopts what the rule allows.
func TestReconcile(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	for _, name := range []string{"a", "b"} {
		if _, _, err := m.Create(ctx, s, &Key{Name: name, Type: TypeAES256GCM96}, who, nil); err != nil {
			t.Fatal(err)
		}
	}
	snap := snapshot(t, s)
	rotate(t, m, s, "a", "req-2")
	if _, _, err := m.Create(ctx, s, &Key{Name: "c", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	bv1, _ := m.Get(ctx, s, "b")
	if _, err := f.DestroyKeys(ctx, bv1.Versions[1].ID()); err != nil {
		t.Fatal(err)
	}

	m2, s2 := restored(f, snap)
	r, err := m2.Reconcile(ctx, s2, "", false, false, who)
	if err != nil {
		t.Fatal(err)
	}
	if r.Keys != 2 || len(r.Missing) != 1 || r.Missing[0].Key != "b" || len(r.Adopted) != 0 {
		t.Fatalf("report: %+v", r)
	}
	if len(r.Unreferenced) != 2 || r.Unreferenced[0].Key != "a" || !r.Unreferenced[0].Adoptable ||
		r.Unreferenced[1].Key != "c" || r.Unreferenced[1].Adoptable {
		t.Fatalf("unreferenced: %+v", r.Unreferenced)
	}
	if k, _ := m2.Get(ctx, s2, "a"); k.LatestVersion != 1 {
		t.Fatal("a report without adopt changed the key")
	}
	r, err = m2.Reconcile(ctx, s2, "", true, false, who)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Adopted) != 1 || r.Adopted[0].Key != "a" || r.Adopted[0].Version != 2 || len(r.Unreferenced) != 1 {
		t.Fatalf("after adopt: %+v", r)
	}
}

// A forged ciphertext naming a version that exists nowhere costs one token search, not one per request.
func TestForgedVersionsSearchTheTokenOnce(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	before := f.finds
	f.mu.Unlock()
	for i := 0; i < 50; i++ {
		if k, adopted, err := m.Adopt(ctx, s, "k", 1000+i, who); err != nil || len(adopted) != 0 || k.LatestVersion != 1 {
			t.Fatalf("forged version: %v %v", adopted, err)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.finds-before != 1 {
		t.Fatalf("%d token searches for 50 forged requests", f.finds-before)
	}
}

// On a token that leaves CKA_LOCAL false on the keys it generates (NSS), nothing is adopted automatically, except
// what this engine's own WAL entry says it generated; an operator may vouch for the rest (adopt_unverified), and
// the history says so.
func TestTokenWithoutLocalMarks(t *testing.T) {
	m, f, s := newManager(t)
	f.noLocal = true
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	snap := snapshot(t, s)
	rotate(t, m, s, "k", "req-2")

	// A rotation cut short: its WAL entry vouches for the material.
	ours := "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
	if _, err := framework.PutWAL(ctx, s, WALKindVersion, &WALEntry{Name: "k", Version: 3, HSMID: ours, Generated: true}); err != nil {
		t.Fatal(err)
	}
	f.objects[ours], f.labels[ours] = true, versionLabel("mount", "k", 3)
	if k := rotate(t, m, s, "k", "req-3"); k.LatestVersion != 4 || k.Versions[3].HSMID != ours {
		t.Fatalf("material the WAL vouches for: latest %d", k.LatestVersion)
	}

	// After the restore, versions 2 to 4 are on the token and no WAL entry speaks for them.
	m2, s2 := restored(f, snap)
	if _, _, err := m2.Adopt(ctx, s2, "k", 2, who); err == nil {
		t.Fatal("adopted automatically on a token that cannot show where the material came from")
	}
	r, err := m2.Reconcile(ctx, s2, "k", false, false, who)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Unreferenced) != 3 || r.Unreferenced[0].Adoptable || !r.Unreferenced[0].AdoptableByOperator {
		t.Fatalf("report: %+v", r.Unreferenced)
	}
	if r, err = m2.Reconcile(ctx, s2, "k", true, true, who); err != nil || len(r.Adopted) != 3 {
		t.Fatalf("adopt_unverified: %+v %v", r, err)
	}
	events, _ := ReadHistory(ctx, s2, "k", 0)
	if last := events[len(events)-1]; last.Cause != CauseOperator || !strings.Contains(last.Details, "operator's word") {
		t.Fatalf("history: %+v", last)
	}
}

// A change that adopted interrupted material and then failed keeps that material's WAL entry (its evidence of
// origin) and the material; only what the change itself made is undone.
func TestFailedChangeKeepsAdoptedMaterialAndItsWAL(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	interrupted := "d0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
	walID, err := framework.PutWAL(ctx, s, WALKindVersion, &WALEntry{Name: "k", Version: 2, HSMID: interrupted, Generated: true, RequestID: "req-x"})
	if err != nil {
		t.Fatal(err)
	}
	f.objects[interrupted], f.labels[interrupted] = true, versionLabel("mount", "k", 2)
	f.failGen = true
	if _, err := m.Update(ctx, s, "k", Actor{RequestID: "req-y"}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) }); err == nil {
		t.Fatal("the rotation succeeded without generating")
	}
	if e, err := framework.GetWAL(ctx, s, walID); err != nil || e == nil {
		t.Fatalf("the adopted material's WAL entry was deleted by the failed change: %v", err)
	}
	if !f.has(interrupted) {
		t.Fatal("the failed change destroyed material it had adopted")
	}
}

// Deleting a key destroys what the token holds under its labels, adopted or not, so that a later key of the same
// name gets none of it; and a key being created adopts only what its own interrupted creation made.
func TestDeletedKeysMaterialNeverComesBack(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	k := &Key{Name: "k", Type: TypeAES256GCM96, DeletionAllowed: true}
	if _, _, err := m.Create(ctx, s, k, who, nil); err != nil {
		t.Fatal(err)
	}
	lost := "e0e1e2e3e4e5e6e7e8e9eaebecedeeef" // a version a restore lost, never adopted
	f.objects[lost], f.labels[lost] = true, versionLabel("mount", "k", 2)
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.Delete(0) }); err != nil {
		t.Fatal(err)
	}
	if f.has(lost) {
		t.Fatal("the deleted key's unadopted material is still on the token")
	}
	// Material of an earlier key of this name that storage never knew (made after the snapshot storage was
	// restored from): a key made again under the name adopts it (issue 19, finding 1), so that what it protected
	// decrypts again; its usage is unknown and the new key encrypts with a version of its own.
	earlier := "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
	f.objects[earlier], f.labels[earlier] = true, versionLabel("mount", "k", 1)
	k, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, Actor{RequestID: "req-new"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if k.Versions[1].HSMID != earlier || !k.Versions[1].EncryptionsUnknown || k.LatestVersion != 2 {
		t.Fatalf("key made again: v1 %+v, latest %d", k.Versions[1], k.LatestVersion)
	}
	// Material the token cannot show it generated (imported) is not given to the new key: the number is taken.
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { tx.Key.DeletionAllowed = true; tx.Changed(); return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.Delete(0) }); err != nil {
		t.Fatal(err)
	}
	planted := "d0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
	f.objects[planted], f.labels[planted], f.imported[planted] = true, versionLabel("mount", "k", 1), true
	_, _, err = m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, Actor{RequestID: "req-third"}, nil)
	var taken *NumberTakenError
	if !errors.As(err, &taken) {
		t.Fatalf("a new key took material the token cannot show it generated (or its number): %v", err)
	}
}

// Mount-wide reconcile with adopt goes on past a key whose next number is blocked, and keeps what it adopted
// before a blocked number.
func TestReconcileGoesOnPastBlockedKeys(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	for _, name := range []string{"a", "b"} {
		if _, _, err := m.Create(ctx, s, &Key{Name: name, Type: TypeAES256GCM96}, who, nil); err != nil {
			t.Fatal(err)
		}
	}
	snap := snapshot(t, s)
	rotate(t, m, s, "a", "req-2") // a v2: adoptable after the restore
	rotate(t, m, s, "b", "req-3") // b v2: adoptable
	planted := "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	f.objects[planted], f.labels[planted], f.imported[planted] = true, versionLabel("mount", "a", 3), true

	m2, s2 := restored(f, snap)
	r, err := m2.Reconcile(ctx, s2, "", true, false, who)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Adopted) != 2 {
		t.Fatalf("adopted %+v, want a v2 and b v2", r.Adopted)
	}
	if len(r.Unreferenced) != 1 || r.Unreferenced[0].HSMID != planted {
		t.Fatalf("unreferenced %+v", r.Unreferenced)
	}
}

// A reconcile of one key looks for that key's labels only: on a token shared with many other keys' objects it
// never scans the whole token, and still reports what the key's labels hold (a version after the latest that a
// restore left unreferenced, in a row; a stored version whose material is gone).
func TestReconcileOneKeyScansNothingElse(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	snap := snapshot(t, s)
	rotate(t, m, s, "k", "req-2")
	for i := 0; i < 1000; i++ { // other keys' objects on the shared token
		id := fmt.Sprintf("%032x", i+1)
		f.objects[id], f.labels[id] = true, versionLabel("other-mount", fmt.Sprintf("key-%d", i), 1)
	}
	m2, s2 := restored(f, snap) // storage knows v1 only; v2 is on the token
	k, _ := m2.Get(ctx, s2, "k")
	f.mu.Lock()
	delete(f.objects, k.Versions[1].HSMID)
	delete(f.labels, k.Versions[1].HSMID) // v1's material is gone
	f.scans, f.visited = 0, 0
	f.mu.Unlock()

	r, err := m2.Reconcile(ctx, s2, "k", false, false, who)
	if err != nil {
		t.Fatal(err)
	}
	if f.scans != 0 || f.visited > 2 {
		t.Fatalf("a reconcile of one key scanned the token %d times and looked at %d objects; want no scan and the key's own objects", f.scans, f.visited)
	}
	if len(r.Unreferenced) != 1 || r.Unreferenced[0].Version != 2 || len(r.Missing) != 1 || r.Missing[0].Version != 1 {
		t.Fatalf("report: unreferenced %+v, missing %+v", r.Unreferenced, r.Missing)
	}
}
