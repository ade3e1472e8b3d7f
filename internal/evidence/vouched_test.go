package evidence

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// rehashed returns events[from:] chained again from genesis as an attacker without the audit key can: every hash
// is right, but the signed head does not vouch for the result.
func rehashed(t *testing.T, events []json.RawMessage, upTo int, rewrite func(map[string]interface{})) []json.RawMessage {
	t.Helper()
	out := append([]json.RawMessage(nil), events...)
	prev := ""
	for i := 0; i < upTo; i++ {
		var ev map[string]interface{}
		if err := json.Unmarshal(out[i], &ev); err != nil {
			t.Fatal(err)
		}
		rewrite(ev)
		if prev != "" {
			ev[FieldPrev] = prev
		}
		delete(ev, FieldHash)
		b, _ := json.Marshal(ev)
		h, err := EventHash(b)
		if err != nil {
			t.Fatal(err)
		}
		ev[FieldHash] = h
		out[i], _ = json.Marshal(ev)
		prev = h
	}
	return out
}

func TestVouchedMarksOnlyWhatTheSignedHeadVouchesFor(t *testing.T) {
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	keys := AuditKeys{1: &priv.PublicKey}
	events, head := chain(t, "k", 5, priv)
	all := []bool{true, true, true, true, true}
	if got := Vouched("k", events, head, keys); !reflect.DeepEqual(got, all) {
		t.Fatalf("an intact chain: %v", got)
	}
	altered := append([]json.RawMessage(nil), events...)
	altered[2] = json.RawMessage(strings.Replace(string(altered[2]), `"rotated"`, `"created"`, 1))
	deleted := append(append([]json.RawMessage(nil), events[:1]...), events[2:]...)
	reordered := append([]json.RawMessage(nil), events...)
	reordered[3], reordered[4] = reordered[4], reordered[3]
	// The first three events rewritten and chained again from genesis: forward, the chain breaks only at event 3
	// (its prev_hash no longer follows), yet events 0-2 are forgeries that nothing vouches for.
	forgedStart := rehashed(t, events, 3, func(ev map[string]interface{}) { ev["details"] = "forged" })
	appended, _ := chain(t, "k", 6, priv) // one event more than the head signed
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for name, c := range map[string]struct {
		events []json.RawMessage
		keys   AuditKeys
		want   []bool
	}{
		"altered":      {altered, keys, []bool{false, false, false, true, true}},
		"deleted":      {deleted, keys, []bool{false, true, true, true}},
		"reordered":    {reordered, keys, []bool{false, false, false, false, false}},
		"forged start": {forgedStart, keys, []bool{false, false, false, true, true}},
		"other key":    {events, AuditKeys{1: &other.PublicKey}, []bool{false, false, false, false, false}},
		"appended":     {appended, keys, []bool{true, true, true, true, true, false}},
	} {
		got := Vouched("k", c.events, head, c.keys)
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: vouched %v, want %v", name, got, c.want)
		}
		if v := VerifyChain("k", c.events, head, c.keys); v.Verified {
			t.Errorf("%s: the chain verifies", name)
		}
	}
	if v := VerifyChain("k", forgedStart, head, keys); v.Broken != 3 {
		t.Errorf("forged start: first broken %d, want 3 (%s)", v.Broken, v.Reason)
	}
	if got := Vouched("other", events, head, keys); !reflect.DeepEqual(got, make([]bool, 5)) {
		t.Errorf("one key's head vouches for another key's events: %v", got)
	}
	if got := Vouched("k", events, nil, keys); !reflect.DeepEqual(got, make([]bool, 5)) {
		t.Errorf("events with no head are vouched for: %v", got)
	}
}
