package tests

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// An auditor takes a key's evidence with the vault CLI and checks it with cmk-evidence and the audit public key
// alone: it verifies; history altered through sys/raw afterwards makes the next bundle fail, naming the event.
func TestEvidenceTakenWithTheCLIAndCheckedOffline(t *testing.T) {
	s, err := vaulttest.NewServer(filepath.Join(workDir, "evidence"), vaultBin, pluginBin, softhsm)
	if err != nil {
		t.Fatal(err)
	}
	s.RawStorage = true
	if err := s.StartDevMode("e2e-evidence-root"); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if err := s.RegisterPlugin(pluginBin, "", ""); err != nil {
		t.Fatal(err)
	}
	m := newMount(t, s)
	c := s.Client
	mustWrite(t, c, m.Path+"/keys/pay", map[string]interface{}{"owner": "team-payments", "tags": "env=prod", "data_assets": "cards"})
	mustWrite(t, c, m.Path+"/keys/pay/rotate", nil)
	for i := 0; i < 3; i++ {
		mustWrite(t, c, m.Path+"/encrypt/pay", map[string]interface{}{"plaintext": "aGVsbG8="})
	}

	dir := t.TempDir()
	tool := filepath.Join(dir, "cmk-evidence")
	if out, err := exec.Command("go", "build", "-o", tool, "../cmd/cmk-evidence").CombinedOutput(); err != nil {
		t.Fatalf("build cmk-evidence: %v\n%s", err, out)
	}
	vaultRead := func(path, file string) string {
		t.Helper()
		cmd := exec.Command(vaultBin, "read", "-format=json", path)
		cmd.Env = append(os.Environ(), "VAULT_ADDR=http://"+s.Addr, "VAULT_TOKEN="+s.RootToken)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("vault read %s: %v", path, err)
		}
		f := filepath.Join(dir, file)
		if err := os.WriteFile(f, out, 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	run := func(args ...string) (string, int) {
		t.Helper()
		out, err := exec.Command(tool, args...).CombinedOutput()
		var exit *exec.ExitError
		switch {
		case err == nil:
			return string(out), 0
		case errors.As(err, &exit):
			return string(out), exit.ExitCode()
		}
		t.Fatalf("cmk-evidence %v: %v", args, err)
		return "", -1
	}
	auditKey := vaultRead(m.Path+"/audit_key", "audit-key.json")
	bundle := vaultRead(m.Path+"/keys/pay/evidence", "pay.json")
	if out, code := run("verify", "--audit-key", auditKey, bundle); code != 0 || !strings.Contains(out, "VERIFIED") {
		t.Fatalf("an untouched bundle: exit %d\n%s", code, out)
	}
	report := filepath.Join(dir, "pay.html")
	if out, code := run("report", "--audit-key", auditKey, "-o", report, bundle); code != 0 {
		t.Fatalf("report: exit %d\n%s", code, out)
	}
	if verdict, charts := renderInChromium(t, report); verdict != "VERIFIED" || charts == 0 {
		t.Fatalf("the report of the engine's bundle renders %q with %d charts", verdict, charts)
	}

	// Storage rolled back (the history page and its signed head together) after an auditor kept a bundle: the
	// next bundle fails against the one kept.
	mounts, err := c.Sys().ListMounts()
	if err != nil {
		t.Fatal(err)
	}
	uuid := mounts[m.Path+"/"].UUID
	headPath := "sys/raw/logical/" + uuid + "/history/pay/head"
	oldPage := readPageOf(t, c, uuid, "pay", 0)
	oldHead := mustRead(t, c, headPath).Data["value"]
	mustWrite(t, c, m.Path+"/keys/pay/rotate", nil)
	kept := vaultRead(m.Path+"/keys/pay/evidence", "pay-kept.json")
	if out, code := run("verify", "--audit-key", auditKey, "--previous", bundle, kept); code != 0 || !strings.Contains(out, "ok     continuity") {
		t.Fatalf("a bundle whose history goes on from the earlier one: exit %d\n%s", code, out)
	}
	writePage(t, c, oldPage)
	mustWrite(t, c, headPath, map[string]interface{}{"value": oldHead})
	rolledBack := vaultRead(m.Path+"/keys/pay/evidence", "pay-rolled-back.json")
	if out, code := run("verify", "--audit-key", auditKey, "--previous", kept, rolledBack); code != 1 || !strings.Contains(out, "history rolled back") {
		t.Fatalf("a bundle after storage was rolled back, against the one kept: exit %d\n%s", code, out)
	}

	// The history altered in storage: the next bundle is signed, and what it says of the history fails.
	page := readPageOf(t, c, uuid, "pay", 0)
	page.events[1] = json.RawMessage(strings.Replace(string(page.events[1]), `"rotated"`, `"created"`, 1))
	writePage(t, c, page)
	tampered := vaultRead(m.Path+"/keys/pay/evidence", "pay-tampered.json")
	out, code := run("verify", "--audit-key", auditKey, tampered)
	if code != 1 || !strings.Contains(out, "FAILED") || !strings.Contains(out, "index 1 (seq 2)") {
		t.Fatalf("a bundle of altered history: exit %d\n%s", code, out)
	}
	if _, code := run("report", "--audit-key", auditKey, "-o", report, tampered); code != 1 {
		t.Fatalf("report of a bundle of altered history: exit %d", code)
	}
	if verdict, _ := renderInChromium(t, report); verdict != "FAILED" {
		t.Fatalf("the report of a bundle of altered history renders %q", verdict)
	}
}

// renderInChromium opens a report in Debian's headless Chromium and returns the verdict and the number of charts
// in the DOM it rendered. Any console message fails the test: the report has no script, so none is expected.
func renderInChromium(t *testing.T, report string) (verdict string, charts int) {
	t.Helper()
	const chromium = "/usr/bin/chromium"
	if _, err := os.Stat(chromium); err != nil {
		t.Fatalf("headless Chromium renders the report (make deps installs Debian's chromium): %v", err)
	}
	cmd := exec.Command(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--no-first-run", "--user-data-dir="+t.TempDir(),
		"--enable-logging=stderr", "--v=0", "--dump-dom", "file://"+report)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	dom, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium: %v\n%s", err, stderr.String())
	}
	for _, line := range strings.Split(stderr.String(), "\n") {
		if strings.Contains(line, ":CONSOLE") {
			t.Errorf("%s: %s", report, line)
		}
	}
	m := regexp.MustCompile(`id="verdict-word">([A-Z]+)<`).FindSubmatch(dom)
	if m == nil {
		t.Fatalf("no verdict in the rendered report")
	}
	return string(m[1]), strings.Count(string(dom), "<svg")
}
