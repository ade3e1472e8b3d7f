package cmk

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// versionTypes reads each version's type from the key read.
func (e *testEnv) versionTypes(name string) map[string]string {
	e.t.Helper()
	out := map[string]string{}
	for n, v := range e.ok(e.read("keys/" + name)).Data["versions"].(map[string]interface{}) {
		out[n] = fmt.Sprint(v.(map[string]interface{})["type"])
	}
	return out
}

// An encryption key rotated from AES-128 to AES-256: each version keeps its type, old ciphertexts decrypt and
// rewrap onto the new one, the history names the change, and storage holds every version's type (the version
// stored before the change included), so a restart reads them all back.
func TestRotationChangesAnEncryptionKeysType(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"type": "aes128-gcm96"}))
	old := encryptOK(t, e, "k", "under aes-128")

	r := e.ok(e.write("keys/k/rotate", map[string]interface{}{"type": "aes256-gcm96"})).Data
	if r["type"] != "aes256-gcm96" || fmt.Sprint(r["latest_version"]) != "2" {
		t.Fatalf("after the rotation: type %v, latest %v", r["type"], r["latest_version"])
	}
	if got := e.versionTypes("k"); got["1"] != "aes128-gcm96" || got["2"] != "aes256-gcm96" {
		t.Fatalf("version types: %v", got)
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "rotated" || !strings.Contains(fmt.Sprint(ev["details"]), "aes128-gcm96 to aes256-gcm96") {
		t.Fatalf("history: %v", ev)
	}
	if decryptOK(t, e, "k", old) != "under aes-128" {
		t.Fatal("the aes-128 version's ciphertext does not decrypt")
	}
	fresh := encryptOK(t, e, "k", "under aes-256")
	if !strings.HasPrefix(fresh, "vault:v2:") {
		t.Fatalf("new encryption: %s", fresh)
	}
	moved := e.ok(e.write("rewrap/k", map[string]interface{}{"ciphertext": old})).Data["ciphertext"].(string)
	if !strings.HasPrefix(moved, "vault:v2:") || decryptOK(t, e, "k", moved) != "under aes-128" {
		t.Fatalf("rewrap across algorithms: %s", moved)
	}
	entry, err := e.inmem.Get(context.Background(), keys.VersionsKey("k", 0))
	if err != nil || entry == nil {
		t.Fatal(err)
	}
	var stored map[string]map[string]interface{}
	if err := json.Unmarshal(entry.Value, &stored); err != nil {
		t.Fatal(err)
	}
	if stored["1"]["type"] != "aes128-gcm96" || stored["2"]["type"] != "aes256-gcm96" {
		t.Fatalf("stored versions: %v", stored)
	}
	r2 := e.reopen()
	if got := r2.versionTypes("k"); got["1"] != "aes128-gcm96" || got["2"] != "aes256-gcm96" {
		t.Fatalf("version types after a restart: %v", got)
	}
	if decryptOK(t, r2, "k", old) != "under aes-128" || decryptOK(t, r2, "k", fresh) != "under aes-256" {
		t.Fatal("ciphertexts after a restart")
	}
}

// A key's purpose never changes: encryption, signing and hmac keys each rotate within theirs, and a key_size
// outside hmac is refused.
func TestRotationRefusesAnotherPurpose(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/aes", nil))
	e.ok(e.write("keys/sig", map[string]interface{}{"type": "ecdsa-p256"}))
	e.ok(e.write("keys/mac", map[string]interface{}{"type": "hmac"}))
	objects := len(e.tokenObjects())
	for _, c := range []struct{ key, to, want string }{
		{"aes", "ecdsa-p256", "purpose"},
		{"aes", "rsa-2048", "purpose"},
		{"aes", "hmac", "purpose"},
		{"sig", "aes256-gcm96", "purpose"},
		{"mac", "ed25519", "purpose"},
		{"aes", "des", "unsupported key type"},
	} {
		resp, err := e.write("keys/"+c.key+"/rotate", map[string]interface{}{"type": c.to})
		if status(resp, err) != 400 || !strings.Contains(respText(resp), c.want) {
			t.Fatalf("%s to %s: %d %s", c.key, c.to, status(resp, err), respText(resp))
		}
	}
	for _, body := range []map[string]interface{}{{"type": "aes128-gcm96", "key_size": 64}, {"key_size": 64}} {
		resp, err := e.write("keys/aes/rotate", body)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "key_size") {
			t.Fatalf("key_size on an aes rotation (%v): %d %s", body, status(resp, err), respText(resp))
		}
	}
	resp, err := e.write("keys/aes/config", map[string]interface{}{"next_type": "ed25519"})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "purpose") {
		t.Fatalf("next_type of another purpose: %d %s", status(resp, err), respText(resp))
	}
	for _, name := range []string{"aes", "sig", "mac"} {
		if v := e.ok(e.read("keys/" + name)).Data["latest_version"]; fmt.Sprint(v) != "1" {
			t.Fatalf("a refused rotation made a version of %s: %v", name, v)
		}
	}
	if n := len(e.tokenObjects()); n != objects {
		t.Fatalf("objects on the token after refused rotations: %d, before %d", n, objects)
	}
}

// A signing key moved from ECDSA to Ed25519 and then RSA: sign uses the latest's algorithm, each signature
// verifies with its version's, the key read shows each version's public key under its own name, and each version's
// public key checks its signature outside the engine.
func TestRotationChangesASigningKeysAlgorithm(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	input := b64("signed by three algorithms")
	sign := func() string {
		return e.ok(e.write("sign/s", map[string]interface{}{"input": input})).Data["signature"].(string)
	}
	sigs := []string{sign()}
	e.ok(e.write("keys/s/rotate", map[string]interface{}{"type": "ed25519"}))
	sigs = append(sigs, sign())
	e.ok(e.write("keys/s/rotate", map[string]interface{}{"type": "rsa-3072"}))
	sigs = append(sigs, sign())
	for i, sig := range sigs {
		if !strings.HasPrefix(sig, fmt.Sprintf("vault:v%d:", i+1)) {
			t.Fatalf("signature %d: %s", i+1, sig)
		}
		if !verifyOK(t, e, "s", map[string]interface{}{"input": input, "signature": sig}) {
			t.Fatalf("signature of version %d does not verify", i+1)
		}
	}
	read := e.ok(e.read("keys/s")).Data
	if read["type"] != "rsa-3072" || read["supports_encryption"] != true {
		t.Fatalf("key read: type %v, supports_encryption %v", read["type"], read["supports_encryption"])
	}
	published := read["keys"].(map[string]interface{})
	for n, want := range map[string]string{"1": "P-256", "2": "ed25519", "3": "rsa-3072"} {
		if got := published[n].(map[string]interface{})["name"]; got != want {
			t.Fatalf("version %s published as %v, want %s", n, got, want)
		}
	}
	digest := sha256.Sum256([]byte("signed by three algorithms"))
	for i, sig := range sigs {
		raw, err := base64.StdEncoding.DecodeString(strings.SplitN(sig, ":", 3)[2])
		if err != nil {
			t.Fatal(err)
		}
		text := published[fmt.Sprint(i+1)].(map[string]interface{})["public_key"].(string)
		var ok bool
		switch i {
		case 0:
			block, _ := pem.Decode([]byte(text))
			pub, err := x509.ParsePKIXPublicKey(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			ok = ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest[:], raw)
		case 1:
			pub, err := base64.StdEncoding.DecodeString(text)
			if err != nil {
				t.Fatal(err)
			}
			ok = ed25519.Verify(ed25519.PublicKey(pub), []byte("signed by three algorithms"), raw)
		case 2:
			block, _ := pem.Decode([]byte(text))
			pub, err := x509.ParsePKIXPublicKey(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			ok = rsa.VerifyPSS(pub.(*rsa.PublicKey), 5 /* SHA-256 */, digest[:], raw, nil) == nil
		}
		if !ok {
			t.Fatalf("version %d's public key does not check its signature", i+1)
		}
	}
	// prehashed is refused for the Ed25519 version alone.
	resp, err := e.write("sign/s", map[string]interface{}{"input": b64(string(digest[:])), "prehashed": true, "key_version": 2})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "ed25519") {
		t.Fatalf("prehashed with the ed25519 version: %d %s", status(resp, err), respText(resp))
	}
	e.ok(e.write("sign/s", map[string]interface{}{"input": base64.StdEncoding.EncodeToString(digest[:]), "prehashed": true}))

	// RSA versions encrypt; once the key has moved on to ECDSA, encryption is refused and the RSA ciphertext
	// still decrypts.
	ct := encryptOK(t, e, "s", "under rsa")
	e.ok(e.write("keys/s/rotate", map[string]interface{}{"type": "ecdsa-p384"}))
	resp, err = e.write("encrypt/s", map[string]interface{}{"plaintext": b64("x")})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "does not support encryption") {
		t.Fatalf("encryption after a move to ecdsa: %d %s", status(resp, err), respText(resp))
	}
	if decryptOK(t, e, "s", ct) != "under rsa" {
		t.Fatal("the rsa version's ciphertext")
	}
}

// An hmac key rotated to a longer secret: each version keeps its size, and both versions' HMACs verify.
func TestRotationChangesAnHMACKeysSize(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/mac", map[string]interface{}{"type": "hmac", "key_size": 32}))
	input := b64("authenticated")
	first := e.ok(e.write("hmac/mac", map[string]interface{}{"input": input})).Data["hmac"]
	r := e.ok(e.write("keys/mac/rotate", map[string]interface{}{"key_size": 64})).Data
	if r["key_size"] != 64 {
		t.Fatalf("key_size after the rotation: %v", r["key_size"])
	}
	versions := r["versions"].(map[string]interface{})
	if versions["1"].(map[string]interface{})["key_size"] != 32 || versions["2"].(map[string]interface{})["key_size"] != 64 {
		t.Fatalf("version sizes: %v / %v", versions["1"], versions["2"])
	}
	second := e.ok(e.write("hmac/mac", map[string]interface{}{"input": input})).Data["hmac"]
	for _, mac := range []interface{}{first, second} {
		if v := e.ok(e.write("verify/mac", map[string]interface{}{"input": input, "hmac": mac})).Data["valid"]; v != true {
			t.Fatalf("hmac %v does not verify", mac)
		}
	}
	resp, err := e.write("keys/mac/rotate", map[string]interface{}{"key_size": 8})
	if status(resp, err) != 400 {
		t.Fatalf("a secret below the minimum: %d", status(resp, err))
	}
}

// next_type is carried by the next rotation of any cause (here the schedule), then cleared; the key read shows
// it while it is pending, and the history records its setting.
func TestNextTypeIsMadeByTheNextRotation(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"type": "aes128-gcm96", "auto_rotate_period": "24h"}))
	e.ok(e.write("keys/k/config", map[string]interface{}{"next_type": "aes256-gcm96"}))
	if got := e.ok(e.read("keys/k")).Data["next_type"]; got != "aes256-gcm96" {
		t.Fatalf("next_type as read: %v", got)
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "config_changed" || !strings.Contains(fmt.Sprint(ev["details"]), "next_type") {
		t.Fatalf("history: %v", ev)
	}
	past := "2020-01-01T00:00:00Z"
	e.ok(e.write("keys/k/config", map[string]interface{}{"next_rotation_time": past}))
	e.tick()
	read := e.ok(e.read("keys/k")).Data
	if fmt.Sprint(read["latest_version"]) != "2" || read["type"] != "aes256-gcm96" || read["next_type"] != nil {
		t.Fatalf("after the scheduled rotation: latest %v, type %v, next_type %v", read["latest_version"], read["type"], read["next_type"])
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "rotated" || ev["cause"] != "scheduled" || !strings.Contains(fmt.Sprint(ev["details"]), "to aes256-gcm96") {
		t.Fatalf("history: %v", ev)
	}
	e.ok(e.write("keys/k/rotate", nil))
	if got := e.versionTypes("k"); got["3"] != "aes256-gcm96" {
		t.Fatalf("the rotation after: %v", got)
	}
}

// Storage restored from before a rotation that changed the type: the version made after it is adopted from the
// token as what it is (the token's object says so), and its ciphertexts decrypt again.
func TestRestoreAdoptsAVersionOfTheNewType(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"type": "aes128-gcm96"}))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	snap := e.snapshotStorage()
	e.ok(e.write("keys/k/rotate", map[string]interface{}{"type": "aes256-gcm96"}))
	e.ok(e.write("keys/s/rotate", map[string]interface{}{"type": "ed25519"}))
	ct := encryptOK(t, e, "k", "after the snapshot")
	sig := e.ok(e.write("sign/s", map[string]interface{}{"input": b64("signed after")})).Data["signature"].(string)

	r := e.restoredFrom(snap)
	if decryptOK(t, r, "k", ct) != "after the snapshot" {
		t.Fatal("plaintext differs")
	}
	if !verifyOK(t, r, "s", map[string]interface{}{"input": b64("signed after"), "signature": sig}) {
		t.Fatal("the ed25519 signature made after the snapshot does not verify after the restore")
	}
	if got := r.versionTypes("k"); got["1"] != "aes128-gcm96" || got["2"] != "aes256-gcm96" {
		t.Fatalf("key k after adoption: %v", got)
	}
	read := r.ok(r.read("keys/s")).Data
	if read["type"] != "ed25519" || r.versionTypes("s")["2"] != "ed25519" {
		t.Fatalf("key s after adoption: %v %v", read["type"], r.versionTypes("s"))
	}
	r.labelsOnce()
}

// The mount's algorithm policy: allowed_types refuses creation, import and rotation to other types with a 400
// naming the allowed ones, and so does a deprecation once its date has passed; rsa-2048 is deprecated from 2031
// by default, and existing versions of a refused type keep serving.
func TestMountAlgorithmPolicy(t *testing.T) {
	e := newTestBackend(t)
	cfg := e.ok(e.read("config/keys")).Data
	if dep := cfg["deprecated_types"].(map[string]string); dep["rsa-2048"] != "2031-01-01" || len(cfg["allowed_types"].([]string)) != 0 {
		t.Fatalf("default policy: %v %v", cfg["allowed_types"], cfg["deprecated_types"])
	}
	e.ok(e.write("keys/old", map[string]interface{}{"type": "aes128-gcm96"}))
	ct := encryptOK(t, e, "old", "kept")
	e.ok(e.write("config/keys", map[string]interface{}{"allowed_types": "aes256-gcm96,ecdsa-p384,ed25519"}))

	resp, err := e.write("keys/new", map[string]interface{}{"type": "aes128-gcm96"})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "aes256-gcm96, ecdsa-p384, ed25519") {
		t.Fatalf("creation of a type not allowed: %d %s", status(resp, err), respText(resp))
	}
	resp, err = e.write("keys/old/rotate", nil)
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "not allowed") {
		t.Fatalf("rotation keeping a type not allowed: %d %s", status(resp, err), respText(resp))
	}
	if decryptOK(t, e, "old", ct) != "kept" || !strings.HasPrefix(encryptOK(t, e, "old", "x"), "vault:v1:") {
		t.Fatal("the existing version of a refused type stopped serving")
	}
	e.ok(e.write("keys/old/rotate", map[string]interface{}{"type": "aes256-gcm96"}))
	e.ok(e.write("keys/new", nil)) // aes256-gcm96
	resp, err = e.request(logical.CreateOperation, "encrypt/upserted", map[string]interface{}{"plaintext": b64("x"), "type": "aes128-gcm96"})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "not allowed") {
		t.Fatalf("upsert of a type not allowed: %d %s", status(resp, err), respText(resp))
	}

	e.ok(e.write("config/keys", map[string]interface{}{"allowed_types": "", "deprecated_types": map[string]interface{}{"ecdsa-p256": "2020-01-01", "ed25519": "2999-01-01"}}))
	cfg = e.ok(e.read("config/keys")).Data
	if dep := cfg["deprecated_types"].(map[string]string); len(dep) != 2 || dep["ecdsa-p256"] != "2020-01-01" {
		t.Fatalf("deprecations as read: %v", dep)
	}
	resp, err = e.write("keys/sig", map[string]interface{}{"type": "ecdsa-p256"})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "deprecated on this mount since 2020-01-01") {
		t.Fatalf("creation of a deprecated type: %d %s", status(resp, err), respText(resp))
	}
	e.ok(e.write("keys/sig", map[string]interface{}{"type": "ed25519"}))  // deprecated only from 2999
	e.ok(e.write("keys/rsa", map[string]interface{}{"type": "rsa-2048"})) // the default no longer applies
	resp, err = e.write("config/keys", map[string]interface{}{"deprecated_types": map[string]interface{}{"rsa-2048": "soon"}})
	if status(resp, err) != 400 {
		t.Fatalf("a deprecation without a date: %d", status(resp, err))
	}
	resp, err = e.write("config/keys", map[string]interface{}{"allowed_types": "aes256-gcm96,des"})
	if status(resp, err) != 400 {
		t.Fatalf("an unknown allowed type: %d", status(resp, err))
	}
}

// The migration view counts what each version made and what relied on it (rewrap's decrypting half included),
// by version and by algorithm, lists the versions to rewrap before retiring them, and keeps its counts across a
// restart once flushed; raising min_decryption_version takes a version out of the decrypt window.
func TestMigrationViewCountsEachVersionsUse(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"type": "aes128-gcm96"}))
	var old []string
	for i := 0; i < 3; i++ {
		old = append(old, encryptOK(t, e, "k", fmt.Sprint("old ", i)))
	}
	e.ok(e.write("keys/k/rotate", map[string]interface{}{"type": "aes256-gcm96"}))
	encryptOK(t, e, "k", "new 1")
	encryptOK(t, e, "k", "new 2")
	decryptOK(t, e, "k", old[0])
	e.ok(e.write("rewrap/k", map[string]interface{}{"ciphertext": old[1]}))

	check := func(e *testEnv, restarted bool) {
		t.Helper()
		m := e.ok(e.read("keys/k/migration")).Data
		v1 := m["versions"].(map[string]interface{})["1"].(map[string]interface{})
		v2 := m["versions"].(map[string]interface{})["2"].(map[string]interface{})
		if v1["type"] != "aes128-gcm96" || v1["made"] != uint64(3) || v1["opened"] != uint64(2) || v1["last_opened"] == "" ||
			v1["in_decrypt_window"] != true || v1["counts_complete"] != true || (!restarted && v1["encryptions"] != uint64(3)) {
			t.Fatalf("version 1: %v", v1)
		}
		if v2["type"] != "aes256-gcm96" || v2["made"] != uint64(3) || v2["opened"] != uint64(0) || v2["last_opened"] != "" {
			t.Fatalf("version 2: %v", v2)
		}
		algs := m["algorithms"].(map[string]*migrationAlgorithm)
		if a := algs["aes128-gcm96"]; a == nil || a.Made != 3 || a.Opened != 2 || fmt.Sprint(a.InDecryptWindow) != "[1]" {
			t.Fatalf("algorithms: %v", algs)
		}
		if fmt.Sprint(m["pending_migration"]) != "[1]" {
			t.Fatalf("pending_migration: %v", m["pending_migration"])
		}
	}
	check(e, false)
	e.tick() // the periodic function stores the counts
	r := e.reopen()
	check(r, true) // the nonce limit's count is shown once the process has read it (as the key read does)
	r.ok(r.write("keys/k/config", map[string]interface{}{"min_decryption_version": 2}))
	m := r.ok(r.read("keys/k/migration")).Data
	if fmt.Sprint(m["pending_migration"]) != "[]" || m["versions"].(map[string]interface{})["1"].(map[string]interface{})["in_decrypt_window"] != false {
		t.Fatalf("after the window moved: %v", m)
	}
}

// A use of a version whose type the mount deprecates answers with a warning and is counted by type; uses of
// versions of other types do not; the migration view names the deprecation.
func TestDeprecatedTypeUseIsWarnedAndCounted(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"type": "aes128-gcm96"}))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	old := encryptOK(t, e, "k", "old")
	sig := e.ok(e.write("sign/s", map[string]interface{}{"input": b64("x")})).Data["signature"]
	e.ok(e.write("keys/k/rotate", map[string]interface{}{"type": "aes256-gcm96"}))
	e.ok(e.write("config/keys", map[string]interface{}{"deprecated_types": map[string]interface{}{"aes128-gcm96": "2020-01-01", "ecdsa-p256": "2020-01-02"}}))
	counted := map[string]string{"key_type": "aes128-gcm96"}
	before := e.value(e.scrape(), "cmk_deprecated_type_uses_total", counted)

	resp := e.ok(e.write("decrypt/k", map[string]interface{}{"ciphertext": old}))
	if !strings.Contains(strings.Join(resp.Warnings, "\n"), "aes128-gcm96 is deprecated on this mount since 2020-01-01") {
		t.Fatalf("warnings: %v", resp.Warnings)
	}
	resp = e.ok(e.write("decrypt/k", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"ciphertext": old}, map[string]interface{}{"ciphertext": old}}}))
	if len(resp.Warnings) != 1 {
		t.Fatalf("a batch's warnings: %v", resp.Warnings)
	}
	if resp := e.ok(e.write("encrypt/k", map[string]interface{}{"plaintext": b64("x")})); len(resp.Warnings) != 0 {
		t.Fatalf("a use of the aes256 version warned: %v", resp.Warnings)
	}
	resp = e.ok(e.write("verify/s", map[string]interface{}{"input": b64("x"), "signature": sig}))
	if resp.Data["valid"] != true || !strings.Contains(strings.Join(resp.Warnings, "\n"), "ecdsa-p256 is deprecated") {
		t.Fatalf("verify: %v %v", resp.Data, resp.Warnings)
	}
	if got := e.value(e.scrape(), "cmk_deprecated_type_uses_total", counted) - before; got != 3 {
		t.Fatalf("deprecated uses counted: %v, want 3", got)
	}
	algs := e.ok(e.read("keys/k/migration")).Data["algorithms"].(map[string]*migrationAlgorithm)
	if algs["aes128-gcm96"].DeprecatedSince != "2020-01-01" || algs["aes256-gcm96"].DeprecatedSince != "" {
		t.Fatalf("migration view: %v", algs)
	}
	// The compliance report names both keys' deprecated versions and sums the mount's algorithms.
	report := e.ok(e.read("reports/compliance")).Data
	found := map[string]string{}
	for _, f := range report["deprecated_types_in_use"].([]map[string]interface{}) {
		found[f["key"].(string)] = fmt.Sprint(f["type"], f["versions"])
	}
	if found["k"] != "aes128-gcm96[1]" || found["s"] != "ecdsa-p256[1]" || len(found) != 2 {
		t.Fatalf("deprecated_types_in_use: %v", report["deprecated_types_in_use"])
	}
	sum := report["algorithms"].(map[string]*algorithmSummary)
	if a := sum["aes128-gcm96"]; a == nil || a.Keys != 0 || a.Versions != 1 || a.InDecryptWindow != 1 || a.DeprecatedSince != "2020-01-01" {
		t.Fatalf("algorithms aes128-gcm96: %+v", sum["aes128-gcm96"])
	}
	if a := sum["aes256-gcm96"]; a == nil || a.Keys != 1 || a.Versions != 1 {
		t.Fatalf("algorithms aes256-gcm96: %+v", sum["aes256-gcm96"])
	}
}

// A retired version serves rewrap alone: decrypt, encrypt with key_version, and verify are refused; rewrap moves
// its data; it is never enabled again; the migration view lists it until it is destroyed; retiring a disabled
// version is held for approval under dual control, retiring a serving one is not.
func TestRetiredVersionServesRewrapAlone(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "moved off")
	e.ok(e.write("keys/k/rotate", nil))
	resp, err := e.write("keys/k/versions/2/retire", nil)
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "latest") {
		t.Fatalf("retiring the latest: %d %s", status(resp, err), respText(resp))
	}
	v := e.ok(e.write("keys/k/versions/1/retire", map[string]interface{}{"reason": "exposed in incident 42"})).Data
	if v["state"] != "retired" {
		t.Fatalf("state: %v", v["state"])
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "version_retired" || !strings.Contains(fmt.Sprint(ev["details"]), "incident 42") {
		t.Fatalf("history: %v", ev)
	}
	for _, c := range []struct {
		path string
		data map[string]interface{}
	}{
		{"decrypt/k", map[string]interface{}{"ciphertext": ct}},
		{"encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 1}},
	} {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "retired") {
			t.Fatalf("%s: %d %s", c.path, status(resp, err), respText(resp))
		}
	}
	if m := e.ok(e.read("keys/k/migration")).Data; fmt.Sprint(m["pending_migration"]) != "[1]" {
		t.Fatalf("pending_migration: %v", m["pending_migration"])
	}
	moved := e.ok(e.write("rewrap/k", map[string]interface{}{"ciphertext": ct})).Data["ciphertext"].(string)
	if !strings.HasPrefix(moved, "vault:v2:") || decryptOK(t, e, "k", moved) != "moved off" {
		t.Fatalf("rewrap off the retired version: %s", moved)
	}
	resp, err = e.write("keys/k/versions/1/enable", nil)
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "never enabled again") {
		t.Fatalf("enabling a retired version: %d %s", status(resp, err), respText(resp))
	}
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	e.ok(e.write("keys/k/versions/1/destroy", nil))
	if e.versionState("k", 1) != "destroyed" {
		t.Fatalf("after destroy: %s", e.versionState("k", 1))
	}
	resp, err = e.write("rewrap/k", map[string]interface{}{"ciphertext": ct})
	if status(resp, err) != 400 {
		t.Fatalf("rewrap after destruction: %d", status(resp, err))
	}

	// Signing keys: verify is refused for a retired version (its signatures are no longer trusted).
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ed25519"}))
	sig := e.ok(e.write("sign/s", map[string]interface{}{"input": b64("x")})).Data["signature"]
	e.ok(e.write("keys/s/rotate", nil))
	e.ok(e.write("keys/s/versions/1/retire", nil))
	resp, err = e.write("verify/s", map[string]interface{}{"input": b64("x"), "signature": sig})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "retired") {
		t.Fatalf("verify with a retired version: %d %s", status(resp, err), respText(resp))
	}
}

// Under dual control, retiring a disabled version (which returns it to rewrap) waits for an approval; retiring a
// serving one does not.
func TestRetiringADisabledVersionIsHeld(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 1}))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/versions/1/disable", nil))
	held := e.held(e.write("keys/k/versions/1/retire", nil))
	if held["approval_id"] == nil || e.versionState("k", 1) != "disabled" {
		t.Fatalf("retiring a disabled version: %v, state %s", held, e.versionState("k", 1))
	}
	if v := e.ok(e.write("keys/k/versions/2/retire", nil)).Data; v["state"] != "retired" {
		t.Fatalf("retiring a serving version: %v", v["state"])
	}
}

// The decrypt window advances min_decryption_version by itself after rotations, with a history event, but never
// past a version whose use was not counted for a whole quiet period, nor one that decrypted within it; once the
// quiet period has passed, it goes on.
func TestDecryptWindowAdvancesButNotPastRecentUse(t *testing.T) {
	e := newTestBackend(t)
	start := time.Now()
	clock := start
	e.b.keys.Clock = func() time.Time { return clock }
	tickAt := func(at time.Time) {
		t.Helper()
		clock = at
		if err := e.b.keys.Tick(context.Background(), e.storage, at); err != nil {
			t.Fatal(err)
		}
	}
	minDecrypt := func() string { return fmt.Sprint(e.ok(e.read("keys/k")).Data["min_decryption_version"]) }

	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/config", map[string]interface{}{"decrypt_window": "2", "decrypt_window_quiet_period": "1h"}))
	if r := e.ok(e.read("keys/k")).Data; r["decrypt_window"] != "2" || r["decrypt_window_quiet_period"] != int64(3600) {
		t.Fatalf("window as read: %v %v", r["decrypt_window"], r["decrypt_window_quiet_period"])
	}
	ct1 := encryptOK(t, e, "k", "v1")
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil)) // versions 2 and 3: the window keeps 2 and 3
	tickAt(start.Add(time.Minute))
	if minDecrypt() != "1" {
		t.Fatalf("the window passed a version whose use was counted for less than the quiet period: %s", minDecrypt())
	}
	clock = start.Add(90 * time.Minute)
	decryptOK(t, e, "k", ct1) // version 1 relied on, within the next quiet period
	tickAt(start.Add(100 * time.Minute))
	if minDecrypt() != "1" {
		t.Fatalf("the window passed a version decrypted 10 minutes before: %s", minDecrypt())
	}
	if next := e.ok(e.read("keys/k")).Data["decrypt_window_next_check"]; next != keys.FormatTime(start.Add(150*time.Minute)) {
		t.Fatalf("next check: %v, want the end of version 1's quiet period", next)
	}
	tickAt(start.Add(151 * time.Minute))
	if minDecrypt() != "2" {
		t.Fatalf("after the quiet period: min_decryption_version %s", minDecrypt())
	}
	ev := e.historyOfKind("k", "decrypt_window_advanced")
	if len(ev) != 1 || !strings.Contains(fmt.Sprint(ev[0]["details"]), "min_decryption_version 1 → 2 (decrypt_window 2)") {
		t.Fatalf("history: %v", ev)
	}
	resp, err := e.write("decrypt/k", map[string]interface{}{"ciphertext": ct1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "min_decryption_version") {
		t.Fatalf("decrypt below the window: %d %s", status(resp, err), respText(resp))
	}
	// Forced: an operator lowers the bound by hand (and the window, once off, leaves it).
	e.ok(e.write("keys/k/config", map[string]interface{}{"decrypt_window": "", "min_decryption_version": 1}))
	tickAt(start.Add(200 * time.Minute))
	if minDecrypt() != "1" || e.ok(e.read("keys/k")).Data["decrypt_window"] != nil {
		t.Fatalf("with the window off: %s", minDecrypt())
	}
	resp, err = e.write("keys/k/config", map[string]interface{}{"decrypt_window": "soon"})
	if status(resp, err) != 400 {
		t.Fatalf("a window that is neither a number nor a period: %d", status(resp, err))
	}
}

// An imported (BYOK) version keeps its type when the key moves on: signatures of the imported P-256 key verify as
// version 1 after rotations to P-384, and import_version takes material of the key's current type only.
func TestImportedVersionsKeepTheirType(t *testing.T) {
	e := newImportBackend(t)
	msg := []byte("signed outside")
	digest := sha256.Sum256(msg)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(p256)
	e.ok(e.write("keys/ec/import", map[string]interface{}{"type": "ecdsa-p256", "allow_rotation": true, "ciphertext": wrapFor(t, e, crypto.SHA256, der)}))
	e.ok(e.write("keys/ec/rotate", map[string]interface{}{"type": "ecdsa-p384"}))
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der384, _ := x509.MarshalPKCS8PrivateKey(p384)
	e.ok(e.write("keys/ec/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, der384)}))
	resp, err := e.write("keys/ec/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, der)})
	if status(resp, err) != 400 {
		t.Fatalf("import_version of a P-256 key into a key now P-384: %d %s", status(resp, err), respText(resp))
	}
	versions := e.ok(e.read("keys/ec")).Data["versions"].(map[string]interface{})
	for n, want := range map[string][2]string{"1": {"ecdsa-p256", "imported"}, "2": {"ecdsa-p384", ""}, "3": {"ecdsa-p384", "imported"}} {
		v := versions[n].(map[string]interface{})
		if v["type"] != want[0] || (want[1] != "") != (v["import_method"] != nil) {
			t.Fatalf("version %s: type %v, import_method %v", n, v["type"], v["import_method"])
		}
	}
	sig, _ := ecdsa.SignASN1(rand.Reader, p256, digest[:])
	if !verifyOK(t, e, "ec", map[string]interface{}{"input": b64(string(msg)), "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(sig)}) {
		t.Fatal("the imported P-256 key's signature does not verify as version 1")
	}
	sig384, _ := ecdsa.SignASN1(rand.Reader, p384, digest[:])
	if !verifyOK(t, e, "ec", map[string]interface{}{"input": b64(string(msg)), "signature": "vault:v3:" + base64.StdEncoding.EncodeToString(sig384)}) {
		t.Fatal("the imported P-384 key's signature does not verify as version 3")
	}
}

// A retired version stays retired: disabling it or scheduling its destruction and enabling it again returns it to
// serving rewrap alone, never to decrypt (review of the first change: it came back active).
func TestARetiredVersionIsNeverEnabledAgain(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "x")
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/versions/1/retire", nil))
	for _, step := range []string{"disable", "destroy"} {
		e.ok(e.write("keys/k/versions/1/"+step, nil))
		if v := e.ok(e.write("keys/k/versions/1/enable", nil)).Data; v["state"] != "retired" {
			t.Fatalf("%s then enable: %v", step, v["state"])
		}
		resp, err := e.write("decrypt/k", map[string]interface{}{"ciphertext": ct})
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "retired") {
			t.Fatalf("decrypt after %s then enable: %d %s", step, status(resp, err), respText(resp))
		}
	}
	// Below min_decryption_version it serves nothing, rewrap included, and is no longer to be migrated.
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 2}))
	if s := e.versionState("k", 1); s != "disabled" {
		t.Fatalf("a retired version below the bounds: %s", s)
	}
	if m := e.ok(e.read("keys/k/migration")).Data; fmt.Sprint(m["pending_migration"]) != "[]" {
		t.Fatalf("pending_migration: %v", m["pending_migration"])
	}
}

// Rewrap off a retired RSA version with PKCS#1 v1.5 padding works: implicit rejection needs the version's HMAC
// secret, made on first use, which a retired version may make for the engine's own use (not for a caller's hmac).
func TestRewrapOffARetiredRSAVersionWithPKCS1v15(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/r", map[string]interface{}{"type": "rsa-2048"}))
	e.ok(e.write("keys/r/config", map[string]interface{}{"allow_pkcs1v15_decryption": true}))
	ct := e.ok(e.write("encrypt/r", map[string]interface{}{"plaintext": b64("old"), "padding_scheme": "pkcs1v15"})).Data["ciphertext"].(string)
	e.ok(e.write("keys/r/rotate", nil))
	e.ok(e.write("keys/r/versions/1/retire", nil))
	moved := e.ok(e.write("rewrap/r", map[string]interface{}{"ciphertext": ct, "decrypt_padding_scheme": "pkcs1v15"})).Data["ciphertext"].(string)
	if !strings.HasPrefix(moved, "vault:v2:") || decryptOK(t, e, "r", moved) != "old" {
		t.Fatalf("rewrap: %s", moved)
	}
	if resp, err := e.write("hmac/r", map[string]interface{}{"input": b64("x"), "key_version": 1}); status(resp, err) != 400 {
		t.Fatalf("a caller's hmac with the retired version: %d", status(resp, err))
	}
}

// A scheduled rotation the mount's algorithm policy refuses waits and is recorded once, the key showing as
// overdue; the destruction due in the same run is stored all the same (review: the refusal undid its record while
// its objects were gone); a next_type the policy allows lets the next run rotate.
func TestRefusedScheduledRotationKeepsTheDestructionsDone(t *testing.T) {
	e := newTestBackend(t)
	ctx := context.Background()
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1h"}))
	e.ok(e.write("keys/k", map[string]interface{}{"type": "aes128-gcm96", "auto_rotate_period": "24h"}))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/versions/1/destroy", nil))
	e.ok(e.write("config/keys", map[string]interface{}{"deprecated_types": map[string]interface{}{"aes128-gcm96": "2020-01-01"}}))
	later := time.Now().Add(25 * time.Hour)
	for _, at := range []time.Time{later, later.Add(time.Minute)} { // the second run, within the hour, tries nothing
		if err := e.b.keys.Tick(ctx, e.storage, at); err != nil {
			t.Fatal(err)
		}
	}
	if s := e.versionState("k", 1); s != "destroyed" {
		t.Fatalf("version 1 after the run: %s", s)
	}
	read := e.ok(e.read("keys/k")).Data
	if fmt.Sprint(read["latest_version"]) != "2" {
		t.Fatalf("a refused rotation made a version: %v", read["latest_version"])
	}
	if held, _ := time.Parse(time.RFC3339, fmt.Sprint(read["rotation_held_until"])); !held.Equal(later.Add(time.Hour).Truncate(time.Second)) && !held.Equal(later.Add(time.Hour).UTC().Truncate(time.Second)) {
		t.Fatalf("rotation_held_until %v, want an hour after the refusal", read["rotation_held_until"])
	}
	if next, _ := time.Parse(time.RFC3339, read["next_rotation_time"].(string)); next.After(later) {
		t.Fatalf("next_rotation_time moved on: %v; the key must show as overdue", read["next_rotation_time"])
	}
	if ev := e.historyOfKind("k", "rotation_skipped"); len(ev) != 1 || !strings.Contains(fmt.Sprint(ev[0]["details"]), "deprecated") {
		t.Fatalf("history: %v", ev)
	}
	// next_type the policy refuses is refused when it is set; one it allows is made by the next run.
	resp, err := e.write("keys/k/config", map[string]interface{}{"next_type": "aes128-gcm96"})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "deprecated") {
		t.Fatalf("next_type of a deprecated type: %d %s", status(resp, err), respText(resp))
	}
	e.ok(e.write("keys/k/config", map[string]interface{}{"next_type": "aes256-gcm96"}))
	if err := e.b.keys.Tick(ctx, e.storage, later.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	read = e.ok(e.read("keys/k")).Data
	if fmt.Sprint(read["latest_version"]) != "3" || read["type"] != "aes256-gcm96" || read["rotation_held_until"] != nil {
		t.Fatalf("after next_type: latest %v, type %v, held %v", read["latest_version"], read["type"], read["rotation_held_until"])
	}
}

// A key from before versions' uses were counted (its analytics older, no count per version): the window does not
// take the analytics' age for the versions' (review: it passed a version decrypted just before the upgrade).
func TestDecryptWindowWaitsForCountingOfAKeyFromBefore(t *testing.T) {
	e := newTestBackend(t)
	ctx := context.Background()
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "before the upgrade")
	decryptOK(t, e, "k", ct)
	e.tick() // the analytics are stored
	// As an engine from before stored them: the key without uses_counted, its analytics a month old, no versions.
	var key map[string]interface{}
	entry, _ := e.inmem.Get(ctx, keys.PolicyPrefix+"k")
	_ = json.Unmarshal(entry.Value, &key)
	delete(key, "uses_counted")
	e.put(keys.PolicyPrefix+"k", key)
	var analytics map[string]interface{}
	entry, _ = e.inmem.Get(ctx, "analytics/k")
	_ = json.Unmarshal(entry.Value, &analytics)
	delete(analytics, "versions")
	delete(analytics, "versions_since")
	analytics["since"] = time.Now().Add(-30 * 24 * time.Hour).UTC().Format(time.RFC3339)
	e.put("analytics/k", analytics)

	r := e.reopen()
	r.ok(r.write("keys/k/config", map[string]interface{}{"decrypt_window": "1", "decrypt_window_quiet_period": "24h"}))
	r.ok(r.write("keys/k/rotate", nil))
	if err := r.b.keys.Tick(ctx, r.storage, time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(r.ok(r.read("keys/k")).Data["min_decryption_version"]); got != "1" {
		t.Fatalf("the window passed a version whose uses were not counted: min_decryption_version %s", got)
	}
	if v1 := r.ok(r.read("keys/k/migration")).Data["versions"].(map[string]interface{})["1"].(map[string]interface{}); v1["counts_complete"] != false {
		t.Fatalf("version 1's counts said complete: %v", v1)
	}
}

// import_version of a public-key-only version's private key takes the version's own type after the key moved on
// (review: it was imported as the key's current type and refused).
func TestImportVersionIntoAnOlderPublicOnlyVersion(t *testing.T) {
	e := newImportBackend(t)
	customer, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pubDER, _ := x509.MarshalPKIXPublicKey(&customer.PublicKey)
	pubPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}))
	wrappingPublicKey(t, e)
	e.ok(e.write("keys/pub/import", map[string]interface{}{"public_key": pubPEM, "type": "ecdsa-p256", "allow_rotation": true}))
	e.ok(e.write("keys/pub/rotate", map[string]interface{}{"type": "ed25519"}))
	privDER, _ := x509.MarshalPKCS8PrivateKey(customer)
	e.ok(e.write("keys/pub/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, privDER), "version": 1}))
	sig := e.ok(e.write("sign/pub", map[string]interface{}{"input": b64("x"), "key_version": 1})).Data["signature"].(string)
	if !strings.HasPrefix(sig, "vault:v1:") || !verifyOK(t, e, "pub", map[string]interface{}{"input": b64("x"), "signature": sig}) {
		t.Fatalf("signature by the imported private key of version 1: %s", sig)
	}
}

// Only valid signatures and HMACs count as relying on a version: forged ones naming an old version do not keep
// it in use for the decrypt window.
func TestForgedSignaturesAreNotCountedAsUse(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ed25519"}))
	sig := e.ok(e.write("sign/s", map[string]interface{}{"input": b64("x")})).Data["signature"].(string)
	e.ok(e.write("verify/s", map[string]interface{}{"input": b64("x"), "signature": sig}))
	e.ok(e.write("verify/s", map[string]interface{}{"input": b64("forged"), "signature": sig}))
	v1 := e.ok(e.read("keys/s/migration")).Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
	if v1["opened"] != uint64(1) {
		t.Fatalf("verifications counted: %v, want the valid one only", v1["opened"])
	}
}
