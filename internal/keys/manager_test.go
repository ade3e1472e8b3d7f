package keys

import (
	"context"
	"crypto"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// fakeHSM keeps the objects the model asks for, by CKA_ID, in memory: enough to test the funnel's bookkeeping
// without a token (the real tokens are tested in the hsm package and, through the backend, in the root package).
type fakeHSM struct {
	// Crypto is left nil: the bookkeeping these tests check uses no key material (the use of keys is tested on
	// real tokens, through the backend).
	Crypto
	mu       sync.Mutex
	objects  map[string]bool
	hmac     map[string]bool
	labels   map[string]string // CKA_ID → CKA_LABEL
	imported map[string]bool   // not generated on the token
	finds    int               // FindVersion calls
	scans    int               // ListObjects calls: scans of the whole token
	visited  int               // objects ListObjects and ObjectsLabelled looked at
	noLocal  bool              // the token leaves CKA_LOCAL false on what it generates (NSS)
	failGen  bool              // GenerateVersion fails
	uses     map[string]uint64 // CKA_ID → usage witness
	// copiesBarred: CKA_ID → whether the model last barred (true) or allowed (false) the version's working copies
	copiesBarred map[string]bool
	// hideOnce: labels whose objects the next search that would see them misses, as SoftHSM 2.6.1's object store
	// hides an object from one search now and then (another process writing, parallel writes).
	hideOnce map[string]bool
}

// hidden says whether label is hidden from this search, and forgets it for the next ones. Called under f.mu.
func (f *fakeHSM) hidden(label string) bool {
	if f.hideOnce[label] {
		delete(f.hideOnce, label)
		return true
	}
	return false
}

func newFakeHSM() *fakeHSM {
	return &fakeHSM{objects: map[string]bool{}, hmac: map[string]bool{}, labels: map[string]string{}, imported: map[string]bool{}, hideOnce: map[string]bool{}}
}

func (f *fakeHSM) GenerateVersion(_ context.Context, _ hsm.Algorithm, id []byte, label string, _ int) (crypto.PublicKey, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failGen {
		return nil, errors.New("the token refused")
	}
	f.objects[hex.EncodeToString(id)] = true
	f.labels[hex.EncodeToString(id)] = label
	return nil, nil
}

func (f *fakeHSM) ImportVersion(_ context.Context, r hsm.ImportRequest) (crypto.PublicKey, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := hex.EncodeToString(r.ID)
	f.objects[id], f.labels[id], f.imported[id] = true, r.Label, true
	return nil, "fake", nil
}

func (f *fakeHSM) EnsureHMACKey(_ context.Context, id []byte, _ string, _ int, _ bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hmac[hex.EncodeToString(id)] = true
	return nil
}

func (f *fakeHSM) CheckHMACSecret(context.Context, []byte, int, bool) error { return nil }

func (f *fakeHSM) DestroyKeys(_ context.Context, id []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	if f.objects[hex.EncodeToString(id)] {
		n++
	}
	delete(f.objects, hex.EncodeToString(id))
	delete(f.hmac, hex.EncodeToString(id))
	delete(f.labels, hex.EncodeToString(id))
	return n, nil
}

// FindVersion describes the objects labelled label as a real token would: generated ones are local and never
// extractable, imported ones are not local.
func (f *fakeHSM) FindVersion(_ context.Context, _ hsm.Algorithm, label string, _ int) ([]hsm.Found, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.finds++
	var out []hsm.Found
	if f.hidden(label) {
		return nil, nil
	}
	for id, l := range f.labels {
		if l != label {
			continue
		}
		raw, _ := hex.DecodeString(id)
		out = append(out, hsm.Found{ID: raw, Label: l, Class: "secret_key", KeyType: "aes", Local: !f.imported[id] && !f.noLocal, LocalReported: true,
			Sensitive: true, AlwaysSensitive: true, NeverExtractable: !f.imported[id], HMACSecret: f.hmac[id]})
	}
	return out, nil
}

func (f *fakeHSM) ListObjects(_ context.Context, prefix string) ([]hsm.ObjectInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.scans++
	f.visited += len(f.labels)
	var out []hsm.ObjectInfo
	for id, l := range f.labels {
		if strings.HasPrefix(l, prefix) {
			raw, _ := hex.DecodeString(id)
			out = append(out, hsm.ObjectInfo{ID: raw, Label: l, Class: "secret_key", KeyType: "aes", Token: true})
		}
	}
	return out, nil
}

// ObjectsLabelled finds objects by exact label, as a token that searches by CKA_LABEL does: it looks at the
// matching objects only.
func (f *fakeHSM) ObjectsLabelled(_ context.Context, labels []string) ([]hsm.ObjectInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []hsm.ObjectInfo
	for _, want := range labels {
		if f.hidden(want) {
			continue
		}
		for id, l := range f.labels {
			if l == want {
				f.visited++
				raw, _ := hex.DecodeString(id)
				out = append(out, hsm.ObjectInfo{ID: raw, Label: l, Class: "secret_key", KeyType: "aes", Token: true})
			}
		}
	}
	return out, nil
}

// LabelledIDs is the token's object index: it sees every object, hidden from searches or not.
func (f *fakeHSM) LabelledIDs(_ context.Context, label string) ([][]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out [][]byte
	for id, l := range f.labels {
		if l == label {
			raw, _ := hex.DecodeString(id)
			out = append(out, raw)
		}
	}
	return out, nil
}

func (f *fakeHSM) WorkingCopiesAllowed(id []byte, allowed bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.copiesBarred == nil {
		f.copiesBarred = map[string]bool{}
	}
	f.copiesBarred[hex.EncodeToString(id)] = !allowed
}

func (f *fakeHSM) UsageWitness(_ context.Context, id []byte) (uint64, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.uses[hex.EncodeToString(id)]
	return n, ok, nil
}

func (f *fakeHSM) RaiseUsageWitness(_ context.Context, id []byte, _ string, n uint64) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.uses == nil {
		f.uses = map[string]uint64{}
	}
	before := f.uses[hex.EncodeToString(id)]
	f.uses[hex.EncodeToString(id)] = max(before, n)
	return before, nil
}

func (f *fakeHSM) DestroyUnlessLabelled(_ context.Context, id []byte, versionLabel string) (bool, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := hex.EncodeToString(id)
	if !f.objects[key] {
		return false, 0, nil
	}
	if l := f.labels[key]; l == versionLabel || strings.HasPrefix(l, versionLabel+"/") {
		return true, 0, nil
	}
	delete(f.objects, key)
	delete(f.hmac, key)
	delete(f.labels, key)
	return false, 1, nil
}

func (f *fakeHSM) has(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.objects[id]
}

// storedButFailing stores every write and then, for keys with the prefix while armed, reports an error: a write
// whose outcome the caller cannot know (a storage backend that timed out after committing).
type storedButFailing struct {
	logical.Storage
	mu     sync.Mutex
	prefix string
}

func (s *storedButFailing) arm(prefix string) { s.mu.Lock(); s.prefix = prefix; s.mu.Unlock() }

func (s *storedButFailing) Put(ctx context.Context, e *logical.StorageEntry) error {
	if err := s.Storage.Put(ctx, e); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.prefix != "" && strings.HasPrefix(e.Key, s.prefix) {
		s.prefix = ""
		return errors.New("storage timed out (the write may have happened)")
	}
	return nil
}

func newManager(t *testing.T) (*Manager, *fakeHSM, *storedButFailing) {
	f := newFakeHSM()
	m := NewManager(hclog.NewNullLogger(), "mount", func(context.Context, logical.Storage) (HSM, *Nonces, error) { return f, nil, nil })
	m.Connected = func() HSM { return f }
	return m, f, &storedButFailing{Storage: &logical.InmemStorage{}}
}

var who = Actor{DisplayName: "test", RequestID: "req-1"}

// Defect a: a rotation whose key write reports an error after storing destroyed the new version's objects, so
// every later encryption under it failed. Now nothing is destroyed, the cache is dropped, the next read sees what
// storage holds, and the WAL rollback (which reads storage first) keeps what is referenced.
func TestFailedWriteThatStoredDestroysNothing(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	s.arm(PolicyPrefix + "k")
	_, err := m.Update(ctx, s, "k", Actor{RequestID: "req-2"}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) })
	if err == nil {
		t.Fatal("the failed write was not reported")
	}
	k, err := m.Get(ctx, s, "k")
	if err != nil || k.LatestVersion != 2 {
		t.Fatalf("after the failed write storage holds version 2, the manager says %v (%v)", k, err)
	}
	if !f.has(k.Versions[2].HSMID) {
		t.Fatal("version 2's objects were destroyed though storage references them")
	}
	// The WAL rollback, later, destroys nothing that storage references.
	entries, err := framework.ListWAL(ctx, s)
	if err != nil || len(entries) != 1 {
		t.Fatalf("WAL entries %v, %v", entries, err)
	}
	w, err := framework.GetWAL(ctx, s, entries[0])
	if err != nil || w == nil {
		t.Fatal(err)
	}
	if err := m.RollbackVersion(ctx, s, w.Data); err != nil {
		t.Fatal(err)
	}
	if !f.has(k.Versions[2].HSMID) {
		t.Fatal("the rollback destroyed a stored version's objects")
	}
}

// The same rollback destroys the objects of a version storage never came to hold.
func TestRollbackDestroysWhatStorageNeverHeld(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	orphan := "0123456789abcdef0123456789abcdef"
	f.objects[orphan] = true
	if err := m.RollbackVersion(ctx, s, &WALEntry{Name: "k", Version: 2, HSMID: orphan}); err != nil {
		t.Fatal(err)
	}
	if f.has(orphan) {
		t.Fatal("an unreferenced version's objects survived the rollback")
	}
}

// Defect b: history was recorded after the key's lock was released, so concurrent changes lost events (each
// appends to the same page by read, append, write). Twenty parallel state changes on one key leave twenty events.
func TestNoHistoryEventIsLost(t *testing.T) {
	m, _, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if _, err := m.Update(ctx, s, "k", Actor{RequestID: fmt.Sprint("rotate-", i)}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) }); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for i := 1; i <= 20; i++ {
		wg.Add(1)
		go func(n int) {
			defer wg.Done()
			action := map[bool]string{true: "disable", false: "destroy"}[n%2 == 0]
			if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.SetVersionState(n, action, time.Now().Add(time.Hour), false) }); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	events, err := ReadHistory(ctx, s, "k", 0)
	if err != nil {
		t.Fatal(err)
	}
	changes := 0
	for _, ev := range events {
		if ev.Event == "version_disabled" || ev.Event == "version_destroy_scheduled" {
			changes++
		}
	}
	if changes != 20 {
		t.Fatalf("%d state-change events for 20 parallel changes", changes)
	}
}

// Defect c: a version scheduled for destruction (or destroyed) got an HMAC secret made on its first HMAC. The
// state is checked under the key's lock, and nothing is made.
func TestNoHMACSecretForAVersionOnItsWayOut(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Update(ctx, s, "k", Actor{RequestID: "r2"}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) }); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Update(ctx, s, "k", who, func(tx *Tx) error {
		return tx.SetVersionState(1, "destroy", time.Now().Add(time.Hour), false)
	}); err != nil {
		t.Fatal(err)
	}
	_, err := m.Update(ctx, s, "k", who, func(tx *Tx) error { return tx.EnsureHMACSecret(1, true) })
	if !IsCaller(err) || !strings.Contains(err.Error(), StateDestroyScheduled) {
		t.Fatalf("HMAC secret for a destroy-scheduled version: %v", err)
	}
	if len(f.hmac) != 0 {
		t.Fatal("an HMAC secret was made")
	}
	k, _ := m.Get(ctx, s, "k")
	if !k.Versions[1].HMACDeferred {
		t.Fatal("the version records a secret it has not")
	}
}

// Defect d: with a per-version limit, one request crossing several limits rotates each time; the same request's
// rotations for one exhausted version add one version however often they are asked (batch items, Vault's retry).
func TestUsageRotationsOfOneRequest(t *testing.T) {
	m, _, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	req := Actor{RequestID: "encrypt-batch"}
	for v := 1; v <= 3; v++ {
		for i := 0; i < 2; i++ { // twice for the same version: once
			k, err := m.rotateForUsage(ctx, s, "k", v, req)
			if err != nil || k.LatestVersion != v+1 {
				t.Fatalf("usage rotation of version %d (call %d): latest %v, %v", v, i, k.LatestVersion, err)
			}
		}
	}
	// A manual rotation retried by Vault (the same request ID) adds one version.
	for i := 0; i < 2; i++ {
		k, err := m.Update(ctx, s, "k", Actor{RequestID: "manual-1"}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) })
		if err != nil || k.LatestVersion != 5 {
			t.Fatalf("retried manual rotation: %d, %v", k.LatestVersion, err)
		}
	}
}

// A change that fails after making material, before anything was stored, destroys what it made.
func TestFailedChangeDestroysItsMaterial(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	before := len(f.objects)
	_, err := m.Update(ctx, s, "k", Actor{RequestID: "x"}, func(tx *Tx) error {
		if err := tx.Rotate("manual", VersionType{}); err != nil {
			return err
		}
		return Callerf("changed my mind")
	})
	if !IsCaller(err) || len(f.objects) != before {
		t.Fatalf("%v; %d objects, %d before", err, len(f.objects), before)
	}
	if k, _ := m.Get(ctx, s, "k"); k.LatestVersion != 1 {
		t.Fatalf("latest %d after a failed change", k.LatestVersion)
	}
}

// The token hears of every version that stops serving (its working copies are destroyed and barred) and of every
// one that serves again, once per change of state: a version's disable and enable, a raised min_decryption_version,
// the key's disable and re-enable, a scheduled deletion and its cancellation.
func TestWorkingCopiesFollowWhatServes(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96, DeletionAllowed: true}, who, nil); err != nil {
		t.Fatal(err)
	}
	requests := 1
	update := func(change func(tx *Tx) error) *Key {
		t.Helper()
		requests++
		k, err := m.Update(ctx, s, "k", Actor{DisplayName: "test", RequestID: fmt.Sprintf("req-%d", requests)}, change)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	k := update(func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) })
	v1, v2 := k.Versions[1].HSMID, k.Versions[2].HSMID
	barred := func(id string) (bool, bool) {
		f.mu.Lock()
		defer f.mu.Unlock()
		b, told := f.copiesBarred[id]
		return b, told
	}
	if _, told := barred(v2); told {
		t.Fatal("a new version's copies were mentioned: they are allowed as any serving version's")
	}
	update(func(tx *Tx) error { return tx.SetVersionState(1, "disable", time.Time{}, false) })
	if b, _ := barred(v1); !b {
		t.Fatal("a disabled version's copies are not barred")
	}
	if _, told := barred(v2); told {
		t.Fatal("version 2, still serving, was mentioned")
	}
	update(func(tx *Tx) error { return tx.SetVersionState(1, "enable", time.Time{}, false) })
	if b, told := barred(v1); b || !told {
		t.Fatal("a re-enabled version's copies are not allowed again")
	}
	two := 2
	update(func(tx *Tx) error { return tx.Configure(Settings{MinDecryptionVersion: &two}) })
	if b, _ := barred(v1); !b {
		t.Fatal("a version below min_decryption_version keeps its copies")
	}
	update(func(tx *Tx) error { tx.SetDisabled(true); return nil })
	if b, _ := barred(v2); !b {
		t.Fatal("a disabled key's versions keep their copies")
	}
	update(func(tx *Tx) error { tx.SetDisabled(false); return nil })
	if b, _ := barred(v2); b {
		t.Fatal("a re-enabled key's version stays barred")
	}
	update(func(tx *Tx) error { return tx.Delete(time.Hour) })
	if b, _ := barred(v2); !b {
		t.Fatal("a key scheduled for deletion keeps its copies")
	}
	update(func(tx *Tx) error { return tx.CancelDeletion() })
	if b, _ := barred(v2); b {
		t.Fatal("a key whose deletion was cancelled stays barred")
	}
	if b, _ := barred(v1); !b {
		t.Fatal("version 1, still below min_decryption_version, was allowed with its key")
	}
}

// A change made by another node (storage changed underneath, Invalidate) bars every version's working copies on
// this one; reading the key again allows them for the versions that serve as storage says.
func TestInvalidationBarsCopiesUntilTheKeyIsReadAgain(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	_, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil)
	if err != nil {
		t.Fatal(err)
	}
	k, err := m.Update(ctx, s, "k", Actor{RequestID: "req-2"}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) })
	if err != nil {
		t.Fatal(err)
	}
	// Another node disabled version 1: storage says so, and this node's cache does not know yet.
	changed := k.Clone()
	changed.withVersion(1, func(v *Version) { v.State = StateDisabled })
	if err := store(ctx, s, changed, []int{1}); err != nil {
		t.Fatal(err)
	}
	m.Invalidate(PolicyPrefix + "k")
	barred := func(n int) bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.copiesBarred[k.Versions[n].HSMID]
	}
	if !barred(1) || !barred(2) {
		t.Fatal("an invalidated key's versions keep their copies")
	}
	if _, err := m.Get(ctx, s, "k"); err != nil {
		t.Fatal(err)
	}
	if !barred(1) || barred(2) {
		t.Fatalf("after reading the key again: version 1 barred %v (disabled: want true), version 2 barred %v (want false)", barred(1), barred(2))
	}
}
