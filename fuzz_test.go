package cmk

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// fuzzPaths are the request paths FuzzRequestData sends to: every data-plane path and the key settings, on
// keys that exist. Paths that make HSM objects on every call (rotate, create under new names) are left out, so
// the token stays small while the fuzzer runs for long.
var fuzzPaths = []string{
	"encrypt/k", "decrypt/k", "rewrap/k", "datakey/plaintext/k", "datakey/wrapped/k", "hmac/k", "verify/k",
	"sign/ec", "verify/ec", "encrypt/rsa", "decrypt/rsa", "sign/rsa", "keys/k/config", "keys/k", "config/keys",
	"random", "hash", "keys/k/trim", "keys/k/import_version", "keys/k/versions/1/enable",
}

// FuzzRequestData sends arbitrary JSON, decoded as Vault's HTTP layer decodes it (numbers as json.Number), to
// the engine's paths on a real token: no input may panic or be answered with a 500.
func FuzzRequestData(f *testing.F) {
	e := newTestBackend(f)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/ec", map[string]interface{}{"type": "ecdsa-p256"}))
	e.ok(e.write("keys/rsa", map[string]interface{}{"type": "rsa-2048"}))
	ct := e.ok(e.write("encrypt/k", map[string]interface{}{"plaintext": b64("seed")})).Data["ciphertext"].(string)
	for i, body := range []string{
		`{"plaintext":"aGk="}`,
		`{"ciphertext":"` + ct + `"}`,
		`{"batch_input":[{"plaintext":"aGk=","reference":"r"},{"plaintext":"!"}],"partial_failure_response_code":207}`,
		`{"batch_input":[{"ciphertext":"` + ct + `"},{"ciphertext":"vault:v9:AAAA"}]}`,
		`{"input":"aGk=","hash_algorithm":"sha2-512","marshaling_algorithm":"jws","key_version":1}`,
		`{"input":"aGk=","signature":"vault:v1:AAAA","prehashed":true,"salt_length":"auto"}`,
		`{"bits":512,"associated_data":"aGk=","key_version":"1"}`,
		`{"min_decryption_version":1,"auto_rotate_period":"1h","deletion_allowed":false}`,
		`{"max_batch_size":5,"deletion_grace_period":"1s"}`,
		`{"plaintext":"aGk=","padding_scheme":"oaep","batch_input":null}`,
	} {
		f.Add(uint8(i), body)
	}
	f.Fuzz(func(t *testing.T, which uint8, body string) {
		var data map[string]interface{}
		dec := json.NewDecoder(bytes.NewReader([]byte(body)))
		dec.UseNumber()
		if dec.Decode(&data) != nil {
			return // Vault's listener refuses what is not a JSON object
		}
		path := fuzzPaths[int(which)%len(fuzzPaths)]
		resp, err := e.b.HandleRequest(context.Background(), &logical.Request{
			Operation: logical.UpdateOperation, Path: path, Data: data, Storage: e.storage,
		})
		if code := status(resp, err); code >= 500 && code != 503 {
			t.Fatalf("%s %s: %d %v %s", path, body, code, err, respText(resp))
		}
	})
}
