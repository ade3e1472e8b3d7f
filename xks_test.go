package cmk

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks/xkstest"
)

// The XKS API served through xks/request, as cmd/cmk-xks-proxy forwards it, with requests signed by a SigV4
// implementation apart from the verifier's (xkstest). The cases mirror AWS's test client
// (aws-samples/aws-kms-xksproxy-test-client): health, metadata, encrypt and decrypt with and without AAD, the
// ciphertext data integrity value, large inputs, authentication, paths, unknown keys and key usage.

type xksClient struct {
	e          *testEnv
	akid, key  string
	uriPath    string
	region     string
	at         func() time.Time
	principal  string
	vpce       string
	kmsKeyARN  string
	requestSeq int
}

func newXKSStore(t *testing.T, e *testEnv, store string, fields map[string]interface{}) *xksClient {
	t.Helper()
	if fields == nil {
		fields = map[string]interface{}{}
	}
	st := e.ok(e.write("xks/stores/"+store, fields))
	cred := e.ok(e.write("xks/stores/"+store+"/credentials", nil))
	return &xksClient{e: e, akid: cred.Data["access_key_id"].(string), key: cred.Data["secret_access_key"].(string),
		uriPath: st.Data["uri_path"].(string), region: "us-east-1", at: time.Now,
		principal: "arn:aws:iam::111122223333:user/Alice", kmsKeyARN: "arn:aws:kms:us-east-1:111122223333:key/1234abcd"}
}

// send signs body for path (under the store's URI path) and returns the XKS status and body.
func (c *xksClient) send(method, path string, body []byte) (int, map[string]interface{}) {
	c.e.t.Helper()
	r := xkstest.NewRequest("xks.example.com", c.uriPath+path, body, c.akid, c.key, c.region, c.at())
	r.Method = method
	return c.forward(r)
}

// xksRequestData is what cmk-xks-proxy writes to xks/request for r.
func xksRequestData(r *xks.Request) map[string]interface{} {
	headers := map[string]interface{}{}
	for k, vs := range r.Header {
		var list []interface{}
		for _, v := range vs {
			list = append(list, v)
		}
		headers[k] = list
	}
	return map[string]interface{}{"method": r.Method, "path": r.Path, "host": r.Host, "headers": headers,
		"body": base64.StdEncoding.EncodeToString(r.Body)}
}

func (c *xksClient) forward(r *xks.Request) (int, map[string]interface{}) {
	c.e.t.Helper()
	resp := c.e.ok(c.e.write("xks/request", xksRequestData(r)))
	var out map[string]interface{}
	if err := json.Unmarshal([]byte(resp.Data["body"].(string)), &out); err != nil {
		c.e.t.Fatalf("XKS body %q: %v", resp.Data["body"], err)
	}
	return resp.Data["status"].(int), out
}

func (c *xksClient) metadata(op string) map[string]interface{} {
	c.requestSeq++
	md := map[string]interface{}{"awsPrincipalArn": c.principal, "kmsOperation": op, "kmsRequestId": fmt.Sprintf("req-%d", c.requestSeq)}
	if c.kmsKeyARN != "" {
		md["kmsKeyArn"] = c.kmsKeyARN
	}
	if c.vpce != "" {
		md["awsSourceVpce"] = c.vpce
	}
	return md
}

func (c *xksClient) call(op, keyID string, fields map[string]interface{}) (int, map[string]interface{}) {
	c.e.t.Helper()
	body := map[string]interface{}{"requestMetadata": c.metadata(map[string]string{"encrypt": "Encrypt", "decrypt": "Decrypt", "metadata": "DescribeKey"}[op])}
	if op != "metadata" {
		body["encryptionAlgorithm"] = "AES_GCM"
	}
	for k, v := range fields {
		body[k] = v
	}
	raw, _ := json.Marshal(body)
	return c.send(http.MethodPost, "/keys/"+keyID+"/"+op, raw)
}

func (c *xksClient) encrypt(keyID string, plaintext, aad []byte, cdiv bool) (int, map[string]interface{}) {
	c.e.t.Helper()
	f := map[string]interface{}{"plaintext": base64.StdEncoding.EncodeToString(plaintext)}
	if aad != nil {
		f["additionalAuthenticatedData"] = base64.StdEncoding.EncodeToString(aad)
	}
	if cdiv {
		f["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
	}
	return c.call("encrypt", keyID, f)
}

// decryptOf is the decrypt request for what encrypt returned, with aad.
func decryptOf(enc map[string]interface{}, aad []byte) map[string]interface{} {
	f := map[string]interface{}{}
	for _, k := range []string{"ciphertext", "ciphertextMetadata", "initializationVector", "authenticationTag"} {
		if v, ok := enc[k]; ok {
			f[k] = v
		}
	}
	if aad != nil {
		f["additionalAuthenticatedData"] = base64.StdEncoding.EncodeToString(aad)
	}
	return f
}

func wantXKSError(t *testing.T, status int, body map[string]interface{}, wantStatus int, name string) {
	t.Helper()
	if status != wantStatus || body["errorName"] != name {
		t.Fatalf("got %d %v, want %d %s", status, body, wantStatus, name)
	}
}

func roundTrip(t *testing.T, c *xksClient, keyID string, pt, aad []byte, cdiv bool) map[string]interface{} {
	t.Helper()
	status, enc := c.encrypt(keyID, pt, aad, cdiv)
	if status != 200 {
		t.Fatalf("encrypt: %d %v", status, enc)
	}
	status, dec := c.call("decrypt", keyID, decryptOf(enc, aad))
	if status != 200 || dec["plaintext"] != base64.StdEncoding.EncodeToString(pt) {
		t.Fatalf("decrypt: %d %v", status, dec)
	}
	return enc
}

func TestXKSAsAWSsTestClientSeesIt(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/payments", nil))
	e.ok(e.write("keys/enc-only", nil))
	e.ok(e.write("keys/dec-only", nil))
	c := newXKSStore(t, e, "tenant1", nil)
	if c.uriPath != "/tenant1/kms/xks/v1" {
		t.Fatalf("uri_path %s", c.uriPath)
	}
	e.ok(e.write("xks/stores/tenant1/keys/payments-key", map[string]interface{}{"key": "payments"}))
	e.ok(e.write("xks/stores/tenant1/keys/enc-only", map[string]interface{}{"key": "enc-only", "key_usage": "ENCRYPT"}))
	e.ok(e.write("xks/stores/tenant1/keys/dec-only", map[string]interface{}{"key": "dec-only", "key_usage": "DECRYPT"}))
	pt, aad, aad2 := []byte("plaintext\n"), []byte("project=nile,department=marketing"), []byte("project=blue,department=finance")

	t.Run("health", func(t *testing.T) {
		status, h := c.send(http.MethodPost, "/health", []byte(`{"requestMetadata":{"kmsRequestId":"h1","kmsOperation":"KmsHealthCheck"}}`))
		fleet, _ := h["ekmFleetDetails"].([]interface{})
		if status != 200 || len(fleet) != 1 || fleet[0].(map[string]interface{})["healthStatus"] != "ACTIVE" || h["xksProxyFleetSize"] != float64(1) {
			t.Fatalf("%d %v", status, h)
		}
		if id := fleet[0].(map[string]interface{})["id"].(string); !strings.Contains(id, e.label) {
			t.Fatalf("fleet id %q does not name the token", id)
		}
	})
	t.Run("metadata", func(t *testing.T) {
		status, md := c.call("metadata", "payments-key", nil)
		if status != 200 || md["keySpec"] != "AES_256" || md["keyStatus"] != "ENABLED" || fmt.Sprint(md["keyUsage"]) != "[ENCRYPT DECRYPT]" {
			t.Fatalf("%d %v", status, md)
		}
		c.kmsKeyARN = "" // CreateKey: no kmsKeyArn yet
		status, md = c.call("metadata", "enc-only", nil)
		c.kmsKeyARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd"
		if status != 200 || fmt.Sprint(md["keyUsage"]) != "[ENCRYPT]" {
			t.Fatalf("%d %v", status, md)
		}
	})
	t.Run("encrypt with a non-existing key", func(t *testing.T) {
		status, body := c.encrypt("non_existing_key", pt, nil, false)
		wantXKSError(t, status, body, 404, "KeyNotFoundException")
	})
	t.Run("encrypt with missing plaintext", func(t *testing.T) {
		status, body := c.call("encrypt", "payments-key", nil)
		wantXKSError(t, status, body, 400, "ValidationException")
	})
	t.Run("invalid SigV4 access key id", func(t *testing.T) {
		bad := *c
		bad.akid = "Invalid" + c.akid
		status, body := bad.encrypt("payments-key", pt, nil, false)
		wantXKSError(t, status, body, 401, "AuthenticationFailedException")
	})
	t.Run("invalid SigV4 secret", func(t *testing.T) {
		bad := *c
		bad.key = "Invalid" + c.key
		status, body := bad.encrypt("payments-key", pt, nil, false)
		wantXKSError(t, status, body, 401, "AuthenticationFailedException")
	})
	t.Run("invalid URI path", func(t *testing.T) {
		bad := *c
		bad.uriPath = "/tenant1/invalid/kms/xks/v1"
		status, body := bad.encrypt("payments-key", pt, nil, false)
		wantXKSError(t, status, body, 404, "InvalidUriPathException")
	})
	t.Run("a request signed more than 5 minutes ago", func(t *testing.T) {
		old := *c
		old.at = func() time.Time { return time.Now().Add(-6 * time.Minute) }
		status, body := old.encrypt("payments-key", pt, nil, false)
		wantXKSError(t, status, body, 401, "AuthenticationFailedException")
	})
	t.Run("GET", func(t *testing.T) {
		status, _ := c.send(http.MethodGet, "/health", nil)
		if status != http.StatusMethodNotAllowed {
			t.Fatalf("GET answered %d", status)
		}
	})
	t.Run("encrypt with AAD, decrypt without it", func(t *testing.T) {
		_, enc := c.encrypt("payments-key", pt, aad, false)
		status, body := c.call("decrypt", "payments-key", decryptOf(enc, nil))
		wantXKSError(t, status, body, 400, "InvalidCiphertextException")
	})
	t.Run("encrypt with AAD, decrypt with another", func(t *testing.T) {
		_, enc := c.encrypt("payments-key", pt, aad, false)
		status, body := c.call("decrypt", "payments-key", decryptOf(enc, aad2))
		wantXKSError(t, status, body, 400, "InvalidCiphertextException")
	})
	t.Run("round trips without and with AAD", func(t *testing.T) {
		roundTrip(t, c, "payments-key", []byte("Hello World!"), nil, false)
		roundTrip(t, c, "payments-key", []byte("Hello World!"), aad, false)
	})
	t.Run("the ciphertext data integrity value, with and without AAD", func(t *testing.T) {
		for _, a := range [][]byte{aad, nil} {
			enc := roundTrip(t, c, "payments-key", []byte("Hello World!"), a, true)
			h := sha256.New()
			h.Write(a)
			for _, k := range []string{"ciphertextMetadata", "initializationVector", "ciphertext", "authenticationTag"} {
				b, _ := base64.StdEncoding.DecodeString(enc[k].(string))
				h.Write(b)
			}
			if enc["ciphertextDataIntegrityValue"] != base64.StdEncoding.EncodeToString(h.Sum(nil)) {
				t.Fatalf("CDIV %v is not SHA-256 over the fields", enc["ciphertextDataIntegrityValue"])
			}
		}
		if _, enc := c.encrypt("payments-key", pt, nil, false); enc["ciphertextDataIntegrityValue"] != nil {
			t.Fatal("a CDIV nobody asked for")
		}
	})
	t.Run("4 KiB plaintext with 8 KiB AAD", func(t *testing.T) {
		big, bigAAD := make([]byte, 4096), make([]byte, 8192)
		for i := range bigAAD {
			bigAAD[i] = byte(i)
		}
		roundTrip(t, c, "payments-key", big, bigAAD, false)
		roundTrip(t, c, "payments-key", make([]byte, 4300), bigAAD, true)
	})
	t.Run("tampered input", func(t *testing.T) {
		_, enc := c.encrypt("payments-key", pt, aad, false)
		flip := func(field string) map[string]interface{} {
			f := decryptOf(enc, aad)
			b, _ := base64.StdEncoding.DecodeString(f[field].(string))
			b[len(b)-1] ^= 1
			f[field] = base64.StdEncoding.EncodeToString(b)
			return f
		}
		for _, field := range []string{"ciphertext", "authenticationTag", "initializationVector", "ciphertextMetadata"} {
			status, body := c.call("decrypt", "payments-key", flip(field))
			wantXKSError(t, status, body, 400, "InvalidCiphertextException")
		}
		// The specification's example of why lengths go into the HSM's AAD: metadata passed as AAD.
		_, plain := c.encrypt("payments-key", pt, nil, false)
		f := decryptOf(plain, nil)
		f["additionalAuthenticatedData"] = f["ciphertextMetadata"]
		delete(f, "ciphertextMetadata")
		status, body := c.call("decrypt", "payments-key", f)
		wantXKSError(t, status, body, 400, "InvalidCiphertextException")
		f = decryptOf(enc, aad)
		f["authenticationTag"] = base64.StdEncoding.EncodeToString(make([]byte, 12))
		status, body = c.call("decrypt", "payments-key", f)
		wantXKSError(t, status, body, 400, "InvalidCiphertextException")
	})
	t.Run("encrypt-only and decrypt-only keys", func(t *testing.T) {
		_, enc := c.encrypt("enc-only", pt, nil, false)
		status, body := c.call("decrypt", "enc-only", decryptOf(enc, nil))
		wantXKSError(t, status, body, 400, "InvalidKeyUsageException")
		for _, v := range []struct {
			aad  []byte
			cdiv bool
		}{{aad, false}, {nil, false}, {aad, true}, {nil, true}} {
			status, body = c.encrypt("dec-only", pt, v.aad, v.cdiv)
			wantXKSError(t, status, body, 400, "InvalidKeyUsageException")
		}
	})
	t.Run("metadata without or with empty requestMetadata", func(t *testing.T) {
		for _, raw := range []string{`{}`, `{"requestMetadata":{}}`} {
			status, body := c.send(http.MethodPost, "/keys/payments-key/metadata", []byte(raw))
			wantXKSError(t, status, body, 400, "ValidationException")
		}
	})
	t.Run("an unknown kmsOperation is accepted", func(t *testing.T) {
		raw := fmt.Sprintf(`{"requestMetadata":{"awsPrincipalArn":%q,"kmsKeyArn":%q,"kmsOperation":"BulkEncrypt","kmsRequestId":"x1","newField":1},"plaintext":"AAAA","encryptionAlgorithm":"AES_GCM"}`,
			c.principal, c.kmsKeyARN)
		if status, body := c.send(http.MethodPost, "/keys/payments-key/encrypt", []byte(raw)); status != 200 {
			t.Fatalf("%d %v", status, body)
		}
	})
}

func TestXKSRotationIsInvisibleToAWSAndDisableStopsIt(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	c := newXKSStore(t, e, "acct", map[string]interface{}{"path_prefix": ""})
	if c.uriPath != "/kms/xks/v1" {
		t.Fatalf("uri_path %s", c.uriPath)
	}
	e.ok(e.write("xks/stores/acct/keys/ext-1", map[string]interface{}{"key": "k"}))
	_, before := c.encrypt("ext-1", []byte("data key 1"), []byte("ctx"), false)
	e.ok(e.write("keys/k/rotate", nil))
	_, after := c.encrypt("ext-1", []byte("data key 2"), []byte("ctx"), false)
	if before["ciphertextMetadata"] == after["ciphertextMetadata"] {
		t.Fatal("the metadata does not name the version")
	}
	for pt, enc := range map[string]map[string]interface{}{"data key 1": before, "data key 2": after} {
		status, dec := c.call("decrypt", "ext-1", decryptOf(enc, []byte("ctx")))
		if status != 200 || dec["plaintext"] != base64.StdEncoding.EncodeToString([]byte(pt)) {
			t.Fatalf("%d %v", status, dec)
		}
	}
	// A version below min_decryption_version no longer decrypts.
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 2}))
	status, body := c.call("decrypt", "ext-1", decryptOf(before, []byte("ctx")))
	wantXKSError(t, status, body, 400, "InvalidCiphertextException")

	// The external key's and the store's own kill switches stop AWS alone.
	e.ok(e.write("xks/stores/acct/keys/ext-1", map[string]interface{}{"disabled": true}))
	if _, md := c.call("metadata", "ext-1", nil); md["keyStatus"] != "DISABLED" {
		t.Fatalf("metadata of a disabled external key: %v", md)
	}
	status, body = c.encrypt("ext-1", []byte("x"), nil, false)
	wantXKSError(t, status, body, 400, "InvalidStateException")
	encryptOK(t, e, "k", "Vault's own use goes on")
	e.ok(e.write("xks/stores/acct/keys/ext-1", map[string]interface{}{"disabled": false}))
	e.ok(e.write("xks/stores/acct", map[string]interface{}{"disabled": true}))
	status, body = c.send(http.MethodPost, "/health", []byte(`{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}`))
	wantXKSError(t, status, body, 400, "InvalidStateException")
	status, body = c.call("decrypt", "ext-1", decryptOf(after, []byte("ctx")))
	wantXKSError(t, status, body, 400, "InvalidStateException")
	e.ok(e.write("xks/stores/acct", map[string]interface{}{"disabled": false}))

	// The customer's kill switch: disabling the key stops AWS's use at once.
	e.ok(e.write("keys/k/disable", nil))
	if _, md := c.call("metadata", "ext-1", nil); md["keyStatus"] != "DISABLED" {
		t.Fatalf("metadata of a disabled key: %v", md)
	}
	status, body = c.encrypt("ext-1", []byte("x"), nil, false)
	wantXKSError(t, status, body, 400, "InvalidStateException")
	status, body = c.call("decrypt", "ext-1", decryptOf(after, []byte("ctx")))
	wantXKSError(t, status, body, 400, "InvalidStateException")
	e.ok(e.write("keys/k/enable", nil))
	if status, _ := c.call("decrypt", "ext-1", decryptOf(after, []byte("ctx"))); status != 200 {
		t.Fatalf("after enable: %d", status)
	}

	// What the HSM authenticated is the specification's AAD: lengths, AAD, metadata, as HSMAAD makes it.
	tok, _, err := e.b.getToken(t.Context(), e.storage)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := e.b.keys.Get(t.Context(), e.storage, "k")
	d := func(f string) []byte { b, _ := base64.StdEncoding.DecodeString(after[f].(string)); return b }
	md := d("ciphertextMetadata")
	sealed := append(d("ciphertext"), d("authenticationTag")...)
	if _, err := tok.DecryptGCM(t.Context(), k.Versions[2].ID(), d("initializationVector"), xks.HSMAAD([]byte("ctx"), md), sealed); err != nil {
		t.Fatalf("the HSM does not authenticate the specification's AAD: %v", err)
	}
	if _, err := tok.DecryptGCM(t.Context(), k.Versions[2].ID(), d("initializationVector"), append([]byte("ctx"), md...), sealed); err == nil {
		t.Fatal("the HSM authenticated the AAD without its lengths")
	}

	// A key scheduled for deletion serves AWS nothing; one made again under its name (here: the external key's
	// record of which key it exposes is of another) is not the material AWS's ciphertexts need.
	e.ok(e.write("keys/k/config", map[string]interface{}{"deletion_allowed": true}))
	e.ok(e.request("delete", "keys/k", nil))
	status, body = c.encrypt("ext-1", []byte("x"), nil, false)
	wantXKSError(t, status, body, 400, "InvalidStateException")
	e.ok(e.write("keys/k/cancel-deletion", nil))
	xk, err := getJSON[xksKey](t.Context(), e.storage, xksKeysPrefix+"acct/ext-1")
	if err != nil || xk == nil {
		t.Fatal(err)
	}
	xk.KeyCreatedAt = xk.KeyCreatedAt.Add(-time.Hour)
	if err := putJSON(t.Context(), e.storage, xksKeysPrefix+"acct/ext-1", xk); err != nil {
		t.Fatal(err)
	}
	e.b.invalidate(t.Context(), xksKeysPrefix+"acct/ext-1")
	status, body = c.encrypt("ext-1", []byte("x"), nil, false)
	wantXKSError(t, status, body, 404, "KeyNotFoundException")
}

func TestXKSRulesRefuseAndAreRecorded(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	c := newXKSStore(t, e, "acct", map[string]interface{}{"allowed_principal_arns": "arn:aws:iam::111122223333:*"})
	e.ok(e.write("xks/stores/acct/keys/ext", map[string]interface{}{"key": "k", "allowed_vpc_endpoints": "vpce-0abc*"}))
	c.vpce = "vpce-0abc1234"
	if status, body := c.encrypt("ext", []byte("x"), nil, false); status != 200 {
		t.Fatalf("allowed request: %d %v", status, body)
	}
	c.principal = "arn:aws:iam::444455556666:role/Mallory"
	status, body := c.encrypt("ext", []byte("x"), nil, false)
	wantXKSError(t, status, body, 403, "AccessDeniedException")
	if !strings.Contains(body["errorMessage"].(string), "awsPrincipalArn") {
		t.Fatalf("the refusal does not say why: %v", body)
	}
	status, body = c.call("metadata", "ext", nil)
	wantXKSError(t, status, body, 403, "AccessDeniedException")
	ev := lastEvent(e.history("k"))
	if ev["event"] != "xks_denied" || !strings.Contains(fmt.Sprint(ev["details"]), "kmsRequestId req-") {
		t.Fatalf("history: %v", ev)
	}
	// Health is excluded from authorization, as the specification says.
	if status, _ := c.send(http.MethodPost, "/health", []byte(`{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}`)); status != 200 {
		t.Fatalf("health: %d", status)
	}
	c.principal = "arn:aws:iam::111122223333:role/Bob"
	c.vpce = ""
	status, body = c.encrypt("ext", []byte("x"), nil, false)
	wantXKSError(t, status, body, 403, "AccessDeniedException")
	// The refusals were judged at the door: counted with the key's other denials.
	u := e.ok(e.read("keys/k/usage"))
	if !strings.Contains(fmt.Sprint(u.Data), "xks_") {
		t.Fatalf("usage analytics do not count the XKS denials: %v", u.Data)
	}
	// The key's own access conditions apply to AWS's uses too.
	c.vpce = "vpce-0abc1234"
	e.ok(e.write("keys/k/access", map[string]interface{}{"allowed_cidrs": "10.9.9.0/24"}))
	status, body = c.encrypt("ext", []byte("x"), nil, false)
	wantXKSError(t, status, body, 403, "AccessDeniedException")
}

func TestXKSStoresAreApartAndThrottled(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/a", nil))
	e.ok(e.write("keys/b", nil))
	a := newXKSStore(t, e, "tenant-a", nil)
	b := newXKSStore(t, e, "tenant-b", map[string]interface{}{"requests_per_second": 1, "burst": 1})
	e.ok(e.write("xks/stores/tenant-a/keys/ka", map[string]interface{}{"key": "a"}))
	e.ok(e.write("xks/stores/tenant-b/keys/kb", map[string]interface{}{"key": "b"}))
	// One store's credentials on the other's path.
	cross := *a
	cross.uriPath = b.uriPath
	status, body := cross.encrypt("kb", []byte("x"), nil, false)
	wantXKSError(t, status, body, 404, "InvalidUriPathException")
	// One store's keys are not the other's.
	status, body = a.encrypt("kb", []byte("x"), nil, false)
	wantXKSError(t, status, body, 404, "KeyNotFoundException")
	// Store b's throttle: one request a second.
	if status, body := b.encrypt("kb", []byte("x"), nil, false); status != 200 {
		t.Fatalf("%d %v", status, body)
	}
	status, body = b.encrypt("kb", []byte("x"), nil, false)
	wantXKSError(t, status, body, 429, "ThrottlingException")
	if status, _ := a.encrypt("ka", []byte("x"), nil, false); status != 200 {
		t.Fatal("store a throttled by store b's limit")
	}
}

func TestXKSConfiguration(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/aes", nil))
	e.ok(e.write("keys/aes2", nil))
	e.ok(e.write("keys/ec", map[string]interface{}{"type": "ecdsa-p256"}))
	c := newXKSStore(t, e, "s1", nil)
	// Credentials: the secret only once; at most 4; a deleted one stops verifying at once; two at once rotate.
	read := e.ok(e.read("xks/stores/s1/credentials/" + c.akid))
	if read.Data["secret_access_key"] != nil || strings.Contains(fmt.Sprint(read.Data), c.key) {
		t.Fatalf("a read returned the secret: %v", read.Data)
	}
	if len(c.akid) < 20 || len(c.akid) > 30 || len(c.key) < 43 {
		t.Fatalf("generated credential %s / %d characters", c.akid, len(c.key))
	}
	given := e.ok(e.write("xks/stores/s1/credentials", map[string]interface{}{"access_key_id": "AKIAI2SFODNN7EXAMPLE", "secret_access_key": "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"}))
	if !strings.Contains(given.Data["kms_console_file"].(string), `"XksProxyUriPath":"/s1/kms/xks/v1"`) {
		t.Fatalf("console file %v", given.Data["kms_console_file"])
	}
	e.ok(e.write("xks/stores/s1/keys/x", map[string]interface{}{"key": "aes"}))
	second := *c
	second.akid, second.key = "AKIAI2SFODNN7EXAMPLE", "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"
	for _, cl := range []*xksClient{c, &second} {
		if status, _ := cl.call("metadata", "x", nil); status != 200 {
			t.Fatalf("credential %s: %d", cl.akid, status)
		}
	}
	if status, _ := c.call("metadata", "x", nil); status != 200 { // the last verification: c's key derived
		t.Fatalf("credential %s: %d", c.akid, status)
	}
	e.ok(e.request("delete", "xks/stores/s1/credentials/"+c.akid, nil))
	status, body := c.call("metadata", "x", nil)
	wantXKSError(t, status, body, 401, "AuthenticationFailedException")
	// The access key id again, with another secret: the old secret verifies nothing (AWS's signer caches derived
	// keys by access key id, not by secret, so the engine never shares one).
	e.ok(e.write("xks/stores/s1/credentials", map[string]interface{}{"access_key_id": c.akid, "secret_access_key": "bmV3c2VjcmV0bmV3c2VjcmV0bmV3c2VjcmV0bmV3c2VjcmV0MTIzNA=="}))
	status, body = c.call("metadata", "x", nil)
	wantXKSError(t, status, body, 401, "AuthenticationFailedException")
	renewed := *c
	renewed.key = "bmV3c2VjcmV0bmV3c2VjcmV0bmV3c2VjcmV0bmV3c2VjcmV0MTIzNA=="
	if status, _ := renewed.call("metadata", "x", nil); status != 200 {
		t.Fatalf("the new secret: %d", status)
	}
	e.ok(e.request("delete", "xks/stores/s1/credentials/"+c.akid, nil))
	for i := 0; i < 3; i++ {
		e.ok(e.write("xks/stores/s1/credentials", nil))
	}
	if _, err := e.write("xks/stores/s1/credentials", nil); err == nil {
		t.Fatal("a fifth credential")
	}
	// Keys: AES-256 only, one external key per key, fixed once set.
	for _, bad := range []map[string]interface{}{{"key": "ec"}, {"key": "aes"}, {"key": "missing"}, {"key": "aes2", "key_usage": "SIGN"}, {}} {
		if _, err := e.write("xks/stores/s1/keys/y", bad); err == nil {
			t.Fatalf("%v accepted", bad)
		}
	}
	if _, err := e.write("xks/stores/s1/keys/x", map[string]interface{}{"key": "aes2"}); err == nil {
		t.Fatal("an external key's key changed")
	}
	// Stores: a valid, unique path, fixed at creation; no deletion while keys are exposed.
	for _, bad := range []map[string]interface{}{{"path_prefix": "/s1"}, {"path_prefix": "/a b"}, {"path_prefix": "/" + strings.Repeat("p", 120)}} {
		if _, err := e.write("xks/stores/s2", bad); err == nil {
			t.Fatalf("store with %v accepted", bad)
		}
	}
	if _, err := e.write("xks/stores/s1", map[string]interface{}{"path_prefix": "/other"}); err == nil {
		t.Fatal("path_prefix changed")
	}
	if _, err := e.request("delete", "xks/stores/s1", nil); err == nil {
		t.Fatal("a store exposing keys deleted")
	}
	e.ok(e.request("delete", "xks/stores/s1/keys/x", nil))
	e.ok(e.request("delete", "xks/stores/s1", nil))
	if list, _ := e.inmem.List(t.Context(), xksCredentialsPrefix); len(list) != 0 {
		t.Fatalf("credentials left after the store: %v", list)
	}
}

// dropDuring is storage that drops the XKS configuration cache, as a change landing mid-read does, on its first
// list of the credentials.
type dropDuring struct {
	*countingStorage
	x       *xksState
	dropped bool
}

func (s *dropDuring) List(ctx context.Context, prefix string) ([]string, error) {
	if prefix == xksCredentialsPrefix && !s.dropped {
		s.dropped = true
		s.x.drop()
	}
	return s.countingStorage.List(ctx, prefix)
}

// A configuration read that a change overtook serves its own request but is not kept: the next request reads
// again, so a deleted credential stops verifying from its deletion on.
func TestXKSConfigReadOvertakenByAChangeIsNotKept(t *testing.T) {
	e := newTestBackend(t)
	newXKSStore(t, e, "s", nil)
	s := &dropDuring{countingStorage: e.storage, x: &e.b.xks}
	if _, err := e.b.xks.config(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	if !s.dropped {
		t.Fatal("the read did not list the credentials")
	}
	e.b.xks.mu.Lock()
	kept := e.b.xks.cfg
	e.b.xks.mu.Unlock()
	if kept != nil {
		t.Fatal("a snapshot read across a change was kept")
	}
	if _, err := e.b.xks.config(t.Context(), e.storage); err != nil {
		t.Fatal(err)
	}
	if e.b.xks.cfg == nil {
		t.Fatal("a read no change overtook was not kept")
	}
}

// The deep health check: a health key the token lost is made again, and while no check has completed (the first
// one still under way) the HSM is reported UNAVAILABLE, never ACTIVE on no evidence.
func TestXKSHealthKeyLostIsMadeAgainAndNoCheckIsNoHealth(t *testing.T) {
	e := newTestBackend(t)
	c := newXKSStore(t, e, "s", nil)
	health := func() string {
		t.Helper()
		status, h := c.send(http.MethodPost, "/health", []byte(`{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}`))
		if status != 200 {
			t.Fatalf("health: %d %v", status, h)
		}
		return h["ekmFleetDetails"].([]interface{})[0].(map[string]interface{})["healthStatus"].(string)
	}
	if got := health(); got != "ACTIVE" {
		t.Fatalf("first check: %s", got)
	}
	type healthKey struct {
		HSMID string `json:"hsm_id"`
	}
	before, err := getJSON[healthKey](t.Context(), e.storage, xksHealthKeyPath)
	if err != nil || before == nil {
		t.Fatal(err)
	}
	tok, _, err := e.b.getToken(t.Context(), e.storage)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := hex.DecodeString(before.HSMID)
	if n, err := tok.DestroyKeys(t.Context(), id); err != nil || n == 0 {
		t.Fatalf("destroy the health key: %d %v", n, err)
	}
	e.b.xks.healthMu.Lock()
	e.b.xks.healthAt = time.Time{} // due again
	e.b.xks.healthMu.Unlock()
	if got := health(); got != "ACTIVE" {
		t.Fatalf("after the token lost the health key: %s", got)
	}
	after, err := getJSON[healthKey](t.Context(), e.storage, xksHealthKeyPath)
	if err != nil || after == nil || after.HSMID == before.HSMID {
		t.Fatalf("health key %v, was %s", after, before.HSMID)
	}
	e.b.xks.healthMu.Lock()
	e.b.xks.healthAt, e.b.xks.healthRunning = time.Time{}, true // a first check under way elsewhere
	e.b.xks.healthMu.Unlock()
	if got := health(); got != "UNAVAILABLE" {
		t.Fatalf("with no check completed: %s", got)
	}
}

func TestXKSWildcards(t *testing.T) {
	for _, c := range []struct {
		p, v string
		want bool
	}{
		{"arn:aws:iam::1111:*", "arn:aws:iam::1111:role/a", true},
		{"arn:aws:iam::1111:*", "arn:aws:iam::2222:role/a", false},
		{"*", "anything", true},
		{"a*b*c", "abc", true},
		{"a*b*c", "aXbYc", true},
		{"a*b*c", "acb", false},
		{"ab*ba", "aba", false},
		{"vpce-0abc*", "vpce-0abc1234", true},
		{"s3.amazonaws.com", "s3.amazonaws.com", true},
		{"s3.amazonaws.com", "s3xamazonaws.com", false},
		{"a.*", "aX", false}, // '.' is a dot, not any character
	} {
		if got := wildcardMatch(c.p, c.v); got != c.want {
			t.Errorf("%q ~ %q: %v", c.p, c.v, got)
		}
	}
	if matchesAny([]string{"*"}, "") {
		t.Error("an absent value matched")
	}
}
