package cmk

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

const testPIN = "4321-backend"

var (
	softhsm    *softhsmtest.Env
	tokenCount atomic.Int32
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cmk-backend-test-")
	if err != nil {
		panic(err)
	}
	softhsm, err = softhsmtest.Setup(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv(LibraryEnv, softhsm.Library)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// countingStorage counts reads, to prove the hot path does none once a key is cached. Armed with a prefix, it
// stores the next write of a key with that prefix and then reports an error, as a storage backend that timed out
// after committing does (failAfterStoring), or fails it without storing anything (failUnstored). While journaling,
// it records every operation ("get k", "put k", "list k", "delete k").
type countingStorage struct {
	logical.Storage
	gets  atomic.Int64
	lists atomic.Int64

	failMu        sync.Mutex
	failStored    string
	failNotStored string

	journalMu  sync.Mutex
	journaling bool
	journal    []string

	slowPrefix atomic.Value // string: writes of keys with this prefix wait a moment before storing, as a slow backend's
}

// startJournal begins recording operations afresh.
func (c *countingStorage) startJournal() {
	c.journalMu.Lock()
	defer c.journalMu.Unlock()
	c.journaling, c.journal = true, nil
}

// stopJournal stops recording and returns what was recorded.
func (c *countingStorage) stopJournal() []string {
	c.journalMu.Lock()
	defer c.journalMu.Unlock()
	c.journaling = false
	return c.journal
}

func (c *countingStorage) record(op, key string) {
	c.journalMu.Lock()
	defer c.journalMu.Unlock()
	if c.journaling {
		c.journal = append(c.journal, op+" "+key)
	}
}

func (c *countingStorage) Delete(ctx context.Context, key string) error {
	c.record("delete", key)
	return c.Storage.Delete(ctx, key)
}

func (c *countingStorage) failUnstored(prefix string) {
	c.failMu.Lock()
	c.failNotStored = prefix
	c.failMu.Unlock()
}

func (c *countingStorage) failAfterStoring(prefix string) {
	c.failMu.Lock()
	c.failStored = prefix
	c.failMu.Unlock()
}

func (c *countingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	c.record("put", e.Key)
	if p, _ := c.slowPrefix.Load().(string); p != "" && strings.HasPrefix(e.Key, p) {
		time.Sleep(50 * time.Millisecond)
	}
	c.failMu.Lock()
	unstored := c.failNotStored != "" && strings.HasPrefix(e.Key, c.failNotStored)
	if unstored {
		c.failNotStored = ""
	}
	c.failMu.Unlock()
	if unstored {
		return errors.New("storage unavailable")
	}
	if err := c.Storage.Put(ctx, e); err != nil {
		return err
	}
	c.failMu.Lock()
	defer c.failMu.Unlock()
	if c.failStored != "" && strings.HasPrefix(e.Key, c.failStored) {
		c.failStored = ""
		return errors.New("storage timed out (the write may have happened)")
	}
	return nil
}

func (c *countingStorage) List(ctx context.Context, prefix string) ([]string, error) {
	c.lists.Add(1)
	c.record("list", prefix)
	return c.Storage.List(ctx, prefix)
}

func (c *countingStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	c.gets.Add(1)
	c.record("get", key)
	return c.Storage.Get(ctx, key)
}

// requestCount gives every request its own ID, as Vault does (a retried request keeps its ID).
var requestCount atomic.Int64

type testEnv struct {
	t       testing.TB
	b       *backend
	inmem   *logical.InmemStorage
	storage *countingStorage
	label   string
}

// newTestBackend mounts a backend on a token of its own and writes config/hsm.
func newTestBackend(t testing.TB) *testEnv {
	t.Helper()
	return newTestBackendWith(t, nil)
}

// newTestBackendWith is newTestBackend with Vault's system view sys (nil: logical.TestBackendConfig's).
func newTestBackendWith(t testing.TB, sys logical.SystemView) *testEnv {
	t.Helper()
	e := newUnconfiguredBackendWith(t, sys)
	e.label = fmt.Sprintf("backend-test-%d", tokenCount.Add(1))
	if err := softhsm.CreateToken(e.label, testPIN); err != nil {
		t.Fatal(err)
	}
	e.ok(e.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN, "pool_size": 2}))
	return e
}

// newImportBackend is newTestBackend with the raw-RSA OAEP fallback that SoftHSM 2.6 needs for imports wrapped
// with RSA-OAEP-SHA-256 (vault transit import's default): its OAEP takes SHA-1 only.
func newImportBackend(t testing.TB) *testEnv {
	t.Helper()
	e := newTestBackend(t)
	e.ok(e.write("config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true}))
	return e
}

func newUnconfiguredBackend(t testing.TB) *testEnv {
	t.Helper()
	return newUnconfiguredBackendWith(t, nil)
}

func newUnconfiguredBackendWith(t testing.TB, sys logical.SystemView) *testEnv {
	t.Helper()
	conf := logical.TestBackendConfig()
	if sys != nil {
		conf.System = sys
	}
	conf.BackendUUID = fmt.Sprintf("mount-%d", tokenCount.Add(1))
	conf.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testWriter{t}})
	inmem := &logical.InmemStorage{}
	st := &countingStorage{Storage: inmem}
	conf.StorageView = st
	b := newBackend(conf)
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.clean(context.Background()) })
	return &testEnv{t: t, b: b, inmem: inmem, storage: st}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (e *testEnv) request(op logical.Operation, path string, data map[string]interface{}) (*logical.Response, error) {
	return e.b.HandleRequest(context.Background(), &logical.Request{
		ID: fmt.Sprint("req-", requestCount.Add(1)), Operation: op, Path: path, Data: data, Storage: e.storage,
		DisplayName: "token-test", ClientTokenAccessor: "accessor-test",
	})
}

func (e *testEnv) write(path string, data map[string]interface{}) (*logical.Response, error) {
	return e.request(logical.UpdateOperation, path, data)
}

func (e *testEnv) read(path string) (*logical.Response, error) {
	return e.request(logical.ReadOperation, path, nil)
}

// ok fails the test unless the call succeeded.
func (e *testEnv) ok(resp *logical.Response, err error) *logical.Response {
	e.t.Helper()
	if err != nil || (resp != nil && resp.IsError()) {
		e.t.Fatalf("unexpected failure: err=%v resp=%v", err, respText(resp))
	}
	return resp
}

// status is the HTTP status a Vault server would send for this outcome (statusOf, for a write).
func status(resp *logical.Response, err error) int {
	return statusOf(&logical.Request{Operation: logical.UpdateOperation}, resp, err)
}

func respText(resp *logical.Response) string {
	if resp == nil {
		return "<nil>"
	}
	return fmt.Sprintf("%v", resp.Data)
}

// tokenObjects lists this mount's key objects as the token itself reports them, through a separate connection.
// Usage witnesses and the audit key are left out: they hold no key's material. Witnesses come with the first
// encryption of an AES version (hsm/witness.go) and are destroyed with their version, as
// TestUsageWitnessOnEveryToken shows; the audit key comes with the mount's first history event (history_chain_test.go).
func (e *testEnv) tokenObjects() []hsm.ObjectInfo {
	e.t.Helper()
	objs := e.allTokenObjects()
	out := objs[:0]
	for _, o := range objs {
		if !strings.Contains(o.Label, "/uses/") && !strings.Contains(o.Label, "/audit_key:v") {
			out = append(out, o)
		}
	}
	return out
}

// allTokenObjects lists every object of this mount on the token, through a separate connection.
func (e *testEnv) allTokenObjects() []hsm.ObjectInfo {
	e.t.Helper()
	tok, err := hsm.Open(hsm.Config{Library: softhsm.Library, TokenLabel: e.label, PIN: testPIN, PoolSize: 1}, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer tok.Close()
	objs, err := tok.ListObjects(context.Background(), "cmk/"+e.b.mountID+"/")
	if err != nil {
		e.t.Fatal(err)
	}
	return objs
}

// tick runs Vault's periodic function once, as the rollback manager does about once a minute.
func (e *testEnv) tick() {
	e.t.Helper()
	if err := e.b.periodic(context.Background(), &logical.Request{Storage: e.storage}); err != nil {
		e.t.Fatalf("periodic: %v", err)
	}
}

func (e *testEnv) history(name string) []map[string]interface{} {
	e.t.Helper()
	resp := e.ok(e.read("keys/" + name + "/history"))
	return resp.Data["events"].([]map[string]interface{})
}

func lastEvent(events []map[string]interface{}) map[string]interface{} {
	if len(events) == 0 {
		return nil
	}
	return events[len(events)-1]
}

// reopen mounts a new backend on the same storage and token, as after a restart or failover.
func (e *testEnv) reopen() *testEnv {
	e.t.Helper()
	conf := logical.TestBackendConfig()
	conf.BackendUUID = e.b.mountID
	conf.Logger = hclog.NewNullLogger()
	conf.StorageView = e.storage
	b := newBackend(conf)
	if err := b.Setup(context.Background(), conf); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { b.clean(context.Background()) })
	return &testEnv{t: e.t, b: b, inmem: e.inmem, storage: e.storage, label: e.label}
}

func TestScheduledRotation(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"auto_rotate_period": "24h"}))
	resp := e.ok(e.read("keys/k"))
	if resp.Data["auto_rotate_period"] != int64(86400) || resp.Data["next_rotation_time"] == "" {
		t.Fatalf("schedule: %v %v", resp.Data["auto_rotate_period"], resp.Data["next_rotation_time"])
	}
	e.tick()
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 1 {
		t.Fatal("rotated before its time")
	}
	// Fix the next rotation in the past: the next tick rotates, and the period takes over again.
	past := time.Now().Add(-time.Second).UTC().Format(time.RFC3339)
	e.ok(e.write("keys/k/config", map[string]interface{}{"next_rotation_time": past}))
	e.tick()
	resp = e.ok(e.read("keys/k"))
	if resp.Data["latest_version"] != 2 || resp.Data["last_rotated"] == "" {
		t.Fatalf("after the tick: %v, last_rotated %v", resp.Data["latest_version"], resp.Data["last_rotated"])
	}
	next, err := time.Parse(time.RFC3339, resp.Data["next_rotation_time"].(string))
	if err != nil || next.Before(time.Now().Add(23*time.Hour)) {
		t.Fatalf("next rotation %v after a scheduled one", resp.Data["next_rotation_time"])
	}
	ev := lastEvent(e.history("k"))
	if ev["event"] != "rotated" || ev["cause"] != "scheduled" || ev["display_name"] != "cmk scheduler" {
		t.Fatalf("history: %v", ev)
	}
	e.tick()
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 2 {
		t.Fatal("rotated twice for one due time")
	}
	// A one-off rotation time without a period.
	e.ok(e.write("keys/once", nil))
	e.ok(e.write("keys/once/config", map[string]interface{}{"next_rotation_time": past}))
	e.tick()
	if r := e.ok(e.read("keys/once")); r.Data["latest_version"] != 2 || r.Data["next_rotation_time"] != "" {
		t.Fatalf("one-off rotation: %v %v", r.Data["latest_version"], r.Data["next_rotation_time"])
	}
	// Mount default.
	e.ok(e.write("config/keys", map[string]interface{}{"auto_rotate_period": "48h"}))
	if r := e.ok(e.write("keys/defaulted", nil)); r.Data["auto_rotate_period"] != int64(172800) {
		t.Fatalf("mount default: %v", r.Data["auto_rotate_period"])
	}
	if got := status(e.write("keys/k/config", map[string]interface{}{"next_rotation_time": "tomorrow"})); got != 400 {
		t.Fatalf("bad next_rotation_time: %d", got)
	}
}

// The scheduler reads every key once per process, then only what is due: a tick's cost grows with the due
// keys, not with all keys.
func TestSchedulerDoesNotReadEveryKeyPerTick(t *testing.T) {
	e := newTestBackend(t)
	for i := 0; i < 40; i++ {
		e.ok(e.write(fmt.Sprintf("keys/k%d", i), map[string]interface{}{"auto_rotate_period": "24h"}))
	}
	fresh := e.reopen() // a new process: nothing cached
	fresh.tick()        // builds the schedule: reads every key once
	gets, lists := fresh.storage.gets.Load(), fresh.storage.lists.Load()
	for i := 0; i < 5; i++ {
		fresh.tick()
	}
	// One read of config/hsm per tick; no listing and no key read.
	if reads := fresh.storage.gets.Load() - gets; reads > 5 {
		t.Fatalf("%d storage reads in 5 ticks with nothing due and 40 keys", reads)
	}
	if n := fresh.storage.lists.Load() - lists; n != 0 {
		t.Fatalf("%d listings in 5 ticks with nothing due", n)
	}
	past := time.Now().Add(-time.Second).UTC().Format(time.RFC3339)
	fresh.ok(fresh.write("keys/k7/config", map[string]interface{}{"next_rotation_time": past}))
	fresh.tick()
	if r := fresh.ok(fresh.read("keys/k7")); r.Data["latest_version"] != 2 {
		t.Fatal("due key not rotated")
	}
	if r := fresh.ok(fresh.read("keys/k8")); r.Data["latest_version"] != 1 {
		t.Fatal("a key not due was rotated")
	}
}

// A destruction whose grace period has passed happens at the next tick.
func TestGracePeriodElapses(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 1}))
	e.ok(e.write("keys/k", map[string]interface{}{}))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/versions/1/destroy", nil))
	e.ok(e.write("keys/gone", nil))
	e.ok(e.write("keys/gone/config", map[string]interface{}{"deletion_allowed": true}))
	e.ok(e.request(logical.DeleteOperation, "keys/gone", nil))
	time.Sleep(1100 * time.Millisecond)
	e.tick()
	if s := e.ok(e.read("keys/k/versions/1")).Data["state"]; s != "destroyed" {
		t.Fatalf("version state %v after its grace period", s)
	}
	if r, _ := e.read("keys/gone"); r != nil {
		t.Fatal("deleted key still there after its grace period")
	}
	for _, o := range e.tokenObjects() {
		if strings.Contains(o.Label, "/gone/") {
			t.Fatalf("object %s of a deleted key left on the token", o.Label)
		}
	}
	if ev := lastEvent(e.history("gone")); ev["event"] != "deleted" {
		t.Fatalf("the deleted key's history: %v", ev)
	}
}

// The WAL rollback destroys objects whose version never reached storage, and never one storage references.
// A crash between the HSM call and the storage write leaves material and a WAL entry, and no metadata. The
// rollback adopts material generated on the token under the version's label (after a storage restore it may
// already protect data), destroys what may not be adopted, and touches nothing storage references.
func TestWALRollbackAdoptsOrDestroysOnlyUncommittedObjects(t *testing.T) {
	e := newTestBackend(t)
	ctx := context.Background()
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "kept")

	tok, _, err := e.b.getToken(ctx, e.storage)
	if err != nil {
		t.Fatal(err)
	}
	made := func(id []byte, version int, label string) {
		t.Helper()
		if _, err := framework.PutWAL(ctx, e.storage, keys.WALKindVersion, &keys.WALEntry{Name: "k", Version: version, HSMID: hex.EncodeToString(id)}); err != nil {
			t.Fatal(err)
		}
		if _, err := tok.GenerateVersion(ctx, hsm.AES256, id, label, hsm.HMACKeySize); err != nil {
			t.Fatal(err)
		}
	}
	adoptable := []byte("0123456789abcdef")
	made(adoptable, 2, "cmk/"+e.b.mountID+"/k/v2")
	// Material the rule does not adopt: not under the label of the version its WAL entry names.
	stray := []byte("fedcba9876543210")
	made(stray, 3, "cmk/"+e.b.mountID+"/k/elsewhere")
	// And a WAL entry left behind for a version that did commit.
	p, _ := e.b.keys.Get(ctx, e.storage, "k")
	if _, err := framework.PutWAL(ctx, e.storage, keys.WALKindVersion, &keys.WALEntry{Name: "k", Version: 1, HSMID: p.Versions[1].HSMID}); err != nil {
		t.Fatal(err)
	}
	if n := len(e.tokenObjects()); n != 5 {
		t.Fatalf("%d objects before rollback, want 5 (two orphans' keys and HMAC secrets, the committed version's key)", n)
	}
	resp, err := e.b.HandleRequest(ctx, &logical.Request{
		Operation: logical.RollbackOperation, Path: "", Storage: e.storage, Data: map[string]interface{}{"immediate": true},
	})
	if err != nil || (resp != nil && resp.IsError()) {
		t.Fatalf("rollback: %v %s", err, respText(resp))
	}
	if n := len(e.tokenObjects()); n != 3 {
		t.Fatalf("%d objects after rollback, want 3 (the committed version's, the adopted version's two)", n)
	}
	if decryptOK(t, e, "k", ct) != "kept" {
		t.Fatal("committed version damaged by rollback")
	}
	k, _ := e.b.keys.Get(ctx, e.storage, "k")
	if k.LatestVersion != 2 || k.Versions[2].HSMID != hex.EncodeToString(adoptable) || !k.Versions[2].EncryptionsUnknown {
		t.Fatalf("after rollback: latest %d, %+v", k.LatestVersion, k.Versions[2])
	}
	// Whether the adopted version encrypted anything is unknown (storage may have been restored from a snapshot
	// taken during its rotation): the next encryption rotates.
	if ct := encryptOK(t, e, "k", "after the adoption"); !strings.HasPrefix(ct, "vault:v3:") {
		t.Fatalf("encryption after the rollback's adoption: %s", ct)
	}
	if _, _, err := tok.EncryptGCM(ctx, stray, make([]byte, 12), nil, nil); err == nil {
		t.Fatal("the stray object is still usable")
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func encryptOK(t *testing.T, e *testEnv, key, plaintext string) string {
	t.Helper()
	var op logical.Operation = logical.UpdateOperation
	if p, _ := e.b.keys.Get(context.Background(), e.storage, key); p == nil {
		op = logical.CreateOperation
	}
	resp := e.ok(e.request(op, "encrypt/"+key, map[string]interface{}{"plaintext": b64(plaintext)}))
	return resp.Data["ciphertext"].(string)
}

func decryptOK(t *testing.T, e *testEnv, key, ct string) string {
	t.Helper()
	resp := e.ok(e.write("decrypt/"+key, map[string]interface{}{"ciphertext": ct}))
	pt, err := base64.StdEncoding.DecodeString(resp.Data["plaintext"].(string))
	if err != nil {
		t.Fatal(errors.New("plaintext is not base64"))
	}
	return string(pt)
}
