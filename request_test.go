package cmk

import (
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// Issue 19 item 21: a misspelt field never silently drops a protection. Every data-plane path refuses a field
// that neither it nor Transit's path knows, naming it; inside a batch the item with the typo fails alone, naming
// the field; the fields Transit documents stay accepted.
func TestMisspeltFieldsAreRefused(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	ct := encryptOK(t, e, "k", "x")
	sig := e.ok(e.write("sign/s", map[string]interface{}{"input": b64("x")})).Data["signature"].(string)

	// A single request: the typo is named, not "missing plaintext", and nothing is encrypted without the AAD.
	for _, c := range []struct {
		path  string
		data  map[string]interface{}
		field string
	}{
		{"encrypt/k", map[string]interface{}{"plaintxt": b64("x")}, "plaintxt"},
		{"encrypt/k", map[string]interface{}{"plaintext": b64("x"), "asociated_data": b64("aad")}, "asociated_data"},
		{"decrypt/k", map[string]interface{}{"ciphertext": ct, "asociated_data": b64("aad")}, "asociated_data"},
		{"rewrap/k", map[string]interface{}{"ciphertext": ct, "key_verison": 1}, "key_verison"},
		{"datakey/plaintext/k", map[string]interface{}{"bitz": 512}, "bitz"},
		{"sign/s", map[string]interface{}{"input": b64("x"), "hash_algoritm": "sha2-512"}, "hash_algoritm"},
		{"verify/s", map[string]interface{}{"input": b64("x"), "signatur": sig}, "signatur"},
		{"hmac/k", map[string]interface{}{"input": b64("x"), "algoritm": "sha2-512"}, "algoritm"},
		{"random", map[string]interface{}{"byte": 8}, "byte"},
		{"hash", map[string]interface{}{"input": b64("x"), "formatt": "base64"}, "formatt"},
		{"keys/k/rotate", map[string]interface{}{"typo": true}, "typo"},
		{"keys/k/trim", map[string]interface{}{"min_available_versio": 1}, "min_available_versio"},
		{"keys/s/csr", map[string]interface{}{"verison": 1}, "verison"},
	} {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "unknown field "+c.field) {
			t.Errorf("%s %v: %d %s", c.path, c.data, status(resp, err), respText(resp))
		}
	}

	// A batch: the item with the typo fails, naming it and keeping its reference; the others are served.
	resp, err := e.write("encrypt/k", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a"), "associated_data": b64("aad"), "reference": "good"},
		map[string]interface{}{"plaintext": b64("b"), "asociated_data": b64("aad"), "reference": "typo"},
	}})
	if status(resp, err) != 400 {
		t.Fatalf("batch with a misspelt item field: %d", status(resp, err))
	}
	rs := batchResults(t, resp)
	if rs[0].Error != "" || rs[0].Ciphertext == "" || rs[0].Reference != "good" {
		t.Fatalf("the good item: %+v", rs[0])
	}
	if rs[1].Ciphertext != "" || rs[1].Reference != "typo" || !strings.Contains(rs[1].Error, "batch_input[1]: unknown field asociated_data") {
		t.Fatalf("the misspelt item: %+v", rs[1])
	}
	for _, c := range []struct {
		path string
		item map[string]interface{}
	}{
		{"decrypt/k", map[string]interface{}{"ciphertext": ct, "asociated_data": b64("aad")}},
		{"rewrap/k", map[string]interface{}{"ciphertext": ct, "contex": ""}},
		{"sign/s", map[string]interface{}{"input": b64("x"), "refrence": "r"}},
		{"verify/s", map[string]interface{}{"input": b64("x"), "signatur": sig}},
		{"hmac/k", map[string]interface{}{"inpt": b64("x")}},
	} {
		resp, err := e.write(c.path, map[string]interface{}{"batch_input": []interface{}{c.item}})
		if status(resp, err) != 400 || len(batchResults(t, resp)) != 1 || !strings.Contains(batchResults(t, resp)[0].Error, "unknown field") {
			t.Errorf("%s batch %v: %d %s", c.path, c.item, status(resp, err), respText(resp))
		}
	}

	// Transit's documented fields stay accepted; those asking for what the HSM cannot do are a 400 saying why.
	e.ok(e.request(logical.CreateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "context": "", "nonce": "",
		"convergent_encryption": false, "key_version": 0, "reference": "r", "type": "aes256-gcm96", "iv": "", "partial_failure_response_code": 207}))
	e.ok(e.write("decrypt/k", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"ciphertext": ct, "key_version": 1, "reference": "r", "iv": "", "context": "", "nonce": ""},
	}}))
	e.ok(e.write("sign/s", map[string]interface{}{"input": b64("x"), "signature_context": "", "batch_input": []interface{}{
		map[string]interface{}{"input": b64("x"), "context": "", "signature_context": "", "reference": "r"}}}))
	e.ok(e.write("verify/s", map[string]interface{}{"input": b64("x"), "signature": sig, "cmac": "", "mac_length": 0}))
	e.ok(e.write("keys/k/rotate", map[string]interface{}{"managed_key_name": ""}))
	for _, c := range []struct {
		path string
		data map[string]interface{}
		want string
	}{
		{"encrypt/k", map[string]interface{}{"plaintext": b64("x"), "iv": b64("twelve bytes")}, "iv is not supported"},
		{"encrypt/k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"plaintext": b64("x"), "iv": b64("iv")}}}, "iv is not supported"},
		{"sign/s", map[string]interface{}{"input": b64("x"), "signature_context": b64("ctx")}, "signature_context is not supported"},
		{"verify/s", map[string]interface{}{"input": b64("x"), "cmac": "vault:v1:AAAA"}, "cmac is not supported"},
	} {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), c.want) {
			t.Errorf("%s %v: %d %s", c.path, c.data, status(resp, err), respText(resp))
		}
	}
}
