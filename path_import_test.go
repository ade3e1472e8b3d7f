package cmk

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/byoktest"
)

func wrappingPublicKey(t *testing.T, e *testEnv) *rsa.PublicKey {
	t.Helper()
	resp := e.ok(e.read("wrapping_key"))
	block, _ := pem.Decode([]byte(resp.Data["public_key"].(string)))
	if block == nil {
		t.Fatal("wrapping_key is not PEM")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return pub.(*rsa.PublicKey)
}

func wrapFor(t *testing.T, e *testEnv, h crypto.Hash, material []byte) string {
	t.Helper()
	wrapped, err := byoktest.Wrap(wrappingPublicKey(t, e), h, material)
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(wrapped)
}

func TestImportAESAndUseItOutside(t *testing.T) {
	e := newImportBackend(t)
	pub := wrappingPublicKey(t, e)
	if pub.N.BitLen() != 4096 || !pub.Equal(wrappingPublicKey(t, e)) {
		t.Fatal("wrapping key is not a stable RSA-4096 key")
	}
	material := make([]byte, 32)
	rand.Read(material)
	for _, c := range []struct{ key, hash, method string }{
		{"imported-sha256", "", "raw-rsa-oaep-decoded-in-plugin"}, // the CLI's default
		{"imported-sha1", "SHA1", "hsm-unwrap"},
	} {
		h := crypto.SHA256
		data := map[string]interface{}{"ciphertext": ""}
		if c.hash != "" {
			h, data["hash_function"] = crypto.SHA1, c.hash
		}
		data["ciphertext"] = wrapFor(t, e, h, material)
		if resp := e.ok(e.write("keys/"+c.key+"/import", data)); resp != nil {
			t.Fatalf("import answered %v", resp.Data)
		}
		key := e.ok(e.read("keys/" + c.key))
		v1 := key.Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
		if key.Data["imported_key"] != true || v1["import_method"] != c.method {
			t.Fatalf("%s: %v", c.key, key.Data)
		}
		// The engine's ciphertext opens with the imported material in a standard AES-GCM…
		ct := encryptOK(t, e, c.key, "engine wrote this")
		raw, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, "vault:v1:"))
		block, _ := aes.NewCipher(material)
		gcm, _ := cipher.NewGCM(block)
		if pt, err := gcm.Open(nil, raw[:12], raw[12:], nil); err != nil || string(pt) != "engine wrote this" {
			t.Fatalf("%s: standard AES-GCM cannot open the engine's ciphertext: %v", c.key, err)
		}
		// …and a standard AES-GCM ciphertext in Transit's layout decrypts in the engine.
		nonce := make([]byte, 12)
		rand.Read(nonce)
		theirs := "vault:v1:" + base64.StdEncoding.EncodeToString(append(nonce, gcm.Seal(nil, nonce, []byte("outside wrote this"), nil)...))
		if got := decryptOK(t, e, c.key, theirs); got != "outside wrote this" {
			t.Fatalf("%s: %q", c.key, got)
		}
	}

	// Rotation of an imported key needs allow_rotation; import_version adds versions.
	if got := status(e.write("keys/imported-sha1/rotate", nil)); got != 400 {
		t.Fatalf("rotate without allow_rotation: %d", got)
	}
	e.ok(e.write("keys/imported-sha1/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)}))
	if r := e.ok(e.read("keys/imported-sha1")); r.Data["latest_version"] != 2 {
		t.Fatalf("import_version: %v", r.Data["latest_version"])
	}
	e.ok(e.write("keys/rotatable/import", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material), "allow_rotation": true}))
	e.ok(e.write("keys/rotatable/rotate", nil))
	for _, o := range e.tokenObjects() {
		if !o.Sensitive || o.Extractable {
			t.Errorf("%s: %+v", o.Label, o)
		}
	}
}

// A standard signature made outside with the imported private key verifies in the engine, and the engine's
// signatures verify outside.
func TestImportSigningKeys(t *testing.T) {
	e := newImportBackend(t)
	msg := []byte("signed outside")
	digest := sha256.Sum256(msg)

	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKCS8PrivateKey(rsaKey)
	e.ok(e.write("keys/rsa/import", map[string]interface{}{"type": "rsa-2048", "ciphertext": wrapFor(t, e, crypto.SHA256, der)}))
	if !publicKeyOf(t, e, "rsa", 1).(*rsa.PublicKey).Equal(&rsaKey.PublicKey) {
		t.Fatal("imported RSA public key differs")
	}
	sig, _ := rsa.SignPKCS1v15(rand.Reader, rsaKey, crypto.SHA256, digest[:])
	if !verifyOK(t, e, "rsa", map[string]interface{}{"input": b64(string(msg)), "signature_algorithm": "pkcs1v15", "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(sig)}) {
		t.Fatal("standard PKCS#1 v1.5 signature does not verify in the engine")
	}
	pss, _ := rsa.SignPSS(rand.Reader, rsaKey, crypto.SHA256, digest[:], nil)
	if !verifyOK(t, e, "rsa", map[string]interface{}{"input": b64(string(msg)), "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(pss)}) {
		t.Fatal("standard PSS signature does not verify in the engine")
	}

	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ = x509.MarshalPKCS8PrivateKey(ecKey)
	e.ok(e.write("keys/ec/import", map[string]interface{}{"type": "ecdsa-p256", "ciphertext": wrapFor(t, e, crypto.SHA256, der)}))
	if !publicKeyOf(t, e, "ec", 1).(*ecdsa.PublicKey).Equal(&ecKey.PublicKey) {
		t.Fatal("imported ECDSA public key differs")
	}
	esig, _ := ecdsa.SignASN1(rand.Reader, ecKey, digest[:])
	if !verifyOK(t, e, "ec", map[string]interface{}{"input": b64(string(msg)), "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(esig)}) {
		t.Fatal("standard ECDSA signature does not verify in the engine")
	}
	engineSig := e.ok(e.write("sign/ec", map[string]interface{}{"input": b64(string(msg))})).Data["signature"].(string)
	if !ecdsa.VerifyASN1(&ecKey.PublicKey, digest[:], signatureBytes(t, engineSig, base64.StdEncoding)) {
		t.Fatal("engine signature with the imported key does not verify outside")
	}
}

func TestImportRefusals(t *testing.T) {
	e := newImportBackend(t)
	// Before the wrapping key exists nothing can have been wrapped for it.
	resp, err := e.write("keys/k/import", map[string]interface{}{"ciphertext": b64("x")})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "wrapping_key") {
		t.Fatalf("import before wrapping_key: %d %s", status(resp, err), respText(resp))
	}
	material := make([]byte, 32)
	good := wrapFor(t, e, crypto.SHA256, material)
	e.ok(e.write("keys/generated", nil))
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	sec1, _ := x509.MarshalECPrivateKey(ecKey) // "EC PRIVATE KEY", not PKCS#8
	cases := []struct {
		path string
		data map[string]interface{}
		want string
	}{
		{"keys/k/import", map[string]interface{}{}, "ciphertext is required"},
		{"keys/k/import", map[string]interface{}{"ciphertext": "%%"}, "base64"},
		{"keys/k/import", map[string]interface{}{"ciphertext": good, "hash_function": "MD5"}, "hash_function"},
		{"keys/k/import", map[string]interface{}{"ciphertext": good, "type": "chacha20-poly1305"}, "unsupported key type"},
		{"keys/k/import", map[string]interface{}{"ciphertext": good, "type": "aes128-gcm96"}, "wraps to"},
		{"keys/k/import", map[string]interface{}{"ciphertext": good, "hash_function": "SHA512"}, "does not unwrap"},
		{"keys/k/import", map[string]interface{}{"ciphertext": good, "type": "rsa-2048"}, "could not unwrap"},
		{"keys/k/import", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, sec1), "type": "ecdsa-p256"}, "expected as PKCS#8"},
		{"keys/k/import", map[string]interface{}{"ciphertext": good, "exportable": true}, "never leaves the HSM"},
		{"keys/k/import", map[string]interface{}{"ciphertext": good, "public_key": "x"}, "public_key"},
		{"keys/generated/import", map[string]interface{}{"ciphertext": good}, "already exists"},
		{"keys/generated/import_version", map[string]interface{}{"ciphertext": good}, "imported key"},
		{"keys/none/import_version", map[string]interface{}{"ciphertext": good}, "no key found"},
	}
	for _, c := range cases {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), c.want) {
			t.Errorf("%s %v: %d %s %v, want 400 with %q", c.path, c.data["type"], status(resp, err), respText(resp), err, c.want)
		}
	}
	if r, _ := e.read("keys/k"); r != nil {
		t.Fatal("a refused import left a key")
	}
	if n := len(e.tokenObjects()); n != 2 { // wrapping key + the generated key (its HMAC secret comes with its first HMAC)
		t.Fatalf("refused imports left objects: %d", n)
	}
}

// Defect a, for the mount's wrapping key: a write that fails after storing destroys nothing, and imports wrapped
// with the stored key work.
func TestWrappingKeyWhoseWriteFailedAfterStoring(t *testing.T) {
	e := newImportBackend(t)
	e.storage.failAfterStoring("wrapping_key")
	if resp, err := e.read("wrapping_key"); err == nil && (resp == nil || !resp.IsError()) {
		t.Fatal("the failed write was not reported")
	}
	resp, err := e.b.HandleRequest(context.Background(), &logical.Request{
		Operation: logical.RollbackOperation, Storage: e.storage, Data: map[string]interface{}{"immediate": true},
	})
	if err != nil || (resp != nil && resp.IsError()) {
		t.Fatalf("rollback: %v", err)
	}
	material := make([]byte, 32)
	e.ok(e.write("keys/imported/import", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)}))
	if decryptOK(t, e, "imported", encryptOK(t, e, "imported", "x")) != "x" {
		t.Fatal("round trip with the imported key")
	}
}

// A public key imports as a version that verifies (and, RSA, encrypts) with nothing on the token; its private
// key, imported later into that version, must match it, and then it signs in the HSM.
func TestPublicKeyImportThenItsPrivateKey(t *testing.T) {
	e := newImportBackend(t)
	customer, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // the customer's key, outside the HSM
	pubDER, _ := x509.MarshalPKIXPublicKey(&customer.PublicKey)
	pubPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}))
	wrappingPublicKey(t, e) // the mount's wrapping key is made on its first read
	objects := len(e.tokenObjects())

	if code := status(e.write("keys/pub/import", map[string]interface{}{"public_key": pubPEM, "type": "ecdsa-p384"})); code != 400 {
		t.Fatalf("a P-256 key imported as ecdsa-p384: %d", code)
	}
	e.ok(e.write("keys/pub/import", map[string]interface{}{"public_key": pubPEM, "type": "ecdsa-p256"}))
	v1 := e.ok(e.read("keys/pub")).Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
	if v1["public_key_only"] != true || v1["hsm_id"] != "" || len(e.tokenObjects()) != objects {
		t.Fatalf("public-key-only version: %v", v1)
	}
	msg := []byte("signed outside")
	digest := sha256.Sum256(msg)
	sig, _ := ecdsa.SignASN1(rand.Reader, customer, digest[:])
	if !verifyOK(t, e, "pub", map[string]interface{}{"input": b64(string(msg)), "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(sig)}) {
		t.Fatal("a signature by the imported public key's owner does not verify")
	}
	for _, c := range []struct {
		path string
		data map[string]interface{}
	}{{"sign/pub", map[string]interface{}{"input": b64("x")}}, {"hmac/pub", map[string]interface{}{"input": b64("x")}}, {"keys/pub/csr", nil}} {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "only a public key") {
			t.Fatalf("%s on a public-key-only version: %d %s", c.path, status(resp, err), respText(resp))
		}
	}

	// Another key's private half is refused for version 1, and leaves nothing on the token.
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherDER, _ := x509.MarshalPKCS8PrivateKey(other)
	resp, err := e.write("keys/pub/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, otherDER), "version": 1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "does not match") {
		t.Fatalf("a mismatching private key: %d %s", status(resp, err), respText(resp))
	}
	if n := len(e.tokenObjects()); n != objects {
		t.Fatalf("the refused import left objects: %d, want %d", n, objects)
	}
	// The matching one, without version: it goes to the latest version, which holds only a public key.
	privDER, _ := x509.MarshalPKCS8PrivateKey(customer)
	e.ok(e.write("keys/pub/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, privDER)}))
	key := e.ok(e.read("keys/pub")).Data
	if key["latest_version"] != 1 {
		t.Fatalf("the private key made a new version: latest %v", key["latest_version"])
	}
	signed := e.ok(e.write("sign/pub", map[string]interface{}{"input": b64("signed in the HSM")})).Data["signature"].(string)
	raw, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(signed, "vault:v1:"))
	d2 := sha256.Sum256([]byte("signed in the HSM"))
	if !ecdsa.VerifyASN1(&customer.PublicKey, d2[:], raw) {
		t.Fatal("the HSM's signature does not verify with the customer's public key")
	}
	if ev := lastEvent(e.history("pub")); ev["event"] != "private_key_imported" {
		t.Fatalf("history: %v", ev)
	}
	// A second public key adds version 2.
	e.ok(e.write("keys/pub/import_version", map[string]interface{}{"public_key": pubPEM}))
	if v := e.ok(e.read("keys/pub")).Data["latest_version"]; v != 2 {
		t.Fatalf("public_key import_version: latest %v", v)
	}

	// RSA: a public-key-only version encrypts (no secret involved) and cannot decrypt.
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	rsaDER, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	e.ok(e.write("keys/rsapub/import", map[string]interface{}{"type": "rsa-2048", "public_key": string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: rsaDER}))}))
	ct := e.ok(e.write("encrypt/rsapub", map[string]interface{}{"plaintext": b64("to the key owner")})).Data["ciphertext"].(string)
	rawCT, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, "vault:v1:"))
	if pt, err := rsa.DecryptOAEP(sha256.New(), nil, rsaKey, rawCT, nil); err != nil || string(pt) != "to the key owner" {
		t.Fatalf("the owner cannot decrypt: %v", err)
	}
	if code := status(e.write("decrypt/rsapub", map[string]interface{}{"ciphertext": ct})); code != 400 {
		t.Fatalf("decrypt with a public-key-only version: %d", code)
	}
}

// Issue 19 item 24: config/hsm says per key type whether the token can import it, and an import the token cannot
// do names the real limit. SoftHSM 2.6 generates and uses Ed25519 keys but cannot unwrap one: its import of a
// valid PKCS#8 key used to fail with "private keys are expected as PKCS#8" while config/hsm said ed25519 was
// supported. What the report says and what an import does must agree, on any token.
func TestImportSupportReportMatchesImport(t *testing.T) {
	e := newImportBackend(t)
	e.ok(e.read("wrapping_key"))
	types := e.ok(e.read("config/hsm")).Data["key_types"].(map[string]interface{})
	if aes := types["aes256-gcm96"].(map[string]interface{}); aes["import_supported"] != true {
		t.Fatalf("aes256-gcm96: %v", aes)
	}
	ed := types["ed25519"].(map[string]interface{})
	if ed["supported"] != true {
		t.Skip("this token does not serve ed25519 at all")
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(priv)
	resp, err := e.write("keys/ed/import", map[string]interface{}{"type": "ed25519", "ciphertext": wrapFor(t, e, crypto.SHA256, der)})
	switch ed["import_supported"] {
	case true:
		e.ok(resp, err)
	case false:
		why, _ := ed["import_missing"].(string)
		if status(resp, err) != 400 || !strings.Contains(why, "cannot unwrap Ed25519") || !strings.Contains(respText(resp), "cannot unwrap Ed25519") ||
			strings.Contains(respText(resp), "expected as PKCS#8") {
			t.Fatalf("a valid PKCS#8 Ed25519 import where the report says %q: %d %s", why, status(resp, err), respText(resp))
		}
	default:
		t.Fatalf("ed25519 import_supported: %v", ed)
	}
}
