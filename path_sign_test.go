package cmk

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha3"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// publicKeyOf reads version v's public key from keys/<name> as a client would.
func publicKeyOf(t *testing.T, e *testEnv, name string, v int) crypto.PublicKey {
	t.Helper()
	resp := e.ok(e.read("keys/" + name))
	entry := resp.Data["keys"].(map[string]interface{})[fmt.Sprint(v)].(map[string]interface{})
	s := entry["public_key"].(string)
	if resp.Data["type"] == "ed25519" {
		raw, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return ed25519.PublicKey(raw)
	}
	block, _ := pem.Decode([]byte(s))
	if block == nil || block.Type != "PUBLIC KEY" {
		t.Fatalf("public key of %s is not PEM: %q", name, s)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func signatureBytes(t *testing.T, sig string, enc *base64.Encoding) []byte {
	t.Helper()
	i := strings.LastIndex(sig, ":")
	raw, err := enc.DecodeString(sig[i+1:])
	if err != nil {
		t.Fatalf("signature %q: %v", sig, err)
	}
	return raw
}

// Every signature the engine makes verifies with the standard library and the public key it publishes.
func TestSignVerifiesWithTheStandardLibrary(t *testing.T) {
	e := newTestBackend(t)
	msg := []byte("sign me")
	digest := sha256.Sum256(msg)
	for _, typ := range []string{"rsa-2048", "rsa-3072", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519"} {
		t.Run(typ, func(t *testing.T) {
			resp := e.ok(e.write("keys/"+typ, map[string]interface{}{"type": typ}))
			if resp.Data["supports_signing"] != true || resp.Data["supports_encryption"] != strings.HasPrefix(typ, "rsa") {
				t.Fatalf("supports_*: %v", resp.Data)
			}
			pub := publicKeyOf(t, e, typ, 1)
			sig := e.ok(e.write("sign/"+typ, map[string]interface{}{"input": b64(string(msg))})).Data["signature"].(string)
			if !strings.HasPrefix(sig, "vault:v1:") {
				t.Fatalf("signature %q", sig)
			}
			raw := signatureBytes(t, sig, base64.StdEncoding)
			switch k := pub.(type) {
			case *rsa.PublicKey: // default: PSS, salt "auto" = the largest
				if err := rsa.VerifyPSS(k, crypto.SHA256, digest[:], raw, nil); err != nil {
					t.Fatalf("PSS: %v", err)
				}
			case *ecdsa.PublicKey: // default: ASN.1
				if !ecdsa.VerifyASN1(k, digest[:], raw) {
					t.Fatal("ECDSA ASN.1 signature does not verify")
				}
			case ed25519.PublicKey:
				if !ed25519.Verify(k, msg, raw) {
					t.Fatal("Ed25519 signature does not verify")
				}
			}
			if !verifyOK(t, e, typ, map[string]interface{}{"input": b64(string(msg)), "signature": sig}) {
				t.Fatal("engine does not verify its own signature")
			}
			if verifyOK(t, e, typ, map[string]interface{}{"input": b64("other message"), "signature": sig}) {
				t.Fatal("signature verifies over another message")
			}
		})
	}
}

func verifyOK(t *testing.T, e *testEnv, key string, data map[string]interface{}) bool {
	t.Helper()
	return e.ok(e.write("verify/"+key, data)).Data["valid"].(bool)
}

func TestSignOptions(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/rsa", map[string]interface{}{"type": "rsa-2048"}))
	e.ok(e.write("keys/ec", map[string]interface{}{"type": "ecdsa-p256"}))
	e.ok(e.write("keys/ed", map[string]interface{}{"type": "ed25519"}))
	rsaPub := publicKeyOf(t, e, "rsa", 1).(*rsa.PublicKey)
	ecPub := publicKeyOf(t, e, "ec", 1).(*ecdsa.PublicKey)
	msg := b64("options")
	d256 := sha256.Sum256([]byte("options"))
	d3 := sha3.Sum512([]byte("options"))

	sig := func(key string, data map[string]interface{}) string {
		t.Helper()
		data["input"] = msg
		s := e.ok(e.write("sign/"+key, data)).Data["signature"].(string)
		check := map[string]interface{}{"signature": s}
		for k, v := range data {
			check[k] = v
		}
		if !verifyOK(t, e, key, check) {
			t.Fatalf("%s %v: engine rejects its own signature", key, data)
		}
		return s
	}
	// RSA PKCS#1 v1.5 with SHA3-512, via the URL.
	s := sig("rsa/sha3-512", map[string]interface{}{"signature_algorithm": "pkcs1v15"})
	if err := rsa.VerifyPKCS1v15(rsaPub, crypto.SHA3_512, d3[:], signatureBytes(t, s, base64.StdEncoding)); err != nil {
		t.Fatalf("pkcs1v15 sha3-512: %v", err)
	}
	// PSS with salt = hash length, and with 10 bytes.
	s = sig("rsa", map[string]interface{}{"salt_length": "hash"})
	if err := rsa.VerifyPSS(rsaPub, crypto.SHA256, d256[:], signatureBytes(t, s, base64.StdEncoding), &rsa.PSSOptions{SaltLength: 32}); err != nil {
		t.Fatalf("PSS salt hash: %v", err)
	}
	s = sig("rsa", map[string]interface{}{"salt_length": "10"})
	if err := rsa.VerifyPSS(rsaPub, crypto.SHA256, d256[:], signatureBytes(t, s, base64.StdEncoding), &rsa.PSSOptions{SaltLength: 10}); err != nil {
		t.Fatalf("PSS salt 10: %v", err)
	}
	// ECDSA with JWS marshaling: r‖s, base64url without padding.
	s = sig("ec", map[string]interface{}{"marshaling_algorithm": "jws"})
	raw := signatureBytes(t, s, base64.RawURLEncoding)
	if len(raw) != 64 || !ecdsa.Verify(ecPub, d256[:], new(big.Int).SetBytes(raw[:32]), new(big.Int).SetBytes(raw[32:])) {
		t.Fatal("JWS signature does not verify")
	}
	// Prehashed input is the digest.
	resp := e.ok(e.write("sign/ec", map[string]interface{}{"input": base64.StdEncoding.EncodeToString(d256[:]), "prehashed": true}))
	if !ecdsa.VerifyASN1(ecPub, d256[:], signatureBytes(t, resp.Data["signature"].(string), base64.StdEncoding)) {
		t.Fatal("prehashed signature does not verify")
	}

	// A standard signature over the same input, made outside the engine, verifies here only with the right key.
	other, _ := ecdsa.GenerateKey(ecPub.Curve, rand.Reader)
	foreign, _ := ecdsa.SignASN1(rand.Reader, other, d256[:])
	if verifyOK(t, e, "ec", map[string]interface{}{"input": msg, "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(foreign)}) {
		t.Fatal("a signature by another key verifies")
	}

	bad := []struct {
		path string
		data map[string]interface{}
		want string
	}{
		{"sign/ed", map[string]interface{}{"input": msg, "prehashed": true}, "prehashed"},
		{"sign/rsa", map[string]interface{}{"input": msg, "signature_algorithm": "dsa"}, "signature_algorithm"},
		{"sign/rsa", map[string]interface{}{"input": msg, "salt_length": "300"}, "salt_length"},
		{"sign/rsa/md5", map[string]interface{}{"input": msg}, "hash algorithm"},
		{"sign/ec", map[string]interface{}{"input": b64("short"), "prehashed": true}, "prehashed input"},
		{"sign/ec", map[string]interface{}{"input": "%%"}, "base64"},
		{"sign/ec", map[string]interface{}{}, "missing input"},
		{"sign/ec", map[string]interface{}{"input": msg, "key_version": 2}, "invalid key version"},
		{"verify/ec", map[string]interface{}{"input": msg, "signature": "vault:v1:###"}, "invalid signature"},
		{"verify/ec", map[string]interface{}{"input": msg, "signature": "vault:v7:AAAA"}, "does not exist"},
		{"verify/ec", map[string]interface{}{"input": msg}, "signature or hmac"},
	}
	for _, c := range bad {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), c.want) {
			t.Errorf("%s %v: %d %s, want 400 mentioning %q", c.path, c.data, status(resp, err), respText(resp), c.want)
		}
	}
}

func TestSignAndVerifyBatch(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/ec", map[string]interface{}{"type": "ecdsa-p384"}))
	in := []interface{}{
		map[string]interface{}{"input": b64("a"), "reference": "a"},
		map[string]interface{}{"input": "%%", "reference": "bad"},
		map[string]interface{}{"input": b64("c"), "reference": "c"},
	}
	resp, err := e.write("sign/ec", map[string]interface{}{"batch_input": in})
	if status(resp, err) != 400 {
		t.Fatalf("batch with one bad item: %d", status(resp, err))
	}
	rs := batchResults(t, resp)
	if rs[1].Error == "" || rs[0].Error != "" || rs[2].Error != "" {
		t.Fatalf("results: %+v", rs)
	}
	sigs := batchSignatures(t, resp)
	verify := []interface{}{
		map[string]interface{}{"input": b64("a"), "signature": sigs[0], "reference": "a"},
		map[string]interface{}{"input": b64("c"), "signature": sigs[0], "reference": "swapped"},
		map[string]interface{}{"input": b64("c"), "signature": sigs[2], "reference": "c"},
	}
	resp = e.ok(e.write("verify/ec", map[string]interface{}{"batch_input": verify}))
	valid := batchValid(t, resp)
	if !valid[0] || valid[1] || !valid[2] {
		t.Fatalf("batch verify: %v", valid)
	}
}

func TestHMAC(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/aes", nil))
	e.ok(e.write("keys/mac", map[string]interface{}{"type": "hmac"}))
	e.ok(e.write("keys/short", map[string]interface{}{"type": "hmac", "key_size": 32}))
	if r := e.ok(e.read("keys/mac")); r.Data["key_size"] != 64 || r.Data["supports_encryption"] != false {
		t.Fatalf("hmac key: %v", r.Data)
	}
	for _, key := range []string{"aes", "mac"} {
		for _, alg := range []string{"sha2-224", "sha2-256", "sha2-384", "sha2-512"} {
			resp := e.ok(e.write("hmac/"+key+"/"+alg, map[string]interface{}{"input": b64("data")}))
			mac := resp.Data["hmac"].(string)
			if !strings.HasPrefix(mac, "vault:v1:") {
				t.Fatalf("%s %s: %q", key, alg, mac)
			}
			again := e.ok(e.write("hmac/"+key, map[string]interface{}{"input": b64("data"), "algorithm": alg})).Data["hmac"]
			if again != mac {
				t.Fatalf("%s %s: HMAC differs between the URL and the field", key, alg)
			}
			if !verifyOK(t, e, key+"/"+alg, map[string]interface{}{"input": b64("data"), "hmac": mac}) {
				t.Fatalf("%s %s: own HMAC does not verify", key, alg)
			}
			if verifyOK(t, e, key+"/"+alg, map[string]interface{}{"input": b64("datA"), "hmac": mac}) {
				t.Fatalf("%s %s: HMAC verifies over other data", key, alg)
			}
		}
	}
	aesMac := e.ok(e.write("hmac/aes", map[string]interface{}{"input": b64("x")})).Data["hmac"]
	if verifyOK(t, e, "mac", map[string]interface{}{"input": b64("x"), "hmac": aesMac}) {
		t.Fatal("another key's HMAC verifies")
	}
	resp, err := e.write("hmac/short/sha2-512", map[string]interface{}{"input": b64("x")})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "HMAC key") {
		t.Fatalf("32-byte key with sha2-512: %d %s", status(resp, err), respText(resp))
	}
	resp = e.ok(e.write("hmac/mac", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"input": b64("1"), "reference": "one"}, map[string]interface{}{"input": b64("2")},
	}}))
	if rs := batchResults(t, resp); len(rs) != 2 || rs[0].Reference != "one" || rs[0].Error != "" {
		t.Fatalf("hmac batch: %+v", rs)
	}
}

// A version's HMAC secret is made on its first HMAC: exactly once under concurrent first use, adopted (not made
// twice) when recording it failed, and the same secret after a restart.
func TestHMACSecretMadeOnFirstUse(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	if n := len(e.tokenObjects()); n != 1 {
		t.Fatalf("%d objects for a new AES key, want 1", n)
	}
	if on := e.ok(e.read("keys/k/versions/1")).Data["hmac_secret_on_token"]; on != false {
		t.Fatalf("hmac_secret_on_token before any HMAC: %v", on)
	}
	// The first HMAC fails while storage refuses every write: nothing is made, as the engine makes no secret
	// before its record of making it is stored.
	e.inmem.Underlying().FailPut(true)
	if got := status(e.write("hmac/k", map[string]interface{}{"input": b64("x")})); got != 500 {
		t.Fatalf("hmac with failing storage: %d", got)
	}
	e.inmem.Underlying().FailPut(false)
	if n := len(e.tokenObjects()); n != 1 {
		t.Fatalf("%d objects after an HMAC whose record could not be stored, want 1", n)
	}
	// The first HMAC fails at the key write, after the secret is made: the secret is on the token but not recorded
	// (the engine's record vouches for it).
	e.storage.failUnstored(keys.VersionsPrefix + "k/")
	if got := status(e.write("hmac/k", map[string]interface{}{"input": b64("x")})); got != 500 {
		t.Fatalf("hmac with failing key write: %d", got)
	}
	if n := len(e.tokenObjects()); n != 2 {
		t.Fatalf("%d objects after the failed first HMAC, want 2", n)
	}
	// A batch spread over the session pool: every item uses the one secret, adopted from the token.
	items := make([]interface{}, 200)
	for i := range items {
		items[i] = map[string]interface{}{"input": b64("same")}
	}
	rs := batchResults(t, e.ok(e.write("hmac/k", map[string]interface{}{"batch_input": items})))
	for _, r := range rs {
		if r.Error != "" || r.HMAC != rs[0].HMAC {
			t.Fatalf("batch item: %+v, first %q", r, rs[0].HMAC)
		}
	}
	if n := len(e.tokenObjects()); n != 2 {
		t.Fatalf("%d objects after first use, want 2", n)
	}
	if p, _ := keys.Load(context.Background(), e.storage, "k"); p.Versions[1].HMACDeferred {
		t.Fatal("the HMAC secret is not recorded in storage")
	}
	if on := e.ok(e.read("keys/k/versions/1")).Data["hmac_secret_on_token"]; on != true {
		t.Fatalf("hmac_secret_on_token after the first HMAC: %v", on)
	}
	// A restarted backend uses the same secret, and the next version defers its own.
	again := e.reopen()
	if mac := again.ok(again.write("hmac/k", map[string]interface{}{"input": b64("same")})).Data["hmac"]; mac != rs[0].HMAC {
		t.Fatalf("HMAC after restart %v, before %v", mac, rs[0].HMAC)
	}
	again.ok(again.write("keys/k/rotate", nil))
	if n := len(e.tokenObjects()); n != 3 {
		t.Fatalf("%d objects after rotation, want 3", n)
	}
}

func TestRSAEncryption(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/rsa", map[string]interface{}{"type": "rsa-3072"}))
	e.ok(e.write("keys/rsa/config", map[string]interface{}{"allow_pkcs1v15_decryption": true})) // for the pkcs1v15 round trip
	pub := publicKeyOf(t, e, "rsa", 1).(*rsa.PublicKey)
	for _, padding := range []string{"", "oaep", "pkcs1v15"} {
		data := map[string]interface{}{"plaintext": b64("rsa secret")}
		if padding != "" {
			data["padding_scheme"] = padding
		}
		ct := e.ok(e.write("encrypt/rsa", data)).Data["ciphertext"].(string)
		data = map[string]interface{}{"ciphertext": ct}
		if padding != "" {
			data["padding_scheme"] = padding
		}
		if pt := e.ok(e.write("decrypt/rsa", data)).Data["plaintext"]; pt != b64("rsa secret") {
			t.Fatalf("%q: %v", padding, pt)
		}
	}
	// A standard OAEP-SHA-256 ciphertext made with the published public key decrypts in the HSM.
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, []byte("from outside"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := decryptOK(t, e, "rsa", "vault:v1:"+base64.StdEncoding.EncodeToString(ct)); got != "from outside" {
		t.Fatalf("standard ciphertext: %q", got)
	}
	ct[5] ^= 1
	resp, err2 := e.write("decrypt/rsa", map[string]interface{}{"ciphertext": "vault:v1:" + base64.StdEncoding.EncodeToString(ct)})
	if status(resp, err2) != 400 {
		t.Fatalf("tampered RSA ciphertext: %d", status(resp, err2))
	}
	resp, err2 = e.write("encrypt/rsa", map[string]interface{}{"plaintext": b64("x"), "associated_data": b64("aad")})
	if status(resp, err2) != 400 || !strings.Contains(respText(resp), "non-AEAD") {
		t.Fatalf("aad with RSA: %s", respText(resp))
	}
	e.ok(e.write("keys/rsa/rotate", nil))
	rw := e.ok(e.write("rewrap/rsa", map[string]interface{}{"ciphertext": e.ok(e.write("encrypt/rsa", map[string]interface{}{"plaintext": b64("r")})).Data["ciphertext"]}))
	if rw.Data["key_version"] != 2 || decryptOK(t, e, "rsa", rw.Data["ciphertext"].(string)) != "r" {
		t.Fatalf("rewrap: %v", rw.Data)
	}
}

func TestWrongKeyTypeForOperation(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/aes", nil))
	e.ok(e.write("keys/ec", map[string]interface{}{"type": "ecdsa-p256"}))
	e.ok(e.write("keys/mac", map[string]interface{}{"type": "hmac"}))
	cases := []struct {
		path string
		data map[string]interface{}
		want string
	}{
		{"encrypt/ec", map[string]interface{}{"plaintext": b64("x")}, "key type ecdsa-p256 does not support encryption; it supports sign/verify, hmac"},
		{"decrypt/mac", map[string]interface{}{"ciphertext": "vault:v1:AAAA"}, "key type hmac does not support decryption; it supports hmac"},
		{"sign/aes", map[string]interface{}{"input": b64("x")}, "key type aes256-gcm96 does not support signing; it supports encrypt/decrypt, hmac"},
		{"verify/mac", map[string]interface{}{"input": b64("x"), "signature": "vault:v1:AAAA"}, "does not support signature verification"},
		{"datakey/plaintext/ec", nil, "does not support encryption"},
		{"keys/x", map[string]interface{}{"type": "ecdsa-p256", "key_size": 32}, "key_size is valid for hmac keys only"},
		{"encrypt/aes", map[string]interface{}{"plaintext": b64("x"), "padding_scheme": "oaep"}, "RSA keys only"},
	}
	for _, c := range cases {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), c.want) {
			t.Errorf("%s: %d %s, want 400 with %q", c.path, status(resp, err), respText(resp), c.want)
		}
	}
	// Upsert refuses a type that cannot encrypt rather than create an unusable key.
	resp, err := e.request("create", "encrypt/new-ec", map[string]interface{}{"plaintext": b64("x"), "type": "ecdsa-p256"})
	if status(resp, err) != 400 {
		t.Fatalf("upsert of an ecdsa key: %d", status(resp, err))
	}
	if r, _ := e.read("keys/new-ec"); r != nil {
		t.Fatal("upsert left an ecdsa key")
	}
}

func TestAsymmetricObjectsOnTheToken(t *testing.T) {
	e := newTestBackend(t)
	for _, typ := range []string{"rsa-2048", "ecdsa-p521", "ed25519", "hmac"} {
		e.ok(e.write("keys/"+typ, map[string]interface{}{"type": typ}))
		e.ok(e.write("hmac/"+typ, map[string]interface{}{"input": b64("x")}))
	}
	objs := e.tokenObjects()
	// Three private keys, four HMAC secrets, and Ed25519's public half (which the token cannot give back from its
	// private key: kept so that the version can be adopted after a storage restore); RSA's and ECDSA's are not kept.
	if len(objs) != 8 {
		t.Fatalf("%d objects", len(objs))
	}
	for _, o := range objs {
		if o.Class == "public_key" {
			if o.KeyType != "ec_edwards" || strings.Join(o.Usage, ",") != "verify" {
				t.Errorf("public half kept: %+v", o)
			}
			continue
		}
		if !o.Sensitive || o.Extractable || !o.NeverExtractable {
			t.Errorf("%s: %+v", o.Label, o)
		}
	}
}

func batchSignatures(t *testing.T, resp *logical.Response) []string {
	t.Helper()
	var out []string
	for _, item := range rawBatch(t, resp) {
		s, _ := item["signature"].(string)
		out = append(out, s)
	}
	return out
}

func batchValid(t *testing.T, resp *logical.Response) []bool {
	t.Helper()
	var out []bool
	for _, item := range rawBatch(t, resp) {
		v, _ := item["valid"].(bool)
		out = append(out, v)
	}
	return out
}

// rawBatch reads batch_results as JSON objects, as a client sees them.
func rawBatch(t *testing.T, resp *logical.Response) []map[string]interface{} {
	t.Helper()
	var data interface{} = resp.Data["batch_results"]
	if body, ok := resp.Data[logical.HTTPRawBody].(string); ok {
		var wrapped struct {
			Data map[string]json.RawMessage `json:"data"`
		}
		if err := json.Unmarshal([]byte(body), &wrapped); err != nil {
			t.Fatal(err)
		}
		data = wrapped.Data["batch_results"]
	}
	raw, err := json.Marshal(data)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]interface{}
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// Defect c: a version scheduled for destruction, or destroyed, never gets an HMAC secret made on its first HMAC;
// hmac and verify with it are 400, and nothing is left on the token.
func TestNoHMACSecretForAVersionOnItsWayOut(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1h"}))
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/versions/1/destroy", nil)) // scheduled, in an hour
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	e.ok(e.write("keys/k/versions/2/destroy", nil)) // destroyed at once
	objects := len(e.tokenObjects())
	for v, state := range map[int]string{1: "destroy_scheduled", 2: "destroyed"} {
		resp, err := e.write("hmac/k", map[string]interface{}{"input": b64("x"), "key_version": v})
		if status(resp, err) != 400 || !strings.Contains(respText(resp), state) {
			t.Fatalf("hmac with a %s version: %d %s", state, status(resp, err), respText(resp))
		}
		resp, err = e.write("verify/k", map[string]interface{}{"input": b64("x"), "hmac": fmt.Sprintf("vault:v%d:AAAA", v)})
		if status(resp, err) != 400 {
			t.Fatalf("verify with a %s version: %d %s", state, status(resp, err), respText(resp))
		}
	}
	if n := len(e.tokenObjects()); n != objects {
		t.Fatalf("%d objects on the token, %d before: an HMAC secret was made", n, objects)
	}
}

// Defect e: a combination the token refuses because of the caller's choice (SoftHSM has no PSS with SHA-3) is a
// 400 naming it, never a 500 with PKCS#11 details.
func TestRefusedSignatureCombinationIsA400(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/rsa", map[string]interface{}{"type": "rsa-2048"}))
	resp, err := e.write("sign/rsa/sha3-256", map[string]interface{}{"input": b64("x"), "signature_algorithm": "pss"})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "RSA-PSS with SHA3-256") {
		t.Fatalf("PSS with SHA3-256 on SoftHSM: %d %s", status(resp, err), respText(resp))
	}
}

// Issue 19 item 10: an RSA key that opts in to PKCS#1 v1.5 decryption derives each invalid ciphertext's
// synthetic message from its versions' HMAC secrets. hmac/ would let a caller compute that derivation for any
// ciphertext, predict the synthetic message and its length, and tell valid padding from invalid through rewrap's
// per-item "message too long": so such a key serves no hmac and no verify with hmac (single or batch), and a key
// whose versions already have an HMAC secret (which hmac may have used) cannot opt in.
func TestPKCS1v15OptInReservesTheHMACSecrets(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/r", map[string]interface{}{"type": "rsa-2048"}))
	e.ok(e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": true}))
	refused := func(what, path string, data map[string]interface{}) {
		t.Helper()
		resp, err := e.write(path, data)
		text := respText(resp)
		if err == nil && resp != nil && !resp.IsError() {
			if items := rawBatch(t, resp); len(items) > 0 {
				text = fmt.Sprint(items)
			}
		}
		if status(resp, err) != 400 || !strings.Contains(text, "allow_pkcs1v15_decryption") {
			t.Fatalf("%s on an opted-in key: %d %s", what, status(resp, err), text)
		}
	}
	input := b64("label and ciphertext")
	refused("hmac", "hmac/r", map[string]interface{}{"input": input})
	refused("hmac batch", "hmac/r/sha2-256", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"input": input}}})
	forged := "vault:v1:" + base64.StdEncoding.EncodeToString(make([]byte, 32))
	refused("verify with hmac", "verify/r", map[string]interface{}{"input": input, "hmac": forged})
	refused("verify batch with hmac", "verify/r", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"input": input, "hmac": forged}}})
	if read := e.ok(e.read("keys/r/versions/1")); read.Data["hmac_secret_on_token"] != false {
		t.Fatalf("the refused requests made an HMAC secret: %v", read.Data["hmac_secret_on_token"])
	}
	// Signatures are not HMACs: sign and verify still work.
	sig := e.ok(e.write("sign/r", map[string]interface{}{"input": input})).Data["signature"]
	if v := e.ok(e.write("verify/r", map[string]interface{}{"input": input, "signature": sig})).Data["valid"]; v != true {
		t.Fatalf("signature on an opted-in key: valid=%v", v)
	}

	// Implicit rejection makes the secret; once opted out, hmac could use it: opting in again is refused.
	ct := e.ok(e.write("encrypt/r", map[string]interface{}{"plaintext": input, "padding_scheme": "pkcs1v15"})).Data["ciphertext"]
	e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": ct, "padding_scheme": "pkcs1v15"}))
	e.ok(e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": true})) // no change: accepted
	e.ok(e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": false}))
	if resp, err := e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": true}); status(resp, err) != 400 {
		t.Fatalf("opting in again after opting out: %d %s", status(resp, err), respText(resp))
	}

	// A key whose version has made HMACs cannot opt in: hmac may have handed out the derivation of any ciphertext.
	e.ok(e.write("keys/h", map[string]interface{}{"type": "rsa-2048"}))
	e.ok(e.write("hmac/h", map[string]interface{}{"input": input}))
	resp, err := e.write("keys/h/config", map[string]interface{}{"allow_pkcs1v15_decryption": true})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "hmac_secret_on_token") {
		t.Fatalf("opting in after hmac: %d %s", status(resp, err), respText(resp))
	}
}
