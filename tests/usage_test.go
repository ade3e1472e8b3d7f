package tests

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/prometheus/common/expfmt"
)

// usesOf reads keys/<key>/usage and returns caller's uses and denials of op, as the JSON numbers read.
func usesOf(t *testing.T, c *api.Client, m mount, key, op, caller string) (uses, denials string) {
	t.Helper()
	data := mustRead(t, c, m.Path+"/keys/"+key+"/usage").Data
	ops, _ := data["operations"].(map[string]interface{})
	o, _ := ops[op].(map[string]interface{})
	callers, _ := o["callers"].(map[string]interface{})
	cu, _ := callers[caller].(map[string]interface{})
	return fmt.Sprint(cu["uses"]), fmt.Sprint(cu["denials"])
}

// anomaliesCounted scrapes the mount's metrics and returns cmk_anomalies_total{kind}.
func anomaliesCounted(t *testing.T, c *api.Client, m mount, kind string) float64 {
	t.Helper()
	resp, err := c.Logical().ReadRawWithDataWithContext(context.Background(), m.Path+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var p expfmt.TextParser
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range families["cmk_anomalies_total"].GetMetric() {
		for _, l := range s.GetLabel() {
			if l.GetName() == "kind" && l.GetValue() == kind {
				return s.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no cmk_anomalies_total{kind=%q}", kind)
	return 0
}

// batchOf encrypts n items in one request as c.
func batchOf(c *api.Client, m mount, key string, n int) error {
	items := make([]interface{}, n)
	for i := range items {
		items[i] = map[string]interface{}{"plaintext": b64("item")}
	}
	_, err := c.Logical().Write(m.Path+"/encrypt/"+key, map[string]interface{}{"batch_input": items})
	return err
}

// TestAnomalyActionsAndUsageAcrossAReload: on a real server, a caller past a key's anomaly_rate_limit is blocked
// (block_caller) or must hold a grant (require_grant), with the anomaly counted in the metrics and recorded in the
// history; the usage counts and the block survive a reload of the plugin's backend; an operator lifts the block.
func TestAnomalyActionsAndUsageAcrossAReload(t *testing.T) {
	root := dev.Client
	m := newMount(t, dev)
	mustWrite(t, root, m.Path+"/keys/k", map[string]interface{}{"on_anomaly": "block_caller", "anomaly_rate_limit": 5, "anomaly_action_period": "1h"})
	mustWrite(t, root, m.Path+"/keys/g", map[string]interface{}{"on_anomaly": "require_grant", "anomaly_rate_limit": 5})
	p := newPeople(t, dev, m)
	alice, aliceID := p.login("alice", appPolicy(t, dev, m, "k"), appPolicy(t, dev, m, "g"))
	bob, bobID := p.login("bob", appPolicy(t, dev, m, "k"))
	alice = from(t, alice, "127.0.0.2")

	if err := batchOf(alice, m, "k", 5); err != nil { // at the cap: usual
		t.Fatal(err)
	}
	denied(t, "a batch past the cap", batchOf(alice, m, "k", 6), "anomaly")
	_, err := alice.Logical().Write(m.Path+"/encrypt/k", map[string]interface{}{"plaintext": b64("x")})
	denied(t, "alice, blocked", err, "anomaly")
	encrypt(t, bob, m, "k", "bob is not blocked")

	denied(t, "a batch past the cap on g", batchOf(alice, m, "g", 6), "anomaly")
	_, err = alice.Logical().Write(m.Path+"/encrypt/g", map[string]interface{}{"plaintext": b64("x")})
	denied(t, "alice without a grant", err, "anomaly")
	mustWrite(t, root, m.Path+"/keys/g/grants", map[string]interface{}{"entity_id": aliceID, "operations": "encrypt", "ttl": "1h"})
	encrypt(t, alice, m, "g", "under a grant")

	if n := anomaliesCounted(t, root, m, "rate_above_limit"); n != 2 {
		t.Fatalf("cmk_anomalies_total{kind=rate_above_limit} = %v, want 2", n)
	}
	if n := historyCount(t, root, m.Path+"/keys/k/history", "anomaly"); n != 1 {
		t.Fatalf("%d anomaly events on k, want 1", n)
	}
	an := mustRead(t, root, m.Path+"/keys/k/anomalies").Data
	if acts, _ := an["actions"].([]interface{}); len(acts) != 1 || acts[0].(map[string]interface{})["caller"] != aliceID {
		t.Fatalf("actions in force on k: %v", an)
	}
	aliceUses, aliceDenials := usesOf(t, root, m, "k", "encrypt", aliceID)
	bobUses, _ := usesOf(t, root, m, "k", "encrypt", bobID)
	if aliceUses != "5" || aliceDenials != "7" || bobUses != "1" {
		t.Fatalf("before the reload: alice %v uses %v denials, bob %v uses", aliceUses, aliceDenials, bobUses)
	}

	// The backend is reloaded: Clean flushes the counts, the new backend reads them and the stored block.
	if _, err := root.Sys().ReloadPlugin(&api.ReloadPluginInput{Mounts: []string{m.Path}}); err != nil {
		t.Fatalf("reload: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err = alice.Logical().Write(m.Path+"/encrypt/k", map[string]interface{}{"plaintext": b64("x")})
		if statusOf(err) == 403 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond) // the backend coming back
	}
	denied(t, "alice after the reload", err, "anomaly")
	if n := anomaliesCounted(t, root, m, "rate_above_limit"); n != 0 {
		t.Fatalf("the metrics count %v anomalies after the reload: the backend was not made anew", n)
	}
	if u, d := usesOf(t, root, m, "k", "encrypt", aliceID); u != "5" || d != "8" {
		t.Fatalf("after the reload alice has %v uses, %v denials; want 5 and 8", u, d)
	}
	if u, _ := usesOf(t, root, m, "k", "encrypt", bobID); u != "1" {
		t.Fatalf("after the reload bob has %v uses, want 1", u)
	}

	lifted := mustWrite(t, root, m.Path+"/keys/k/anomalies/lift", map[string]interface{}{"caller": aliceID})
	if l, _ := lifted.Data["lifted"].(map[string]interface{}); l["action"] != "block_caller" {
		t.Fatalf("lift: %v", lifted.Data)
	}
	encrypt(t, alice, m, "k", "lifted")
	if n := historyCount(t, root, m.Path+"/keys/k/history", "anomaly_action_lifted"); n != 1 {
		t.Fatalf("%d anomaly_action_lifted events, want 1", n)
	}
	if s := mustRead(t, root, m.Path+"/keys/k").Data; s["on_anomaly"] != "block_caller" || fmt.Sprint(s["anomaly_rate_limit"]) != "5" {
		t.Fatalf("key read: on_anomaly %v, anomaly_rate_limit %v", s["on_anomaly"], s["anomaly_rate_limit"])
	}

	// Two orphan tokens (no entity, both of display name "token") are two callers, each named by its accessor's
	// HMAC: blocking one leaves the other.
	policy := appPolicy(t, dev, m, "k")
	orphan := func() *api.Client {
		secret, err := root.Auth().Token().CreateOrphan(&api.TokenCreateRequest{Policies: []string{policy}, TTL: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		c, err := root.Clone()
		if err != nil {
			t.Fatal(err)
		}
		c.SetToken(secret.Auth.ClientToken)
		return c
	}
	one, two := orphan(), orphan()
	denied(t, "an orphan token's batch past the cap", batchOf(one, m, "k", 6), "anomaly")
	encrypt(t, two, m, "k", "another orphan token is not blocked")
	an = mustRead(t, root, m.Path+"/keys/k/anomalies").Data
	acts, _ := an["actions"].([]interface{})
	if len(acts) != 1 || !strings.HasPrefix(fmt.Sprint(acts[0].(map[string]interface{})["caller"]), "token:hmac-sha256:") {
		t.Fatalf("actions in force on k: %v", an)
	}
	ops, _ := mustRead(t, root, m.Path+"/keys/k/usage").Data["operations"].(map[string]interface{})
	callers, _ := ops["encrypt"].(map[string]interface{})["callers"].(map[string]interface{})
	tokens := 0
	for label, c := range callers {
		if strings.HasPrefix(label, "token:hmac-sha256:") && c.(map[string]interface{})["display_name"] == "token" {
			tokens++
		}
	}
	if tokens != 2 {
		t.Fatalf("want the two orphan tokens as two callers: %v", callers)
	}
}
