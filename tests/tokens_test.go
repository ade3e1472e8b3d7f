package tests

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// TestEveryOperationOnEveryToken mounts the engine on each PKCS#11 implementation of the matrix besides SoftHSM
// (which the rest of the suite covers) through the real server: the plugin is registered once more per module, with
// the module and its parameters in its environment as an operator sets them (CMK_PKCS11_LIBRARY,
// CMK_PKCS11_INIT_PARAMS), and every operation the token serves is run through Vault's API and CLI; every key type
// it cannot serve is refused at creation with a 400 naming what it lacks.
func TestEveryOperationOnEveryToken(t *testing.T) {
	for _, kind := range tokentest.Selected() {
		if kind == tokentest.SoftHSM {
			continue
		}
		t.Run(string(kind), func(t *testing.T) {
			p, err := tokentest.Setup(kind, filepath.Join(workDir, "tokens", string(kind)))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			tk, err := p.Token("e2e")
			if err != nil {
				t.Fatal(err)
			}
			name := pluginName + "-" + string(kind)
			env := append([]string{"CMK_PKCS11_LIBRARY=" + tk.Library, "CMK_PKCS11_INIT_PARAMS=" + tk.InitParams}, tk.Env...)
			if err := dev.RegisterPluginOn(pluginBin, name, env); err != nil {
				t.Fatal(err)
			}
			c := dev.Client
			path := "cmk-" + string(kind)
			if err := c.Sys().Mount(path, &api.MountInput{Type: name}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Sys().Unmount(path) })
			mustWrite(t, c, path+"/config/hsm", map[string]interface{}{"token_label": tk.Label, "pin": tk.PIN, "raw_rsa_oaep_fallback": true})
			cfg, err := c.Logical().Read(path + "/config/hsm")
			if err != nil || cfg.Data["connected"] != true {
				t.Fatalf("config/hsm: %v %v", err, cfg)
			}
			want, known := tokentest.Expected[kind]
			if !known {
				t.Fatalf("no known capabilities for %s: add them to tokentest.Expected", kind)
			}
			served := map[string]bool{}
			for typ, v := range cfg.Data["key_types"].(map[string]interface{}) {
				entry := v.(map[string]interface{})
				served[typ] = entry["supported"] == true
				// The engine's probe against what the token is known to serve: a probe that wrongly said
				// "unsupported" must fail here, not pass as a refusal below.
				alg := string(keys.Type(typ).Info().Alg)
				if knownServed, listed := want.ServesAlgorithm(alg, false), want.ServesAlgorithm(alg, true); (knownServed && !served[typ]) || (!listed && served[typ]) {
					t.Errorf("config/hsm says %s supported=%v on %s; it is known to serve it: %v (%v)", typ, served[typ], kind, knownServed, entry["missing"])
				}
				if !served[typ] {
					// Refused at creation, naming what the token lacks: never a 500 at first use.
					_, err := c.Logical().Write(path+"/keys/refused-"+typ, map[string]interface{}{"type": typ})
					missing := fmt.Sprint(entry["missing"].([]interface{})[0])
					if statusOf(err) != 400 || !strings.Contains(err.Error(), strings.Fields(missing)[0]) {
						t.Errorf("%s on %s: %v, want 400 naming %s", typ, kind, err, missing)
					}
				}
			}
			t.Logf("%s serves %v", kind, served)
			m := mount{Path: path, Label: tk.Label, PIN: tk.PIN}
			if served["aes256-gcm96"] {
				t.Run("aes", func(t *testing.T) { aesOperations(t, m) })
				t.Run("byok-aes", func(t *testing.T) { importOnToken(t, m, "aes256-gcm96", cfg.Data["key_wrap_mechanism_in_use"] != nil) })
				t.Run("working-copies", func(t *testing.T) { workingCopies(t, m, kind) })
			}
			if served["hmac"] {
				t.Run("hmac", func(t *testing.T) { hmacOperations(t, m) })
			}
			if served["rsa-2048"] {
				t.Run("rsa", func(t *testing.T) { signOperations(t, m, "rsa-2048", kind != tokentest.TPM2) })
				if served["rsa-4096"] {
					t.Run("byok-rsa", func(t *testing.T) { importOnToken(t, m, "rsa-2048", cfg.Data["key_wrap_mechanism_in_use"] != nil) })
				}
			}
			if served["ecdsa-p256"] {
				t.Run("ecdsa", func(t *testing.T) { signOperations(t, m, "ecdsa-p256", false) })
				if served["rsa-4096"] {
					t.Run("byok-ecdsa", func(t *testing.T) { importOnToken(t, m, "ecdsa-p256", cfg.Data["key_wrap_mechanism_in_use"] != nil) })
				}
			}
			t.Run("agility", func(t *testing.T) { agilityOnToken(t, m, served) })
			r := mustWrite(t, c, path+"/random/32", nil)
			if b, _ := base64.StdEncoding.DecodeString(r.Data["random_bytes"].(string)); len(b) != 32 {
				t.Fatalf("random: %v", r.Data)
			}
		})
	}
}

// workingCopies: where the token's probe found session-object copies faster (NSS softokn decrypts a token key from
// its database per use), a hot version gets one; its disable and its key's disable destroy it before the write
// returns, the disabled version serves nothing, and working_copies=0 leaves none.
func workingCopies(t *testing.T, m mount, kind tokentest.Kind) {
	c := dev.Client
	probe := mustRead(t, c, m.Path+"/config/hsm").Data["working_copies_probe"].(map[string]interface{})
	if probe["faster"] != true {
		if kind == tokentest.NSS {
			t.Fatalf("NSS softokn serves session-object copies many times faster than its token objects; the probe says %v", probe)
		}
		t.Skipf("copies are not used on %s: %v", kind, probe)
	}
	held := func() int {
		n, _ := mustRead(t, c, m.Path+"/config/hsm").Data["working_copies_held"].(json.Number).Int64()
		return int(n)
	}
	heldAtLeast := func(n int) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); held() < n; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d working copies held, want at least %d", held(), n)
			}
		}
	}
	mustWrite(t, c, m.Path+"/keys/wc", nil)
	base := held()
	v1 := encrypt(t, c, m, "wc", "under v1")
	encrypt(t, c, m, "wc", "under v1 again")
	heldAtLeast(base + 1)
	mustWrite(t, c, m.Path+"/keys/wc/rotate", nil)
	encrypt(t, c, m, "wc", "under v2")
	encrypt(t, c, m, "wc", "under v2 again")
	heldAtLeast(base + 2)
	if decrypt(t, c, m, "wc", v1) != "under v1" {
		t.Fatal("v1 through its copy")
	}
	mustWrite(t, c, m.Path+"/keys/wc/versions/1/disable", nil)
	if n := held(); n != base+1 {
		t.Fatalf("%d copies held after version 1's disable, want %d", n, base+1)
	}
	if _, err := c.Logical().Write(m.Path+"/decrypt/wc", map[string]interface{}{"ciphertext": v1}); statusOf(err) != 400 {
		t.Fatalf("decrypt under a disabled version: %v", err)
	}
	mustWrite(t, c, m.Path+"/keys/wc/disable", nil)
	if n := held(); n != base {
		t.Fatalf("%d copies held after the key's disable, want %d", n, base)
	}
	mustWrite(t, c, m.Path+"/keys/wc/enable", nil)
	mustWrite(t, c, m.Path+"/keys/wc/versions/1/enable", nil)
	if decrypt(t, c, m, "wc", v1) != "under v1" {
		t.Fatal("v1 after its enable")
	}
	mustWrite(t, c, m.Path+"/config/hsm", map[string]interface{}{"working_copies": 0})
	defer mustWrite(t, c, m.Path+"/config/hsm", map[string]interface{}{"working_copies": 1024})
	encrypt(t, c, m, "wc", "no copies")
	encrypt(t, c, m, "wc", "no copies")
	if n := held(); n != 0 {
		t.Fatalf("%d copies held with working_copies 0", n)
	}
}

// aesOperations: AES-GCM with associated data under both nonce sources, rewrap, data keys, rotation, and the
// destruction of a version, whose ciphertexts then fail as such.
func aesOperations(t *testing.T, m mount) {
	c := dev.Client
	mustWrite(t, c, m.Path+"/keys/k", nil)
	for _, ivSource := range []string{"os", "hsm"} {
		mustWrite(t, c, m.Path+"/config/hsm", map[string]interface{}{"iv_source": ivSource})
		r := mustWrite(t, c, m.Path+"/encrypt/k", map[string]interface{}{"plaintext": b64("with aad"), "associated_data": b64("ctx")})
		ct := r.Data["ciphertext"].(string)
		r = mustWrite(t, c, m.Path+"/decrypt/k", map[string]interface{}{"ciphertext": ct, "associated_data": b64("ctx")})
		if r.Data["plaintext"] != b64("with aad") {
			t.Fatalf("%s: decrypt %v", ivSource, r.Data)
		}
		if _, err := c.Logical().Write(m.Path+"/decrypt/k", map[string]interface{}{"ciphertext": ct, "associated_data": b64("other")}); statusOf(err) != 400 {
			t.Fatalf("wrong associated data: %v", err)
		}
	}
	v1 := encrypt(t, c, m, "k", "first")
	mustWrite(t, c, m.Path+"/keys/k/rotate", nil)
	r := mustWrite(t, c, m.Path+"/rewrap/k", map[string]interface{}{"ciphertext": v1})
	if !strings.HasPrefix(r.Data["ciphertext"].(string), "vault:v2:") || decrypt(t, c, m, "k", r.Data["ciphertext"].(string)) != "first" {
		t.Fatalf("rewrap: %v", r.Data)
	}
	dk := mustWrite(t, c, m.Path+"/datakey/plaintext/k", map[string]interface{}{"bits": 256})
	back := mustWrite(t, c, m.Path+"/decrypt/k", map[string]interface{}{"ciphertext": dk.Data["ciphertext"]})
	if back.Data["plaintext"] != dk.Data["plaintext"] {
		t.Fatal("data key does not decrypt to itself")
	}
	mustWrite(t, c, m.Path+"/config/keys", map[string]interface{}{"deletion_grace_period": 0})
	mustWrite(t, c, m.Path+"/keys/k/versions/1/destroy", nil)
	if _, err := c.Logical().Write(m.Path+"/decrypt/k", map[string]interface{}{"ciphertext": v1}); statusOf(err) != 400 {
		t.Fatalf("decrypt under a destroyed version: %v", err)
	}
	// The AES version's HMAC secret, made on first use beside the key (NSS keeps one secret key per CKA_ID).
	h := mustWrite(t, c, m.Path+"/hmac/k", map[string]interface{}{"input": b64("mac me")})
	v := mustWrite(t, c, m.Path+"/verify/k", map[string]interface{}{"input": b64("mac me"), "hmac": h.Data["hmac"]})
	if v.Data["valid"] != true {
		t.Fatalf("hmac verify: %v", v.Data)
	}
	if decrypt(t, c, m, "k", encrypt(t, c, m, "k", "after hmac")) != "after hmac" {
		t.Fatal("the AES key after its HMAC secret was made")
	}
}

func hmacOperations(t *testing.T, m mount) {
	c := dev.Client
	mustWrite(t, c, m.Path+"/keys/h", map[string]interface{}{"type": "hmac", "key_size": 32})
	for _, alg := range []string{"sha2-256", "sha2-512"} {
		h := mustWrite(t, c, m.Path+"/hmac/h/"+alg, map[string]interface{}{"input": b64("data")})
		v := mustWrite(t, c, m.Path+"/verify/h/"+alg, map[string]interface{}{"input": b64("data"), "hmac": h.Data["hmac"]})
		if v.Data["valid"] != true {
			t.Fatalf("%s: %v", alg, v.Data)
		}
	}
}

// signOperations signs and verifies; for RSA also PSS where the token offers it, and encryption.
func signOperations(t *testing.T, m mount, typ string, rsaDecrypt bool) {
	c := dev.Client
	key := strings.ReplaceAll(typ, "-", "")
	mustWrite(t, c, m.Path+"/keys/"+key, map[string]interface{}{"type": typ})
	schemes := []map[string]interface{}{{}}
	if strings.HasPrefix(typ, "rsa") {
		schemes = []map[string]interface{}{{"signature_algorithm": "pkcs1v15"}, {"signature_algorithm": "pss"}}
	}
	for _, extra := range schemes {
		body := map[string]interface{}{"input": b64("sign me")}
		for k, v := range extra {
			body[k] = v
		}
		s, err := c.Logical().Write(m.Path+"/sign/"+key+"/sha2-256", body)
		if extra["signature_algorithm"] == "pss" && statusOf(err) == 400 && strings.Contains(err.Error(), "RSA-PSS") {
			t.Logf("PSS refused: %v", err) // the token lacks it (tpm2-pkcs11)
			continue
		}
		if err != nil {
			t.Fatalf("sign %v: %v", extra, err)
		}
		body["signature"] = s.Data["signature"]
		v := mustWrite(t, c, m.Path+"/verify/"+key+"/sha2-256", body)
		if v.Data["valid"] != true {
			t.Fatalf("verify %v: %v", extra, v.Data)
		}
	}
	if rsaDecrypt {
		ct := encrypt(t, c, m, key, "for the RSA key")
		if decrypt(t, c, m, key, ct) != "for the RSA key" {
			t.Fatal("RSA round trip")
		}
	}
}

// importOnToken imports a key of typ with the real `vault transit import`, then uses it.
func importOnToken(t *testing.T, m mount, typ string, keyWrap bool) {
	var material []byte
	switch typ {
	case "aes256-gcm96":
		material = make([]byte, 32)
		rand.Read(material)
	case "rsa-2048":
		k, _ := rsa.GenerateKey(rand.Reader, 2048)
		material, _ = x509.MarshalPKCS8PrivateKey(k)
	case "ecdsa-p256":
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		material, _ = x509.MarshalPKCS8PrivateKey(k)
	}
	name := "imported-" + strings.ReplaceAll(typ, "-", "")
	out, err := dev.CLI(dev.RootToken, "transit", "import", m.Path+"/keys/"+name, base64.StdEncoding.EncodeToString(material), "type="+typ)
	if !keyWrap {
		if err == nil || !strings.Contains(out, "Code: 400") {
			t.Fatalf("import on a token without key wrap: %v\n%s", err, out)
		}
		return
	}
	if err != nil {
		t.Fatalf("vault transit import %s: %v\n%s", typ, err, out)
	}
	c := dev.Client
	if typ == "aes256-gcm96" {
		if decrypt(t, c, m, name, encrypt(t, c, m, name, "imported")) != "imported" {
			t.Fatal("round trip with the imported key")
		}
		return
	}
	s := mustWrite(t, c, m.Path+"/sign/"+name, map[string]interface{}{"input": b64("x")})
	v := mustWrite(t, c, m.Path+"/verify/"+name, map[string]interface{}{"input": b64("x"), "signature": s.Data["signature"]})
	if v.Data["valid"] != true {
		t.Fatalf("signature of the imported key: %v", v.Data)
	}
}
