package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// TestScheduledRotationOnLiveServer: a next_rotation_time a few seconds ahead rotates the key through Vault's
// own periodic function (which Vault runs about once a minute).
func TestScheduledRotationOnLiveServer(t *testing.T) {
	t.Parallel()
	c := dev.Client
	m := newMount(t, dev)
	mustWrite(t, c, m.Path+"/keys/sched", map[string]interface{}{"auto_rotate_period": "24h"})
	when := time.Now().Add(3 * time.Second).UTC().Format(time.RFC3339)
	if out, err := dev.CLI(dev.RootToken, "write", m.Path+"/keys/sched/config", "next_rotation_time="+when); err != nil {
		t.Fatalf("set next_rotation_time: %v\n%s", err, out)
	}
	deadline := time.Now().Add(150 * time.Second)
	for {
		k, err := c.Logical().Read(m.Path + "/keys/sched")
		if err == nil && fmt.Sprint(k.Data["latest_version"]) == "2" {
			next, _ := time.Parse(time.RFC3339, fmt.Sprint(k.Data["next_rotation_time"]))
			if next.Before(time.Now().Add(23 * time.Hour)) {
				t.Fatalf("next rotation after the scheduled one: %v", k.Data["next_rotation_time"])
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key not rotated within 150s of its next_rotation_time (latest %v, err %v)", k.Data["latest_version"], err)
		}
		time.Sleep(2 * time.Second)
	}
	h, err := c.Logical().Read(m.Path + "/keys/sched/history")
	if err != nil {
		t.Fatal(err)
	}
	events := h.Data["events"].([]interface{})
	last := events[len(events)-1].(map[string]interface{})
	if last["event"] != "rotated" || last["cause"] != "scheduled" {
		t.Fatalf("history: %v", last)
	}
}

func TestKeyLifecycleOnLiveServer(t *testing.T) {
	c := dev.Client
	m := newMount(t, dev)
	p := m.Path

	// Usage limit: the 10th encryption is the last with version 1.
	mustWrite(t, c, p+"/keys/limited", map[string]interface{}{"max_encryptions_per_version": 10})
	for i := 1; i <= 10; i++ {
		if ct := encrypt(t, c, m, "limited", "x"); !strings.HasPrefix(ct, "vault:v1:") {
			t.Fatalf("encryption %d: %s", i, ct[:9])
		}
	}
	if ct := encrypt(t, c, m, "limited", "x"); !strings.HasPrefix(ct, "vault:v2:") {
		t.Fatalf("11th encryption: %s", ct[:9])
	}

	// Whole-key revoke.
	mustWrite(t, c, p+"/keys/k", nil)
	ct := encrypt(t, c, m, "k", "secret")
	run := func(args ...string) string {
		t.Helper()
		out, err := dev.CLI(dev.RootToken, args...)
		if err != nil {
			t.Fatalf("vault %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	run("write", "-f", p+"/keys/k/disable")
	if _, err := c.Logical().Write(p+"/decrypt/k", map[string]interface{}{"ciphertext": ct}); statusOf(err) != 400 || !strings.Contains(err.Error(), "disabled") {
		t.Fatalf("decrypt with a disabled key: %v", err)
	}
	run("write", "-f", p+"/keys/k/enable")
	if decrypt(t, c, m, "k", ct) != "secret" {
		t.Fatal("enabled key")
	}

	// Version destruction (no grace period on this mount): the objects are gone from the token itself.
	run("write", p+"/config/keys", "deletion_grace_period=0")
	run("write", p+"/hmac/k", "input="+b64("x")) // makes v1's HMAC secret, whose destruction is checked too
	run("write", "-f", p+"/keys/k/rotate")
	k, _ := c.Logical().Read(p + "/keys/k")
	label := k.Data["versions"].(map[string]interface{})["1"].(map[string]interface{})["label"].(string)
	if n := objectsLabelled(t, m, label); n != 2 {
		t.Fatalf("%d objects labelled %s before destruction", n, label)
	}
	run("write", "-f", p+"/keys/k/versions/1/destroy")
	if n := objectsLabelled(t, m, label); n != 0 {
		t.Fatalf("%d objects labelled %s left after destruction", n, label)
	}
	if _, err := c.Logical().Write(p+"/decrypt/k", map[string]interface{}{"ciphertext": ct}); statusOf(err) != 400 {
		t.Fatalf("decrypt with a destroyed version: %v", err)
	}
	if v, _ := c.Logical().Read(p + "/keys/k/versions/1"); v == nil || v.Data["state"] != "destroyed" {
		t.Fatalf("tombstone: %v", v)
	}

	// Deletion with a grace period, then restored.
	run("write", p+"/config/keys", "deletion_grace_period=168h")
	run("write", p+"/keys/k/config", "deletion_allowed=true")
	run("delete", p+"/keys/k")
	if _, err := c.Logical().Write(p+"/encrypt/k", map[string]interface{}{"plaintext": b64("x")}); statusOf(err) != 400 {
		t.Fatalf("encrypt with a key scheduled for deletion: %v", err)
	}
	run("write", "-f", p+"/keys/k/cancel-deletion")
	encrypt(t, c, m, "k", "restored")

	out := run("read", "-format=json", p+"/keys/k/history")
	var h struct {
		Data struct {
			Events []map[string]interface{} `json:"events"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &h); err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range h.Data.Events {
		kinds = append(kinds, fmt.Sprint(e["event"]))
		if e["display_name"] == nil || e["time"] == nil {
			t.Fatalf("event without requester or time: %v", e)
		}
	}
	want := "created disabled enabled rotated version_destroy_scheduled version_destroyed config_changed deletion_scheduled deletion_cancelled"
	if strings.Join(kinds, " ") != want {
		t.Fatalf("history: %v", kinds)
	}
}

// objectsLabelled counts the objects on m's token whose label is label or label/hmac, as the token reports them.
func objectsLabelled(t *testing.T, m mount, label string) int {
	t.Helper()
	return countObjects(t, m, func(l string) bool { return l == label || l == label+"/hmac" })
}

// countObjects counts the objects on m's token whose label matches, through a connection of the test's own.
func countObjects(t *testing.T, m mount, match func(label string) bool) int {
	t.Helper()
	tok, err := hsm.Open(hsm.Config{Library: softhsm.Library, TokenLabel: m.Label, PIN: m.PIN, PoolSize: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	objs, err := tok.ListObjects(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, o := range objs {
		if match(o.Label) {
			n++
		}
	}
	return n
}
