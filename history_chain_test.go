package cmk

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

func (e *testEnv) verifyHistory(name string) map[string]interface{} {
	e.t.Helper()
	return e.ok(e.read("keys/" + name + "/history/verify")).Data
}

func verified(v map[string]interface{}) bool { return v["verified"] == true }

// A key's whole life is one chain: every event carries its seq, the previous event's hash and its own, and the
// head the audit key signed vouches for the last one, after the key is deleted too.
func TestHistoryChainVerifiesAfterALifeOfEvents(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 1, "deletion_allowed": true, "owner": "team-a"}))
	grant := e.ok(e.write("keys/k/grants", map[string]interface{}{"entity_id": "ent-1", "ttl": "1h"})).Data["id"].(string)
	e.ok(e.request(logical.DeleteOperation, "keys/k/grants/"+grant, nil))
	e.ok(e.write("keys/k/disable", nil))
	e.ok(e.write("keys/k/enable", nil))
	e.ok(e.write("keys/k/versions/1/disable", nil))

	events := e.history("k")
	if len(events) < 8 {
		t.Fatalf("history: %v", events)
	}
	for i, ev := range events {
		if ev["seq"] != i+1 || ev["hash"] == nil || (i > 0) != (ev["prev_hash"] != nil) {
			t.Fatalf("event %d carries no chain link: %v", i, ev)
		}
		if i > 0 && ev["prev_hash"] != events[i-1]["hash"] {
			t.Fatalf("event %d does not follow event %d: %v", i, i-1, ev)
		}
	}
	v := e.verifyHistory("k")
	if !verified(v) || v["events"] != len(events) || v["first_broken_index"] != -1 || v["head_seq"] != len(events) ||
		v["head_signed"] != true || v["head_audit_key_version"] != 1 || v["head_hash"] != lastEvent(events)["hash"] {
		t.Fatalf("verify after a life of events: %v", v)
	}

	e.ok(e.request(logical.DeleteOperation, "keys/k", nil))
	v = e.verifyHistory("k")
	if !verified(v) || v["events"] != len(events)+1 {
		t.Fatalf("verify the deleted key's history: %v", v)
	}
	if resp, err := e.read("keys/nokey/history/verify"); err != nil || resp != nil {
		t.Fatalf("a key that never was: %v %v", resp, err)
	}

	// What the lead's evidence path uses: the events as stored, the head, and the audit key's public keys verify
	// offline, with internal/evidence alone.
	raw, head, ver, err := e.b.keys.VerifyHistory(context.Background(), e.storage, "k")
	if err != nil || !ver.Verified || head == nil {
		t.Fatalf("VerifyHistory: %v %+v %v", err, ver, head)
	}
	pems, err := e.b.keys.AuditPublicKeys(context.Background(), e.storage)
	if err != nil {
		t.Fatal(err)
	}
	offline := evidence.AuditKeys{}
	for n, p := range pems {
		if offline[n], err = evidence.ParseAuditKey(p); err != nil {
			t.Fatal(err)
		}
	}
	if got := evidence.VerifyChain("k", raw, head, offline); !got.Verified {
		t.Fatalf("offline verification: %+v", got)
	}
	n, sig, err := e.b.keys.AuditSign(context.Background(), e.storage, []byte("a document"))
	if err != nil || offline.Verify(n, []byte("a document"), sig) != nil {
		t.Fatalf("AuditSign: version %d, %v", n, err)
	}
}

// An event changed in storage is named, and stays named after the key's next event: the head the engine signs then
// extends the one before it, whose hash pins every event before it.
func TestHistoryAlteredInStorageIsNamedAndNeverSignedAgain(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))
	page, err := e.inmem.Get(context.Background(), "history/k/00000000")
	if err != nil || page == nil {
		t.Fatalf("page: %v %v", page, err)
	}
	var events []map[string]interface{}
	if err := json.Unmarshal(page.Value, &events); err != nil {
		t.Fatal(err)
	}
	events[1]["cause"] = "scheduled" // was manual
	altered, _ := json.Marshal(events)
	if err := e.inmem.Put(context.Background(), &logical.StorageEntry{Key: page.Key, Value: altered}); err != nil {
		t.Fatal(err)
	}
	v := e.verifyHistory("k")
	if verified(v) || v["first_broken_index"] != 1 || v["first_broken_seq"] != 2 || !strings.Contains(v["reason"].(string), "altered") {
		t.Fatalf("verify an altered event: %v", v)
	}
	e.ok(e.write("keys/k/rotate", nil))
	v = e.verifyHistory("k")
	if verified(v) || v["first_broken_index"] != 1 || v["first_broken_seq"] != 2 {
		t.Fatalf("after the next event the altered event is no longer named: %v", v)
	}
	// Rehashed from the altered event on, the chain no longer ends at the signed head: the next event is recorded,
	// and no head is signed over it.
	rehashed := e.rehashHistory("k", 1)
	v = e.verifyHistory("k")
	if verified(v) || v["head_signed"] != true || !strings.Contains(v["reason"].(string), "not the one the head signed") {
		t.Fatalf("verify a rehashed chain: %v", v)
	}
	e.ok(e.write("keys/k/rotate", nil))
	v = e.verifyHistory("k")
	if verified(v) || v["events"] != rehashed+1 || v["head_seq"] != 4 {
		t.Fatalf("after an event on a rehashed chain: %v", v)
	}
}

// rehashHistory recomputes the chain of key name's first history page from event from on, as someone with write
// access to storage would after altering it, and returns how many events the page holds.
func (e *testEnv) rehashHistory(name string, from int) int {
	e.t.Helper()
	page, err := e.inmem.Get(context.Background(), "history/"+name+"/00000000")
	if err != nil || page == nil {
		e.t.Fatalf("page: %v %v", page, err)
	}
	var events []map[string]interface{}
	d := json.NewDecoder(strings.NewReader(string(page.Value)))
	d.UseNumber()
	if err := d.Decode(&events); err != nil {
		e.t.Fatal(err)
	}
	for i := from; i < len(events); i++ {
		if i > 0 {
			events[i]["prev_hash"] = events[i-1]["hash"]
		}
		delete(events[i], "hash")
		b, _ := json.Marshal(events[i])
		h, err := evidence.EventHash(b)
		if err != nil {
			e.t.Fatal(err)
		}
		events[i]["hash"] = h
	}
	b, _ := json.Marshal(events)
	if err := e.inmem.Put(context.Background(), &logical.StorageEntry{Key: page.Key, Value: b}); err != nil {
		e.t.Fatal(err)
	}
	return len(events)
}

// signRefusingToken is the real token whose ECDSA signatures fail as an unreachable HSM's do, while refuse is set.
type signRefusingToken struct {
	hsmToken
	refuse *atomic.Bool
}

func (t signRefusingToken) SignECDSA(ctx context.Context, id, digest []byte) ([]byte, error) {
	if t.refuse.Load() {
		return nil, fmt.Errorf("%w: injected", hsm.ErrUnavailable)
	}
	return t.hsmToken.SignECDSA(ctx, id, digest)
}

// An event is recorded while the audit key cannot sign; verification says the tail is not vouched for, and the
// periodic function signs the head once the HSM serves.
func TestHistoryHeadLeftBehindIsSignedWhenTheHSMServes(t *testing.T) {
	e := newTestBackend(t)
	refuse := &atomic.Bool{}
	e.b.resetToken()
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		tok, err := hsm.Open(c, l)
		if err != nil {
			return nil, err
		}
		return signRefusingToken{tok, refuse}, nil
	}
	e.ok(e.write("keys/k", nil))
	refuse.Store(true)
	e.ok(e.write("keys/k/grants", map[string]interface{}{"entity_id": "ent-1", "ttl": "1h"}))
	if ev := lastEvent(e.history("k")); ev["event"] != "grant_created" || ev["seq"] != 2 {
		t.Fatalf("the event was not recorded: %v", ev)
	}
	v := e.verifyHistory("k")
	if verified(v) || v["head_seq"] != 1 || v["first_broken_index"] != 1 || v["first_broken_seq"] != 2 {
		t.Fatalf("verify with the head left behind: %v", v)
	}
	e.tick()
	if v := e.verifyHistory("k"); verified(v) {
		t.Fatalf("signed while the HSM cannot sign: %v", v)
	}
	refuse.Store(false)
	e.tick()
	if v := e.verifyHistory("k"); !verified(v) || v["head_seq"] != 2 {
		t.Fatalf("after the HSM serves again: %v", v)
	}
}

// Rotating the audit key keeps every version: heads signed by the old one go on verifying, new heads use the new.
func TestAuditKeyRotationKeepsOldHeadsVerifying(t *testing.T) {
	e := newTestBackend(t)
	if a := e.ok(e.read("audit_key")).Data; a["latest_version"] != 0 || len(a["versions"].(map[string]interface{})) != 0 {
		t.Fatalf("audit key before any event: %v", a)
	}
	e.ok(e.write("keys/a", nil))
	first := e.ok(e.read("audit_key")).Data
	if first["latest_version"] != 1 || first["algorithm"] != "ecdsa-p256-sha256" {
		t.Fatalf("audit key after the first event: %v", first)
	}
	rotated := e.ok(e.write("audit_key/rotate", nil)).Data
	versions := rotated["versions"].(map[string]interface{})
	if rotated["latest_version"] != 2 || len(versions) != 2 {
		t.Fatalf("rotate: %v", rotated)
	}
	v2 := versions["2"].(map[string]interface{})
	if !strings.HasPrefix(v2["created_by"].(string), "token-test") || v2["label"] != "cmk/"+e.b.mountID+"/audit_key:v2" {
		t.Fatalf("version 2: %v", v2)
	}
	if _, err := evidence.ParseAuditKey(v2["public_key"].(string)); err != nil {
		t.Fatalf("version 2's public key: %v", err)
	}
	if versions["1"].(map[string]interface{})["public_key"] != first["versions"].(map[string]interface{})["1"].(map[string]interface{})["public_key"] {
		t.Fatal("rotation changed version 1")
	}
	e.ok(e.write("keys/b", nil))
	if v := e.verifyHistory("a"); !verified(v) || v["head_audit_key_version"] != 1 {
		t.Fatalf("a head signed before the rotation: %v", v)
	}
	if v := e.verifyHistory("b"); !verified(v) || v["head_audit_key_version"] != 2 {
		t.Fatalf("a head signed after the rotation: %v", v)
	}
	e.ok(e.write("keys/a/rotate", nil))
	if v := e.verifyHistory("a"); !verified(v) || v["head_audit_key_version"] != 2 {
		t.Fatalf("a's head signed again after the rotation: %v", v)
	}
}

// The audit key's objects are no key's: reconcile (with adopt) does not report or take them, and a key whose name
// is the audit key's label's does not destroy them with itself.
func TestReconcileLeavesTheAuditKeyAlone(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("audit_key/rotate", nil))
	auditObjects := func() int {
		n := 0
		for _, o := range e.allTokenObjects() {
			if strings.Contains(o.Label, "/audit_key:v") {
				n++
			}
		}
		return n
	}
	if n := auditObjects(); n != 2 {
		t.Fatalf("audit key objects on the token: %d, want 2 (two versions' private keys)", n)
	}
	for _, path := range []string{"reconcile", "keys/k/reconcile"} {
		r := e.ok(e.write(path, map[string]interface{}{"adopt": true})).Data
		if len(r["unreferenced_objects"].([]interface{})) != 0 || len(r["adopted"].([]interface{})) != 0 || len(r["missing_objects"].([]interface{})) != 0 {
			t.Fatalf("%s with adopt: %v", path, r)
		}
	}
	for _, name := range []string{"audit_key", "audit_key:v1", "audit_key:v2"} {
		if resp, err := e.write("keys/"+name, nil); err != nil || resp.IsError() {
			continue // not a key name
		}
		e.ok(e.write("keys/"+name+"/config", map[string]interface{}{"deletion_allowed": true}))
		e.ok(e.request(logical.DeleteOperation, "keys/"+name, nil))
	}
	if n := auditObjects(); n != 2 {
		t.Fatalf("audit key objects after reconcile and deleting key audit_key: %d", n)
	}
	e.ok(e.write("keys/k/rotate", nil))
	if v := e.verifyHistory("k"); !verified(v) || v["head_audit_key_version"] != 2 {
		t.Fatalf("signing after reconcile: %v", v)
	}
}

// Events stored before history was chained stay as they were (their clear accessor sealed when the chain begins):
// the chain begins after them at seq 1, which pins them as stored, and verify counts them as unchained.
func TestHistoryBeforeChainingIsCountedUnchained(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	legacy := `[{"time":"2025-01-02T03:04:05Z","event":"created","version":1,"display_name":"old","token_accessor":"clear-accessor"},` +
		`{"time":"2025-01-03T03:04:05Z","event":"rotated","version":2,"cause":"manual","display_name":"old","token_accessor":"clear-accessor"}]`
	if err := e.inmem.Put(context.Background(), &logical.StorageEntry{Key: "history/k/00000000", Value: []byte(legacy)}); err != nil {
		t.Fatal(err)
	}
	if err := e.inmem.Delete(context.Background(), "history/k/head"); err != nil {
		t.Fatal(err)
	}
	e = e.reopen() // the engine that chains history starts on storage an earlier one wrote
	if v := e.verifyHistory("k"); verified(v) || v["unchained_events"] != 2 {
		t.Fatalf("unchained history alone: %v", v)
	}
	e.ok(e.write("keys/k/rotate", nil))
	v := e.verifyHistory("k")
	if !verified(v) || v["unchained_events"] != 2 || v["events"] != 3 || v["head_seq"] != 1 {
		t.Fatalf("a chain begun after unchained events: %v", v)
	}
	raw, _, _, err := e.b.keys.VerifyHistory(context.Background(), e.storage, "k")
	if err != nil {
		t.Fatal(err)
	}
	stored, _ := e.inmem.Get(context.Background(), "history/k/00000000")
	for _, text := range []string{fmt.Sprint(raw), string(stored.Value)} {
		if strings.Contains(text, "clear-accessor") {
			t.Fatalf("a clear accessor is shown or stored: %s", text)
		}
	}
	// seq 1 pins the unchained events as stored (sealed): one changed afterwards is reported.
	var events []map[string]interface{}
	if err := json.Unmarshal(stored.Value, &events); err != nil {
		t.Fatal(err)
	}
	if pin, err := evidence.UnchainedPin(raw[:2]); err != nil || events[2]["prev_hash"] != pin {
		t.Fatalf("seq 1 does not pin the unchained events: %v %v", events[2], err)
	}
	events[0]["display_name"] = "someone else"
	e.put(stored.Key, events)
	if v := e.verifyHistory("k"); verified(v) || v["first_broken_index"] != 2 || !strings.Contains(v["reason"].(string), "unchained events") {
		t.Fatalf("an unchained event changed after the chain pinned it: %v", v)
	}
}

// A key created while the audit key cannot sign has no head: the process that began its chain signs the first head
// once the HSM serves. After a restart nothing tells such a chain from one whose head was deleted: it is not signed.
func TestHistoryWithoutHeadIsSignedOnlyByTheProcessThatBeganIt(t *testing.T) {
	e := newTestBackend(t)
	refuse := &atomic.Bool{}
	e.b.resetToken()
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		tok, err := hsm.Open(c, l)
		if err != nil {
			return nil, err
		}
		return signRefusingToken{tok, refuse}, nil
	}
	refuse.Store(true)
	e.ok(e.write("keys/began-here", nil))
	e.ok(e.write("keys/restarted", nil))
	for _, name := range []string{"began-here", "restarted"} {
		if v := e.verifyHistory(name); verified(v) || v["head_seq"] != 0 || !strings.Contains(v["reason"].(string), "no signed head") {
			t.Fatalf("%s without a head: %v", name, v)
		}
	}
	refuse.Store(false)
	restarted := e.reopen()
	restarted.ok(restarted.write("keys/restarted/rotate", nil))
	restarted.tick()
	if v := restarted.verifyHistory("restarted"); verified(v) || v["head_seq"] != 0 || v["events"] != 2 {
		t.Fatalf("a chain without head, after a restart: %v", v)
	}
	e.tick()
	if v := e.verifyHistory("began-here"); !verified(v) || v["head_seq"] != 1 {
		t.Fatalf("the chain this process began: %v", v)
	}
}

// An audit key version the token made but storage never came to hold is destroyed by the WAL rollback; the one
// storage holds is kept.
func TestAuditKeyNeverStoredIsRolledBack(t *testing.T) {
	e := newTestBackend(t)
	ctx := context.Background()
	e.ok(e.write("keys/k", nil)) // audit key version 1, stored
	e.storage.failUnstored("audit_key")
	if resp, err := e.write("audit_key/rotate", nil); err == nil && !resp.IsError() {
		t.Fatalf("rotation stored: %v", respText(resp))
	}
	e.storage.failUnstored("")
	audit := func() int {
		n := 0
		for _, o := range e.allTokenObjects() {
			if strings.Contains(o.Label, "/audit_key:v") {
				n++
			}
		}
		return n
	}
	if n := audit(); n != 2 {
		t.Fatalf("audit key objects before the rollback: %d, want 2 (version 1, and the unstored version 2)", n)
	}
	resp, err := e.b.HandleRequest(ctx, &logical.Request{
		Operation: logical.RollbackOperation, Path: "", Storage: e.storage, Data: map[string]interface{}{"immediate": true},
	})
	if err != nil || (resp != nil && resp.IsError()) {
		t.Fatalf("rollback: %v %s", err, respText(resp))
	}
	if n := audit(); n != 1 {
		t.Fatalf("audit key objects after the rollback: %d, want 1", n)
	}
	e.ok(e.write("keys/k/rotate", nil))
	if v := e.verifyHistory("k"); !verified(v) || v["head_audit_key_version"] != 1 {
		t.Fatalf("signing after the rollback: %v", v)
	}
}

// forgeHistoryWithStoredKey is what someone with write access to storage (and not to the token) does to make key
// name's history say what he wants: he adds his own public key to audit_key as version 7 (or, with asV1, puts it
// in version 1's place), keeps only the first event, and signs a head over it with his key. It returns his version.
func (e *testEnv) forgeHistoryWithStoredKey(name string, asV1 bool) int {
	e.t.Helper()
	ctx := context.Background()
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pemText, _ := evidence.MarshalAuditKey(&priv.PublicKey)
	stored, _ := e.inmem.Get(ctx, "audit_key")
	var a map[string]interface{}
	if err := json.Unmarshal(stored.Value, &a); err != nil {
		e.t.Fatal(err)
	}
	versions := a["versions"].(map[string]interface{})
	version := 7
	if asV1 {
		version = 1
		versions["1"].(map[string]interface{})["public_key"] = pemText
	} else {
		versions["7"] = map[string]interface{}{"hsm_id": versions["1"].(map[string]interface{})["hsm_id"],
			"label": "cmk/" + e.b.mountID + "/audit_key:v7", "public_key": pemText, "created_at": time.Now()}
	}
	e.put("audit_key", a)
	page, _ := e.inmem.Get(ctx, "history/"+name+"/00000000")
	var events []json.RawMessage
	if err := json.Unmarshal(page.Value, &events); err != nil {
		e.t.Fatal(err)
	}
	e.put(page.Key, events[:1])
	h, _ := evidence.EventHash(events[0])
	head := evidence.Head{Key: name, Seq: 1, Hash: h, SignedAt: time.Now().UTC(), AuditKeyVersion: version}
	d := sha256.Sum256(head.SignedBytes())
	sig, _ := ecdsa.SignASN1(rand.Reader, priv, d[:])
	head.Signature = base64.StdEncoding.EncodeToString(sig)
	e.put("history/"+name+"/head", head)
	return version
}

func (e *testEnv) put(key string, v interface{}) {
	e.t.Helper()
	b, err := json.Marshal(v)
	if err == nil {
		err = e.inmem.Put(context.Background(), &logical.StorageEntry{Key: key, Value: b})
	}
	if err != nil {
		e.t.Fatal(err)
	}
}

// A public key written to storage vouches for nothing: a version's key is the token's. History forged and signed
// with a key added to audit_key (or put in version 1's place) is not verified, before and after the key's next
// event, which the engine does not sign over; audit_key's read names the version and serves only the token's keys;
// and a bundle taken after it does not verify offline with the audit key the auditor trusts.
func TestHistoryForgedWithAPublicKeyInStorageIsNotVerified(t *testing.T) {
	for _, asV1 := range []bool{false, true} {
		t.Run(fmt.Sprintf("in version 1's place %v", asV1), func(t *testing.T) {
			e := newTestBackend(t)
			e.ok(e.write("keys/k", nil))
			e.ok(e.write("keys/k/rotate", nil))
			trusted := e.ok(e.read("audit_key")).Data["versions"].(map[string]interface{})["1"].(map[string]interface{})["public_key"].(string)
			forged := e.forgeHistoryWithStoredKey("k", asV1)
			for i, env := range []*testEnv{e, e.reopen()} {
				v := env.verifyHistory("k")
				if verified(v) || !strings.Contains(v["reason"].(string), fmt.Sprintf("audit key version %d", forged)) {
					t.Fatalf("process %d: forged history: %v", i, v)
				}
				env.ok(env.write("keys/k/config", map[string]interface{}{"owner": "x"}))
				v = env.verifyHistory("k")
				if verified(v) || v["head_audit_key_version"] != forged || v["head_seq"] != 1 {
					t.Fatalf("process %d: the engine signed over the forged history: %v", i, v)
				}
				a := env.ok(env.read("audit_key")).Data
				versions := a["versions"].(map[string]interface{})
				if _, served := versions["7"]; served || (asV1 && versions["1"] != nil) {
					t.Fatalf("process %d: audit_key serves a key the token does not hold: %v", i, versions)
				}
				if why, _ := a["unvouched_versions"].(map[string]interface{})[strconv.Itoa(forged)].(string); why == "" {
					t.Fatalf("process %d: audit_key does not name version %d: %v", i, forged, a)
				}
			}
			if asV1 {
				return
			}
			// An auditor holding version 1's key (taken before the forgery) checks a bundle taken after it.
			trustedKey, err := evidence.ParseAuditKey(trusted)
			if err != nil {
				t.Fatal(err)
			}
			resp := e.ok(e.read("keys/k/evidence"))
			doc, _ := json.Marshal(resp.Data)
			c, err := evidence.Check(doc, evidence.AuditKeys{1: trustedKey})
			if err != nil {
				t.Fatal(err)
			}
			if c.History.Verified {
				t.Fatalf("offline, the forged history verifies: %+v", c.History)
			}
		})
	}
}

// A key's history deleted whole (pages and head) is missing, not verified; the engine does not begin a new chain
// over it with the key's next event, in this process or after a restart.
func TestHistoryDeletedWholeIsMissing(t *testing.T) {
	e := newTestBackend(t)
	ctx := context.Background()
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))
	wipe := func() {
		entries, _ := e.inmem.List(ctx, "history/k/")
		for _, k := range entries {
			if err := e.inmem.Delete(ctx, "history/k/"+k); err != nil {
				t.Fatal(err)
			}
		}
	}
	wipe()
	if v := e.verifyHistory("k"); verified(v) || !strings.Contains(v["reason"].(string), "history missing") {
		t.Fatalf("no history for a key that exists: %v", v)
	}
	e.ok(e.write("keys/k/rotate", nil))
	if v := e.verifyHistory("k"); verified(v) || v["head_seq"] != 0 {
		t.Fatalf("a chain begun over a deleted history: %v", v)
	}
	wipe()
	restarted := e.reopen()
	if v := restarted.verifyHistory("k"); verified(v) || !strings.Contains(v["reason"].(string), "history missing") {
		t.Fatalf("after a restart, no history for a key that exists: %v", v)
	}
	restarted.ok(restarted.write("keys/k/rotate", nil))
	restarted.tick()
	v := restarted.verifyHistory("k")
	if verified(v) || v["head_seq"] != 0 || !strings.Contains(v["reason"].(string), "does not begin at the key's creation") {
		t.Fatalf("after a restart, a chain begun over a deleted history: %v", v)
	}
}

// A head and a page put back as they were earlier (an older head with the events it signed) are reported as rolled
// back by the process that signed the newer head, and the engine does not sign over them.
func TestHistoryRolledBackIsReported(t *testing.T) {
	e := newTestBackend(t)
	ctx := context.Background()
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/rotate", nil))
	oldHead, _ := e.inmem.Get(ctx, "history/k/head")
	oldPage, _ := e.inmem.Get(ctx, "history/k/00000000")
	e.ok(e.write("keys/k/versions/1/disable", nil))
	e.ok(e.write("keys/k/rotate", nil))
	for _, entry := range []*logical.StorageEntry{oldHead, oldPage} {
		if err := e.inmem.Put(ctx, entry); err != nil {
			t.Fatal(err)
		}
	}
	v := e.verifyHistory("k")
	if verified(v) || !strings.Contains(v["reason"].(string), "history rolled back: seq 4 was signed") {
		t.Fatalf("a rolled back history: %v", v)
	}
	e.ok(e.write("keys/k/rotate", nil))
	v = e.verifyHistory("k")
	if verified(v) || v["head_seq"] != 2 || v["events"] != 3 || !strings.Contains(v["reason"].(string), "history rolled back") {
		t.Fatalf("after an event on a rolled back history: %v", v)
	}
}

// ecdsaRefusingToken is the real token on which ECDSA P-256 keys cannot be generated, as on a token without them;
// it counts the attempts.
type ecdsaRefusingToken struct {
	hsmToken
	attempts *atomic.Int32
}

func (t ecdsaRefusingToken) GenerateVersion(ctx context.Context, alg hsm.Algorithm, id []byte, label string, hmacBytes int) (crypto.PublicKey, error) {
	if alg == hsm.ECDSAP256 {
		t.attempts.Add(1)
		return nil, fmt.Errorf("%w: injected: no ECDSA P-256 on this token", hsm.ErrMechanismUnsupported)
	}
	return t.hsmToken.GenerateVersion(ctx, alg, id, label, hmacBytes)
}

// When the audit key cannot be made, events are recorded and the engine tries again only after a while, not at
// every event and every tick of every key.
func TestAuditKeyThatCannotBeMadeIsTriedAgainOnlyAfterAWhile(t *testing.T) {
	e := newTestBackend(t)
	attempts := &atomic.Int32{}
	e.b.resetToken()
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		tok, err := hsm.Open(c, l)
		if err != nil {
			return nil, err
		}
		return ecdsaRefusingToken{tok, attempts}, nil
	}
	now := time.Now()
	e.b.keys.Clock = func() time.Time { return now }
	e.ok(e.write("keys/a", nil))
	e.ok(e.write("keys/b", nil))
	e.ok(e.write("keys/a/rotate", nil))
	e.tick()
	e.tick()
	if n := attempts.Load(); n != 1 {
		t.Fatalf("attempts to make the audit key: %d, want 1", n)
	}
	if got := len(e.history("a")); got != 2 {
		t.Fatalf("events recorded: %d", got)
	}
	now = now.Add(10 * time.Minute)
	e.tick()
	e.ok(e.write("keys/b/rotate", nil))
	if n := attempts.Load(); n != 2 {
		t.Fatalf("attempts after the backoff: %d, want 2", n)
	}
}

// Recording an event and signing the head over it reads back nothing the request just wrote, and reads the audit
// key once: a key's creation costs nine storage operations, not fourteen. Across a page boundary the head is still
// signed over the chain as stored.
func TestSigningAHeadReadsNothingTheAppendWrote(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/first", nil)) // the audit key is made with the mount's first event

	readsBack := func(what string, journal []string) {
		t.Helper()
		written, auditReads := map[string]bool{}, 0
		for _, op := range journal {
			verb, key, _ := strings.Cut(op, " ")
			switch {
			case verb == "put":
				written[key] = true
			case verb == "get" && written[key]:
				t.Fatalf("%s read back %s, which it had just written: %q", what, key, journal)
			case verb == "list" && strings.HasPrefix(key, "history/") && len(written) > 0:
				for k := range written {
					if strings.HasPrefix(k, key) {
						t.Fatalf("%s listed %s again after writing %s: %q", what, key, k, journal)
					}
				}
			}
			if op == "get audit_key" {
				auditReads++
			}
		}
		if auditReads > 1 {
			t.Fatalf("%s read the audit key %d times: %q", what, auditReads, journal)
		}
	}

	e.storage.startJournal()
	e.ok(e.write("keys/k", nil))
	journal := e.storage.stopJournal()
	readsBack("creation", journal)
	if len(journal) != 9 {
		t.Fatalf("creation took %d storage operations, want 9: %q", len(journal), journal)
	}
	if slices.Contains(journal, "get history/k/head") {
		t.Fatalf("creation read a head its listing showed absent: %q", journal)
	}

	// Past the first page: the head is signed over events on two pages.
	for i := 0; i < 120; i++ {
		e.storage.startJournal()
		e.ok(e.write("keys/k/config", map[string]interface{}{"owner": fmt.Sprintf("team-%d", i)}))
		readsBack(fmt.Sprintf("config change %d", i), e.storage.stopJournal())
	}
	v := e.verifyHistory("k")
	if !verified(v) || v["events"] != 121 || v["head_seq"] != 121 {
		t.Fatalf("history across pages: %v", v)
	}
	pages, err := e.storage.List(context.Background(), "history/k/")
	if err != nil || len(pages) != 3 { // two pages and the head
		t.Fatalf("history/k/: %q, %v", pages, err)
	}
}

// The head is signed while its page is written, and stored only once the page is: a page that storage refused
// leaves the head where it was, and the history as stored still verifies.
func TestHeadIsNeverStoredOverAPageStorageRefused(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	before, err := e.inmem.Get(context.Background(), "history/k/head")
	if err != nil || before == nil {
		t.Fatalf("head after creation: %v, %v", before, err)
	}
	e.storage.failUnstored("history/k/00000000")
	e.ok(e.write("keys/k/config", map[string]interface{}{"owner": "team-a"})) // the change stands; its event is lost
	after, err := e.inmem.Get(context.Background(), "history/k/head")
	if err != nil || after == nil || string(after.Value) != string(before.Value) {
		t.Fatalf("the head moved over a page that was never stored:\nbefore %s\nafter  %s (%v)", before.Value, after.Value, err)
	}
	if v := e.verifyHistory("k"); !verified(v) || v["events"] != 1 || v["head_seq"] != 1 {
		t.Fatalf("history after a refused page: %v", v)
	}
	e.ok(e.write("keys/k/config", map[string]interface{}{"owner": "team-b"}))
	if v := e.verifyHistory("k"); !verified(v) || v["events"] != 2 || v["head_seq"] != 2 {
		t.Fatalf("history after the next change: %v", v)
	}
}

// Unchained events over two pages: the chain's first append reads the whole history from storage to sign over it,
// and must read it once its own page is written, however slowly storage writes it.
func TestChainBegunOverPagesOfUnchainedEventsIsSignedWithASlowStorage(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	page := func(n int) []map[string]interface{} {
		var events []map[string]interface{}
		for i := 0; i < n; i++ {
			events = append(events, map[string]interface{}{"time": "2025-01-02T03:04:05Z", "event": "rotated", "version": 1, "display_name": "old"})
		}
		return events
	}
	e.put("history/k/00000000", page(100))
	e.put("history/k/00000001", page(50))
	if err := e.inmem.Delete(context.Background(), "history/k/head"); err != nil {
		t.Fatal(err)
	}
	e = e.reopen()
	e.storage.slowPrefix.Store("history/k/0")
	e.ok(e.write("keys/k/config", map[string]interface{}{"owner": "team-a"}))
	e.storage.slowPrefix.Store("")
	if v := e.verifyHistory("k"); !verified(v) || v["unchained_events"] != 150 || v["head_seq"] != 1 {
		t.Fatalf("a chain begun over two pages of unchained events: %v", v)
	}
}
