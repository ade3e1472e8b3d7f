package cmk

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// scrape reads the metrics path as Prometheus would and parses the exposition.
func (e *testEnv) scrape() map[string]*dto.MetricFamily {
	e.t.Helper()
	resp := e.ok(e.request(logical.ReadOperation, "metrics", map[string]interface{}{"format": "prometheus"}))
	if ct := resp.Data[logical.HTTPContentType]; ct != metricsContentType {
		e.t.Fatalf("content type %v", ct)
	}
	if code := resp.Data[logical.HTTPStatusCode]; code != 200 {
		e.t.Fatalf("status %v", code)
	}
	var p expfmt.TextParser
	families, err := p.TextToMetricFamilies(bytes.NewReader(resp.Data[logical.HTTPRawBody].([]byte)))
	if err != nil {
		e.t.Fatalf("the exposition does not parse: %v", err)
	}
	return families
}

// series is the value of the series of family name with exactly labels (a histogram's: its sample count), and
// whether there is one.
func series(families map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	f := families[name]
	if f == nil {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) != len(labels) {
			continue
		}
		match := true
		for _, l := range m.GetLabel() {
			if labels[l.GetName()] != l.GetValue() {
				match = false
			}
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

func (e *testEnv) value(families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	e.t.Helper()
	v, _ := series(families, name, labels)
	return v
}

func TestMetricsCountRequestsHSMCallsAndRotations(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	before := e.scrape()
	encrypted := map[string]string{"operation": "encrypt", "status": "200", "key_type": "aes256-gcm96"}
	missing := map[string]string{"operation": "encrypt", "status": "400", "key_type": "none"}
	hsmEncrypt := map[string]string{"operation": "AES-GCM encrypt", "result": "ok"}

	encryptOK(t, e, "k", "x")
	encryptOK(t, e, "k", "y")
	if got := status(e.write("encrypt/absent", map[string]interface{}{"plaintext": "eA=="})); got != 400 {
		t.Fatalf("encrypt with a missing key: %d", got)
	}
	e.ok(e.write("keys/k/rotate", nil))

	after := e.scrape()
	for _, c := range []struct {
		name   string
		labels map[string]string
		delta  float64
	}{
		{"cmk_requests_total", encrypted, 2},
		{"cmk_requests_total", missing, 1},
		{"cmk_hsm_call_duration_seconds", hsmEncrypt, 2},
		{"cmk_rotations_total", map[string]string{"cause": "manual"}, 1},
	} {
		if got := e.value(after, c.name, c.labels) - e.value(before, c.name, c.labels); got != c.delta {
			t.Errorf("%s%v moved by %v, want %v", c.name, c.labels, got, c.delta)
		}
	}
	for name, labels := range map[string]map[string]string{
		"cmk_keys":                          {"state": "active"},
		"cmk_key_versions":                  {"state": "active"},
		"cmk_key_versions_near_usage_limit": {},
		"cmk_hsm_sessions":                  {},
		"cmk_hsm_sessions_in_use":           {},
		"cmk_hsm_connected":                 {},
	} {
		if _, ok := series(after, name, labels); !ok {
			t.Errorf("no series %s%v", name, labels)
		}
	}
	if got := e.value(after, "cmk_keys", map[string]string{"state": "active"}); got != 1 {
		t.Errorf("cmk_keys{state=active} = %v, want 1", got)
	}
	if got := e.value(after, "cmk_key_versions", map[string]string{"state": "active"}); got != 2 {
		t.Errorf("cmk_key_versions{state=active} = %v, want 2 after a rotation", got)
	}
	if got := e.value(after, "cmk_hsm_connected", map[string]string{}); got != 1 {
		t.Errorf("cmk_hsm_connected = %v", got)
	}
	if _, ok := after["cmk_key_requests_total"]; ok {
		t.Errorf("per-key series without the operator's opt-in: %v", after["cmk_key_requests_total"])
	}
}

func TestMetricsCountDenialsByCondition(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8"}))
	resp, err := e.b.HandleRequest(context.Background(), &logical.Request{ID: fmt.Sprint("req-", requestCount.Add(1)),
		Operation: logical.UpdateOperation, Path: "encrypt/k", Data: map[string]interface{}{"plaintext": "eA=="},
		Storage: e.storage, Connection: &logical.Connection{RemoteAddr: "192.0.2.1"}})
	if got := status(resp, err); got != 403 {
		t.Fatalf("encrypt from outside allowed_cidrs: %d %v", got, err)
	}
	m := e.scrape()
	if got := e.value(m, "cmk_denials_total", map[string]string{"condition": "allowed_cidrs"}); got != 1 {
		t.Errorf("cmk_denials_total{condition=allowed_cidrs} = %v, want 1", got)
	}
	if got := e.value(m, "cmk_requests_total", map[string]string{"operation": "encrypt", "status": "403", "key_type": "aes256-gcm96"}); got != 1 {
		t.Errorf("the denied request counted %v times with status 403", got)
	}
}

// Per-key labels only where the operator opts in, for at most per_key_label_limit keys; the rest are counted as
// key="_other", and how many keys that is.
func TestMetricsPerKeyLabelsAreOptInAndCapped(t *testing.T) {
	e := newTestBackend(t)
	for _, k := range []string{"a", "b", "c"} {
		e.ok(e.write("keys/"+k, nil))
	}
	if got := status(e.write("config/metrics", map[string]interface{}{"per_key_labels": true, "per_key_label_limit": 0})); got != 400 {
		t.Fatalf("per_key_label_limit 0: %d", got)
	}
	resp := e.ok(e.write("config/metrics", map[string]interface{}{"per_key_labels": true, "per_key_label_limit": 1}))
	if resp.Data["per_key_labels"] != true || resp.Data["per_key_label_limit"] != 1 {
		t.Fatalf("config/metrics: %v", resp.Data)
	}
	for _, k := range []string{"a", "b", "c", "a", "c"} {
		encryptOK(t, e, k, "x")
	}
	m := e.scrape()
	for key, want := range map[string]float64{"a": 2, otherKeys: 3, "b": 0, "c": 0} {
		if got := e.value(m, "cmk_key_requests_total", map[string]string{"key": key, "operation": "encrypt"}); got != want {
			t.Errorf("cmk_key_requests_total{key=%q} = %v, want %v", key, got, want)
		}
	}
	if got := e.value(m, "cmk_metrics_keys_aggregated_total", map[string]string{}); got != 2 {
		t.Errorf("cmk_metrics_keys_aggregated_total = %v, want 2 (b and c)", got)
	}
	// Turned off, the per-key series go at once.
	e.ok(e.write("config/metrics", map[string]interface{}{"per_key_labels": false}))
	encryptOK(t, e, "b", "x")
	if got := e.scrape()["cmk_key_requests_total"]; got != nil {
		t.Errorf("per-key series after per_key_labels=false: %v", got)
	}
}

// Each mount's metrics are its own: the plugin process serves several mounts.
func TestMetricsAreTheMounts(t *testing.T) {
	one, two := newTestBackend(t), newTestBackend(t)
	one.ok(one.write("keys/k", nil))
	encryptOK(t, one, "k", "x")
	labels := map[string]string{"operation": "encrypt", "status": "200", "key_type": "aes256-gcm96"}
	if got := two.value(two.scrape(), "cmk_requests_total", labels); got != 0 {
		t.Fatalf("another mount's encryption counted here: %v", got)
	}
	if got := one.value(one.scrape(), "cmk_requests_total", labels); got != 1 {
		t.Fatalf("the mount's encryption counted %v times", got)
	}
	if got := status(one.request(logical.ReadOperation, "metrics", map[string]interface{}{"format": "json"})); got != 400 {
		t.Fatalf("format=json: %d, want 400", got)
	}
	if strings.Contains(fmt.Sprint(one.b.PathsSpecial.Unauthenticated), "metrics") {
		t.Fatal("metrics must be governed by Vault's ACL")
	}
}

// The key gauges an alert watches: versions near their usage limit, and scheduled rotations that are late.
func TestMetricsGaugeUsageNearLimitAndOverdueRotations(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/config", map[string]interface{}{"max_encryptions_per_version": 10, "auto_rotate_period": "1h"}))
	near := func() float64 { return e.value(e.scrape(), "cmk_key_versions_near_usage_limit", map[string]string{}) }
	for range 8 {
		encryptOK(t, e, "k", "x")
	}
	if got := near(); got != 0 {
		t.Fatalf("8 of 10 encryptions: %v versions near the limit, want 0", got)
	}
	encryptOK(t, e, "k", "x")
	if got := near(); got != 1 {
		t.Fatalf("9 of 10 encryptions: %v versions near the limit, want 1", got)
	}
	encryptOK(t, e, "k", "x") // the last: the key rotates for usage, and its new version has made none
	m := e.scrape()
	if got := e.value(m, "cmk_key_versions_near_usage_limit", map[string]string{}); got != 0 {
		t.Fatalf("after the rotation for usage: %v versions near the limit, want 0", got)
	}
	if got := e.value(m, "cmk_rotations_total", map[string]string{"cause": "usage"}); got != 1 {
		t.Fatalf("cmk_rotations_total{cause=usage} = %v, want 1", got)
	}

	k, err := e.b.keys.Get(context.Background(), e.storage, "k")
	if err != nil {
		t.Fatal(err)
	}
	overdue := func(at time.Time) float64 {
		body, err := e.b.metrics.exposition([]*keys.Key{k}, e.b.keys, at)
		if err != nil {
			t.Fatal(err)
		}
		var p expfmt.TextParser
		families, err := p.TextToMetricFamilies(bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		return e.value(families, "cmk_keys_rotation_overdue", map[string]string{})
	}
	if got := overdue(k.NextRotation.Add(time.Minute)); got != 0 {
		t.Fatalf("a minute after the rotation was due: %v overdue, want 0", got)
	}
	if got := overdue(k.NextRotation.Add(rotationLate + time.Minute)); got != 1 {
		t.Fatalf("%v after the rotation was due: %v overdue, want 1", rotationLate+time.Minute, got)
	}
}
