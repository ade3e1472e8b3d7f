package tests

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestTransitImportCommand runs the real `vault transit import` and `import-version` against this mount, then
// proves with a standard AES-GCM that the engine's ciphertexts open with the imported material, and the reverse.
func TestTransitImportCommand(t *testing.T) {
	c := dev.Client
	m := newMount(t, dev)
	material := make([]byte, 32)
	rand.Read(material)
	// SoftHSM 2.6's OAEP lacks SHA-256, which vault transit import wraps with: refused (400, saying what to do)
	// until the operator chooses the raw-RSA fallback.
	out, err := dev.CLI(dev.RootToken, "transit", "import", m.Path+"/keys/byok", base64.StdEncoding.EncodeToString(material), "type=aes256-gcm96")
	if err == nil || !strings.Contains(out, "raw_rsa_oaep_fallback") || !strings.Contains(out, "Code: 400") {
		t.Fatalf("import needing the raw-RSA fallback, not chosen: %v\n%s", err, out)
	}
	mustWrite(t, c, m.Path+"/config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true})
	out, err = dev.CLI(dev.RootToken, "transit", "import", m.Path+"/keys/byok", base64.StdEncoding.EncodeToString(material), "type=aes256-gcm96")
	if err != nil || !strings.Contains(out, "Success!") {
		t.Fatalf("vault transit import: %v\n%s", err, out)
	}
	key, err := c.Logical().Read(m.Path + "/keys/byok")
	if err != nil {
		t.Fatal(err)
	}
	v1 := key.Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
	if key.Data["imported_key"] != true || v1["import_method"] == nil {
		t.Fatalf("imported key: %v", key.Data)
	}
	t.Logf("import method on SoftHSM: %v", v1["import_method"])

	gcm := newGCM(t, material)
	ct := encrypt(t, c, m, "byok", "sealed by the HSM")
	raw, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, "vault:v1:"))
	if pt, err := gcm.Open(nil, raw[:12], raw[12:], nil); err != nil || string(pt) != "sealed by the HSM" {
		t.Fatalf("standard AES-GCM cannot open the engine's ciphertext: %v", err)
	}
	nonce := make([]byte, 12)
	rand.Read(nonce)
	theirs := "vault:v1:" + base64.StdEncoding.EncodeToString(append(nonce, gcm.Seal(nil, nonce, []byte("sealed outside"), nil)...))
	if decrypt(t, c, m, "byok", theirs) != "sealed outside" {
		t.Fatal("the engine cannot open a standard AES-GCM ciphertext of the imported key")
	}

	second := make([]byte, 32)
	rand.Read(second)
	out, err = dev.CLI(dev.RootToken, "transit", "import-version", m.Path+"/keys/byok", base64.StdEncoding.EncodeToString(second))
	if err != nil || !strings.Contains(out, "Success!") {
		t.Fatalf("vault transit import-version: %v\n%s", err, out)
	}
	ct2 := encrypt(t, c, m, "byok", "version two")
	raw, _ = base64.StdEncoding.DecodeString(strings.TrimPrefix(ct2, "vault:v2:"))
	if pt, err := newGCM(t, second).Open(nil, raw[:12], raw[12:], nil); err != nil || string(pt) != "version two" {
		t.Fatalf("version 2 is not the material imported: %v (%s)", err, ct2[:10])
	}
	if _, err := c.Logical().Write(m.Path+"/keys/byok/rotate", nil); statusOf(err) != 400 {
		t.Fatalf("rotating an imported key without allow_rotation: %v", err)
	}
}

func newGCM(t *testing.T, key []byte) cipher.AEAD {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	return gcm
}

// TestSignaturesAgainstOpenSSL: signatures made in the HSM verify with openssl and the published public key;
// a signature openssl makes with a key imported through `vault transit import` verifies in the engine.
func TestSignaturesAgainstOpenSSL(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Fatalf("openssl (installed by make deps): %v", err)
	}
	c := dev.Client
	m := newMount(t, dev)
	mustWrite(t, c, m.Path+"/config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true}) // SoftHSM 2.6 and vault transit import
	dir := t.TempDir()
	msg := filepath.Join(dir, "msg.txt")
	if err := os.WriteFile(msg, []byte("verify me with openssl"), 0o600); err != nil {
		t.Fatal(err)
	}
	input := b64("verify me with openssl")
	openssl := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("openssl", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	sigFile := func(key string, data map[string]interface{}) string {
		data["input"] = input
		s := mustWrite(t, c, m.Path+"/sign/"+key, data).Data["signature"].(string)
		raw, err := base64.StdEncoding.DecodeString(s[strings.LastIndex(s, ":")+1:])
		if err != nil {
			t.Fatal(err)
		}
		return write(key+".sig", raw)
	}
	pubFile := func(key string) string {
		k, err := c.Logical().Read(m.Path + "/keys/" + key)
		if err != nil {
			t.Fatal(err)
		}
		pub := k.Data["keys"].(map[string]interface{})["1"].(map[string]interface{})["public_key"].(string)
		if k.Data["type"] == "ed25519" {
			raw, _ := base64.StdEncoding.DecodeString(pub)
			der, _ := x509.MarshalPKIXPublicKey(ed25519.PublicKey(raw))
			pub = string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
		}
		return write(key+".pem", []byte(pub))
	}

	for _, typ := range []string{"ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"} {
		mustWrite(t, c, m.Path+"/keys/"+typ, map[string]interface{}{"type": typ})
	}
	openssl("dgst", "-sha256", "-verify", pubFile("ecdsa-p256"), "-signature", sigFile("ecdsa-p256", map[string]interface{}{}), msg)
	openssl("dgst", "-sha384", "-verify", pubFile("ecdsa-p384"), "-signature", sigFile("ecdsa-p384", map[string]interface{}{"hash_algorithm": "sha2-384"}), msg)
	openssl("dgst", "-sha256", "-verify", pubFile("rsa-2048"), "-signature",
		sigFile("rsa-2048", map[string]interface{}{"signature_algorithm": "pkcs1v15"}), msg)
	openssl("dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-2", "-verify", pubFile("rsa-2048"),
		"-signature", sigFile("rsa-2048", map[string]interface{}{}), msg)
	openssl("pkeyutl", "-verify", "-pubin", "-inkey", pubFile("ed25519"), "-rawin", "-in", msg, "-sigfile", sigFile("ed25519", map[string]interface{}{}))

	// OpenSSL's key, imported; OpenSSL's signature verifies here.
	keyPEM := filepath.Join(dir, "openssl-ec.pem")
	openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", keyPEM)
	der := openssl("pkcs8", "-topk8", "-nocrypt", "-in", keyPEM, "-outform", "DER")
	out, err := dev.CLI(dev.RootToken, "transit", "import", m.Path+"/keys/openssl-ec", base64.StdEncoding.EncodeToString([]byte(der)), "type=ecdsa-p256")
	if err != nil {
		t.Fatalf("import openssl key: %v\n%s", err, out)
	}
	theirSig := filepath.Join(dir, "openssl.sig")
	openssl("dgst", "-sha256", "-sign", keyPEM, "-out", theirSig, msg)
	sig, _ := os.ReadFile(theirSig)
	v := mustWrite(t, c, m.Path+"/verify/openssl-ec", map[string]interface{}{"input": input, "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(sig)})
	if v.Data["valid"] != true {
		t.Fatal("openssl's signature does not verify in the engine")
	}
	// And the engine's signature with that imported key verifies in openssl with openssl's own key file.
	openssl("dgst", "-sha256", "-prverify", keyPEM, "-signature", sigFile("openssl-ec", map[string]interface{}{}), msg)
}
