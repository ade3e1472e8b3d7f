package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/prometheus/common/expfmt"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// anonymous is a client of the dev server without a Vault token.
func anonymous(t *testing.T) *api.Client {
	t.Helper()
	c, err := dev.Client.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	return c
}

// health is the status and body of GET <mount>/health as a caller without a token gets them.
func health(t *testing.T, mountPath string) (int, string) {
	t.Helper()
	resp, err := anonymous(t).Logical().ReadRawWithContext(context.Background(), mountPath+"/health")
	if resp == nil {
		t.Fatalf("health: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// Vault lets a caller without a token through to health (the backend's unauthenticated path), and to nothing
// else of the engine; the answer names the state and nothing of the configuration.
func TestHealthNeedsNoVaultToken(t *testing.T) {
	m := newMount(t, dev)
	if code, body := health(t, m.Path); code != 200 || !strings.Contains(body, `"status":"ok"`) {
		t.Fatalf("health of a configured mount: %d %s", code, body)
	}
	out, err := dev.CLI("", "read", "-field=status", m.Path+"/health")
	if err != nil || strings.TrimSpace(out) != "ok" {
		t.Fatalf("vault read %s/health without a token: %v %s", m.Path, err, out)
	}

	bare := m.Path + "-unconfigured"
	if err := dev.Client.Sys().Mount(bare, &api.MountInput{Type: vaulttest.PluginName}); err != nil {
		t.Fatal(err)
	}
	code, body := health(t, bare)
	if code != 503 || !strings.Contains(body, "not configured") {
		t.Fatalf("health of an unconfigured mount: %d %s", code, body)
	}
	for _, secret := range []string{m.Label, m.PIN, softhsm.Library} {
		if strings.Contains(body, secret) {
			t.Fatalf("health reveals %q: %s", secret, body)
		}
	}
	for _, path := range []string{m.Path + "/metrics", m.Path + "/config/hsm", m.Path + "/keys"} {
		if _, err := anonymous(t).Logical().Read(path); statusOf(err) != 403 {
			t.Errorf("%s without a token: %v, want 403", path, err)
		}
	}
}

// The metrics path answers Prometheus's text format through Vault to a token whose policy reads it.
func TestMetricsThroughVault(t *testing.T) {
	m := newMount(t, dev)
	mustWrite(t, dev.Client, m.Path+"/keys/k", nil)
	encrypt(t, dev.Client, m, "k", "counted")
	scraper := policyToken(t, m, "cmk-metrics.hcl")
	if _, err := scraper.Logical().Write(m.Path+"/encrypt/k", map[string]interface{}{"plaintext": b64("x")}); statusOf(err) != 403 {
		t.Fatalf("the scraper's token encrypts: %v", err)
	}
	resp, err := scraper.Logical().ReadRawWithDataWithContext(context.Background(), m.Path+"/metrics",
		map[string][]string{"format": {"prometheus"}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Fatalf("content type %q", ct)
	}
	var p expfmt.TextParser
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("the exposition does not parse: %v", err)
	}
	found := false
	for _, s := range families["cmk_requests_total"].GetMetric() {
		labels := map[string]string{}
		for _, l := range s.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["operation"] == "encrypt" && labels["status"] == "200" && s.GetCounter().GetValue() == 1 {
			found = true
		}
	}
	if !found {
		t.Fatalf("no cmk_requests_total{operation=encrypt,status=200} 1 in %v", families["cmk_requests_total"])
	}
}

// A real Prometheus scrapes the mount with a token file, as the README's configuration does, and its HTTP API
// gives the engine's values back.
func TestPrometheusScrapesTheMount(t *testing.T) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("Debian's prometheus is not installed: make deps installs it")
	}
	m := newMount(t, dev)
	mustWrite(t, dev.Client, m.Path+"/keys/k", nil)
	for i := range 3 {
		encrypt(t, dev.Client, m, "k", fmt.Sprint("scraped ", i))
	}
	scraper := policyToken(t, m, "cmk-metrics.hcl")

	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "vault-token")
	if err := os.WriteFile(tokenFile, []byte(scraper.Token()), 0o600); err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: vault-cmk
    metrics_path: /v1/%s/metrics
    params:
      format: [prometheus]
    authorization:
      credentials_file: %s
    static_configs:
      - targets: [%q]
`, m.Path, tokenFile, dev.Addr)
	configFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(configFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	addr, err := vaulttest.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd := exec.Command(bin, "--config.file="+configFile, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill() // the process started here, by its pid
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("prometheus log:\n%s", logs.String())
		}
	}()

	query := func(q string) (float64, bool) {
		resp, err := http.Get("http://" + addr + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return 0, false
		}
		defer resp.Body.Close()
		var out struct {
			Data struct {
				Result []struct {
					Value []interface{} `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if json.NewDecoder(resp.Body).Decode(&out) != nil || len(out.Data.Result) != 1 || len(out.Data.Result[0].Value) != 2 {
			return 0, false
		}
		var v float64
		_, err = fmt.Sscan(fmt.Sprint(out.Data.Result[0].Value[1]), &v)
		return v, err == nil
	}
	encrypted := `cmk_requests_total{job="vault-cmk",operation="encrypt",status="200",key_type="aes256-gcm96"}`
	deadline := time.Now().Add(90 * time.Second)
	for {
		if v, ok := query(encrypted); ok && v == 3 {
			break
		}
		if time.Now().After(deadline) {
			v, _ := query(`up{job="vault-cmk"}`)
			t.Fatalf("Prometheus has no %s of 3 after 90s (up=%v)", encrypted, v)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if v, ok := query(`cmk_keys{job="vault-cmk",state="active"}`); !ok || v != 1 {
		t.Fatalf("cmk_keys{state=active} through Prometheus: %v %v", v, ok)
	}
	if v, ok := query(`sum(cmk_hsm_call_duration_seconds_count{job="vault-cmk",operation="AES-GCM encrypt"})`); !ok || v < 3 {
		t.Fatalf("HSM encrypt calls through Prometheus: %v %v", v, ok)
	}
}
