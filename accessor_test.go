package cmk

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Token accessors are recorded as Vault's audit devices record them: as an HMAC under a salt of the mount's own.
// After requests by a token, no storage entry of the mount and no response carries its accessor in clear; its
// events and created_by carry one HMAC, another token's another; history and created_by written in clear by an
// earlier engine are shown as the same HMAC, and a page written again is stored sealed.
func TestTokenAccessorsAreRecordedOnlyAsHMAC(t *testing.T) {
	e := newTestBackend(t)
	const accessor, other, legacy = "Xacc-clear-accessor-one", "Xacc-clear-accessor-two", "Xacc-legacy-accessor"
	var responses []string
	as := func(acc string, op logical.Operation, path string, data map[string]interface{}) map[string]interface{} {
		t.Helper()
		resp, err := e.b.HandleRequest(context.Background(), &logical.Request{
			ID: fmt.Sprint("req-", requestCount.Add(1)), Operation: op, Path: path, Data: data, Storage: e.storage,
			DisplayName: "token-user", ClientTokenAccessor: acc, // a token without an entity (root, or an orphan)
		})
		if err != nil || resp == nil || resp.IsError() {
			t.Fatalf("%s %s: %v %v", op, path, err, resp)
		}
		raw, _ := json.Marshal(resp)
		responses = append(responses, string(raw))
		return resp.Data
	}
	as(accessor, logical.UpdateOperation, "keys/k", nil)
	as(accessor, logical.UpdateOperation, "keys/k/rotate", nil)
	as(other, logical.UpdateOperation, "keys/k/rotate", nil)
	as(accessor, logical.UpdateOperation, "keys/k/config", map[string]interface{}{"deletion_allowed": true})
	as(accessor, logical.UpdateOperation, "hmac/k", map[string]interface{}{"input": b64("data")})

	events := as(accessor, logical.ReadOperation, "keys/k/history", nil)["events"].([]map[string]interface{})
	hmacRe := regexp.MustCompile(`^hmac-sha256:[0-9a-f]{64}$`)
	first := events[0]["token_accessor_hmac"]
	if s, _ := first.(string); !hmacRe.MatchString(s) {
		t.Fatalf("event without the accessor's HMAC: %v", events[0])
	}
	var byOther interface{}
	for _, ev := range events {
		if _, clear := ev["token_accessor"]; clear {
			t.Fatalf("event with a token_accessor field: %v", ev)
		}
		if ev["event"] == "rotated" && ev["version"] == 3 {
			byOther = ev["token_accessor_hmac"]
		} else if ev["token_accessor_hmac"] != first {
			t.Fatalf("one token, two HMACs: %v and %v", first, ev)
		}
	}
	if byOther == nil || byOther == first || !hmacRe.MatchString(byOther.(string)) {
		t.Fatalf("another token's HMAC: %v (first token's %v)", byOther, first)
	}
	k := as(accessor, logical.ReadOperation, "keys/k", nil)
	for n, v := range k["versions"].(map[string]interface{}) {
		want := first
		if n == "3" {
			want = byOther
		}
		if by := v.(map[string]interface{})["created_by"].(string); by != "token-user (token accessor "+want.(string)+")" {
			t.Fatalf("version %s created_by %q", n, by)
		}
	}
	noClearAccessor(t, e, responses, []string{accessor, other}, []string{accessor, other})

	// What an earlier engine stored in clear: an event of the last history page and a version's created_by.
	ctx := context.Background()
	pageKey := "history/k/00000000"
	page, err := e.inmem.Get(ctx, pageKey)
	if err != nil || page == nil {
		t.Fatalf("history page: %v", err)
	}
	var stored []map[string]interface{}
	if err := json.Unmarshal(page.Value, &stored); err != nil {
		t.Fatal(err)
	}
	stored = append(stored, map[string]interface{}{"time": "2026-01-01T00:00:00Z", "event": "enabled", "display_name": "old", "token_accessor": legacy})
	raw, _ := json.Marshal(stored)
	if err := e.inmem.Put(ctx, &logical.StorageEntry{Key: pageKey, Value: raw}); err != nil {
		t.Fatal(err)
	}
	chunk, err := e.inmem.Get(ctx, keys.VersionsKey("k", 0))
	if err != nil || chunk == nil {
		t.Fatalf("versions: %v", err)
	}
	chunk.Value = bytes.Replace(chunk.Value, []byte(first.(string)), []byte(legacy), 1)
	if err := e.inmem.Put(ctx, chunk); err != nil {
		t.Fatal(err)
	}
	e.b.keys.Invalidate(keys.VersionsKey("k", 0))

	legacyHMAC, err := e.b.keys.AccessorHMAC(ctx, e.storage, legacy)
	if err != nil {
		t.Fatal(err)
	}
	events = as(accessor, logical.ReadOperation, "keys/k/history", nil)["events"].([]map[string]interface{})
	if last := events[len(events)-1]; last["token_accessor_hmac"] != legacyHMAC {
		t.Fatalf("an event stored in clear reads %v, want its HMAC %s", last, legacyHMAC)
	}
	found := false
	for _, v := range as(accessor, logical.ReadOperation, "keys/k", nil)["versions"].(map[string]interface{}) {
		found = found || v.(map[string]interface{})["created_by"] == "token-user (token accessor "+legacyHMAC+")"
	}
	if !found {
		t.Fatal("a created_by stored in clear is not shown as its HMAC")
	}
	as(accessor, logical.UpdateOperation, "keys/k/rotate", nil) // writes the last history page again
	if entry, _ := e.inmem.Get(ctx, pageKey); strings.Contains(string(entry.Value), legacy) {
		t.Fatal("the history page written again keeps the accessor in clear")
	}
	// The created_by stored in clear stays so in storage until its version is written again.
	noClearAccessor(t, e, responses, []string{accessor, other, legacy}, []string{accessor, other})
}

// noClearAccessor fails if a response carries one of inResponses, or any entry of the mount's storage one of
// inStorage, in clear.
func noClearAccessor(t *testing.T, e *testEnv, responses []string, inResponses, inStorage []string) {
	t.Helper()
	for _, r := range responses {
		for _, a := range inResponses {
			if strings.Contains(r, a) {
				t.Fatalf("a response carries accessor %s in clear: %s", a, r)
			}
		}
	}
	ctx := context.Background()
	all, err := logical.CollectKeys(ctx, e.inmem)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range all {
		entry, err := e.inmem.Get(ctx, k)
		if err != nil || entry == nil {
			t.Fatal(k, err)
		}
		for _, a := range inStorage {
			if bytes.Contains(entry.Value, []byte(a)) || strings.Contains(k, a) {
				t.Fatalf("storage entry %s carries accessor %s in clear", k, a)
			}
		}
	}
}
