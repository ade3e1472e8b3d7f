package cmk

import (
	"context"
	"crypto"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
)

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

func TestUsageLimitRotates(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"max_encryptions_per_version": 10}))
	for i := 1; i <= 10; i++ {
		if ct := encryptOK(t, e, "k", "x"); !strings.HasPrefix(ct, "vault:v1:") {
			t.Fatalf("encryption %d used %s", i, ct[:9])
		}
	}
	if ct := encryptOK(t, e, "k", "x"); !strings.HasPrefix(ct, "vault:v2:") {
		t.Fatalf("the 11th encryption used %s", ct[:9])
	}
	ev := lastEvent(e.history("k"))
	if ev["event"] != "rotated" || ev["cause"] != "usage" || ev["version"] != 2 || ev["display_name"] != "token-test" {
		t.Fatalf("history: %v", ev)
	}
	v1 := e.ok(e.read("keys/k/versions/1")).Data
	if v1["encryptions"] != uint64(10) {
		t.Fatalf("version 1 counted %v", v1["encryptions"])
	}
	// Batch items count one each.
	in := make([]interface{}, 25)
	for i := range in {
		in[i] = map[string]interface{}{"plaintext": b64("x")}
	}
	resp := e.ok(e.write("encrypt/k", map[string]interface{}{"batch_input": in}))
	perVersion := map[int]int{}
	for _, r := range batchResults(t, resp) {
		perVersion[r.KeyVersion]++
	}
	if perVersion[2] != 9 || perVersion[3] != 10 || perVersion[4] != 6 {
		t.Fatalf("batch spread over versions: %v", perVersion)
	}
	// An explicitly requested exhausted version is refused.
	resp, err := e.write("encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "encryption limit") {
		t.Fatalf("exhausted version: %d %s", status(resp, err), respText(resp))
	}
}

// Counts are reserved in storage ahead of use: after a restart a version resumes at least where it was.
func TestUsageSurvivesRestart(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"max_encryptions_per_version": 10}))
	for i := 0; i < 4; i++ {
		encryptOK(t, e, "k", "x")
	}
	again := e.reopen()
	again.ok(again.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN}))
	for i := 0; i < 6; i++ {
		if ct := encryptOK(t, again, "k", "x"); !strings.HasPrefix(ct, "vault:v1:") {
			t.Fatalf("encryption %d after restart used %s", 5+i, ct[:9])
		}
	}
	if ct := encryptOK(t, again, "k", "x"); !strings.HasPrefix(ct, "vault:v2:") {
		t.Fatalf("the 11th encryption across a restart used %s", ct[:9])
	}
	// The default limit is the GCM nonce bound.
	if r := e.ok(e.write("keys/big", nil)); r.Data["max_encryptions_per_version"] != uint64(1)<<32 {
		t.Fatalf("default limit %v", r.Data["max_encryptions_per_version"])
	}
}

func TestVersionStates(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1h"}))
	e.ok(e.write("keys/k", nil))
	ct1 := encryptOK(t, e, "k", "one")
	e.ok(e.write("keys/k/rotate", nil))

	state := func(v int) string {
		return e.ok(e.read(fmt.Sprintf("keys/k/versions/%d", v))).Data["state"].(string)
	}
	refused := func(what string) {
		t.Helper()
		resp, err := e.write("decrypt/k", map[string]interface{}{"ciphertext": ct1})
		if status(resp, err) != 400 || !strings.Contains(respText(resp), what) {
			t.Fatalf("decrypt with v1 %s: %d %s", what, status(resp, err), respText(resp))
		}
	}
	e.ok(e.write("keys/k/versions/1/disable", nil))
	if state(1) != "disabled" {
		t.Fatalf("state %s", state(1))
	}
	refused("disabled")
	e.ok(e.write("keys/k/versions/1/enable", nil))
	if decryptOK(t, e, "k", ct1) != "one" {
		t.Fatal("enabled version does not decrypt")
	}
	for _, action := range []string{"disable", "destroy"} {
		if got := status(e.write("keys/k/versions/2/"+action, nil)); got != 400 {
			t.Fatalf("%s the latest version: %d", action, got)
		}
	}
	// Destruction waits for the grace period and can be undone until then.
	resp := e.ok(e.write("keys/k/versions/1/destroy", nil))
	if resp.Data["state"] != "destroy_scheduled" || resp.Data["destruction_scheduled_time"] == "" {
		t.Fatalf("destroy: %v", resp.Data)
	}
	refused("destroy_scheduled")
	e.tick()
	if state(1) != "destroy_scheduled" || len(e.tokenObjects()) != 2 {
		t.Fatal("destroyed before the grace period")
	}
	// A restart does not destroy it early either.
	again := e.reopen()
	again.tick()
	if len(e.tokenObjects()) != 2 {
		t.Fatal("destroyed early after a restart")
	}
	e.ok(e.write("keys/k/versions/1/enable", nil))
	if decryptOK(t, e, "k", ct1) != "one" {
		t.Fatal("restored version does not decrypt")
	}
	// With no grace period the objects go at once; the metadata stays as a tombstone.
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	resp = e.ok(e.write("keys/k/versions/1/destroy", nil))
	if resp.Data["state"] != "destroyed" || resp.Data["destroyed_time"] == "" {
		t.Fatalf("immediate destroy: %v", resp.Data)
	}
	for _, o := range e.tokenObjects() {
		if strings.HasSuffix(o.Label, "/k/v1") || strings.HasSuffix(o.Label, "/k/v1/hmac") {
			t.Fatalf("object %s left on the token", o.Label)
		}
	}
	refused("destroyed")
	if got := status(e.write("keys/k/versions/1/enable", nil)); got != 400 {
		t.Fatalf("enable a destroyed version: %d", got)
	}
	var kinds []string
	for _, ev := range e.history("k") {
		kinds = append(kinds, fmt.Sprint(ev["event"]))
	}
	want := "created rotated version_disabled version_enabled version_destroy_scheduled version_enabled version_destroy_scheduled version_destroyed"
	if strings.Join(kinds, " ") != want {
		t.Fatalf("history %v", kinds)
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

func TestKeyDisableAndDeletion(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	ct := encryptOK(t, e, "k", "x")
	e.ok(e.write("keys/k/disable", nil))
	e.ok(e.write("keys/s/disable", nil))
	for path, data := range map[string]map[string]interface{}{
		"encrypt/k": {"plaintext": b64("x")}, "decrypt/k": {"ciphertext": ct}, "rewrap/k": {"ciphertext": ct},
		"datakey/wrapped/k": {}, "hmac/k": {"input": b64("x")}, "sign/s": {"input": b64("x")}, "keys/k/rotate": {},
	} {
		resp, err := e.write(path, data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "disabled") {
			t.Errorf("%s on a disabled key: %d %s", path, status(resp, err), respText(resp))
		}
	}
	if r := e.ok(e.read("keys/k")); r.Data["disabled"] != true {
		t.Fatal("read of a disabled key")
	}
	e.ok(e.read("keys/k/history"))
	e.ok(e.write("keys/k/enable", nil))
	if decryptOK(t, e, "k", ct) != "x" {
		t.Fatal("enabled key does not decrypt")
	}

	// Deletion: scheduled (default grace 7 days), serves nothing, restorable, survives restarts.
	e.ok(e.write("keys/k/config", map[string]interface{}{"deletion_allowed": true}))
	resp := e.ok(e.request(logical.DeleteOperation, "keys/k", nil))
	at, err := time.Parse(time.RFC3339, resp.Data["deletion_scheduled_time"].(string))
	if err != nil || at.Before(time.Now().Add(6*24*time.Hour)) {
		t.Fatalf("deletion scheduled at %v", resp.Data)
	}
	if got := status(e.write("decrypt/k", map[string]interface{}{"ciphertext": ct})); got != 400 {
		t.Fatalf("decrypt with a key scheduled for deletion: %d", got)
	}
	again := e.reopen()
	again.tick()
	if len(e.tokenObjects()) != 2 {
		t.Fatal("objects destroyed before the grace period")
	}
	e.ok(e.write("keys/k/cancel-deletion", nil))
	if decryptOK(t, e, "k", ct) != "x" {
		t.Fatal("restored key does not decrypt")
	}
	if got := status(e.write("keys/k/cancel-deletion", nil)); got != 400 {
		t.Fatalf("cancel without a deletion: %d", got)
	}
	var kinds []string
	for _, ev := range e.history("k") {
		kinds = append(kinds, fmt.Sprint(ev["event"]))
		if ev["display_name"] != "token-test" || ev["token_accessor"] != "accessor-test" {
			t.Fatalf("event without its requester: %v", ev)
		}
	}
	if strings.Join(kinds, " ") != "created disabled enabled config_changed deletion_scheduled deletion_cancelled" {
		t.Fatalf("history %v", kinds)
	}
}

func TestTrim(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	old := encryptOK(t, e, "k", "old")
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))
	if got := status(e.write("keys/k/trim", map[string]interface{}{"min_available_version": 2})); got != 400 {
		t.Fatalf("trim above min_decryption_version: %d", got)
	}
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 3}))
	resp := e.ok(e.write("keys/k/trim", map[string]interface{}{"min_available_version": 3}))
	if resp.Data["min_available_version"] != 3 || len(e.tokenObjects()) != 1 {
		t.Fatalf("trim: %v, %d objects", resp.Data["min_available_version"], len(e.tokenObjects()))
	}
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 1}))
	resp2, err := e.write("decrypt/k", map[string]interface{}{"ciphertext": old})
	if status(resp2, err) != 400 || !strings.Contains(respText(resp2), "trimmed") {
		t.Fatalf("decrypt a trimmed version: %s", respText(resp2))
	}
}

// Versions are stored in chunks, so that no storage entry grows with the key's life.
func TestVersionsAreStoredInChunks(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	first := encryptOK(t, e, "k", "first")
	for i := 0; i < versionChunk+4; i++ {
		e.ok(e.write("keys/k/rotate", nil))
	}
	ctx := context.Background()
	for _, key := range []string{policyPrefix + "k", versionsKey("k", 0), versionsKey("k", 1)} {
		entry, err := e.inmem.Get(ctx, key)
		if err != nil || entry == nil {
			t.Fatalf("%s: %v", key, err)
		}
		if len(entry.Value) > 256*1024 {
			t.Fatalf("%s is %d bytes", key, len(entry.Value))
		}
	}
	var policy map[string]interface{}
	entry, _ := e.inmem.Get(ctx, policyPrefix+"k")
	_ = json.Unmarshal(entry.Value, &policy)
	if _, has := policy["versions"]; has {
		t.Fatal("versions stored in the policy entry")
	}
	again := e.reopen()
	again.ok(again.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN}))
	if decryptOK(t, again, "k", first) != "first" {
		t.Fatal("version 1 lost across chunks")
	}
	if r := again.ok(again.read("keys/k")); r.Data["latest_version"] != versionChunk+5 {
		t.Fatalf("latest %v", r.Data["latest_version"])
	}
}

// Vault retries a request once, unchanged, when the plugin process dies under it: a retried rotation or import
// that had completed adds no second version, and repeating a state change answers with the state.
func TestRetriedRequestsChangeNothingTwice(t *testing.T) {
	e := newImportBackend(t)
	e.ok(e.write("keys/k", nil))
	retry := func(path string, data map[string]interface{}) {
		t.Helper()
		for i := 0; i < 2; i++ {
			e.ok(e.b.HandleRequest(context.Background(), &logical.Request{
				ID: "req-" + path, Operation: logical.UpdateOperation, Path: path, Data: data, Storage: e.storage,
			}))
		}
	}
	retry("keys/k/rotate", nil)
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 2 {
		t.Fatalf("a retried rotation made version %v", r.Data["latest_version"])
	}
	e.ok(e.write("keys/k/rotate", nil)) // another request rotates again
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 3 {
		t.Fatalf("a new request did not rotate: %v", r.Data["latest_version"])
	}
	material := make([]byte, 32)
	retry("keys/imp/import", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)})
	retry("keys/imp/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)})
	if r := e.ok(e.read("keys/imp")); r.Data["latest_version"] != 2 {
		t.Fatalf("retried imports made version %v", r.Data["latest_version"])
	}
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1h"}))
	retry("keys/k/versions/1/destroy", nil)
	retry("keys/k/versions/2/disable", nil)
	if s := e.ok(e.read("keys/k/versions/1")).Data["state"]; s != "destroy_scheduled" {
		t.Fatalf("state %v", s)
	}
	n := 0
	for _, o := range e.tokenObjects() {
		if strings.Contains(o.Label, "/imp/") {
			n++
		}
	}
	if n != 4 { // two versions × (AES + HMAC): no orphan of the retried imports
		t.Fatalf("%d objects for the imported key", n)
	}
}
