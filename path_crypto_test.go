package cmk

import (
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

func TestEncryptDecryptRoundTrip(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k256", nil))
	e.ok(e.write("keys/k128", map[string]interface{}{"type": "aes128-gcm96"}))
	for _, key := range []string{"k256", "k128"} {
		for _, pt := range []string{"", "hello", strings.Repeat("long ", 50000)} {
			t.Run(fmt.Sprintf("%s/%d", key, len(pt)), func(t *testing.T) {
				ct := encryptOK(t, e, key, pt)
				raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, "vault:v1:"))
				if err != nil || len(raw) != 12+len(pt)+16 {
					t.Fatalf("ciphertext layout: %s (%d bytes, err %v)", ct[:20], len(raw), err)
				}
				if got := decryptOK(t, e, key, ct); got != pt {
					t.Fatalf("round trip gave %q", got)
				}
			})
		}
	}
	// Two encryptions of one plaintext differ (random nonces).
	first, second := encryptOK(t, e, "k256", "same"), encryptOK(t, e, "k256", "same")
	if first == second {
		t.Fatal("identical ciphertexts for one plaintext")
	}
}

func TestAssociatedData(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	aad := b64("tenant=42")
	resp := e.ok(e.write("encrypt/k", map[string]interface{}{"plaintext": b64("secret"), "associated_data": aad}))
	ct := resp.Data["ciphertext"].(string)
	resp = e.ok(e.write("decrypt/k", map[string]interface{}{"ciphertext": ct, "associated_data": aad}))
	if resp.Data["plaintext"] != b64("secret") {
		t.Fatalf("decrypt with aad: %v", resp.Data)
	}
	for _, bad := range []map[string]interface{}{
		{"ciphertext": ct},
		{"ciphertext": ct, "associated_data": b64("tenant=43")},
	} {
		resp, err := e.write("decrypt/k", bad)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "tampered") {
			t.Fatalf("wrong associated data: %d %s", status(resp, err), respText(resp))
		}
	}
	// Rewrap keeps the associated data binding.
	e.ok(e.write("keys/k/rotate", nil))
	resp = e.ok(e.write("rewrap/k", map[string]interface{}{"ciphertext": ct, "associated_data": aad}))
	if resp.Data["key_version"] != 2 {
		t.Fatalf("rewrap: %v", resp.Data)
	}
	resp = e.ok(e.write("decrypt/k", map[string]interface{}{"ciphertext": resp.Data["ciphertext"], "associated_data": aad}))
	if resp.Data["plaintext"] != b64("secret") {
		t.Fatal("rewrapped ciphertext does not decrypt to the original")
	}
}

// TestBadInputIsA400 covers every caller mistake of the foundation issue: a 400 naming the problem.
func TestBadInputIsA400(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/other", nil))
	ct := encryptOK(t, e, "k", "payload")
	foreign := encryptOK(t, e, "other", "payload")
	raw, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, "vault:v1:"))
	raw[len(raw)-1] ^= 0x80
	tampered := "vault:v1:" + base64.StdEncoding.EncodeToString(raw)
	short := "vault:v1:" + base64.StdEncoding.EncodeToString(raw[:20])

	cases := []struct {
		name, path string
		data       map[string]interface{}
		want       string
	}{
		{"bad plaintext base64", "encrypt/k", map[string]interface{}{"plaintext": "not base64!"}, "base64"},
		{"missing plaintext", "encrypt/k", map[string]interface{}{}, "missing plaintext"},
		{"bad aad base64", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "associated_data": "%%"}, "associated_data"},
		{"version above latest", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 2}, "invalid key version"},
		{"negative version", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": -1}, "invalid key version"},
		{"context (derivation)", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "context": b64("c")}, "derivation"},
		{"nonce (convergent)", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "nonce": b64("123456789012")}, "convergent"},
		{"unknown key", "decrypt/nope", map[string]interface{}{"ciphertext": ct}, "encryption key not found"},
		{"missing ciphertext", "decrypt/k", map[string]interface{}{}, "missing ciphertext"},
		{"no prefix", "decrypt/k", map[string]interface{}{"ciphertext": "abc"}, "prefix"},
		{"version 0", "decrypt/k", map[string]interface{}{"ciphertext": "vault:v0:" + base64.StdEncoding.EncodeToString(raw)}, "version"},
		{"version above latest", "decrypt/k", map[string]interface{}{"ciphertext": "vault:v9:" + base64.StdEncoding.EncodeToString(raw)}, "does not exist"},
		{"bad ciphertext base64", "decrypt/k", map[string]interface{}{"ciphertext": "vault:v1:!!!"}, "invalid ciphertext"},
		{"too short", "decrypt/k", map[string]interface{}{"ciphertext": short}, "too short"},
		{"tampered", "decrypt/k", map[string]interface{}{"ciphertext": tampered}, "tampered"},
		{"foreign key", "decrypt/k", map[string]interface{}{"ciphertext": foreign}, "tampered"},
		{"rewrap tampered", "rewrap/k", map[string]interface{}{"ciphertext": tampered}, "tampered"},
		{"empty batch", "encrypt/k", map[string]interface{}{"batch_input": []interface{}{}}, "missing batch input"},
		{"batch not a list", "encrypt/k", map[string]interface{}{"batch_input": "x"}, "must be a list"},
		{"datakey bad form", "datakey/raw/k", map[string]interface{}{}, "plaintext"},
		{"datakey bad bits", "datakey/plaintext/k", map[string]interface{}{"bits": 100}, "bits"},
		{"random too many", "random", map[string]interface{}{"bytes": randomMaxBytes + 1}, "bytes"},
		{"random bad url", "random/abc/xyz", map[string]interface{}{}, "byte count"},
		{"random bad source", "random/dice/12", map[string]interface{}{}, "entropy source"},
		{"hash bad algorithm", "hash/md5", map[string]interface{}{"input": b64("x")}, "unsupported algorithm"},
		{"hash bad input", "hash", map[string]interface{}{"input": "??"}, "base64"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, err := e.write(c.path, c.data)
			if got := status(resp, err); got != 400 {
				t.Fatalf("status %d, want 400 (%v %s)", got, err, respText(resp))
			}
			if !strings.Contains(respText(resp), c.want) {
				t.Fatalf("%s does not mention %q", respText(resp), c.want)
			}
		})
	}
}

type batchResultJSON struct {
	Ciphertext string `json:"ciphertext"`
	Plaintext  string `json:"plaintext"`
	KeyVersion int    `json:"key_version"`
	HMAC       string `json:"hmac"`
	Error      string `json:"error"`
	Reference  string `json:"reference"`
}

// batchResults reads batch_results as a client would see them, through JSON.
func batchResults(t *testing.T, resp *logical.Response) []batchResultJSON {
	t.Helper()
	raw, err := json.Marshal(rawBatch(t, resp))
	if err != nil {
		t.Fatal(err)
	}
	var out []batchResultJSON
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestBatchOf1000(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	in := make([]interface{}, 1000)
	for i := range in {
		in[i] = map[string]interface{}{"plaintext": b64(fmt.Sprintf("item-%d", i)), "reference": fmt.Sprint(i)}
	}
	resp := e.ok(e.write("encrypt/k", map[string]interface{}{"batch_input": in}))
	enc := batchResults(t, resp)
	if len(enc) != 1000 {
		t.Fatalf("%d results", len(enc))
	}
	dec := make([]interface{}, len(enc))
	for i, r := range enc {
		if r.Error != "" || r.KeyVersion != 1 || r.Reference != fmt.Sprint(i) {
			t.Fatalf("item %d: %+v", i, r)
		}
		dec[i] = map[string]interface{}{"ciphertext": r.Ciphertext, "reference": r.Reference}
	}
	resp = e.ok(e.write("decrypt/k", map[string]interface{}{"batch_input": dec}))
	for i, r := range batchResults(t, resp) {
		if r.Error != "" || r.Plaintext != b64(fmt.Sprintf("item-%d", i)) || r.Reference != fmt.Sprint(i) {
			t.Fatalf("decrypt item %d: %+v", i, r)
		}
	}
	e.ok(e.write("keys/k/rotate", nil))
	resp = e.ok(e.write("rewrap/k", map[string]interface{}{"batch_input": dec}))
	for i, r := range batchResults(t, resp) {
		if r.Error != "" || r.KeyVersion != 2 || !strings.HasPrefix(r.Ciphertext, "vault:v2:") {
			t.Fatalf("rewrap item %d: %+v", i, r)
		}
	}
}

func TestBatchPerItemErrors(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	good := encryptOK(t, e, "k", "good")
	in := []interface{}{
		map[string]interface{}{"ciphertext": good, "reference": "ok"},
		map[string]interface{}{"ciphertext": "vault:v1:AAAA", "reference": "short"},
		map[string]interface{}{"ciphertext": 42, "reference": "number"},
		"not an object",
		map[string]interface{}{"reference": "missing"},
	}
	resp, err := e.write("decrypt/k", map[string]interface{}{"batch_input": in})
	if got := status(resp, err); got != 400 {
		t.Fatalf("mixed batch: status %d, want 400", got)
	}
	rs := batchResults(t, resp)
	if rs[0].Error != "" || rs[0].Plaintext != b64("good") || rs[0].Reference != "ok" {
		t.Fatalf("good item: %+v", rs[0])
	}
	for i, want := range []string{"", "too short", "must be a string", "must be an object", "missing ciphertext"} {
		if !strings.Contains(rs[i].Error, want) || (want == "" && rs[i].Error != "") {
			t.Errorf("item %d error %q, want %q", i, rs[i].Error, want)
		}
	}
	// partial_failure_response_code applies when some items succeeded.
	resp, err = e.write("decrypt/k", map[string]interface{}{"batch_input": in, "partial_failure_response_code": 207})
	if got := status(resp, err); got != 207 {
		t.Fatalf("partial failure code: %d", got)
	}
	// Not when every item failed.
	resp, err = e.write("decrypt/k", map[string]interface{}{"batch_input": in[1:], "partial_failure_response_code": 207})
	if got := status(resp, err); got != 400 {
		t.Fatalf("all failed: %d", got)
	}
	// max_batch_size bounds a batch as a whole.
	e.ok(e.write("config/keys", map[string]interface{}{"max_batch_size": 2}))
	resp, err = e.write("encrypt/k", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": ""}, map[string]interface{}{"plaintext": ""}, map[string]interface{}{"plaintext": ""},
	}})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "max_batch_size") {
		t.Fatalf("oversized batch: %d %s", status(resp, err), respText(resp))
	}
}

func TestUpsert(t *testing.T) {
	e := newTestBackend(t)
	resp := e.ok(e.request(logical.CreateOperation, "encrypt/new", map[string]interface{}{"plaintext": b64("x"), "type": "aes128-gcm96"}))
	if resp.Data["key_version"] != 1 {
		t.Fatalf("upsert encrypt: %v", resp.Data)
	}
	if r := e.ok(e.read("keys/new")); r.Data["type"] != "aes128-gcm96" {
		t.Fatalf("upserted key: %v", r.Data)
	}
	e.ok(e.write("config/keys", map[string]interface{}{"disable_upsert": true}))
	resp, err := e.request(logical.CreateOperation, "encrypt/other", map[string]interface{}{"plaintext": b64("x")})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "not found") {
		t.Fatalf("upsert disabled: %d %s", status(resp, err), respText(resp))
	}
	// Without create capability Vault sends update: a missing key is then simply not found.
	resp, err = e.write("encrypt/third", map[string]interface{}{"plaintext": b64("x")})
	if status(resp, err) != 400 {
		t.Fatalf("update on missing key: %d", status(resp, err))
	}
}

func TestDatakeyRandomHash(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	for _, bits := range []int{128, 256, 512} {
		resp := e.ok(e.write("datakey/plaintext/k", map[string]interface{}{"bits": bits}))
		pt, _ := base64.StdEncoding.DecodeString(resp.Data["plaintext"].(string))
		if len(pt)*8 != bits {
			t.Fatalf("%d-bit data key has %d bytes", bits, len(pt))
		}
		if got := decryptOK(t, e, "k", resp.Data["ciphertext"].(string)); got != string(pt) {
			t.Fatal("wrapped data key does not decrypt to the plaintext one")
		}
	}
	resp := e.ok(e.write("datakey/wrapped/k", nil))
	if _, has := resp.Data["plaintext"]; has || resp.Data["key_version"] != 1 {
		t.Fatalf("wrapped data key: %v", resp.Data)
	}

	for path, n := range map[string]int{"random": 32, "random/16": 16, "random/seal/24": 24, "random/all": 32} {
		resp := e.ok(e.write(path, nil))
		out, err := base64.StdEncoding.DecodeString(resp.Data["random_bytes"].(string))
		if err != nil || len(out) != n {
			t.Fatalf("%s: %d bytes, %v", path, len(out), err)
		}
	}
	resp = e.ok(e.write("random", map[string]interface{}{"bytes": 8, "format": "hex"}))
	if len(resp.Data["random_bytes"].(string)) != 16 {
		t.Fatalf("hex random: %v", resp.Data)
	}

	sum := sha256.Sum256([]byte("abc"))
	resp = e.ok(e.write("hash", map[string]interface{}{"input": b64("abc")}))
	if resp.Data["sum"] != hex.EncodeToString(sum[:]) {
		t.Fatalf("sha2-256: %v", resp.Data)
	}
	resp = e.ok(e.write("hash/sha3-256", map[string]interface{}{"input": b64("abc"), "format": "base64"}))
	// SHA3-256("abc"), FIPS 202 test vector.
	want, _ := hex.DecodeString("3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532")
	if resp.Data["sum"] != base64.StdEncoding.EncodeToString(want) {
		t.Fatalf("sha3-256: %v", resp.Data)
	}
}

// faultyToken wraps the real token and fails chosen calls, as a broken HSM would.
type faultyToken struct {
	hsmToken
	mu   sync.Mutex
	fail error
}

func (f *faultyToken) set(err error) {
	f.mu.Lock()
	f.fail = err
	f.mu.Unlock()
}

func (f *faultyToken) err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fail
}

func (f *faultyToken) EncryptGCM(ctx context.Context, id, nonce, aad, pt []byte) ([]byte, []byte, error) {
	if err := f.err(); err != nil {
		return nil, nil, err
	}
	return f.hsmToken.EncryptGCM(ctx, id, nonce, aad, pt)
}

func (f *faultyToken) DecryptGCM(ctx context.Context, id, nonce, aad, ct []byte) ([]byte, error) {
	if err := f.err(); err != nil {
		return nil, err
	}
	return f.hsmToken.DecryptGCM(ctx, id, nonce, aad, ct)
}

func (f *faultyToken) GenerateVersion(ctx context.Context, alg hsm.Algorithm, id []byte, label string, hmacBytes int) (crypto.PublicKey, error) {
	if err := f.err(); err != nil {
		return nil, err
	}
	return f.hsmToken.GenerateVersion(ctx, alg, id, label, hmacBytes)
}

func TestUnavailableHSMIs503AndRecovers(t *testing.T) {
	e := newUnconfiguredBackend(t)
	faulty := &faultyToken{}
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		tok, err := hsm.Open(c, l)
		if err != nil {
			return nil, err
		}
		faulty.hsmToken = tok
		return faulty, nil
	}
	e.label = "fault-test"
	if err := softhsm.CreateToken(e.label, testPIN); err != nil {
		t.Fatal(err)
	}
	e.ok(e.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN, "iv_source": "os"}))
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "x")

	faulty.set(fmt.Errorf("C_Encrypt: %w: CKR_DEVICE_REMOVED", hsm.ErrUnavailable))
	resp, err := e.write("encrypt/k", map[string]interface{}{"plaintext": b64("x")})
	if got := status(resp, err); got != 503 || !strings.Contains(err.Error(), "HSM unavailable") {
		t.Fatalf("single encrypt with the HSM gone: %d %v", got, err)
	}
	resp, err = e.write("decrypt/k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"ciphertext": ct}}})
	if got := status(resp, err); got != 503 {
		t.Fatalf("batch decrypt with the HSM gone: %d", got)
	}
	if got := status(e.write("keys/k/rotate", nil)); got != 503 {
		t.Fatalf("rotate with the HSM gone: %d", got)
	}
	faulty.set(nil)
	if decryptOK(t, e, "k", ct) != "x" {
		t.Fatal("no recovery")
	}
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 1 {
		t.Fatalf("failed rotation left a version: %v", r.Data["latest_version"])
	}
}

// Concurrent encrypts, decrypts and rotations (Transit's TestPolicyFuzzing pattern): every ciphertext decrypts,
// versions are contiguous.
func TestConcurrentUseAndRotation(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 40; i++ {
				if g == 0 && i%8 == 0 {
					if _, err := e.write("keys/k/rotate", nil); err != nil {
						errs <- err
						return
					}
				}
				msg := fmt.Sprintf("%d/%d", g, i)
				resp, err := e.write("encrypt/k", map[string]interface{}{"plaintext": b64(msg)})
				if err != nil {
					errs <- err
					return
				}
				resp, err = e.write("decrypt/k", map[string]interface{}{"ciphertext": resp.Data["ciphertext"]})
				if err != nil || resp.Data["plaintext"] != b64(msg) {
					errs <- fmt.Errorf("round trip %s: %v", msg, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	p, _ := loadPolicy(context.Background(), e.storage, "k")
	for v := 1; v <= p.LatestVersion; v++ {
		if p.Versions[v] == nil {
			t.Fatalf("version %d missing of %d", v, p.LatestVersion)
		}
	}
	if p.LatestVersion != 6 || len(e.tokenObjects()) != 6 {
		t.Fatalf("latest %d, %d objects", p.LatestVersion, len(e.tokenObjects()))
	}
}
