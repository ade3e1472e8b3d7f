package tests

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
)

// Crypto-agility through the real server: a key's algorithm changes at rotation within its purpose, each version
// keeps its own, signatures of every version verify with openssl and the version's published public key,
// ciphertexts of every version decrypt and rewrap onto the new algorithm, and the migration view names what each
// version made. On SoftHSM here; on the other tokens of the matrix from TestEveryOperationOnEveryToken, with the
// types each serves.

// TestCryptoAgilityOnSoftHSM runs the agility checks on a SoftHSM mount, with the vault CLI for the rotation.
func TestCryptoAgilityOnSoftHSM(t *testing.T) {
	m := newMount(t, dev)
	all := map[string]bool{}
	for _, typ := range []string{"aes128-gcm96", "aes256-gcm96", "hmac", "rsa-2048", "rsa-3072", "rsa-4096", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519"} {
		all[typ] = true
	}
	agilityOnToken(t, m, all)

	// The CLI as an operator types it: rotate to another type, set the next one, read the migration view.
	c := dev.Client
	mustWrite(t, c, m.Path+"/keys/cli", map[string]interface{}{"type": "aes128-gcm96"})
	if out, err := dev.CLI(dev.RootToken, "write", m.Path+"/keys/cli/rotate", "type=aes256-gcm96"); err != nil {
		t.Fatalf("vault write rotate type=: %v\n%s", err, out)
	}
	if out, err := dev.CLI(dev.RootToken, "write", m.Path+"/keys/cli/config", "next_type=aes128-gcm96"); err != nil {
		t.Fatalf("vault write config next_type=: %v\n%s", err, out)
	}
	out, err := dev.CLI(dev.RootToken, "read", "-format=json", m.Path+"/keys/cli/migration")
	if err != nil || !strings.Contains(out, `"aes128-gcm96"`) || !strings.Contains(out, `"pending_migration"`) || !strings.Contains(out, `"next_type": "aes128-gcm96"`) {
		t.Fatalf("vault read migration: %v\n%s", err, out)
	}

	// A key brought in with vault transit import keeps its imported version's type when it moves on.
	mustWrite(t, c, m.Path+"/config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true}) // SoftHSM 2.6 and the CLI's OAEP-SHA-256
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(ec)
	if out, err := dev.CLI(dev.RootToken, "transit", "import", m.Path+"/keys/byok", base64.StdEncoding.EncodeToString(der), "type=ecdsa-p256", "allow_rotation=true"); err != nil {
		t.Fatalf("vault transit import: %v\n%s", err, out)
	}
	mustWrite(t, c, m.Path+"/keys/byok/rotate", map[string]interface{}{"type": "ed25519"})
	versions := mustRead(t, c, m.Path+"/keys/byok").Data["versions"].(map[string]interface{})
	v1, v2 := versions["1"].(map[string]interface{}), versions["2"].(map[string]interface{})
	if v1["type"] != "ecdsa-p256" || v1["import_method"] == nil || v2["type"] != "ed25519" || v2["import_method"] != nil {
		t.Fatalf("imported key after a rotation to ed25519: %v / %v", v1, v2)
	}
	digest := sha256.Sum256([]byte("signed outside"))
	sig, _ := ecdsa.SignASN1(rand.Reader, ec, digest[:])
	body := map[string]interface{}{"input": b64("signed outside"), "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(sig)}
	if v := mustWrite(t, c, m.Path+"/verify/byok", body).Data["valid"]; v != true {
		t.Fatal("the imported key's own signature does not verify as version 1 after the move to ed25519")
	}
}

// agilityOnToken changes algorithms at rotation among the types the mount's token serves.
func agilityOnToken(t *testing.T, m mount, served map[string]bool) {
	c := dev.Client
	var signing []string
	for _, typ := range []string{"ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048", "rsa-3072"} {
		if served[typ] {
			signing = append(signing, typ)
		}
	}
	if len(signing) >= 2 {
		t.Run("signing", func(t *testing.T) { signingAcrossAlgorithms(t, c, m, signing) })
	}
	if served["aes128-gcm96"] && served["aes256-gcm96"] {
		t.Run("aes", func(t *testing.T) { encryptionAcrossAlgorithms(t, c, m, "agile-aes", "aes128-gcm96", "aes256-gcm96") })
	}
	if served["rsa-2048"] && served["rsa-3072"] {
		t.Run("rsa-encryption", func(t *testing.T) { encryptionAcrossAlgorithms(t, c, m, "agile-rsa", "rsa-2048", "rsa-3072") })
	}
	if served["hmac"] {
		t.Run("hmac", func(t *testing.T) {
			mustWrite(t, c, m.Path+"/keys/agile-hmac", map[string]interface{}{"type": "hmac", "key_size": 32})
			first := mustWrite(t, c, m.Path+"/hmac/agile-hmac", map[string]interface{}{"input": b64("x")}).Data["hmac"]
			mustWrite(t, c, m.Path+"/keys/agile-hmac/rotate", map[string]interface{}{"key_size": 48})
			second := mustWrite(t, c, m.Path+"/hmac/agile-hmac", map[string]interface{}{"input": b64("x")}).Data["hmac"]
			for _, mac := range []interface{}{first, second} {
				if v := mustWrite(t, c, m.Path+"/verify/agile-hmac", map[string]interface{}{"input": b64("x"), "hmac": mac}).Data["valid"]; v != true {
					t.Fatalf("hmac %v after the size change: %v", mac, v)
				}
			}
		})
	}
	// A change of purpose is refused whatever the token serves.
	if served["aes256-gcm96"] && len(signing) > 0 {
		mustWrite(t, c, m.Path+"/keys/agile-purpose", nil)
		if _, err := c.Logical().Write(m.Path+"/keys/agile-purpose/rotate", map[string]interface{}{"type": signing[0]}); statusOf(err) != 400 || !strings.Contains(err.Error(), "purpose") {
			t.Fatalf("a change of purpose: %v", err)
		}
	}
}

// signingAcrossAlgorithms signs with a key moved through types one rotation at a time; every version's signature
// then verifies in the engine and with openssl against the version's public key from the key read.
func signingAcrossAlgorithms(t *testing.T, c *api.Client, m mount, types []string) {
	dir := t.TempDir()
	msg := filepath.Join(dir, "msg")
	if err := os.WriteFile(msg, []byte("signed across algorithms"), 0o600); err != nil {
		t.Fatal(err)
	}
	input := b64("signed across algorithms")
	key := m.Path + "/keys/agile-sig"
	mustWrite(t, c, key, map[string]interface{}{"type": types[0]})
	sigs := map[int]string{}
	for i, typ := range types {
		if i > 0 {
			mustWrite(t, c, key+"/rotate", map[string]interface{}{"type": typ})
		}
		body := map[string]interface{}{"input": input}
		if strings.HasPrefix(typ, "rsa") {
			body["signature_algorithm"] = "pkcs1v15" // every token of the matrix serves it (tpm2-pkcs11's PSS is limited)
		}
		sigs[i+1] = mustWrite(t, c, m.Path+"/sign/agile-sig", body).Data["signature"].(string)
	}
	read := mustRead(t, c, key)
	if read.Data["type"] != types[len(types)-1] {
		t.Fatalf("the key's type after the rotations: %v", read.Data["type"])
	}
	published := read.Data["keys"].(map[string]interface{})
	versions := read.Data["versions"].(map[string]interface{})
	for n, sig := range sigs {
		typ := types[n-1]
		if got := versions[fmt.Sprint(n)].(map[string]interface{})["type"]; got != typ {
			t.Fatalf("version %d's type: %v, want %s", n, got, typ)
		}
		body := map[string]interface{}{"input": input, "signature": sig}
		if strings.HasPrefix(typ, "rsa") {
			body["signature_algorithm"] = "pkcs1v15"
		}
		if v := mustWrite(t, c, m.Path+"/verify/agile-sig", body).Data["valid"]; v != true {
			t.Fatalf("version %d (%s): the engine does not verify its signature", n, typ)
		}
		pub := published[fmt.Sprint(n)].(map[string]interface{})["public_key"].(string)
		if typ == "ed25519" {
			raw, _ := base64.StdEncoding.DecodeString(pub)
			der, _ := x509.MarshalPKIXPublicKey(ed25519.PublicKey(raw))
			pub = string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
		}
		pubFile, sigFile := filepath.Join(dir, fmt.Sprintf("v%d.pem", n)), filepath.Join(dir, fmt.Sprintf("v%d.sig", n))
		raw, err := base64.StdEncoding.DecodeString(sig[strings.LastIndex(sig, ":")+1:])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(pubFile, []byte(pub), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(sigFile, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		args := []string{"dgst", "-sha256", "-verify", pubFile, "-signature", sigFile, msg}
		if typ == "ed25519" {
			args = []string{"pkeyutl", "-verify", "-pubin", "-inkey", pubFile, "-rawin", "-in", msg, "-sigfile", sigFile}
		}
		if out, err := exec.Command("openssl", args...).CombinedOutput(); err != nil {
			t.Fatalf("openssl does not verify version %d (%s): %v\n%s", n, typ, err, out)
		}
	}
	mig := mustRead(t, c, key+"/migration").Data["algorithms"].(map[string]interface{})
	for _, typ := range types {
		if a, ok := mig[typ].(map[string]interface{}); !ok || fmt.Sprint(a["made"]) != "1" || fmt.Sprint(a["opened"]) != "1" {
			t.Fatalf("migration view for %s: %v", typ, mig[typ])
		}
	}
}

// encryptionAcrossAlgorithms encrypts under from, rotates to to, and checks that both versions' ciphertexts
// decrypt and that rewrap moves the old one onto the new algorithm.
func encryptionAcrossAlgorithms(t *testing.T, c *api.Client, m mount, name, from, to string) {
	mustWrite(t, c, m.Path+"/keys/"+name, map[string]interface{}{"type": from})
	old := encrypt(t, c, m, name, "under "+from)
	mustWrite(t, c, m.Path+"/keys/"+name+"/rotate", map[string]interface{}{"type": to})
	fresh := encrypt(t, c, m, name, "under "+to)
	if !strings.HasPrefix(fresh, "vault:v2:") {
		t.Fatalf("new encryption: %s", fresh)
	}
	if decrypt(t, c, m, name, old) != "under "+from || decrypt(t, c, m, name, fresh) != "under "+to {
		t.Fatal("ciphertexts of the two algorithms")
	}
	moved := mustWrite(t, c, m.Path+"/rewrap/"+name, map[string]interface{}{"ciphertext": old}).Data["ciphertext"].(string)
	if !strings.HasPrefix(moved, "vault:v2:") || decrypt(t, c, m, name, moved) != "under "+from {
		t.Fatalf("rewrap onto %s: %s", to, moved)
	}
	versions := mustRead(t, c, m.Path+"/keys/"+name).Data["versions"].(map[string]interface{})
	if versions["1"].(map[string]interface{})["type"] != from || versions["2"].(map[string]interface{})["type"] != to {
		t.Fatalf("version types: %v / %v", versions["1"], versions["2"])
	}
}
