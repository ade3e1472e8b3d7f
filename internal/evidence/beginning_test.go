package evidence

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// chainAfter chains kinds after the unchained events given (seq 1 pinning them, UnchainedPin) and signs a head.
func chainAfter(t *testing.T, unchained []json.RawMessage, kinds []string, priv *ecdsa.PrivateKey) ([]json.RawMessage, *Head) {
	t.Helper()
	events := append([]json.RawMessage(nil), unchained...)
	prev := ""
	if len(unchained) > 0 {
		var err error
		if prev, err = UnchainedPin(unchained); err != nil {
			t.Fatal(err)
		}
	}
	for i, kind := range kinds {
		ev := map[string]interface{}{"time": time.Unix(int64(i+10), 0).UTC(), "event": kind, FieldSeq: i + 1}
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
		events, prev = append(events, b), h
	}
	head := &Head{Key: "k", Seq: len(kinds), Hash: prev, SignedAt: time.Unix(100, 0), AuditKeyVersion: 1}
	head.Signature = sign(t, priv, head.SignedBytes())
	return events, head
}

// A chain begins at the key's creation, or pins the unchained events before it: what is left of a history deleted
// whole (and chained again after it) does not verify, nor do unchained events changed after the chain pinned them.
func TestVerifyChainBeginsAtCreationOrPinsTheUnchainedEvents(t *testing.T) {
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	keys := AuditKeys{1: &priv.PublicKey}
	if v := VerifyChain("k", nil, nil, keys); v.Verified || !strings.Contains(v.Reason, "history missing") {
		t.Fatalf("no history at all: %+v", v)
	}
	for _, kinds := range [][]string{{"created", "rotated"}, {"imported", "rotated"}} {
		if events, head := chainAfter(t, nil, kinds, priv); !VerifyChain("k", events, head, keys).Verified || CheckBeginning(events) != nil {
			t.Fatalf("a chain from %s does not verify: %+v", kinds[0], VerifyChain("k", events, head, keys))
		}
	}
	events, head := chainAfter(t, nil, []string{"rotated", "rotated"}, priv)
	if v := VerifyChain("k", events, head, keys); v.Verified || v.Broken != 0 || v.BrokenSeq != 1 ||
		!strings.Contains(v.Reason, "does not begin at the key's creation") || CheckBeginning(events) == nil {
		t.Fatalf("a chain begun after its history was deleted: %+v", v)
	}

	legacy := []json.RawMessage{
		json.RawMessage(`{"time":"2025-01-02T03:04:05Z","event":"created","version":1}`),
		json.RawMessage(`{"time":"2025-01-03T03:04:05Z","event":"rotated","version":2,"cause":"manual"}`),
	}
	events, head = chainAfter(t, legacy, []string{"rotated", "config_changed"}, priv)
	if v := VerifyChain("k", events, head, keys); !v.Verified || v.Unchained != 2 || CheckBeginning(events) != nil {
		t.Fatalf("a chain pinning the unchained events before it: %+v", v)
	}
	altered := append([]json.RawMessage(nil), events...)
	altered[1] = json.RawMessage(strings.Replace(string(altered[1]), "manual", "scheduled", 1))
	removed := append([]json.RawMessage(nil), events[1:]...)
	added := append([]json.RawMessage{json.RawMessage(`{"event":"created"}`)}, events...)
	unpinned, unpinnedHead := chainAfter(t, nil, []string{"rotated"}, priv)
	unpinned = append(append([]json.RawMessage(nil), legacy...), unpinned...)
	for name, c := range map[string]struct {
		events []json.RawMessage
		head   *Head
		broken int
	}{
		"altered": {altered, head, 2}, "removed": {removed, head, 1}, "added": {added, head, 3}, "not pinned": {unpinned, unpinnedHead, 2},
	} {
		v := VerifyChain("k", c.events, c.head, keys)
		if v.Verified || v.Broken != c.broken || v.BrokenSeq != 1 || !strings.Contains(v.Reason, "unchained events before the chain are not the ones") {
			t.Errorf("%s unchained events: %+v", name, v)
		}
		if CheckBeginning(c.events) == nil {
			t.Errorf("%s unchained events: the engine would sign over them", name)
		}
	}
}
