package cmk

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

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
		if h, _ := ev["token_accessor_hmac"].(string); ev["display_name"] != "token-test" || !strings.HasPrefix(h, "hmac-sha256:") {
			t.Fatalf("event without its requester: %v", ev)
		}
	}
	if strings.Join(kinds, " ") != "created disabled enabled config_changed deletion_scheduled deletion_cancelled" {
		t.Fatalf("history %v", kinds)
	}
}

// Trim, as Transit's, with one difference (issue 19, item 22): the versions below min_available_version are
// destroyed after the mount's deletion grace period, as every other destruction, not in the same second.
func TestTrim(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1m"}))
	e.ok(e.write("keys/k", nil))
	old := encryptOK(t, e, "k", "old")
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))
	// As Transit: refused while min_encryption_version is not set.
	resp, err := e.write("keys/k/trim", map[string]interface{}{"min_available_version": 1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "min_encryption_version is not set") {
		t.Fatalf("trim without min_encryption_version: %d %s", status(resp, err), respText(resp))
	}
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_encryption_version": 3}))
	if got := status(e.write("keys/k/trim", map[string]interface{}{"min_available_version": 2})); got != 400 {
		t.Fatalf("trim above min_decryption_version: %d", got)
	}
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 3}))
	resp = e.ok(e.write("keys/k/trim", map[string]interface{}{"min_available_version": 3}))
	if resp.Data["min_available_version"] != 3 {
		t.Fatalf("trim: %v", resp.Data["min_available_version"])
	}
	if n := len(e.tokenObjects()); n != 3 {
		t.Fatalf("trim under a 1-minute grace period left %d of 3 objects on the token", n)
	}
	for v := 1; v <= 2; v++ {
		r := e.ok(e.read(fmt.Sprintf("keys/k/versions/%d", v)))
		if r.Data["state"] != "destroy_scheduled" {
			t.Fatalf("trimmed version %d: %v", v, r.Data)
		}
		// min_available_version never goes down: a trimmed version's destruction cannot be cancelled.
		if r, err := e.write(fmt.Sprintf("keys/k/versions/%d/enable", v), nil); status(r, err) != 400 || !strings.Contains(respText(r), "trimmed") {
			t.Fatalf("enable trimmed version %d: %d %s", v, status(r, err), respText(r))
		}
	}
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 1}))
	resp2, err := e.write("decrypt/k", map[string]interface{}{"ciphertext": old})
	if status(resp2, err) != 400 || !strings.Contains(respText(resp2), "trimmed") {
		t.Fatalf("decrypt a trimmed version: %s", respText(resp2))
	}
	// Once the grace period has elapsed the scheduler destroys them.
	if err := e.b.keys.Tick(context.Background(), e.storage, time.Now().Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if n := len(e.tokenObjects()); n != 1 {
		t.Fatalf("after the grace period %d objects remain, want 1", n)
	}
	// With no grace period, as Transit, a trim destroys at once.
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_encryption_version": 4, "min_decryption_version": 4}))
	e.ok(e.write("keys/k/trim", map[string]interface{}{"min_available_version": 4}))
	if n := len(e.tokenObjects()); n != 1 {
		t.Fatalf("trim with no grace period left %d objects, want 1", n)
	}
	if r := e.ok(e.read("keys/k/versions/3")); r.Data["state"] != "destroyed" {
		t.Fatalf("version 3 after an immediate trim: %v", r.Data)
	}
}

// Defect b: history was recorded after the key's lock was released, so concurrent lifecycle changes lost events.
// Twenty parallel version state changes on one key leave twenty events.
func TestParallelStateChangesEachRecorded(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1h"}))
	e.ok(e.write("keys/k", nil))
	for i := 0; i < 20; i++ {
		e.ok(e.write("keys/k/rotate", nil))
	}
	var wg sync.WaitGroup
	for n := 1; n <= 20; n++ {
		wg.Add(1)
		go func(n int) {
			defer wg.Done()
			action := map[bool]string{true: "disable", false: "destroy"}[n%2 == 0]
			if resp, err := e.write(fmt.Sprintf("keys/k/versions/%d/%s", n, action), nil); err != nil || resp.IsError() {
				t.Errorf("version %d %s: %v %s", n, action, err, respText(resp))
			}
		}(n)
	}
	wg.Wait()
	changes := 0
	for _, ev := range e.history("k") {
		if ev["event"] == "version_disabled" || ev["event"] == "version_destroy_scheduled" {
			changes++
		}
	}
	if changes != 20 {
		t.Fatalf("%d events for 20 parallel state changes", changes)
	}
}

// Issue 20, item 5: under purge protection, deletion, version destruction and trim all wait for the floor even
// when deletion_grace_period is lower (it was set before purge protection was turned on), their HSM objects stay
// on the token until then, and the scheduler destroys nothing earlier. A destruction scheduled before purge
// protection was turned on keeps its time.
func TestPurgeProtectionDelaysEveryDestruction(t *testing.T) {
	e := newTestBackend(t)
	const floor = 7 * 24 * time.Hour
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1h"}))
	e.ok(e.write("keys/k", nil))
	for i := 0; i < 3; i++ {
		e.ok(e.write("keys/k/rotate", nil))
	}
	e.ok(e.write("keys/d", nil))
	e.ok(e.write("keys/d/config", map[string]interface{}{"deletion_allowed": true}))
	before := time.Now()
	early := e.ok(e.write("keys/k/versions/1/destroy", nil)).Data["destruction_scheduled_time"].(string)

	resp := e.ok(e.write("config/keys", map[string]interface{}{"purge_protection": true}))
	if len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], "below min_deletion_grace_period") {
		t.Fatalf("turning purge protection on over a 1h grace period: warnings %v", resp.Warnings)
	}
	atLeastFloor := func(what, at string) {
		t.Helper()
		when, err := time.Parse(time.RFC3339, at)
		if err != nil || when.Before(before.Add(floor).Truncate(time.Second)) {
			t.Fatalf("%s scheduled at %q, before the %s floor", what, at, floor)
		}
	}
	state := func(name string, v int) map[string]interface{} {
		return e.ok(e.read(fmt.Sprintf("keys/%s/versions/%d", name, v))).Data
	}
	r := e.ok(e.write("keys/k/versions/2/destroy", nil))
	if r.Data["state"] != "destroy_scheduled" {
		t.Fatalf("destroy: %v", r.Data)
	}
	atLeastFloor("version 2's destruction", r.Data["destruction_scheduled_time"].(string))
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_encryption_version": 4, "min_decryption_version": 4}))
	e.ok(e.write("keys/k/trim", map[string]interface{}{"min_available_version": 4}))
	if v3 := state("k", 3); v3["state"] != "destroy_scheduled" {
		t.Fatalf("trimmed version 3: %v", v3)
	} else {
		atLeastFloor("trimmed version 3's destruction", v3["destruction_scheduled_time"].(string))
	}
	r = e.ok(e.request(logical.DeleteOperation, "keys/d", nil))
	atLeastFloor("key d's deletion", r.Data["deletion_scheduled_time"].(string))
	// Scheduled before purge protection: kept.
	if got := state("k", 1)["destruction_scheduled_time"]; got != early {
		t.Fatalf("version 1 scheduled at %s before purge protection, now at %v", early, got)
	}

	tick := func(at time.Time) {
		t.Helper()
		if err := e.b.keys.Tick(context.Background(), e.storage, at); err != nil {
			t.Fatal(err)
		}
	}
	e.tick()
	if n := len(e.tokenObjects()); n != 5 {
		t.Fatalf("%d of 5 objects on the token right after the requests", n)
	}
	tick(before.Add(2 * time.Hour))
	if state("k", 1)["state"] != "destroyed" || len(e.tokenObjects()) != 4 {
		t.Fatalf("version 1, scheduled before purge protection, not destroyed at its time: %v", state("k", 1))
	}
	tick(before.Add(floor - time.Minute))
	if n := len(e.tokenObjects()); n != 4 {
		t.Fatalf("%d of 4 objects left a minute before the floor", n)
	}
	if state("k", 2)["state"] != "destroy_scheduled" || state("k", 3)["state"] != "destroy_scheduled" {
		t.Fatal("a version destroyed before the floor")
	}
	tick(time.Now().Add(floor + time.Minute))
	if n := len(e.tokenObjects()); n != 1 {
		t.Fatalf("after the floor %d objects remain, want 1 (k's version 4)", n)
	}
	if r, err := e.read("keys/d"); err != nil || r != nil {
		t.Fatalf("key d after the floor: %v %v", r, err)
	}
}
