package cmk

import (
	"fmt"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// cache-config bounds the key snapshots kept in memory, as Transit's bounds its policy cache: keys beyond the size
// are read from storage again when used, and every key keeps working.
func TestCacheConfigBoundsTheKeyCache(t *testing.T) {
	e := newTestBackend(t)
	if r := e.ok(e.read("cache-config")); fmt.Sprint(r.Data["size"]) != "0" {
		t.Fatalf("default size %v", r.Data["size"])
	}
	for _, bad := range []interface{}{5, -1} {
		if code := status(e.write("cache-config", map[string]interface{}{"size": bad})); code != 400 {
			t.Fatalf("size %v: %d", bad, code)
		}
	}
	e.ok(e.write("cache-config", map[string]interface{}{"size": 10}))
	cts := map[string]string{}
	for i := 0; i < 30; i++ {
		name := fmt.Sprintf("k%02d", i)
		e.ok(e.write("keys/"+name, nil))
		cts[name] = encryptOK(t, e, name, name)
	}
	if n := e.b.keys.CachedKeys(); n > 10 {
		t.Fatalf("%d keys cached with size 10", n)
	}
	before := e.storage.gets.Load()
	for name, ct := range cts {
		if decryptOK(t, e, name, ct) != name {
			t.Fatalf("%s decrypts wrong", name)
		}
	}
	if e.storage.gets.Load() == before {
		t.Fatal("30 keys served from a cache of 10 without reading storage")
	}
	if r := e.ok(e.read("cache-config")); fmt.Sprint(r.Data["size"]) != "10" {
		t.Fatalf("size read back %v", r.Data["size"])
	}
	// Unbounded again: every key used stays cached.
	e.ok(e.write("cache-config", map[string]interface{}{"size": 0}))
	for name, ct := range cts {
		decryptOK(t, e, name, ct)
	}
	if n := e.b.keys.CachedKeys(); n != 30 {
		t.Fatalf("%d keys cached, unbounded, after using 30", n)
	}
	// The size survives a restart of the mount.
	e.ok(e.write("cache-config", map[string]interface{}{"size": 12}))
	r := e.reopen()
	if err := r.b.Initialize(t.Context(), &logical.InitializationRequest{Storage: r.storage}); err != nil {
		t.Fatal(err)
	}
	for name, ct := range cts {
		decryptOK(t, r, name, ct)
	}
	if n := r.b.keys.CachedKeys(); n > 12 {
		t.Fatalf("%d keys cached after a restart with size 12", n)
	}
}
