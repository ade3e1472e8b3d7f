package keys

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
)

// Versions stored before versions kept their type have none in storage and take the key's when loaded. A rotation
// that changes the key's type must store every one of them with its own, in every chunk: left without, they would
// be read back as the new type.
func TestATypeChangeStoresEveryVersionsType(t *testing.T) {
	m, f, s := newManager(t)
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES128GCM96}, who, nil); err != nil {
		t.Fatal(err)
	}
	const before = versionChunk + 10 // two chunks
	for i := 2; i <= before; i++ {
		if _, err := m.Update(ctx, s, "k", Actor{RequestID: fmt.Sprintf("r%d", i)}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) }); err != nil {
			t.Fatal(err)
		}
	}
	// As an engine from before stored them: no type in any version.
	for c := 0; c <= chunkOf(before); c++ {
		e, err := s.Get(ctx, versionsKey("k", c))
		if err != nil || e == nil {
			t.Fatal(err)
		}
		var chunk map[string]map[string]interface{}
		if err := json.Unmarshal(e.Value, &chunk); err != nil {
			t.Fatal(err)
		}
		for _, v := range chunk {
			delete(v, "type")
		}
		raw, _ := json.Marshal(chunk)
		if err := s.Put(ctx, &logical.StorageEntry{Key: e.Key, Value: raw}); err != nil {
			t.Fatal(err)
		}
	}
	m = NewManager(hclog.NewNullLogger(), "mount", func(context.Context, logical.Storage) (HSM, *Nonces, error) { return f, nil, nil })
	k, err := m.Update(ctx, s, "k", Actor{RequestID: "retype"}, func(tx *Tx) error {
		return tx.Rotate("manual", VersionType{Type: TypeAES256GCM96})
	})
	if err != nil {
		t.Fatal(err)
	}
	if k.Type != TypeAES256GCM96 || k.Versions[before+1].Type != TypeAES256GCM96 {
		t.Fatalf("after the rotation: key %s, new version %s", k.Type, k.Versions[before+1].Type)
	}
	loaded, err := Load(ctx, s, "k")
	if err != nil {
		t.Fatal(err)
	}
	for n := 1; n <= before+1; n++ {
		want := TypeAES128GCM96
		if n == before+1 {
			want = TypeAES256GCM96
		}
		if got := loaded.Versions[n].Type; got != want {
			t.Fatalf("version %d is read back as %s, was made as %s", n, got, want)
		}
	}
}

// The rules of a rotation's type: within the purpose, next_type when none is named, key_size for hmac only.
func TestRotationType(t *testing.T) {
	aes := &Key{Name: "a", Type: TypeAES128GCM96, NextType: TypeAES256GCM96}
	if vt, err := aes.rotationType(VersionType{}); err != nil || vt.Type != TypeAES256GCM96 {
		t.Fatalf("next_type: %v %v", vt, err)
	}
	if _, err := aes.rotationType(VersionType{Type: TypeEd25519}); !IsCaller(err) {
		t.Fatalf("another purpose: %v", err)
	}
	if _, err := aes.rotationType(VersionType{Type: TypeAES128GCM96, HMACKeySize: 64}); !IsCaller(err) {
		t.Fatalf("key_size on aes: %v", err)
	}
	mac := &Key{Name: "m", Type: TypeHMAC, HMACKeySize: 32}
	if vt, err := mac.rotationType(VersionType{HMACKeySize: 64}); err != nil || vt != (VersionType{Type: TypeHMAC, HMACKeySize: 64}) {
		t.Fatalf("hmac size: %v %v", vt, err)
	}
	if vt, err := mac.rotationType(VersionType{}); err != nil || vt != (VersionType{Type: TypeHMAC, HMACKeySize: 32}) {
		t.Fatalf("hmac unchanged: %v %v", vt, err)
	}
	sig := &Key{Name: "s", Type: TypeRSA2048}
	for _, to := range []Type{TypeRSA4096, TypeECDSAP521, TypeEd25519} {
		if vt, err := sig.rotationType(VersionType{Type: to}); err != nil || vt.Type != to {
			t.Fatalf("%s: %v %v", to, vt, err)
		}
	}
}
