package cmk

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"testing"
)

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
