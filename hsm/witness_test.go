package hsm

import (
	"context"
	"strings"
	"testing"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// A usage witness is raised, never lowered, read back, and destroyed with its version, on every token of the
// matrix that holds secret keys (tpm2-pkcs11 holds none, and so no AES version that would need one).
func TestUsageWitnessOnEveryToken(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		if !expectedCapabilities(t, tk.Kind).ServesAlgorithm(string(AES256), true) {
			t.Skipf("%s holds no secret keys: no AES version, no witness", tk.Kind)
		}
		id, other := []byte("witness-test-v01"), []byte("witness-test-v02")
		label := "cmk/witness-test/k/v1"
		if _, err := tok.GenerateVersion(ctx, AES256, id, label, 0); err != nil {
			t.Fatal(err)
		}
		if n, found, err := tok.UsageWitness(ctx, id); err != nil || found || n != 0 {
			t.Fatalf("before any: %d %v %v", n, found, err)
		}
		for _, step := range []struct{ raise, before, want uint64 }{{100, 0, 100}, {50, 100, 100}, {1 << 32, 100, 1 << 32}} {
			if before, err := tok.RaiseUsageWitness(ctx, id, label, step.raise); err != nil || before != step.before {
				t.Fatalf("raise to %d: it held %d before (want %d), %v", step.raise, before, step.before, err)
			}
			if n, found, err := tok.UsageWitness(ctx, id); err != nil || !found || n != step.want {
				t.Fatalf("after raising to %d: %d %v %v, want %d", step.raise, n, found, err, step.want)
			}
		}
		if n, found, err := tok.UsageWitness(ctx, other); err != nil || found || n != 0 {
			t.Fatalf("another version's: %d %v %v", n, found, err)
		}
		objs, err := tok.ListObjects(ctx, label+"/uses")
		if err != nil || len(objs) != 1 {
			t.Fatalf("witness objects: %+v, %v", objs, err)
		}
		if w := objs[0]; !w.Sensitive || w.Extractable || len(w.Usage) != 0 || !strings.HasSuffix(w.Label, "/uses/4294967296") {
			t.Fatalf("the witness is not a protected object good for nothing: %+v", w)
		}
		if n, err := tok.DestroyKeys(ctx, id); err != nil || n != 2 {
			t.Fatalf("destroying the version destroyed %d objects (%v), want its key and its witness", n, err)
		}
		if _, found, err := tok.UsageWitness(ctx, id); err != nil || found {
			t.Fatalf("after destruction: %v %v", found, err)
		}
	})
}
