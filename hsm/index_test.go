//go:build cmkfaults

package hsm

import (
	"bytes"
	"context"
	"maps"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// On a real SoftHSM token: once the object index is learnt, a version's label and a usage witness that are not on
// the token are answered with no search; creations and destructions keep it current; a creation that fails in a
// way that may have changed the token makes it learnt again.
func TestObjectIndexAnswersAbsenceWithoutASearch(t *testing.T) {
	ctx := context.Background()
	tok, _ := newToken(t, 2)
	f := injectFaults(t, tok)
	id := newVersion(t, tok, 256)
	if ids, err := tok.LabelledIDs(ctx, "cmk/test/key/v1"); err != nil || len(ids) != 1 || !bytes.Equal(ids[0], id) {
		t.Fatalf("v1 holds %x, %v; want %x", ids, err, id)
	}
	searches := f.count("FindObjectsInit")
	if found, err := tok.FindVersion(ctx, AES256, "cmk/test/key/v2", HMACKeySize); err != nil || len(found) != 0 {
		t.Fatalf("found %v, %v under a label nothing carries", found, err)
	}
	if _, held, err := tok.UsageWitness(ctx, id); err != nil || held {
		t.Fatalf("a witness for a version that never reserved: %v, %v", held, err)
	}
	if _, err := tok.RaiseUsageWitness(ctx, id, "cmk/test/key/v1", 100); err != nil {
		t.Fatal(err)
	}
	if got := f.count("FindObjectsInit") - searches; got != 0 {
		t.Fatalf("%d searches for what the index knows is absent", got)
	}
	if n, held, err := tok.UsageWitness(ctx, id); err != nil || !held || n != 100 {
		t.Fatalf("the witness just written reads %d, %v, %v", n, held, err)
	}
	if _, err := tok.DestroyKeys(ctx, id); err != nil {
		t.Fatal(err)
	}
	if ids, err := tok.LabelledIDs(ctx, "cmk/test/key/v1"); err != nil || len(ids) != 0 {
		t.Fatalf("v1 still holds %x, %v after its destruction", ids, err)
	}

	// A creation that failed may have left its object (SoftHSM's store race, a device error): the index holds it
	// until two searches by label and one by CKA_ID find it gone.
	f.fail(pkcs11.CKR_FUNCTION_FAILED, -1, "GenerateKey")
	id2 := randomID(t)
	if _, err := tok.GenerateVersion(ctx, AES256, id2, "cmk/test/key/v3", HMACKeySize); err == nil {
		t.Fatal("a generation the module failed succeeded")
	}
	f.clear()
	if ids, err := tok.LabelledIDs(ctx, "cmk/test/key/v3"); err != nil || len(ids) == 0 || !bytes.Equal(ids[0], id2) {
		t.Fatalf("v3 holds %x, %v in the index; want %x, as a failed creation may have made it", ids, err, id2)
	}
	searches = f.count("FindObjectsInit")
	if found, err := tok.FindVersion(ctx, AES256, "cmk/test/key/v3", HMACKeySize); err != nil || len(found) != 0 {
		t.Fatalf("found %v, %v under v3", found, err)
	}
	if got := f.count("FindObjectsInit") - searches; got < 3 {
		t.Fatalf("%d searches before forgetting an object the index holds; want two by label and one by CKA_ID", got)
	}
	if ids, err := tok.LabelledIDs(ctx, "cmk/test/key/v3"); err != nil || len(ids) != 0 {
		t.Fatalf("v3 still holds %x, %v after the searches found it gone", ids, err)
	}
}

// Objects created while the index is being learnt, after the readings listed the token, are in the index all the
// same; one destroyed meanwhile may stay (absence is what the index answers, so that costs a search, never a
// wrong answer); and a forget during a learning discards what that learning read.
func TestObjectIndexLearningMergesChangesMadeMeanwhile(t *testing.T) {
	var x objectIndex
	a, b, c := indexedObject{"a", "1"}, indexedObject{"b", "2"}, indexedObject{"c", "3"}
	wait, start, gen := x.lookup(func() {})
	if wait == nil || !start {
		t.Fatal("an empty index answered, or had a learning under way")
	}
	x.record(true, b)  // made after the readings listed the token
	x.record(false, a) // destroyed after the readings saw it
	x.finish(gen, map[indexedObject]int{a: 1, c: 1}, nil)
	<-wait.done
	var got map[string]int
	if wait, _, _ := x.lookup(func() { got = maps.Clone(x.byID) }); wait != nil {
		t.Fatal("not ready after a learning")
	}
	if got["1"] != 1 || got["2"] != 1 || got["3"] != 1 {
		t.Fatalf("index by CKA_ID %v; want a (may be gone), b (made meanwhile) and c", got)
	}
	x.record(false, a, c)
	if wait, _, _ := x.lookup(func() { got = maps.Clone(x.byID) }); wait != nil || len(got) != 1 || got["2"] != 1 {
		t.Fatalf("after two destructions the index is %v", got)
	}

	// A forget (a reconnection, a fault) while a learning reads: what it read may be out of date, and objects
	// created after the forget must not break the bookkeeping.
	x.forget()
	_, _, gen = x.lookup(func() {})
	x.forget()
	x.record(true, b)
	x.finish(gen, map[indexedObject]int{a: 1}, nil)
	if wait, _, _ := x.lookup(func() {}); wait == nil {
		t.Fatal("a learning overtaken by a forget was kept")
	}
}

// A reconnection after a fault (here a device error, which re-initialises the module) keeps the index: the
// process made nothing unseen meanwhile, and under a flaky HSM reading the token whole after each reconnection
// made every rotation pay for it (the soak: 16 rotations in two minutes, one unanswered). Opening the token
// again, as a mount's start or a node taking over does, reads it again.
func TestReconnectionKeepsTheObjectIndex(t *testing.T) {
	ctx := context.Background()
	tok, cfg := newToken(t, 1)
	id := newVersion(t, tok, 256)
	f := injectFaults(t, tok)
	if _, err := tok.LabelledIDs(ctx, "cmk/test/key/v1"); err != nil {
		t.Fatal(err)
	}
	gen := tok.mod.generation.Load()
	f.fail(pkcs11.CKR_DEVICE_ERROR, 1, "EncryptInit")
	if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if tok.mod.generation.Load() == gen {
		t.Fatal("the device error re-initialised nothing")
	}
	searches := f.count("FindObjectsInit")
	if ids, err := tok.LabelledIDs(ctx, "cmk/test/key/v1"); err != nil || len(ids) != 1 {
		t.Fatalf("v1 holds %x, %v", ids, err)
	}
	if got := f.count("FindObjectsInit") - searches; got != 0 {
		t.Fatalf("%d searches after a reconnection: the index was read again", got)
	}

	again, err := Open(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if _, err := again.LabelledIDs(ctx, "cmk/test/key/v1"); err != nil {
		t.Fatal(err)
	}
	if got := f.count("FindObjectsInit") - searches; got != 2 {
		t.Fatalf("%d searches after the token was opened again; want the two readings of a learning", got)
	}
}
