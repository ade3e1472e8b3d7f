package hsm

import (
	"context"
	"testing"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// The WAL rollback's destruction (issue 19, finding 1): objects carrying a version's label are kept, whatever else
// the rollback believes; objects under another label are destroyed, on every token of the matrix.
func TestDestroyUnlessLabelledKeepsAVersionsMaterial(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		alg := ECDSAP256
		if !expectedCapabilities(t, tk.Kind).ServesAlgorithm(string(alg), true) {
			alg = RSA2048
		}
		version, stray := []byte("unless-label-v01"), []byte("unless-label-v02")
		label := "cmk/unless-test/k/v1"
		if _, err := tok.GenerateVersion(ctx, alg, version, label, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := tok.GenerateVersion(ctx, alg, stray, "cmk/unless-test/k/elsewhere", 0); err != nil {
			t.Fatal(err)
		}
		kept, n, err := tok.DestroyUnlessLabelled(ctx, version, label)
		if err != nil || !kept || n != 0 {
			t.Fatalf("the version's own material: kept %v, destroyed %d, %v", kept, n, err)
		}
		if found, err := tok.FindVersion(ctx, alg, label, 0); err != nil || len(found) != 1 {
			t.Fatalf("after: %d found, %v", len(found), err)
		}
		kept, n, err = tok.DestroyUnlessLabelled(ctx, stray, label)
		if err != nil || kept || n == 0 {
			t.Fatalf("material under another label: kept %v, destroyed %d, %v", kept, n, err)
		}
		if kept, n, err := tok.DestroyUnlessLabelled(ctx, []byte("unless-label-v03"), label); err != nil || kept || n != 0 {
			t.Fatalf("nothing there: kept %v, destroyed %d, %v", kept, n, err)
		}
	})
}
