package cmk

import (
	"context"
	"crypto"
	"crypto/rand"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
)

// snapshotStorage copies every entry of the mount's storage, as `vault operator raft snapshot save` keeps it.
func (e *testEnv) snapshotStorage() *logical.InmemStorage {
	e.t.Helper()
	ctx := context.Background()
	names, err := logical.CollectKeys(ctx, e.inmem)
	if err != nil {
		e.t.Fatal(err)
	}
	snap := &logical.InmemStorage{}
	for _, n := range names {
		entry, err := e.inmem.Get(ctx, n)
		if err != nil || entry == nil {
			e.t.Fatalf("%s: %v", n, err)
		}
		if err := snap.Put(ctx, entry); err != nil {
			e.t.Fatal(err)
		}
	}
	return snap
}

// restoredFrom mounts a new backend on snap and the same token: the node after `vault operator raft snapshot
// restore` (the mount keeps its ID, so its labels are the same).
func (e *testEnv) restoredFrom(snap *logical.InmemStorage) *testEnv {
	e.t.Helper()
	conf := logical.TestBackendConfig()
	conf.BackendUUID = e.b.mountID
	conf.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testWriter{e.t}})
	st := &countingStorage{Storage: snap}
	conf.StorageView = st
	b := newBackend(conf)
	if err := b.Setup(context.Background(), conf); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { b.clean(context.Background()) })
	return &testEnv{t: e.t, b: b, inmem: snap, storage: st, label: e.label}
}

// labelsOnce fails unless every object label on the token is carried by one object per class.
func (e *testEnv) labelsOnce() {
	e.t.Helper()
	seen := map[string]bool{}
	for _, o := range e.tokenObjects() {
		k := o.Class + " " + o.Label
		if seen[k] {
			e.t.Fatalf("two %s objects labelled %s: a version number was used twice", o.Class, o.Label)
		}
		seen[k] = true
	}
}

// The restore drill on the backend: ciphertexts and signatures issued after the snapshot still decrypt and verify
// once storage is restored from it, versions stay contiguous, and no number names two keys.
func TestRestoredStorageServesVersionsFromTheToken(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	e.ok(e.write("keys/r", map[string]interface{}{"type": "rsa-2048"}))
	before := encryptOK(t, e, "k", "before the snapshot")
	snap := e.snapshotStorage()

	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/s/rotate", nil))
	e.ok(e.write("keys/r/rotate", nil))
	after := encryptOK(t, e, "k", "after the snapshot")
	sig := e.ok(e.write("sign/s", map[string]interface{}{"input": b64("signed after")})).Data["signature"].(string)
	rsaSig := e.ok(e.write("sign/r", map[string]interface{}{"input": b64("signed after")})).Data["signature"].(string)
	if !strings.HasPrefix(after, "vault:v2:") || !strings.HasPrefix(sig, "vault:v2:") {
		t.Fatalf("issued %s and %s", after, sig)
	}

	r := e.restoredFrom(snap)
	report := r.ok(r.read("reconcile")).Data
	unref := report["unreferenced_objects"].([]interface{})
	if len(unref) != 3 || len(report["missing_objects"].([]interface{})) != 0 {
		t.Fatalf("reconcile after the restore: %v", report)
	}
	for _, o := range unref {
		if o := o.(map[string]interface{}); o["adoptable"] != true {
			t.Fatalf("not adoptable: %v", o)
		}
	}
	if got := r.ok(r.read("keys/k")).Data["latest_version"]; fmt.Sprint(got) != "1" {
		t.Fatalf("a reconcile read changed the key: latest %v", got)
	}

	if decryptOK(t, r, "k", before) != "before the snapshot" || decryptOK(t, r, "k", after) != "after the snapshot" {
		t.Fatal("plaintexts differ")
	}
	if !verifyOK(t, r, "s", map[string]interface{}{"input": b64("signed after"), "signature": sig}) ||
		!verifyOK(t, r, "r", map[string]interface{}{"input": b64("signed after"), "signature": rsaSig}) {
		t.Fatal("a signature made after the snapshot does not verify after the restore")
	}
	v2 := r.ok(r.read("keys/k")).Data["versions"].(map[string]interface{})["2"].(map[string]interface{})
	if v2["adopted_time"] == nil || v2["encryptions_unknown"] != nil {
		t.Fatalf("adopted version as read: %v", v2)
	}
	if ev := lastEvent(r.history("k")); ev["event"] != "version_adopted" || ev["cause"] != "storage restore" {
		t.Fatalf("history: %v", ev)
	}
	// The token witnessed the adopted version's encryptions: it goes on encrypting, counting from the witness.
	if ct := encryptOK(t, r, "k", "new"); !strings.HasPrefix(ct, "vault:v2:") {
		t.Fatalf("encryption after adoption: %s", ct)
	}
	// The rotation of r's key after the restore adopts v2 before it makes v3.
	rk := r.ok(r.write("keys/r/rotate", nil)).Data
	if fmt.Sprint(rk["latest_version"]) != "3" {
		t.Fatalf("rotation after the restore: %v", rk["latest_version"])
	}
	r.labelsOnce()
	for _, name := range []string{"k", "s", "r"} {
		versions := r.ok(r.read("keys/" + name)).Data["versions"].(map[string]interface{})
		for n := 1; n <= len(versions); n++ {
			if versions[fmt.Sprint(n)] == nil {
				t.Fatalf("key %s: versions not contiguous: %v", name, versions)
			}
		}
	}
	report = r.ok(r.read("reconcile")).Data
	if len(report["unreferenced_objects"].([]interface{})) != 0 || len(report["missing_objects"].([]interface{})) != 0 {
		t.Fatalf("after the drill: %v", report)
	}
}

// adopt=true adopts what the rule allows without any request naming it; a version whose material is gone is
// reported missing, never invented.
func TestReconcileAdoptsOnRequest(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	snap := e.snapshotStorage()
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))

	r := e.restoredFrom(snap)
	resp := r.ok(r.write("keys/k/reconcile", map[string]interface{}{"adopt": true}))
	if adopted := resp.Data["adopted"].([]interface{}); len(adopted) != 2 {
		t.Fatalf("adopted %v", resp.Data)
	}
	if got := r.ok(r.read("keys/k")).Data["latest_version"]; fmt.Sprint(got) != "3" {
		t.Fatalf("latest after adopt: %v", got)
	}
	if code := status(r.read("keys/nope/reconcile")); code != 400 {
		t.Fatalf("reconcile of an unknown key: %d", code)
	}
	if code := status(r.write("keys/k/reconcile", map[string]interface{}{"adpot": true})); code != 400 {
		t.Fatalf("a misspelt field: %d", code)
	}
}

// Material on the token that the engine did not generate there (here: imported with BYOK) is reported and never
// adopted; the import that would take its number is refused with 409 and leaves nothing.
func TestImportedVersionAfterRestoreBlocksItsNumber(t *testing.T) {
	e := newImportBackend(t)
	importAES(t, e, "imp")
	snap := e.snapshotStorage()
	importAESVersion(t, e, "imp")
	afterSnapshot := encryptOK(t, e, "imp", "under the imported v2")

	r := e.restoredFrom(snap)
	objects := len(r.tokenObjects())
	material := make([]byte, 32)
	rand.Read(material)
	resp, err := r.write("keys/imp/import_version", map[string]interface{}{"ciphertext": wrapFor(t, r, crypto.SHA256, material)})
	// The advice is what would work: the object is adoptable on the operator's word (reconcile says so below).
	if code := status(resp, err); code != 409 || !strings.Contains(fmt.Sprint(err), "write reconcile/adopt-unverified/imp") {
		t.Fatalf("an import over imported material: %d %v %s", code, err, respText(resp))
	}
	if len(r.tokenObjects()) != objects {
		t.Fatal("the refused import left objects")
	}
	unref := r.ok(r.read("keys/imp/reconcile")).Data["unreferenced_objects"].([]interface{})
	if len(unref) != 1 || unref[0].(map[string]interface{})["adoptable"] != false ||
		unref[0].(map[string]interface{})["adoptable_by_operator"] != true ||
		!strings.Contains(fmt.Sprint(unref[0].(map[string]interface{})["reason"]), "CKA_LOCAL") {
		t.Fatalf("reconcile: %v", unref)
	}
	if code := status(r.read("keys/imp/reconcile")); code != 200 {
		t.Fatalf("reconcile read: %d", code)
	}
	// Adoption on the operator's word is a sudo path of its own, never a field of reconcile (sudo is per path).
	resp, err = r.write("keys/imp/reconcile", map[string]interface{}{"adopt": true, "adopt_unverified": true})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "reconcile/adopt-unverified") {
		t.Fatalf("adopt_unverified as a field: %d %s", status(resp, err), respText(resp))
	}
	if resp := r.ok(r.write("keys/imp/reconcile", map[string]interface{}{"adopt": true})); len(resp.Data["adopted"].([]interface{})) != 0 {
		t.Fatalf("adopt without the operator's word adopted imported material: %v", resp.Data)
	}
	// The operator knows it is their own import: on their word it is adopted, and the history says so.
	resp = r.ok(r.write("reconcile/adopt-unverified/imp", nil))
	if len(resp.Data["adopted"].([]interface{})) != 1 {
		t.Fatalf("reconcile/adopt-unverified: %v", resp.Data)
	}
	if decryptOK(t, r, "imp", afterSnapshot) != "under the imported v2" {
		t.Fatal("the adopted import does not decrypt what it encrypted")
	}
	if ev := lastEvent(r.history("imp")); ev["cause"] != "operator" {
		t.Fatalf("history: %v", ev)
	}
}

// importAES imports a new AES-256 key name (BYOK), material wrapped as `vault transit import` wraps it.
func importAES(t *testing.T, e *testEnv, name string) {
	t.Helper()
	material := make([]byte, 32)
	rand.Read(material)
	e.ok(e.write("keys/"+name+"/import", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)}))
}

// importAESVersion imports a new version of key name.
func importAESVersion(t *testing.T, e *testEnv, name string) {
	t.Helper()
	material := make([]byte, 32)
	rand.Read(material)
	e.ok(e.write("keys/"+name+"/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)}))
}

// Issue 19, finding 2: a restore rolled back the usage counts of every version storage kept, and a version that
// had used its max_encryptions_per_version encrypted that many again. The token's usage witness keeps the count.
func TestRestoreGivesNoVersionItsBudgetBack(t *testing.T) {
	e := newTestBackend(t)
	// 100 encryptions are reserved 16 at a time: the snapshot holds a reservation of 16.
	const limit = 100
	e.ok(e.write("keys/k", map[string]interface{}{"max_encryptions_per_version": limit}))
	encryptOK(t, e, "k", "before the snapshot")
	snap := e.snapshotStorage()
	const used = limit - 1 // one short of the limit: no rotation yet
	for i := 1; i < used; i++ {
		encryptOK(t, e, "k", "after the snapshot")
	}
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 1 {
		t.Fatalf("rotated early: latest %v", r.Data["latest_version"])
	}
	// Storage forgets the encryptions made after the snapshot; version 1 may make only what is left of its limit.
	r := e.restoredFrom(snap)
	v1 := 0
	for i := 0; i < limit; i++ {
		if strings.HasPrefix(encryptOK(t, r, "k", "after the restore"), "vault:v1:") {
			v1++
		}
	}
	if v1 > limit-used {
		t.Fatalf("after the restore version 1 made %d more encryptions; %d of its %d were used before", v1, used, limit)
	}
}

// Issue 19 item 24: a 409 never advises an adoption that would do nothing. Here storage is restored to before a
// key existed and the key is created again as another type: the old material under v1's label is no key of the
// new type, so reconcile reports it adoptable_by_operator false, and the 409 says to remove it, not to adopt it.
// (Created again as the same type, the key adopts it: TestKeyMadeAgainAfterRestoreAdoptsItsMaterial.)
func TestNumberTakenAdviceMatchesReconcile(t *testing.T) {
	e := newTestBackend(t)
	snap := e.snapshotStorage()
	e.ok(e.write("keys/k", map[string]interface{}{"type": "ecdsa-p256"}))
	r := e.restoredFrom(snap)
	resp, err := r.write("keys/k", nil)
	if status(resp, err) != 409 || !strings.Contains(fmt.Sprint(err), "removes it from the token") ||
		strings.Contains(fmt.Sprint(err), "adopt-unverified") || strings.Contains(fmt.Sprint(err), "adopt_unverified") {
		t.Fatalf("creation over an earlier key's material: %d %v", status(resp, err), err)
	}
	unref := r.ok(r.read("reconcile")).Data["unreferenced_objects"].([]interface{})
	if len(unref) != 1 || unref[0].(map[string]interface{})["adoptable_by_operator"] != false {
		t.Fatalf("reconcile: %v", unref)
	}
	// And adopting on the operator's word indeed takes nothing.
	if resp := r.ok(r.write("reconcile/adopt-unverified", nil)); len(resp.Data["adopted"].([]interface{})) != 0 {
		t.Fatalf("adopted: %v", resp.Data)
	}
}

// Issue 19, finding 1: storage restored to before a key existed, and the key made again under its name, as an
// application's upsert does: the key adopts its material, so what was encrypted after the snapshot decrypts again.
func TestKeyMadeAgainAfterRestoreAdoptsItsMaterial(t *testing.T) {
	e := newTestBackend(t)
	snap := e.snapshotStorage()
	ct := encryptOK(t, e, "k", "after the snapshot") // upsert creates the key
	r := e.restoredFrom(snap)
	if again := encryptOK(t, r, "k", "after the restore"); !strings.HasPrefix(again, "vault:v2:") {
		t.Fatalf("the key made again encrypts with %s, not a version of its own", again[:9])
	}
	if got := decryptOK(t, r, "k", ct); got != "after the snapshot" {
		t.Fatalf("decrypted %q", got)
	}
	r.labelsOnce()
}
