package tests

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/logical"

	cmk "github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk"
)

// TestKeyAndCryptoAPI drives the foundation API through Vault's HTTP API with the official Go client.
func TestKeyAndCryptoAPI(t *testing.T) {
	c := dev.Client
	m := newMount(t, dev)
	p := m.Path

	cfg, err := c.Logical().Read(p + "/config/hsm")
	if err != nil || cfg.Data["connected"] != true || cfg.Data["token_label"] != m.Label {
		t.Fatalf("config/hsm: %v %v", err, cfg)
	}
	if _, has := cfg.Data["pin"]; has {
		t.Fatal("config/hsm returns the PIN")
	}

	key := mustWrite(t, c, p+"/keys/k", nil)
	if key.Data["type"] != "aes256-gcm96" || key.Data["protection_level"] != "hsm" {
		t.Fatalf("create: %v", key.Data)
	}
	mustWrite(t, c, p+"/keys/k128", map[string]interface{}{"type": "aes128-gcm96"})
	list, err := c.Logical().List(p + "/keys")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range list.Data["keys"].([]interface{}) {
		names = append(names, n.(string))
	}
	sort.Strings(names)
	if strings.Join(names, ",") != "k,k128" {
		t.Fatalf("list: %v", names)
	}

	ct1 := encrypt(t, c, m, "k", "first")
	if !strings.HasPrefix(ct1, "vault:v1:") || decrypt(t, c, m, "k", ct1) != "first" {
		t.Fatalf("round trip: %s", ct1)
	}
	mustWrite(t, c, p+"/keys/k/rotate", nil)
	ct2 := encrypt(t, c, m, "k", "second")
	if !strings.HasPrefix(ct2, "vault:v2:") {
		t.Fatalf("after rotate: %s", ct2)
	}
	rw := mustWrite(t, c, p+"/rewrap/k", map[string]interface{}{"ciphertext": ct1})
	if !strings.HasPrefix(rw.Data["ciphertext"].(string), "vault:v2:") || decrypt(t, c, m, "k", rw.Data["ciphertext"].(string)) != "first" {
		t.Fatalf("rewrap: %v", rw.Data)
	}
	dk := mustWrite(t, c, p+"/datakey/plaintext/k", map[string]interface{}{"bits": 512})
	raw, _ := base64.StdEncoding.DecodeString(dk.Data["plaintext"].(string))
	if len(raw) != 64 || decrypt(t, c, m, "k", dk.Data["ciphertext"].(string)) != string(raw) {
		t.Fatal("datakey")
	}
	rnd := mustWrite(t, c, p+"/random/24", nil)
	if r, _ := base64.StdEncoding.DecodeString(rnd.Data["random_bytes"].(string)); len(r) != 24 {
		t.Fatalf("random: %v", rnd.Data)
	}
	h := mustWrite(t, c, p+"/hash/sha2-256", map[string]interface{}{"input": b64("abc")})
	if h.Data["sum"] != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
		t.Fatalf("hash: %v", h.Data)
	}

	// min_decryption_version takes effect through the real server.
	mustWrite(t, c, p+"/keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	if _, err := c.Logical().Write(p+"/decrypt/k", map[string]interface{}{"ciphertext": ct1}); statusOf(err) != 400 {
		t.Fatalf("decrypt below min_decryption_version: %v", err)
	}

	// Caller mistakes are 400s with a message, never 500s.
	for _, bad := range []struct {
		path string
		data map[string]interface{}
	}{
		{p + "/encrypt/k", map[string]interface{}{"plaintext": "%%%"}},
		{p + "/decrypt/k", map[string]interface{}{"ciphertext": "vault:v2:AAAA"}},
		{p + "/decrypt/k", map[string]interface{}{"ciphertext": strings.Replace(ct2, "vault:v2:", "vault:v9:", 1)}},
		{p + "/decrypt/k128", map[string]interface{}{"ciphertext": strings.Replace(ct2, "vault:v2:", "vault:v1:", 1)}},
		{p + "/decrypt/missing", map[string]interface{}{"ciphertext": ct2}},
		{p + "/keys/x", map[string]interface{}{"exportable": true}},
		{p + "/keys/x", map[string]interface{}{"derived": true}},
		{p + "/encrypt/k", map[string]interface{}{"batch_input": []interface{}{}}},
	} {
		_, err := c.Logical().Write(bad.path, bad.data)
		if statusOf(err) != 400 {
			t.Errorf("%s %v: %v, want 400", bad.path, bad.data, err)
		}
	}
	for _, path := range []string{p + "/export/encryption-key/k", p + "/backup/k"} {
		_, err := c.Logical().Read(path)
		if statusOf(err) != 400 || !strings.Contains(err.Error(), "never leaves the HSM") {
			t.Errorf("%s: %v", path, err)
		}
	}

	// Deletion with no grace period destroys the key at once, as Transit.
	mustWrite(t, c, p+"/config/keys", map[string]interface{}{"deletion_grace_period": 0})
	mustWrite(t, c, p+"/keys/k128/config", map[string]interface{}{"deletion_allowed": true})
	if _, err := c.Logical().Delete(p + "/keys/k128"); err != nil {
		t.Fatal(err)
	}
	if s, err := c.Logical().Read(p + "/keys/k128"); err != nil || s != nil {
		t.Fatalf("read after delete: %v %v", s, err)
	}
}

// An engine whose HSM is not configured answers 503 with what to do, through the real server.
func TestUnconfiguredMountIs503(t *testing.T) {
	c := dev.Client
	path := "cmk-unconfigured"
	if err := c.Sys().Mount(path, &api.MountInput{Type: pluginName}); err != nil {
		t.Fatal(err)
	}
	_, err := c.Logical().Write(path+"/encrypt/k", map[string]interface{}{"plaintext": b64("x")})
	if statusOf(err) != 503 || !strings.Contains(err.Error(), "config/hsm") {
		t.Fatalf("encrypt on an unconfigured mount: %v", err)
	}
}

func TestBatchOf1000ThroughVault(t *testing.T) {
	c := dev.Client
	m := newMount(t, dev)
	mustWrite(t, c, m.Path+"/keys/batch", nil)
	in := make([]interface{}, 1000)
	for i := range in {
		in[i] = map[string]interface{}{"plaintext": b64(fmt.Sprintf("item %d", i)), "reference": fmt.Sprint(i)}
	}
	enc := mustWrite(t, c, m.Path+"/encrypt/batch", map[string]interface{}{"batch_input": in})
	results := enc.Data["batch_results"].([]interface{})
	if len(results) != 1000 {
		t.Fatalf("%d results", len(results))
	}
	dec := make([]interface{}, len(results))
	for i, r := range results {
		item := r.(map[string]interface{})
		if item["error"] != nil || item["reference"] != fmt.Sprint(i) {
			t.Fatalf("item %d: %v", i, item)
		}
		dec[i] = map[string]interface{}{"ciphertext": item["ciphertext"], "reference": item["reference"]}
	}
	// One bad item fails alone; partial_failure_response_code lets the caller take the rest as a success.
	dec = append(dec, map[string]interface{}{"ciphertext": "vault:v1:AAAA", "reference": "bad"})
	out := mustWrite(t, c, m.Path+"/decrypt/batch", map[string]interface{}{"batch_input": dec, "partial_failure_response_code": 200})
	results = out.Data["batch_results"].([]interface{})
	for i, r := range results[:1000] {
		item := r.(map[string]interface{})
		if item["plaintext"] != b64(fmt.Sprintf("item %d", i)) || item["reference"] != fmt.Sprint(i) {
			t.Fatalf("decrypt item %d: %v", i, item)
		}
	}
	last := results[1000].(map[string]interface{})
	if last["reference"] != "bad" || !strings.Contains(fmt.Sprint(last["error"]), "invalid ciphertext") {
		t.Fatalf("bad item: %v", last)
	}
	// Without the override, a partial failure is a 400 carrying every result.
	_, err := c.Logical().Write(m.Path+"/decrypt/batch", map[string]interface{}{"batch_input": dec})
	if statusOf(err) != 400 {
		t.Fatalf("partial failure status: %v", err)
	}
}

// TestCLI uses the vault command as a person at a shell would.
func TestCLI(t *testing.T) {
	m := newMount(t, dev)
	run := func(args ...string) string {
		t.Helper()
		out, err := dev.CLI(dev.RootToken, args...)
		if err != nil {
			t.Fatalf("vault %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(out)
	}
	run("write", "-f", m.Path+"/keys/cli")
	ct := run("write", "-field=ciphertext", m.Path+"/encrypt/cli", "plaintext="+b64("from the shell"))
	if !strings.HasPrefix(ct, "vault:v1:") {
		t.Fatalf("ciphertext %q", ct)
	}
	pt := run("write", "-field=plaintext", m.Path+"/decrypt/cli", "ciphertext="+ct)
	if raw, _ := base64.StdEncoding.DecodeString(pt); string(raw) != "from the shell" {
		t.Fatalf("plaintext %q", pt)
	}
	run("write", "-f", m.Path+"/keys/cli/rotate")
	if v := run("read", "-field=latest_version", m.Path+"/keys/cli"); v != "2" {
		t.Fatalf("latest_version %q", v)
	}
	if out := run("read", m.Path+"/keys/cli"); !strings.Contains(out, "protection_level") || !strings.Contains(out, "hsm") {
		t.Fatalf("key read:\n%s", out)
	}
	mac := run("write", "-field=hmac", m.Path+"/hmac/cli/sha2-512", "input="+b64("mac me"))
	if v := run("write", "-field=valid", m.Path+"/verify/cli/sha2-512", "input="+b64("mac me"), "hmac="+mac); v != "true" {
		t.Fatalf("hmac verify: %q", v)
	}
	run("write", m.Path+"/keys/cli-rsa", "type=rsa-3072")
	rsaCT := run("write", "-field=ciphertext", m.Path+"/encrypt/cli-rsa", "plaintext="+b64("rsa via cli"))
	if pt := run("write", "-field=plaintext", m.Path+"/decrypt/cli-rsa", "ciphertext="+rsaCT); pt != b64("rsa via cli") {
		t.Fatalf("rsa round trip: %q", pt)
	}
	if out, err := dev.CLI(dev.RootToken, "write", m.Path+"/sign/cli", "input="+b64("x")); err == nil || !strings.Contains(out, "does not support signing") {
		t.Fatalf("sign with an AES key: %v\n%s", err, out)
	}
	if out := run("list", m.Path+"/keys"); !strings.Contains(out, "cli") {
		t.Fatalf("list:\n%s", out)
	}
	if out := run("path-help", m.Path+"/encrypt/cli"); !strings.Contains(out, "batch_input") || !strings.Contains(out, "associated_data") {
		t.Fatalf("path-help:\n%s", out)
	}
	if out, err := dev.CLI(dev.RootToken, "read", m.Path+"/export/encryption-key/cli"); err == nil || !strings.Contains(out, "never leaves the HSM") {
		t.Fatalf("export: %v\n%s", err, out)
	}
	checkOpenAPI(t, m.Path)
}

// checkOpenAPI compares the OpenAPI document the real server gives for the mount with the one the engine makes of
// its own paths (which TestOpenAPIDescribesEveryPath checks against the paths' declarations): every path of the
// engine is there, with each operation's id, and each parameter where it goes, with its enum; and the server adds
// no path of its own under the mount.
func checkOpenAPI(t *testing.T, mount string) {
	t.Helper()
	conf := logical.TestBackendConfig()
	conf.System.(*logical.StaticSystemView).PluginEnvironment = &logical.PluginEnvironment{VaultVersion: "1.21.0"} // the help path asks
	b, err := cmk.Factory(context.Background(), conf)
	if err != nil {
		t.Fatal(err)
	}
	own, err := b.HandleRequest(context.Background(), &logical.Request{Operation: logical.HelpOperation, Path: "", Storage: &logical.InmemStorage{}})
	if err != nil || own == nil || own.Data["openapi"] == nil {
		t.Fatalf("the engine's own OpenAPI document: %v %v", err, own)
	}
	var want, served openAPIDoc
	raw, _ := json.Marshal(own.Data["openapi"])
	if err := json.Unmarshal(raw, &want); err != nil {
		t.Fatal(err)
	}
	resp, err := dev.Client.Logical().ReadRaw("sys/internal/specs/openapi")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&served); err != nil {
		t.Fatal(err)
	}
	if len(want.Paths) < 30 {
		t.Fatalf("the engine's document has %d paths", len(want.Paths))
	}
	prefix := "/" + strings.TrimSuffix(mount, "/")
	for path, item := range want.Paths {
		got, ok := served.Paths[prefix+path]
		if !ok {
			t.Errorf("the server's OpenAPI lacks %s%s", prefix, path)
			continue
		}
		for method, op := range item.operations() {
			g := got.operations()[method]
			if g == nil {
				t.Errorf("%s %s%s: missing", method, prefix, path)
				continue
			}
			if g.OperationID != op.OperationID {
				t.Errorf("%s %s%s: operation id %q, the engine's %q", method, prefix, path, g.OperationID, op.OperationID)
			}
			if w, s := op.parameters(item), g.parameters(got); w != s {
				t.Errorf("%s %s%s: parameters %s, the engine's %s", method, prefix, path, s, w)
			}
		}
	}
	for path := range served.Paths {
		if rest, ok := strings.CutPrefix(path, prefix+"/"); ok && want.Paths["/"+rest] == nil {
			t.Errorf("the server's OpenAPI has %s, which the engine does not declare", path)
		}
	}
}

type openAPIDoc struct {
	Paths map[string]*openAPIPath `json:"paths"`
}

type openAPIPath struct {
	Parameters               []openAPIParameter `json:"parameters"`
	Get, Post, Delete, Patch *openAPIOperation
}

type openAPIOperation struct {
	OperationID string             `json:"operationId"`
	Parameters  []openAPIParameter `json:"parameters"`
}

type openAPIParameter struct {
	Name   string `json:"name"`
	In     string `json:"in"`
	Schema struct {
		Enum []interface{} `json:"enum"`
	} `json:"schema"`
}

func (p *openAPIPath) operations() map[string]*openAPIOperation {
	out := map[string]*openAPIOperation{}
	for method, op := range map[string]*openAPIOperation{"get": p.Get, "post": p.Post, "delete": p.Delete, "patch": p.Patch} {
		if op != nil {
			out[method] = op
		}
	}
	return out
}

// parameters lists an operation's parameters and its path's in order, with where each goes and its enum; the
// server's own parameters for the mount's path (…_mount_path) are left out.
func (op *openAPIOperation) parameters(p *openAPIPath) string {
	var out []string
	for _, prm := range append(append([]openAPIParameter{}, p.Parameters...), op.Parameters...) {
		if strings.HasSuffix(prm.Name, "_mount_path") {
			continue
		}
		out = append(out, fmt.Sprintf("%s in %s %v", prm.Name, prm.In, prm.Schema.Enum))
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}
