package keys

import (
	"context"
	"errors"
	"testing"

	"github.com/hashicorp/vault/sdk/framework"
)

// A search that misses the object a number's original holds (SoftHSM 2.6.1's store race hides one from one
// search now and then) must never give that number to new material: the rotation finds the original when it
// checks the new version's label, destroys what it made, and adopts the original (or stops, if the original may
// not be adopted). The token never holds two objects under one version's label, and the original survives.
func TestSearchThatMissesTheOriginalNeverReusesItsNumber(t *testing.T) {
	ctx := context.Background()
	t.Run("adoptable original", func(t *testing.T) {
		m, f, s := newManager(t)
		if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
			t.Fatal(err)
		}
		snap := snapshot(t, s)
		original := rotate(t, m, s, "k", "req-2").Versions[2].HSMID

		m2, s2 := restored(f, snap) // storage no longer knows version 2; the token holds it
		f.mu.Lock()
		f.hideOnce[versionLabel("mount", "k", 2)] = true
		f.mu.Unlock()
		k := rotate(t, m2, s2, "k", "req-3")
		labelsUnique(t, f)
		if k.Versions[2] == nil || k.Versions[2].HSMID != original || k.LatestVersion != 3 || !f.has(original) {
			t.Fatalf("version 2 is %+v (the original is %s, on the token: %v); latest %d", k.Versions[2], original, f.has(original), k.LatestVersion)
		}
		ids, err := framework.ListWAL(ctx, s2)
		if err != nil || len(ids) != 0 {
			t.Fatalf("WAL entries left: %v %v", ids, err)
		}
	})
	t.Run("original that may not be adopted", func(t *testing.T) {
		m, f, s := newManager(t)
		if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
			t.Fatal(err)
		}
		label := versionLabel("mount", "k", 2)
		f.mu.Lock()
		f.objects["0123456789abcdef0123456789abcdef"], f.labels["0123456789abcdef0123456789abcdef"] = true, label
		f.imported["0123456789abcdef0123456789abcdef"] = true
		f.hideOnce[label] = true
		before := len(f.objects)
		f.mu.Unlock()
		_, err := m.Update(ctx, s, "k", Actor{DisplayName: "test", RequestID: "req-2"}, func(tx *Tx) error { return tx.Rotate("manual", VersionType{}) })
		var taken *NumberTakenError
		if !errors.As(err, &taken) || taken.Version != 2 {
			t.Fatalf("rotation onto a number held by material that may not be adopted: %v", err)
		}
		labelsUnique(t, f)
		f.mu.Lock()
		defer f.mu.Unlock()
		if len(f.objects) != before || !f.objects["0123456789abcdef0123456789abcdef"] {
			t.Fatalf("the token holds %d objects, %d before; the original is there: %v", len(f.objects), before, f.objects["0123456789abcdef0123456789abcdef"])
		}
	})
}
