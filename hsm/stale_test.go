package hsm

import (
	"context"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// A request that took its session before the module was re-initialised under it (another request's device
// fault) and makes its call after: in the new generation the module hands the same numbers to other sessions
// and objects, so its cached handle of version a now names version b. Before the module's gate checked
// generations, the call went through and sealed the client's data with b under a's name: a ciphertext issued with
// a 200 that nothing could ever decrypt (the soak's lost v20), and decryptions of valid ciphertexts refused as
// tampered. Now the call is refused as stale, and the retry loop takes a session of the new connection.
func TestCallOfFinishedGenerationIsRefused(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, _ tokentest.Token, tok *Token) {
		op := anyServedOp(t, tok)
		a, b := op.version(t), op.version(t)
		if _, err := op.use(a); err != nil { // a's handle is cached
			t.Fatal(err)
		}
		s, err := tok.pool.get() // a request takes its session...
		if err != nil {
			t.Fatal(err)
		}
		// ...the device fails under another request, which re-initialises the module and reconnects...
		tok.pool.markLost(s, true, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))
		if err := tok.pool.ensure(); err != nil {
			t.Fatal(err)
		}
		// ...another request of the new generation uses version b first, so b's handle may take a's old number...
		if _, err := op.use(b); err != nil {
			t.Fatal(err)
		}
		// ...and the first request makes its call with the session and handle it had.
		var out []byte
		err = tok.pool.run(context.Background(), s, func(c pkcs11API, s session) error {
			h, err := tok.findKey(c, s, op.kind(), a)
			if err != nil {
				return err
			}
			out, err = op.raw(c, s, h)
			return err
		})
		if err == nil {
			if merr := op.madeBy(a, out); merr != nil {
				t.Fatalf("a result issued under version a %v", merr)
			}
		}
		if !errors.Is(err, errStale) {
			t.Fatalf("a call with a session of the finished generation was made: %v", err)
		}
		// The same request through do recovers on the new connection.
		if out, err := op.use(a); err != nil || op.madeBy(a, out) != nil {
			t.Fatalf("after the re-initialisation: %v", err)
		}
	})
}
