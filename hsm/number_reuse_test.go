//go:build cmkfaults

package hsm_test

import (
	"context"
	"encoding/hex"
	"errors"
	"os/exec"
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
		return m.Update(ctx, s, "k", who(req), func(tx *keys.Tx) error { return tx.Rotate("manual", keys.VersionType{}) })
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
	byLabel := objectsByLabel(t, tok, "cmk/mount/k/")
	if k.Versions[2] == nil || k.Versions[2].HSMID != original || k.LatestVersion != 3 {
		t.Fatalf("version 2 is %+v, the original %s; latest %d", k.Versions[2], original, k.LatestVersion)
	}
	if ids := byLabel["cmk/mount/k/v2"]; len(ids) != 1 || ids[0] != original {
		t.Fatalf("under v2 the token holds %v, not the original %s", ids, original)
	}
}

// The token's object index (learnt when a mount opens the token, then kept current by the process's own creations and
// destructions) must not let a number be reused whose object another process made, or this engine made before a
// restart that storage forgot. On a real SoftHSM token: version 2's label is taken by another process (OpenSC's
// pkcs11-tool) while the engine runs, then the engine restarts (a new connection) and rotates; and version 2 of
// another key is made by the engine, storage restored to before it, the engine restarted and the key rotated again. Each time
// the token must hold one object under each label, and the engine's versions must be those objects.
func TestObjectMadeElsewhereOrBeforeARestartKeepsItsNumber(t *testing.T) {
	ctx := context.Background()
	tok, cfg := hsm.OpenTestTokenConfig(t)
	manager := func(tok *hsm.Token) *keys.Manager {
		return keys.NewManager(hclog.NewNullLogger(), "mount", func(context.Context, logical.Storage) (keys.HSM, *keys.Nonces, error) { return tok, nil, nil })
	}
	restart := func(old *hsm.Token) *hsm.Token {
		old.Close()
		tok, err := hsm.Open(cfg, hclog.NewNullLogger())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(tok.Close)
		return tok
	}
	who := func(req string) keys.Actor { return keys.Actor{DisplayName: "test", RequestID: req} }
	rotate := func(m *keys.Manager, s logical.Storage, req string) (*keys.Key, error) {
		return m.Update(ctx, s, "k", who(req), func(tx *keys.Tx) error { return tx.Rotate("manual", keys.VersionType{}) })
	}

	s := &logical.InmemStorage{}
	if _, _, err := manager(tok).Create(ctx, s, &keys.Key{Name: "k", Type: keys.TypeAES256GCM96}, who("req-1"), nil); err != nil {
		t.Fatal(err)
	}
	// Another process takes version 2's label while this one runs (its index learnt, by the creation above).
	foreign := "00112233445566778899aabbccddeeff"
	cmd := exec.Command("pkcs11-tool", "--module", cfg.Library, "--token-label", cfg.TokenLabel, "--login", "--pin", cfg.PIN,
		"--keygen", "--key-type", "AES:32", "--label", "cmk/mount/k/v2", "--id", foreign, "--sensitive")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pkcs11-tool: %v\n%s", err, out)
	}
	tok = restart(tok)
	k, err := rotate(manager(tok), s, "req-2")
	var taken *keys.NumberTakenError
	switch {
	case errors.As(err, &taken):
		if taken.Version != 2 {
			t.Fatalf("refused for version %d, not 2: %v", taken.Version, err)
		}
	case err != nil:
		t.Fatal(err)
	case k.Versions[2] == nil || k.Versions[2].HSMID != foreign:
		t.Fatalf("version 2 is %+v, not the object another process made under its label (%s)", k.Versions[2], foreign)
	}
	if ids := objectsByLabel(t, tok, "cmk/mount/k/")["cmk/mount/k/v2"]; len(ids) != 1 || ids[0] != foreign {
		t.Fatalf("under v2 the token holds %v, not only the object another process made (%s)", ids, foreign)
	}
	t.Logf("version 2 made by another process: adopted %v (else refused: %v)", err == nil, err)

	// Key r: the engine makes version 2; storage is restored to before it; the engine restarts.
	if _, _, err := manager(tok).Create(ctx, s, &keys.Key{Name: "r", Type: keys.TypeAES256GCM96}, who("req-3"), nil); err != nil {
		t.Fatal(err)
	}
	rotateR := func(m *keys.Manager, s logical.Storage, req string) (*keys.Key, error) {
		return m.Update(ctx, s, "r", who(req), func(tx *keys.Tx) error { return tx.Rotate("manual", keys.VersionType{}) })
	}
	snap := copyStorage(t, s)
	k, err = rotateR(manager(tok), s, "req-4")
	if err != nil {
		t.Fatal(err)
	}
	original := k.Versions[2].HSMID
	tok = restart(tok)
	if k, err = rotateR(manager(tok), snap, "req-5"); err != nil {
		t.Fatal(err)
	}
	if k.Versions[2] == nil || k.Versions[2].HSMID != original || k.LatestVersion != 3 {
		t.Fatalf("version 2 of r is %+v, the original %s; latest %d", k.Versions[2], original, k.LatestVersion)
	}
	objects, err := tok.ListObjects(ctx, "cmk/mount/r/v2")
	if err != nil {
		t.Fatal(err)
	}
	if len(objects) != 1 || hex.EncodeToString(objects[0].ID) != original {
		t.Fatalf("under cmk/mount/r/v2 the token holds %v, not only the original %s", objects, original)
	}
}

// objectsByLabel lists the CKA_IDs (hex) of the token's objects under labels beginning with prefix, by label, and
// reports any label that more than one object carries: a number given to two keys.
func objectsByLabel(t *testing.T, tok *hsm.Token, prefix string) map[string][]string {
	t.Helper()
	objects, err := tok.ListObjects(context.Background(), prefix)
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
	return byLabel
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
