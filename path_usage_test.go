package cmk

import (
	"context"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// usageOf reads keys/<name>/usage: the uses of op by caller, and the key's totals.
func (e *testEnv) usageOf(name, op, caller string) (callerUses float64, data map[string]interface{}) {
	e.t.Helper()
	data = e.ok(e.read("keys/" + name + "/usage")).Data
	ops, _ := data["operations"].(map[string]interface{})
	o, _ := ops[op].(map[string]interface{})
	callers, _ := o["callers"].(map[string]interface{})
	c, _ := callers[caller].(map[string]interface{})
	n, _ := c["uses"].(float64)
	return n, data
}

// keys/<name>/usage counts per operation and caller, a batch's items each, and survives a restart (Clean flushes,
// the periodic function flushes); config/analytics turns counting off.
func TestUsagePathCountsAndSurvivesARestart(t *testing.T) {
	e := newTestBackend(t)
	h, err := e.b.keys.AccessorHMAC(context.Background(), e.storage, "accessor-test")
	if err != nil {
		t.Fatal(err)
	}
	rootLabel := "token:" + h // the test's root token, without an entity, named by its accessor's HMAC
	e.ok(e.write("keys/k", nil))
	encryptOK(t, e, "k", "one")
	e.ok(e.write("encrypt/k", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a")}, map[string]interface{}{"plaintext": b64("b")}}}))
	e.ok(e.as("alice", "", logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}))
	if n, data := e.usageOf("k", "encrypt", rootLabel); n != 3 || data["uses"] != float64(4) || data["analytics_enabled"] != true {
		t.Fatalf("root token's encryptions %v; usage %v", n, data)
	}
	if n, _ := e.usageOf("k", "encrypt", "entity-alice"); n != 1 {
		t.Fatalf("alice's encryptions: %v", n)
	}
	e.tick() // flushes
	if entry, err := e.storage.Get(context.Background(), "analytics/k"); err != nil || entry == nil {
		t.Fatalf("the periodic function flushed nothing: %v %v", entry, err)
	}
	encryptOK(t, e, "k", "after the flush")
	e.b.clean(context.Background()) // a clean shutdown flushes what the last tick did not
	restarted := e.reopen()
	if n, data := restarted.usageOf("k", "encrypt", rootLabel); n != 4 || data["uses"] != float64(5) {
		t.Fatalf("after a restart: %v, %v", n, data)
	}

	restarted.ok(restarted.write("config/analytics", map[string]interface{}{"enabled": false}))
	encryptOK(t, restarted, "k", "not counted")
	if n, data := restarted.usageOf("k", "encrypt", rootLabel); n != 4 || data["analytics_enabled"] != false {
		t.Fatalf("with analytics off: %v, %v", n, data)
	}
	if r := restarted.ok(restarted.read("config/analytics")); r.Data["enabled"] != false {
		t.Fatalf("config/analytics: %v", r.Data)
	}
	if resp, err := restarted.read("keys/missing/usage"); resp != nil || err != nil {
		t.Fatalf("usage of a missing key: %v %v", respText(resp), err)
	}
}

// A key's anomaly settings are set and shown like its other settings; a cap-triggered block is a 403 naming the
// condition "anomaly", listed on keys/<name>/anomalies, and lifted by an operator.
func TestAnomalySettingsBlockAndLift(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"on_anomaly": "block_caller", "anomaly_rate_limit": 3, "anomaly_action_period": "10m"}))
	k := e.ok(e.read("keys/k")).Data
	if k["on_anomaly"] != "block_caller" || k["anomaly_rate_limit"] != uint64(3) || k["anomaly_action_period"] != int64(600) {
		t.Fatalf("key read: %v %v %v", k["on_anomaly"], k["anomaly_rate_limit"], k["anomaly_action_period"])
	}
	for _, bad := range []map[string]interface{}{{"on_anomaly": "shout"}, {"anomaly_rate_limit": -1}, {"anomaly_action_period": "1000h"}} {
		if got := status(e.write("keys/k/config", bad)); got != 400 {
			t.Errorf("config %v: %d, want 400", bad, got)
		}
	}
	for range 3 {
		e.ok(e.as("alice", "", logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}))
	}
	resp, err := e.as("alice", "", logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64("x")})
	if got := status(resp, err); got != 403 || !strings.Contains(err.Error(), "anomaly") {
		t.Fatalf("the use past the cap: %d %v", got, err)
	}
	encryptOK(t, e, "k", "another caller is not blocked")
	an := e.ok(e.read("keys/k/anomalies")).Data
	anomalies, actions := an["anomalies"].([]interface{}), an["actions"].([]interface{})
	if len(anomalies) != 1 || len(actions) != 1 || anomalies[0].(map[string]interface{})["kind"] != "rate_above_limit" ||
		actions[0].(map[string]interface{})["caller"] != "entity-alice" {
		t.Fatalf("anomalies: %v", an)
	}
	if ev := lastEvent(e.historyOfKind("k", "anomaly")); ev == nil || !strings.Contains(ev["details"].(string), "rate_above_limit") {
		t.Fatalf("history: %v", e.history("k"))
	}
	// A restart keeps the block (stored); the operator lifts it.
	r := e.reopen()
	if got := status(r.as("alice", "", logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64("x")})); got != 403 {
		t.Fatalf("after a restart the blocked caller got %d", got)
	}
	if got := status(r.write("keys/k/anomalies/lift", map[string]interface{}{"caller": "entity-bob"})); got != 400 {
		t.Fatalf("lifting what is not in force: %d", got)
	}
	lifted := r.ok(r.write("keys/k/anomalies/lift", map[string]interface{}{"caller": "entity-alice"})).Data["lifted"].(map[string]interface{})
	if lifted["action"] != "block_caller" {
		t.Fatalf("lifted %v", lifted)
	}
	r.ok(r.as("alice", "", logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}))
	if lastEvent(r.historyOfKind("k", "anomaly_action_lifted")) == nil {
		t.Fatal("no anomaly_action_lifted event")
	}
	if fam := r.scrape()["cmk_anomalies_total"]; fam == nil {
		t.Fatal("no cmk_anomalies_total series")
	}
	if got := e.value(e.scrape(), "cmk_anomalies_total", map[string]string{"kind": "rate_above_limit"}); got != 1 {
		t.Fatalf("cmk_anomalies_total{kind=rate_above_limit} = %v", got)
	}
}

func (e *testEnv) historyOfKind(name, kind string) []map[string]interface{} {
	var out []map[string]interface{}
	for _, ev := range e.history(name) {
		if ev["event"] == kind {
			out = append(out, ev)
		}
	}
	return out
}
