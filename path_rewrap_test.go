package cmk

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"sort"
	"strings"
	"testing"
)

// An RSA ciphertext made with one padding is rewrapped into another, as Transit's decrypt_padding_scheme and
// encrypt_padding_scheme allow; without them padding_scheme serves both.
func TestRewrapRSAPaddingSchemes(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/r", map[string]interface{}{"type": "rsa-2048"}))
	e.ok(e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": true}))
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
	// Implicit rejection: an OAEP ciphertext decrypted as PKCS#1 v1.5 gives a message, not the plaintext.
	if pt := e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": rewrapped, "padding_scheme": "pkcs1v15"})).Data["plaintext"]; pt == b64("padded") {
		t.Fatal("an OAEP ciphertext decrypted as PKCS#1 v1.5 gave the plaintext")
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

// rsaPublicKey is version v's public key of RSA key name, as export gives it.
func rsaPublicKey(t *testing.T, e *testEnv, name string, v int) *rsa.PublicKey {
	t.Helper()
	pemText := e.ok(e.read(fmt.Sprintf("export/public-key/%s/%d", name, v))).Data["keys"].(map[string]interface{})[fmt.Sprint(v)].(string)
	block, _ := pem.Decode([]byte(pemText))
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return pub.(*rsa.PublicKey)
}

// badPaddingCiphertext is a ciphertext of pub whose decryption is not PKCS#1 v1.5 padded (it starts 00 01, a
// signature's block type), as Bleichenbacher's forgeries mostly are.
func badPaddingCiphertext(pub *rsa.PublicKey, seed byte) string {
	em := make([]byte, pub.Size())
	em[1] = 1
	for i := 2; i < len(em); i++ {
		em[i] = seed ^ byte(i)
	}
	c := new(big.Int).Exp(new(big.Int).SetBytes(em), big.NewInt(int64(pub.E)), pub.N)
	return "vault:v1:" + base64.StdEncoding.EncodeToString(c.FillBytes(make([]byte, pub.Size())))
}

// Issue 19 item 10: PKCS#1 v1.5 decryption is a padding oracle. Refused unless the key opts in; a key that opts
// in answers a rewrap batch of valid and invalid-padding items alike (same status, every item a ciphertext and a
// version, no error), and decrypt gives a message for either.
func TestPKCS1v15DecryptionIsNoPaddingOracle(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/r", map[string]interface{}{"type": "rsa-2048"}))
	valid := e.ok(e.write("encrypt/r", map[string]interface{}{"plaintext": b64("session key"), "padding_scheme": "pkcs1v15"})).Data["ciphertext"].(string)
	pub := rsaPublicKey(t, e, "r", 1)
	invalid := []string{badPaddingCiphertext(pub, 1), badPaddingCiphertext(pub, 2), badPaddingCiphertext(pub, 3)}

	// Not opted in: refused, naming the setting, whatever the padding.
	for _, ct := range []string{valid, invalid[0]} {
		for _, c := range []struct{ path, field string }{{"decrypt/r", "padding_scheme"}, {"rewrap/r", "decrypt_padding_scheme"}} {
			resp, err := e.write(c.path, map[string]interface{}{"ciphertext": ct, c.field: "pkcs1v15"})
			if status(resp, err) != 400 || !strings.Contains(respText(resp), "allow_pkcs1v15_decryption") {
				t.Fatalf("%s without opt-in: %d %s", c.path, status(resp, err), respText(resp))
			}
		}
	}
	if code := status(e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": "maybe"})); code != 400 {
		t.Fatalf("a non-boolean setting: %d", code)
	}
	e.ok(e.write("keys/a", nil))
	if code := status(e.write("keys/a/config", map[string]interface{}{"allow_pkcs1v15_decryption": true})); code != 400 {
		t.Fatalf("the setting on an AES key: %d", code)
	}
	if r := e.ok(e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": true})); r.Data["allow_pkcs1v15_decryption"] != true {
		t.Fatalf("key after opting in: %v", r.Data["allow_pkcs1v15_decryption"])
	}

	// Opted in: a batch of valid and invalid items is answered alike: 200, and every item a ciphertext and a
	// version (PKCS#1 v1.5 again: every message a PKCS#1 v1.5 block can hold fits).
	rewrapBatch := func(out string, cts ...string) (int, []map[string]interface{}) {
		in := make([]interface{}, len(cts))
		for i, ct := range cts {
			in[i] = map[string]interface{}{"ciphertext": ct, "reference": "r", "decrypt_padding_scheme": "pkcs1v15", "encrypt_padding_scheme": out}
		}
		resp, err := e.write("rewrap/r", map[string]interface{}{"batch_input": in})
		raw, _ := json.Marshal(rawBatch(t, resp))
		var items []map[string]interface{}
		if err := json.Unmarshal(raw, &items); err != nil {
			t.Fatal(err)
		}
		return status(resp, err), items
	}
	shape := func(it map[string]interface{}) string {
		keys := make([]string, 0, len(it))
		for k := range it {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		return strings.Join(keys, ",")
	}
	code, items := rewrapBatch("pkcs1v15", append([]string{valid}, invalid...)...)
	if code != 200 {
		t.Fatalf("rewrap batch of valid and invalid padding: %d %v", code, items)
	}
	for i, it := range items {
		if shape(it) != "ciphertext,key_version,reference" || !strings.HasPrefix(it["ciphertext"].(string), "vault:v1:") || it["key_version"] != float64(1) {
			t.Fatalf("item %d: %v", i, it)
		}
	}
	if got := e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": items[0]["ciphertext"], "padding_scheme": "pkcs1v15"})).Data["plaintext"]; got != b64("session key") {
		t.Fatalf("the valid item rewrapped decrypts to %v", got)
	}
	// Rewrapped to OAEP, a message longer than OAEP takes cannot be encrypted again, valid or synthetic: the
	// error is the same text for both, and a synthetic message is as long as a random valid block's message is,
	// so the error says nothing of the padding (TestSyntheticMessageLengths).
	long := make([]byte, pub.Size()-11)
	longCT, err := rsa.EncryptPKCS1v15(rand.Reader, pub, long)
	if err != nil {
		t.Fatal(err)
	}
	_, longItems := rewrapBatch("oaep", "vault:v1:"+base64.StdEncoding.EncodeToString(longCT))
	tooLong := longItems[0]["error"]
	if shape(longItems[0]) != "error,reference" || !strings.Contains(fmt.Sprint(tooLong), "message too long") {
		t.Fatalf("a valid long message rewrapped to OAEP: %v", longItems[0])
	}
	var more []string
	for i := byte(10); i < 40; i++ {
		more = append(more, badPaddingCiphertext(pub, i))
	}
	_, items = rewrapBatch("oaep", append([]string{valid}, more...)...)
	for i, it := range items {
		if shape(it) != "ciphertext,key_version,reference" && (shape(it) != "error,reference" || it["error"] != tooLong) {
			t.Fatalf("item %d rewrapped to OAEP: %v", i, it)
		}
	}
	// decrypt: a message for either; for an invalid one, the same message every time (as a real decryption).
	if got := e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": valid, "padding_scheme": "pkcs1v15"})).Data["plaintext"]; got != b64("session key") {
		t.Fatalf("valid: %v", got)
	}
	first := e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": invalid[0], "padding_scheme": "pkcs1v15"})).Data["plaintext"]
	again := e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": invalid[0], "padding_scheme": "pkcs1v15"})).Data["plaintext"]
	other := e.ok(e.write("decrypt/r", map[string]interface{}{"ciphertext": invalid[1], "padding_scheme": "pkcs1v15"})).Data["plaintext"]
	if first != again || first == other {
		t.Fatalf("implicit rejection is not a function of the ciphertext: %v %v %v", first, again, other)
	}
}
