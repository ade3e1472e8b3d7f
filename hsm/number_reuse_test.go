//go:build cmkfaults

package hsm_test

import (
	"context"
	"encoding/hex"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// On a real SoftHSM token: storage restored to before a rotation forgets version 2, whose material the token holds;
// the search the next rotation makes for that number finds nothing (the fault seam hides it from that one search,
// as SoftHSM's store race did). The rotation must not give the number to new material: version 2 is the
// original, adopted, the new material becomes version 3, and the token holds one object under each label.
func TestSearchThatMissesTheOriginalNeverReusesItsNumberOnSoftHSM(t *testing.T) {
	ctx := context.Background()
	tok := hsm.OpenTestToken(t)
	manager := func() *keys.Manager {
		return keys.NewManager(hclog.NewNullLogger(), "mount", func(context.Context, logical.Storage) (keys.HSM, *keys.Nonces, error) { return tok, nil, nil })
	}
	who := func(req string) keys.Actor { return keys.Actor{DisplayName: "test", RequestID: req} }
	rotate := func(m *keys.Manager, s logical.Storage, req string) (*keys.Key, error) {
		return m.Update(ctx, s, "k", who(req), func(tx *keys.Tx) error { return tx.Rotate("manual") })
	}

	s := &logical.InmemStorage{}
	m := manager()
	if _, _, err := m.Create(ctx, s, &keys.Key{Name: "k", Type: keys.TypeAES256GCM96}, who("req-1"), nil); err != nil {
		t.Fatal(err)
	}
	snap := copyStorage(t, s)
	k, err := rotate(m, s, "req-2")
	if err != nil {
		t.Fatal(err)
	}
	original := k.Versions[2].HSMID

	hsm.HideFromSearches(t, tok, 1)
	k, err = rotate(manager(), snap, "req-3")
	if err != nil {
		t.Fatal(err)
	}
	objects, err := tok.ListObjects(ctx, "cmk/mount/k/")
	if err != nil {
		t.Fatal(err)
	}
	byLabel := map[string][]string{}
	for _, o := range objects {
		byLabel[o.Label] = append(byLabel[o.Label], hex.EncodeToString(o.ID))
	}
	for label, ids := range byLabel {
		if len(ids) > 1 {
			t.Errorf("%d objects labelled %s: %v", len(ids), label, ids)
		}
	}
	if k.Versions[2] == nil || k.Versions[2].HSMID != original || k.LatestVersion != 3 {
		t.Fatalf("version 2 is %+v, the original %s; latest %d", k.Versions[2], original, k.LatestVersion)
	}
	if ids := byLabel["cmk/mount/k/v2"]; len(ids) != 1 || ids[0] != original {
		t.Fatalf("under v2 the token holds %v, not the original %s", ids, original)
	}
}

func copyStorage(t *testing.T, s logical.Storage) *logical.InmemStorage {
	t.Helper()
	ctx := context.Background()
	all, err := logical.CollectKeys(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	out := &logical.InmemStorage{}
	for _, k := range all {
		e, err := s.Get(ctx, k)
		if err != nil || e == nil {
			t.Fatal(k, err)
		}
		if err := out.Put(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	return out
}
