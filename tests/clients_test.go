package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// The tests in this file run real third-party Transit clients, unchanged, against Vault's built-in transit/ and
// against a cmk mount on the same dev server, with the same assertions: only the mount path differs, as it does
// for an application moving from one to the other. Vault's transit seal is the Vault binary itself; SOPS and
// the library clients (transit-clients, a driver of go-kms-wrapping, vault-client-go and sigstore's hashivault
// KMS) are built by scripts/build-clients.sh from the pinned module scripts/clients into the directory named by
// CMK_E2E_CLIENTS.

// clientBin returns the path of a built client, skipping the test when CMK_E2E_CLIENTS is unset.
func clientBin(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv("CMK_E2E_CLIENTS")
	if dir == "" {
		t.Skip("third-party clients skipped: set CMK_E2E_CLIENTS to the directory scripts/build-clients.sh builds them into (.build/clients; make e2e does)")
	}
	bin := filepath.Join(dir, name)
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("CMK_E2E_CLIENTS=%s has no %s (run scripts/build-clients.sh): %v", dir, name, err)
	}
	return bin
}

var (
	transitOnce sync.Once
	transitErr  error
	clientKeys  atomic.Int32
)

// builtinTransit mounts Vault's own Transit engine at transit/ on the dev server, once per process.
func builtinTransit(t *testing.T) string {
	t.Helper()
	transitOnce.Do(func() {
		transitErr = dev.Client.Sys().Mount("transit", &api.MountInput{Type: "transit"})
	})
	if transitErr != nil {
		t.Fatalf("mount transit/: %v", transitErr)
	}
	return "transit"
}

// onBothEngines runs f against transit/ and against a new cmk mount, as the subtests "transit" and "cmk".
func onBothEngines(t *testing.T, f func(t *testing.T, mount string)) {
	t.Run("transit", func(t *testing.T) { f(t, builtinTransit(t)) })
	t.Run("cmk", func(t *testing.T) { f(t, newMount(t, dev).Path) })
}

// clientKey is a key name not used before in this process (transit/ is shared by the tests and by -count).
func clientKey(base string) string { return fmt.Sprintf("%s-%d", base, clientKeys.Add(1)) }

// clientEnv is the test's environment without Vault, OpenBao, SOPS or sigstore settings, with HOME in dir (no
// ~/.vault-token is read), plus extra.
func clientEnv(dir string, extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "VAULT_") || strings.HasPrefix(name, "BAO_") || strings.HasPrefix(name, "SOPS_") ||
			name == "TRANSIT_SECRET_ENGINE_PATH" || name == "HOME" {
			continue
		}
		env = append(env, kv)
	}
	return append(append(env, "HOME="+dir), extra...)
}

// runDriver runs one library client's scenario (scripts/clients/transit-clients) against mount; the driver
// prints each step, and on failure the HTTP exchanges of the failing step.
func runDriver(t *testing.T, bin, client, mount string) {
	t.Helper()
	cmd := exec.Command(bin, "-addr", "http://"+dev.Addr, "-token", dev.RootToken, "-mount", mount,
		"-client", client, "-key", clientKey(client))
	cmd.Env = clientEnv(t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s against %s/: %v\n%s", client, mount, err, out)
	}
	t.Logf("%s", out)
}

// TestClientGoKMSWrapping: go-kms-wrapping's transit wrapper (Vault's seal, Boundary's KMS) encrypts, decrypts,
// follows a rotation (key id v1, then v2; old blobs still decrypt) and refuses a tampered blob.
func TestClientGoKMSWrapping(t *testing.T) {
	bin := clientBin(t, "transit-clients")
	onBothEngines(t, func(t *testing.T, mount string) { runDriver(t, bin, "go-kms-wrapping", mount) })
}

// TestClientVaultClientGo: vault-client-go's typed Transit methods with WithMountPath: encrypt, decrypt, rotate,
// read key, rewrap, sign, verify, export public-key, CSR, cache configuration.
func TestClientVaultClientGo(t *testing.T) {
	bin := clientBin(t, "transit-clients")
	onBothEngines(t, func(t *testing.T, mount string) { runDriver(t, bin, "vault-client-go", mount) })
}

// TestClientSigstore: sigstore's hashivault KMS (cosign's hashivault://) with TRANSIT_SECRET_ENGINE_PATH creates
// an ecdsa-p256 key, signs, verifies remotely and locally, and refuses another message.
func TestClientSigstore(t *testing.T) {
	bin := clientBin(t, "transit-clients")
	onBothEngines(t, func(t *testing.T, mount string) { runDriver(t, bin, "sigstore", mount) })
}

// TestClientSOPS: the SOPS binary encrypts a JSON file with --hc-vault-transit, decrypts it, still decrypts it
// after the key is rotated, and `sops rotate` re-encrypts its data key under the new version.
func TestClientSOPS(t *testing.T) {
	sops := clientBin(t, "sops")
	onBothEngines(t, func(t *testing.T, mount string) {
		key := clientKey("sops")
		mustWrite(t, dev.Client, mount+"/keys/"+key, map[string]interface{}{"type": "aes256-gcm96"})
		dir := t.TempDir()
		plain := `{"database": {"user": "app", "password": "s3cr3t-sops"}, "port": 5432}`
		if err := os.WriteFile(filepath.Join(dir, "secrets.json"), []byte(plain), 0o600); err != nil {
			t.Fatal(err)
		}
		uri := "http://" + dev.Addr + "/v1/" + mount + "/keys/" + key
		run := func(args ...string) []byte {
			t.Helper()
			cmd := exec.Command(sops, append([]string{"--disable-version-check"}, args...)...)
			cmd.Dir = dir
			cmd.Env = clientEnv(dir, "VAULT_ADDR=http://"+dev.Addr, "VAULT_TOKEN="+dev.RootToken)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("sops %s against %s/: %v\n%s", strings.Join(args, " "), mount, err, stderr.String())
			}
			return out
		}
		// wantVersion checks the encrypted file names this mount and key, its data key is under version v, and
		// no secret is in clear.
		wantVersion := func(stage string, v int) string {
			t.Helper()
			raw, err := os.ReadFile(filepath.Join(dir, "secrets.enc.json"))
			if err != nil {
				t.Fatal(err)
			}
			var f struct {
				Database struct{ Password string } `json:"database"`
				Sops     struct {
					HCVault []struct {
						Address    string `json:"vault_address"`
						EnginePath string `json:"engine_path"`
						KeyName    string `json:"key_name"`
						Enc        string `json:"enc"`
					} `json:"hc_vault"`
				} `json:"sops"`
			}
			if err := json.Unmarshal(raw, &f); err != nil {
				t.Fatalf("%s: encrypted file is not JSON: %v\n%s", stage, err, raw)
			}
			hv := f.Sops.HCVault
			if len(hv) != 1 || hv[0].EnginePath != mount || hv[0].KeyName != key || hv[0].Address != "http://"+dev.Addr ||
				!strings.HasPrefix(hv[0].Enc, fmt.Sprintf("vault:v%d:", v)) {
				t.Fatalf("%s: hc_vault %+v, want one entry for %s/keys/%s with a vault:v%d: data key", stage, hv, mount, key, v)
			}
			if strings.Contains(string(raw), "s3cr3t-sops") || !strings.HasPrefix(f.Database.Password, "ENC[") {
				t.Fatalf("%s: the password is not encrypted:\n%s", stage, raw)
			}
			return f.Database.Password
		}
		wantPlain := func(stage string) {
			t.Helper()
			var got, want interface{}
			if err := json.Unmarshal(run("decrypt", "secrets.enc.json"), &got); err != nil {
				t.Fatalf("%s: decrypted output is not JSON: %v", stage, err)
			}
			_ = json.Unmarshal([]byte(plain), &want)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("%s: decrypted %v, want %v", stage, got, want)
			}
		}

		enc := run("encrypt", "--hc-vault-transit", uri, "secrets.json")
		if err := os.WriteFile(filepath.Join(dir, "secrets.enc.json"), enc, 0o600); err != nil {
			t.Fatal(err)
		}
		before := wantVersion("encrypted", 1)
		wantPlain("decrypt")

		mustWrite(t, dev.Client, mount+"/keys/"+key+"/rotate", nil)
		wantPlain("decrypt after the key's rotation")

		run("rotate", "-i", "secrets.enc.json")
		if after := wantVersion("sops rotate", 2); after == before {
			t.Fatal("sops rotate kept the same data key: the value's ciphertext did not change")
		}
		wantPlain("decrypt after sops rotate")
	})
}

// TestClientTransitAutoUnseal: a second Vault server whose seal is "transit" on the mount is initialised with
// recovery keys, unseals by itself when restarted, and again after the seal key is rotated on the first server;
// what was written before is still there.
func TestClientTransitAutoUnseal(t *testing.T) {
	onBothEngines(t, func(t *testing.T, mount string) {
		key := clientKey("seal")
		mustWrite(t, dev.Client, mount+"/keys/"+key, map[string]interface{}{"type": "aes256-gcm96"})
		dir := t.TempDir()
		addr, err := vaulttest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		config := fmt.Sprintf(`storage "file" {
  path = %q
}
listener "tcp" {
  address     = %q
  tls_disable = true
}
seal "transit" {
  address         = %q
  token           = %q
  key_name        = %q
  mount_path      = %q
  disable_renewal = "true"
}
api_addr      = %q
disable_mlock = true
`, filepath.Join(dir, "data"), addr, "http://"+dev.Addr, dev.RootToken, key, mount+"/", "http://"+addr)
		configPath := filepath.Join(dir, "vault.hcl")
		if err := os.WriteFile(configPath, []byte(config), 0o600); err != nil {
			t.Fatal(err)
		}
		s := &vaulttest.Server{VaultBin: vaultBin, SoftHSM: softhsm, Dir: dir, Addr: addr,
			LogPath: filepath.Join(dir, "vault.log"), Args: []string{"server", "-config=" + configPath}}
		start := func(stage string) {
			t.Helper()
			if err := s.Start(); err != nil {
				t.Fatalf("%s: start the transit-sealed server: %v", stage, err)
			}
		}
		start("first start")
		t.Cleanup(s.Stop)

		st, err := s.Client.Sys().SealStatus()
		if err != nil || st.Initialized || st.Type != "transit" || !st.RecoverySeal {
			t.Fatalf("before init: %+v %v; want an uninitialised server with a transit recovery seal", st, err)
		}
		out, err := s.CLI("", "operator", "init", "-recovery-shares=1", "-recovery-threshold=1", "-format=json")
		if err != nil {
			t.Fatalf("operator init: %v\n%s\nlog:\n%s", err, out, vaulttest.Tail(s.LogPath, 30))
		}
		var initOut struct {
			RootToken    string   `json:"root_token"`
			RecoveryKeys []string `json:"recovery_keys_b64"`
		}
		if err := json.Unmarshal([]byte(out), &initOut); err != nil || initOut.RootToken == "" || len(initOut.RecoveryKeys) != 1 {
			t.Fatalf("operator init output: %v\n%s", err, out)
		}
		s.RootToken = initOut.RootToken
		s.Client.SetToken(initOut.RootToken)
		waitUnsealed(t, s, "after init")
		if _, err := s.Client.Logical().Write("cubbyhole/probe", map[string]interface{}{"value": "kept"}); err != nil {
			t.Fatalf("write on the unsealed server: %v", err)
		}

		restart := func(stage string) {
			t.Helper()
			s.Stop()
			start(stage)
			waitUnsealed(t, s, stage)
			got, err := s.Client.Logical().Read("cubbyhole/probe")
			if err != nil || got == nil || got.Data["value"] != "kept" {
				t.Fatalf("%s: read what was written before: %v %v", stage, got, err)
			}
		}
		restart("restart")

		mustWrite(t, dev.Client, mount+"/keys/"+key+"/rotate", nil)
		k, err := dev.Client.Logical().Read(mount + "/keys/" + key)
		if err != nil || fmt.Sprint(k.Data["latest_version"]) != "2" {
			t.Fatalf("seal key after rotation: %v %v", k, err)
		}
		restart("restart after the seal key's rotation")
	})
}

// waitUnsealed waits until s reports itself initialised and unsealed by its transit seal (no unseal keys are
// ever given to it). The deadline only bounds a hang; nothing is asserted about how long it takes.
func waitUnsealed(t *testing.T, s *vaulttest.Server, stage string) {
	t.Helper()
	var last *api.SealStatusResponse
	var lastErr error
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		last, lastErr = s.Client.Sys().SealStatus()
		if lastErr == nil && last.Initialized && !last.Sealed {
			if last.Type != "transit" {
				t.Fatalf("%s: seal type %q, want transit", stage, last.Type)
			}
			return
		}
	}
	t.Fatalf("%s: the server did not unseal itself: %+v %v\nlog:\n%s", stage, last, lastErr, vaulttest.Tail(s.LogPath, 30))
}

// TestClientTerraformProviderRequests replays, against both engines, the requests Terraform's Vault provider makes
// for vault_transit_secret_backend_key and vault_transit_secret_cache_config (neither Terraform nor OpenTofu's
// Vault provider can be built from the module proxy here, see CLIENTS.md): read from the provider's source, they
// include key_size 0 for every type and, on the key's first configuration, the misspelt min_encryption_versoin.
func TestClientTerraformProviderRequests(t *testing.T) {
	onBothEngines(t, func(t *testing.T, mount string) {
		c := dev.Client
		for _, typ := range []string{"aes256-gcm96", "rsa-2048", "ecdsa-p256", "hmac"} {
			key := clientKey("tf")
			path := mount + "/keys/" + key
			size := 0
			if typ == "hmac" {
				size = 32
			}
			// resource create: the key, then its configuration.
			mustWrite(t, c, path, map[string]interface{}{"convergent_encryption": false, "derived": false, "type": typ,
				"auto_rotate_period": 0, "key_size": size})
			mustWrite(t, c, path+"/config", map[string]interface{}{"min_decryption_version": 1, "min_encryption_versoin": 0,
				"deletion_allowed": true, "exportable": false, "allow_plaintext_backup": false, "auto_rotate_period": 0})
			// resource read: the fields the provider parses as numbers must be numbers.
			s, err := c.Logical().Read(path)
			if err != nil || s == nil {
				t.Fatalf("%s: read: %v", typ, err)
			}
			for _, f := range []string{"latest_version", "min_available_version", "min_decryption_version", "min_encryption_version"} {
				if _, ok := s.Data[f].(json.Number); !ok {
					t.Fatalf("%s: %s is %T, the provider needs a number", typ, f, s.Data[f])
				}
			}
			if s.Data["deletion_allowed"] != true || (s.Data["keys"] == nil && typ != "hmac") { // Transit shows no keys for hmac keys
				t.Fatalf("%s: read after create: %v", typ, s.Data)
			}
			// resource update, then destroy.
			mustWrite(t, c, path+"/rotate", nil)
			mustWrite(t, c, path+"/config", map[string]interface{}{"min_decryption_version": 1, "min_encryption_version": 2,
				"deletion_allowed": true, "exportable": false, "allow_plaintext_backup": false, "auto_rotate_period": 3600})
			if s, _ = c.Logical().Read(path); s.Data["min_encryption_version"] != json.Number("2") || s.Data["auto_rotate_period"] != json.Number("3600") {
				t.Fatalf("%s: read after update: %v", typ, s.Data)
			}
			if _, err := c.Logical().Delete(path); err != nil {
				t.Fatalf("%s: delete: %v", typ, err)
			}
			// Gone at once on Transit; on cmk after the mount's deletion grace period (7 days by default), meanwhile
			// serving nothing (the provider reads nothing after a destroy).
			s, err = c.Logical().Read(path)
			if err != nil || (s != nil && (mount == "transit" || s.Data["deletion_scheduled_time"] == "")) {
				t.Fatalf("%s: after delete: %v %v", typ, s, err)
			}
		}
		// vault_transit_secret_cache_config: write, read back, restore.
		before, err := c.Logical().Read(mount + "/cache-config")
		if err != nil {
			t.Fatal(err)
		}
		mustWrite(t, c, mount+"/cache-config", map[string]interface{}{"size": 500})
		if s, _ := c.Logical().Read(mount + "/cache-config"); s == nil || s.Data["size"] != json.Number("500") {
			t.Fatalf("cache-config read back: %v", s)
		}
		mustWrite(t, c, mount+"/cache-config", map[string]interface{}{"size": before.Data["size"]})
	})
}
