package cmk

import (
	"strings"
	"testing"
)

func TestAccessSettingsWriteReadDelete(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	resp := e.ok(e.write("keys/k/access", map[string]interface{}{
		"allowed_cidrs": "10.0.0.0/8,192.0.2.7", "allowed_hours": []interface{}{"mon-fri 08:00-18:00"},
		"time_zone": "Europe/Paris", "allowed_groups": "payments-ops", "required_entity_metadata": map[string]interface{}{"device": "managed"},
		"operations": "decrypt,rewrap",
	}))
	if got := resp.Data["allowed_cidrs"].([]string); strings.Join(got, " ") != "10.0.0.0/8 192.0.2.7/32" {
		t.Fatalf("allowed_cidrs stored as %v", got)
	}
	// A write changes the fields it names and keeps the others.
	e.ok(e.write("keys/k/access", map[string]interface{}{"allowed_groups": "payments-ops,grp-2"}))
	resp = e.ok(e.read("keys/k/access"))
	if resp.Data["time_zone"] != "Europe/Paris" || len(resp.Data["allowed_groups"].([]string)) != 2 || len(resp.Data["operations"].([]string)) != 2 {
		t.Fatalf("read after a partial write: %v", resp.Data)
	}
	if !strings.Contains(e.ok(e.read("keys/k")).Data["access"].(string), "allowed_cidrs=10.0.0.0/8") {
		t.Fatalf("the key's read does not summarise its access conditions: %v", e.ok(e.read("keys/k")).Data["access"])
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "access_changed" || !strings.Contains(ev["details"].(string), "grp-2") {
		t.Fatalf("last history event %v", ev)
	}
	for _, bad := range []map[string]interface{}{
		{"allowed_cidrs": "10.0.0.0/40"}, {"allowed_hours": "someday 9-5"}, {"time_zone": "Nowhere/City"},
		{"operations": "export"}, {"max_grant_ttl": "800h"}, {"allowd_cidrs": "10.0.0.0/8"},
	} {
		if got := status(e.write("keys/k/access", bad)); got != 400 {
			t.Errorf("%v: %d, want 400", bad, got)
		}
	}
	e.ok(e.request("delete", "keys/k/access", nil))
	if resp := e.ok(e.read("keys/k/access")); resp.Data["summary"] != "none" || e.ok(e.read("keys/k")).Data["access"] != "none" {
		t.Fatalf("after delete: %v", resp.Data)
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "access_removed" {
		t.Fatalf("last history event %v", ev)
	}
	if got := status(e.write("keys/missing/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8"})); got != 400 {
		t.Fatalf("access of a missing key: %d", got)
	}
}
