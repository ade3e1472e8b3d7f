package tests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// TestPluginReloadAndUpgrade: reloading the plugin and moving a mount to a newly registered version keep every
// key and ciphertext working.
func TestPluginReloadAndUpgrade(t *testing.T) {
	c := dev.Client
	m := newMount(t, dev)
	mustWrite(t, c, m.Path+"/keys/k", nil)
	before := encrypt(t, c, m, "k", "before reload")

	if out, err := dev.CLI(dev.RootToken, "plugin", "reload", "-plugin="+pluginName); err != nil {
		t.Fatalf("plugin reload: %v\n%s", err, out)
	}
	if decrypt(t, c, m, "k", before) != "before reload" {
		t.Fatal("decrypt after reload")
	}
	afterReload := encrypt(t, c, m, "k", "after reload")

	// The binary reports its version (make build sets it from the VERSION file) and Vault shows it.
	mounts, err := c.Sys().ListMounts()
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("../VERSION")
	if err != nil {
		t.Fatal(err)
	}
	if got := mounts[m.Path+"/"].RunningVersion; got != strings.TrimSpace(string(want)) {
		t.Fatalf("the mount runs %q, want the VERSION file's %q", got, want)
	}

	// A release of a new version: the same code built as v0.2.0 (its version set at build time, as make build
	// does), registered under that version, the mount tuned to it, then reloaded. Vault refuses to register it
	// under a version other than the one it reports.
	v2 := filepath.Join(t.TempDir(), pluginName)
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-X github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk.Version=v0.2.0",
		"-o", v2, "../cmd/vault-plugin-secrets-cmk")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build v0.2.0: %v\n%s", err, out)
	}
	if err := dev.RegisterPlugin(v2, "v9.9.9", ""); err == nil || !strings.Contains(err.Error(), "did not match") {
		t.Fatalf("a binary reporting v0.2.0 registered as v9.9.9: %v", err)
	}
	if err := dev.RegisterPlugin(v2, "v0.2.0", ""); err != nil {
		t.Fatalf("register v0.2.0: %v", err)
	}
	if out, err := dev.CLI(dev.RootToken, "secrets", "tune", "-plugin-version=v0.2.0", m.Path); err != nil {
		t.Fatalf("tune: %v\n%s", err, out)
	}
	if out, err := dev.CLI(dev.RootToken, "plugin", "reload", "-plugin="+pluginName); err != nil {
		t.Fatalf("reload: %v\n%s", err, out)
	}
	mounts, err = c.Sys().ListMounts()
	if err != nil {
		t.Fatal(err)
	}
	if got := mounts[m.Path+"/"].RunningVersion; got != "v0.2.0" {
		t.Fatalf("mount runs %q, want v0.2.0", got)
	}
	for ct, want := range map[string]string{before: "before reload", afterReload: "after reload"} {
		if decrypt(t, c, m, "k", ct) != want {
			t.Fatalf("decrypt after upgrade: %s", want)
		}
	}
	mustWrite(t, c, m.Path+"/keys/k/rotate", nil)
	if decrypt(t, c, m, "k", encrypt(t, c, m, "k", "v2")) != "v2" {
		t.Fatal("round trip on the new version")
	}
}

// TestTwoMountsOnOneToken: mounts sharing a token (and the plugin process) cannot see or use each other's keys,
// and a mount cannot ride on another's login with a wrong PIN.
func TestTwoMountsOnOneToken(t *testing.T) {
	c := dev.Client
	a := newMount(t, dev)
	b := mount{Path: a.Path + "-b", Label: a.Label, PIN: a.PIN}
	mountOn(t, dev, b)

	mustWrite(t, c, a.Path+"/keys/shared", nil)
	mustWrite(t, c, b.Path+"/keys/shared", nil)
	mustWrite(t, c, a.Path+"/keys/only-a", nil)
	ctA := encrypt(t, c, a, "shared", "for a")
	if _, err := c.Logical().Write(b.Path+"/decrypt/shared", map[string]interface{}{"ciphertext": ctA}); statusOf(err) != 400 {
		t.Fatalf("mount b decrypted mount a's ciphertext: %v", err)
	}
	if _, err := c.Logical().Write(b.Path+"/decrypt/only-a", map[string]interface{}{"ciphertext": ctA}); statusOf(err) != 400 {
		t.Fatalf("mount b used mount a's key: %v", err)
	}
	list, err := c.Logical().List(b.Path + "/keys")
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(list.Data["keys"]); got != "[shared]" {
		t.Fatalf("mount b lists %s", got)
	}

	// On the token, each mount's objects carry its own label prefix and distinct CKA_IDs.
	ka, _ := c.Logical().Read(a.Path + "/keys/shared")
	kb, _ := c.Logical().Read(b.Path + "/keys/shared")
	va := ka.Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
	vb := kb.Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
	if va["hsm_id"] == vb["hsm_id"] || va["label"] == vb["label"] {
		t.Fatalf("mounts share HSM identity: %v / %v", va, vb)
	}
	tok, err := hsm.Open(hsm.Config{Library: softhsm.Library, TokenLabel: a.Label, PIN: a.PIN, PoolSize: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	objs, err := tok.ListObjects(context.Background(), "cmk/")
	if err != nil {
		t.Fatal(err)
	}
	prefixes := map[string]int{}
	versions, audit := 0, 0
	for _, o := range objs {
		prefixes[strings.Join(strings.SplitN(o.Label, "/", 3)[:2], "/")]++
		if !o.Sensitive || o.Extractable || !o.NeverExtractable {
			t.Errorf("%s is not protected: %+v", o.Label, o)
		}
		switch {
		case strings.Contains(o.Label, "/uses/"): // an encrypted version's usage witness (hsm/witness.go)
		case strings.Contains(o.Label, "/audit_key:"): // the mount's audit key, which signs its keys' history heads
			audit++
		default:
			versions++
		}
	}
	// one per version (no HMAC secret is made until a first HMAC), and one audit key per mount
	if len(prefixes) != 2 || versions != 3 || audit != 2 {
		t.Fatalf("objects by mount: %v (%d objects, %d of them versions' keys, %d audit keys)", prefixes, len(objs), versions, audit)
	}

	// A third mount naming the same token with a wrong PIN is refused, although the plugin process is logged in.
	bad := mount{Path: a.Path + "-c", Label: a.Label, PIN: "not-the-pin"}
	if err := c.Sys().Mount(bad.Path, &api.MountInput{Type: pluginName}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Logical().Write(bad.Path+"/config/hsm", map[string]interface{}{"token_label": bad.Label, "pin": bad.PIN})
	if statusOf(err) != 400 || !strings.Contains(err.Error(), "PIN") {
		t.Fatalf("wrong PIN on a shared token: %v", err)
	}
}

// Issue 19 (6), over HTTP: a second mount's config/hsm with wrong PINs starts a wait, and during it the right PIN was
// accepted (204): whoever could write config/hsm learnt the PIN at HTTP speed. Now the right PIN during the wait
// gets the wrong one's status and message, and the mount that holds the PIN keeps serving.
func TestConfigHSMWaitTellsNothingOverHTTP(t *testing.T) {
	c := dev.Client
	owner := newMount(t, dev)
	mustWrite(t, c, owner.Path+"/keys/k", nil)
	guesser := owner.Path + "-guesser"
	if err := c.Sys().Mount(guesser, &api.MountInput{Type: pluginName}); err != nil {
		t.Fatal(err)
	}
	guess := func(pin string) (int, string) {
		_, err := c.Logical().Write(guesser+"/config/hsm", map[string]interface{}{"token_label": owner.Label, "pin": pin})
		if err == nil {
			return 204, ""
		}
		var re *api.ResponseError
		if errors.As(err, &re) {
			return re.StatusCode, strings.Join(re.Errors, "; ")
		}
		return 0, err.Error()
	}
	for i := 0; ; i++ {
		code, msg := guess(fmt.Sprintf("guess-%d", i))
		if code == 204 {
			t.Fatalf("wrong PIN %d accepted", i)
		}
		if strings.Contains(msg, "login attempts delayed") {
			break
		}
		if i > 10 {
			t.Fatalf("no wait after 10 wrong PINs: %d %s", code, msg)
		}
	}
	wrongCode, wrongMsg := guess("guess-x")
	rightCode, rightMsg := guess(owner.PIN)
	if rightCode != wrongCode || rightMsg != wrongMsg {
		t.Fatalf("during the wait the right PIN is answered %d %q, a wrong one %d %q", rightCode, rightMsg, wrongCode, wrongMsg)
	}
	encrypt(t, c, owner, "k", "still served")
}

// TestRestartWithPersistentStorage: a Vault server with file storage, stopped and started again and unsealed,
// still decrypts every ciphertext it issued.
func TestRestartWithPersistentStorage(t *testing.T) {
	dir := t.TempDir()
	s, err := vaulttest.NewServer(dir, vaultBin, pluginBin, softhsm)
	if err != nil {
		t.Fatal(err)
	}
	addr, pdir := s.Addr, s.PluginDir
	conf := filepath.Join(dir, "vault.hcl")
	hcl := fmt.Sprintf(`
storage "file" {
  path = %q
}
listener "tcp" {
  address     = %q
  tls_disable = true
}
api_addr         = "http://%s"
plugin_directory = %q
disable_mlock    = true
`, filepath.Join(dir, "data"), addr, addr, pdir)
	if err := os.WriteFile(conf, []byte(hcl), 0o600); err != nil {
		t.Fatal(err)
	}
	s.Args = []string{"server", "-config=" + conf}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { s.Stop() }()
	init, err := s.Client.Sys().Init(&api.InitRequest{SecretShares: 1, SecretThreshold: 1})
	if err != nil {
		t.Fatal(err)
	}
	unseal := func() {
		t.Helper()
		if st, err := s.Client.Sys().Unseal(init.Keys[0]); err != nil || st.Sealed {
			t.Fatalf("unseal: %v", err)
		}
	}
	unseal()
	s.RootToken = init.RootToken
	s.Client.SetToken(init.RootToken)
	if err := s.RegisterPlugin(pluginBin, "", ""); err != nil {
		t.Fatal(err)
	}
	m := newMount(t, s)
	c := s.Client
	mustWrite(t, c, m.Path+"/keys/durable", nil)
	issued := map[string]string{}
	for i := 0; i < 30; i++ {
		if i%10 == 9 {
			mustWrite(t, c, m.Path+"/keys/durable/rotate", nil)
		}
		pt := fmt.Sprintf("record %d", i)
		issued[encrypt(t, c, m, "durable", pt)] = pt
	}

	s.Stop()
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	unseal()
	s.Client.SetToken(init.RootToken)
	for ct, pt := range issued {
		if got := decrypt(t, c, m, "durable", ct); got != pt {
			t.Fatalf("after restart %s decrypts to %q, want %q", ct[:12], got, pt)
		}
	}
	if cfg, err := c.Logical().Read(m.Path + "/config/hsm"); err != nil || cfg.Data["connected"] != true {
		t.Fatalf("config/hsm after restart: %v %v", cfg, err)
	}
	if k, _ := c.Logical().Read(m.Path + "/keys/durable"); fmt.Sprint(k.Data["latest_version"]) != "4" {
		t.Fatalf("latest_version after restart: %v", k.Data["latest_version"])
	}
}
