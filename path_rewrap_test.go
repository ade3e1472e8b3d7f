package cmk

import (
	"strings"
	"testing"
)

// An RSA ciphertext made with one padding is rewrapped into another, as Transit's decrypt_padding_scheme and
// encrypt_padding_scheme allow; without them padding_scheme serves both.
func TestRewrapRSAPaddingSchemes(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/r", map[string]interface{}{"type": "rsa-2048"}))
	old := e.ok(e.write("encrypt/r", map[string]interface{}{"plaintext": b64("padded"), "padding_scheme": "pkcs1v15"})).Data["ciphertext"].(string)
	e.ok(e.write("keys/r/rotate", nil))
	resp := e.ok(e.write("rewrap/r", map[string]interface{}{"ciphertext": old, "decrypt_padding_scheme": "pkcs1v15", "encrypt_padding_scheme": "oaep"}))
	rewrapped := resp.Data["ciphertext"].(string)
	if !strings.HasPrefix(rewrapped, "vault:v2:") {
		t.Fatalf("rewrapped to %s", rewrapped)
	}
	if decryptOK(t, e, "r", rewrapped) != "padded" { // oaep is the default
		t.Fatal("the rewrapped ciphertext decrypts to something else")
	}
	if code := status(e.write("decrypt/r", map[string]interface{}{"ciphertext": rewrapped, "padding_scheme": "pkcs1v15"})); code != 400 {
		t.Fatalf("an OAEP ciphertext decrypted as PKCS#1 v1.5: %d", code)
	}
	same := e.ok(e.write("rewrap/r", map[string]interface{}{"ciphertext": old, "padding_scheme": "pkcs1v15"})).Data["ciphertext"].(string)
	pt := e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": same, "padding_scheme": "pkcs1v15"})).Data["plaintext"].(string)
	if pt != b64("padded") {
		t.Fatalf("padding_scheme for both: %s", pt)
	}
	if code := status(e.write("rewrap/r", map[string]interface{}{"ciphertext": old, "decrypt_padding_scheme": "rot13"})); code != 400 {
		t.Fatalf("unknown padding: %d", code)
	}
}
