package evidence

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// chain builds n chained events for key k and a head signed with priv as audit key version 1.
func chain(t *testing.T, k string, n int, priv *ecdsa.PrivateKey) ([]json.RawMessage, *Head) {
	t.Helper()
	var events []json.RawMessage
	prev := ""
	for i := 1; i <= n; i++ {
		kind := "rotated"
		if i == 1 {
			kind = "created"
		}
		ev := map[string]interface{}{"time": time.Unix(int64(i), 0).UTC(), "event": kind, "version": i, FieldSeq: i}
		if prev != "" {
			ev[FieldPrev] = prev
		}
		b, _ := json.Marshal(ev)
		h, err := EventHash(b)
		if err != nil {
			t.Fatal(err)
		}
		ev[FieldHash] = h
		b, _ = json.Marshal(ev)
		events = append(events, b)
		prev = h
	}
	head := &Head{Key: k, Seq: n, Hash: prev, SignedAt: time.Unix(100, 0), AuditKeyVersion: 1}
	head.Signature = sign(t, priv, head.SignedBytes())
	return events, head
}

func sign(t *testing.T, priv *ecdsa.PrivateKey, msg []byte) string {
	d := sha256.Sum256(msg)
	sig, err := ecdsa.SignASN1(rand.Reader, priv, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(sig)
}

func TestVerifyChainNamesTheFirstBrokenEvent(t *testing.T) {
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	keys := AuditKeys{1: &priv.PublicKey}
	events, head := chain(t, "k", 5, priv)
	if v := VerifyChain("k", events, head, keys); !v.Verified || v.Broken != -1 {
		t.Fatalf("an intact chain does not verify: %+v", v)
	}
	altered := append([]json.RawMessage(nil), events...)
	altered[2] = json.RawMessage(strings.Replace(string(altered[2]), `"rotated"`, `"created"`, 1))
	deleted := append(append([]json.RawMessage(nil), events[:1]...), events[2:]...)
	reordered := append([]json.RawMessage(nil), events...)
	reordered[3], reordered[4] = reordered[4], reordered[3]
	truncated := events[:4]
	for name, c := range map[string]struct {
		events []json.RawMessage
		broken int
	}{"altered": {altered, 2}, "deleted": {deleted, 1}, "reordered": {reordered, 3}, "truncated": {truncated, 4}} {
		v := VerifyChain("k", c.events, head, keys)
		if v.Verified || v.Broken != c.broken {
			t.Errorf("%s: got verified=%v broken=%d (%s), want broken=%d", name, v.Verified, v.Broken, v.Reason, c.broken)
		}
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if v := VerifyChain("k", events, head, AuditKeys{1: &other.PublicKey}); v.Verified {
		t.Error("a head verifies with another audit key")
	}
	if v := VerifyChain("other", events, head, keys); v.Verified {
		t.Error("one key's head verifies another key's history")
	}
	if v := VerifyChain("k", events, nil, keys); v.Verified {
		t.Error("a chain with no signed head verifies")
	}
}

func TestCheckBundle(t *testing.T) {
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	keys := AuditKeys{1: &priv.PublicKey}
	events, head := chain(t, "k", 3, priv)
	doc := Document{Key: KeyMetadata{Name: "k", Type: "aes256-gcm96"},
		History: History{Events: events, Head: head, Verification: VerifyChain("k", events, head, keys)}}
	docBytes, _ := json.Marshal(doc)
	b := Bundle{Format: BundleFormat, Document: string(docBytes),
		Signature: Signature{Algorithm: SignatureAlgorithm, AuditKeyVersion: 1, Value: sign(t, priv, docBytes)}}
	raw, _ := json.Marshal(b)
	c, err := Check(raw, keys)
	if err != nil || !c.OK() {
		t.Fatalf("a good bundle does not check: %v %+v", err, c)
	}
	tampered := strings.Replace(string(raw), `aes256-gcm96`, `aes128-gcm96`, 1)
	if c, err := Check([]byte(tampered), keys); err != nil || c.OK() || c.SignatureErr == nil {
		t.Fatalf("a tampered bundle checks: %v %+v", err, c)
	}
	asRead, _ := json.Marshal(map[string]interface{}{"request_id": "r", "data": b}) // vault read -format=json
	if c, err := Check(asRead, keys); err != nil || !c.OK() {
		t.Fatalf("a bundle as vault read writes it does not check: %v %+v", err, c)
	}
}

// A later bundle must hold the event an earlier one's head signed, at its place: a rollback of head and pages
// together, which verifies alone, does not.
func TestExtendsCatchesARollbackBetweenBundles(t *testing.T) {
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	events, head := chain(t, "k", 5, priv)
	_, oldHead := chain(t, "k", 3, priv)
	at := func(s int64) time.Time { return time.Unix(s, 0) }
	prev := &Document{GeneratedAt: at(10), Key: KeyMetadata{Name: "k"}, History: History{Events: events[:3], Head: oldHead}}
	cur := &Document{GeneratedAt: at(20), Key: KeyMetadata{Name: "k"}, History: History{Events: events, Head: head}}
	if err := Extends(prev, cur); err != nil {
		t.Fatalf("a history that goes on: %v", err)
	}
	if err := Extends(cur, &Document{GeneratedAt: at(30), Key: KeyMetadata{Name: "k"}, History: History{Events: events[:3], Head: oldHead}}); err == nil || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("a rollback to an older head: %v", err)
	}
	// Rewritten from seq 2 on with every hash recomputed and a head signed over it (as if by a stolen signature).
	other := append([]json.RawMessage(nil), events...)
	prevHash := ""
	for i := range other {
		var ev map[string]interface{}
		_ = json.Unmarshal(other[i], &ev)
		if i == 1 {
			ev["event"] = "created"
		}
		if prevHash != "" {
			ev[FieldPrev] = prevHash
		}
		delete(ev, FieldHash)
		b, _ := json.Marshal(ev)
		prevHash, _ = EventHash(b)
		ev[FieldHash] = prevHash
		other[i], _ = json.Marshal(ev)
	}
	otherHead := &Head{Key: "k", Seq: 5, Hash: prevHash, SignedAt: time.Unix(200, 0), AuditKeyVersion: 1}
	otherHead.Signature = sign(t, priv, otherHead.SignedBytes())
	if v := VerifyChain("k", other, otherHead, AuditKeys{1: &priv.PublicKey}); !v.Verified {
		t.Fatalf("the rewritten chain should verify alone: %+v", v)
	}
	if err := Extends(prev, &Document{GeneratedAt: at(30), Key: KeyMetadata{Name: "k"}, History: History{Events: other, Head: otherHead}}); err == nil || !strings.Contains(err.Error(), "rewritten") {
		t.Fatal("a rewritten history extends the earlier bundle")
	}
	if err := Extends(cur, prev); err == nil {
		t.Fatal("bundles given in the wrong order pass")
	}
}
