//go:build cmkfaults

package hsm

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// Issue 19 (6): a configuration write naming an absent token re-initialised the shared module, which forgot the
// PIN the process had logged in with; a mount's wrong PINs then reached the real token (three lock opencryptoki's
// user PIN for good), and their wait refused the right PIN of every other mount. The PIN a token accepted is kept
// (as a keyed digest) across re-initialisations: wrong PINs are refused without C_Login, and the mount that knows
// the PIN reconnects during the guesser's wait.
func TestWrongPINsAfterAReinitializationNeverReachTheToken(t *testing.T) {
	onEveryToken(t, 1, func(t *testing.T, tk tokentest.Token, tok *Token) {
		op := anyServedOp(t, tok)
		id := op.version(t)
		f := injectFaults(t, tok)
		tok.pool.mu.Lock()
		gen := tok.pool.gen
		tok.pool.mu.Unlock()
		// A re-initialisation under the mount, as a lookup of a token created since makes: every token is logged
		// out, and the mount reconnects at its next call.
		if err := tok.mod.exclusive(func() error { return tok.mod.reinitializeLocked(gen) }); err != nil {
			t.Fatal(err)
		}
		defer endLoginWaits(tok)
		logins := f.count("Login")
		bad := configFor(tk, 1)
		bad.Mount = "cmk-guesser/"
		for i := 1; i <= 3*freeLoginFailures; i++ {
			bad.PIN = fmt.Sprintf("guess-%d", i)
			if _, err := Open(bad, nil); !errors.Is(err, ErrPINIncorrect) {
				t.Fatalf("wrong PIN %d: %v", i, err)
			}
		}
		if n := f.count("Login") - logins; n != 0 {
			t.Fatalf("%d wrong PINs reached C_Login of a token whose PIN the process knows", n)
		}
		if _, err := op.use(id); err != nil {
			t.Fatalf("the mount that knows the PIN, during the guesser's wait: %v", err)
		}
		if flags := tokenFlags(t, tok); flags&(pkcs11.CKF_USER_PIN_COUNT_LOW|pkcs11.CKF_USER_PIN_FINAL_TRY|pkcs11.CKF_USER_PIN_LOCKED) != 0 {
			t.Fatalf("the token counted wrong PINs: flags %#x", flags)
		}
		loginOutside(t, tk)
	})
}

// Issue 19 (6): opencryptoki locks its user PIN at the third wrong one in a row, whoever gives it. A token that says
// the next wrong PIN locks it (CKF_USER_PIN_FINAL_TRY) is given no PIN it has not accepted in this process: a
// mount that never knew the PIN cannot lock it, and the token's own tools still log in.
func TestNoUnverifiedPINAtTheFinalTry(t *testing.T) {
	onEveryToken(t, 1, func(t *testing.T, tk tokentest.Token, tok *Token) {
		if tk.Kind != tokentest.OpenCryptoki {
			t.Skip("only opencryptoki of the matrix counts wrong PINs in its token flags")
		}
		defer endLoginWaits(tok)
		t.Cleanup(func() { loginOutside(t, tk) }) // whatever happens, the token's count is reset for later tests
		// As in a process that never logged in to the token: logged out, and the PIN known to nobody here.
		tok.pool.mu.Lock()
		gen := tok.pool.gen
		tok.pool.mu.Unlock()
		if err := tok.mod.exclusive(func() error { return tok.mod.reinitializeLocked(gen) }); err != nil {
			t.Fatal(err)
		}
		tok.mod.logins.mu.Lock()
		clear(tok.mod.logins.verified)
		tok.mod.logins.mu.Unlock()
		bad := configFor(tk, 1)
		bad.Mount = "cmk-guesser/"
		for i := 1; ; i++ {
			if flags := tokenFlags(t, tok); flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
				t.Fatalf("the user PIN is locked after %d wrong PINs", i-1)
			} else if flags&pkcs11.CKF_USER_PIN_FINAL_TRY != 0 {
				break
			} else if i > freeLoginFailures {
				t.Fatalf("no CKF_USER_PIN_FINAL_TRY after %d wrong PINs: flags %#x", i-1, flags)
			}
			bad.PIN = fmt.Sprintf("guess-%d", i)
			if _, err := Open(bad, nil); !errors.Is(err, ErrPINIncorrect) {
				t.Fatalf("wrong PIN %d: %v", i, err)
			}
		}
		endLoginWaits(tok) // the wait is not what protects the token here
		bad.PIN = "guess-x"
		if _, err := Open(bad, nil); !errors.Is(err, ErrPINIncorrect) {
			t.Fatalf("wrong PIN at the final try: %v", err)
		}
		if flags := tokenFlags(t, tok); flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
			t.Fatal("a wrong PIN at the final try reached the token and locked its user PIN")
		}
		loginOutside(t, tk) // resets the token's count
		good, err := Open(configFor(tk, 1), nil)
		if err != nil {
			t.Fatalf("the right PIN once the count is reset: %v", err)
		}
		good.Close()
	})
}

// tokenFlags reads the token's CKF_ flags now.
func tokenFlags(t *testing.T, tok *Token) uint {
	t.Helper()
	tok.pool.mu.Lock()
	slot := tok.pool.slot
	tok.pool.mu.Unlock()
	gen := tok.mod.generation.Load()
	var ti pkcs11.TokenInfo
	err := tok.mod.enter(gen, func(c pkcs11API) error {
		var err error
		ti, err = c.GetTokenInfo(slot)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return ti.Flags
}

// loginOutside logs in to the token with its right PIN from another process, with OpenSC's pkcs11-tool, where
// the module needs no C_Initialize parameters.
func loginOutside(t *testing.T, tk tokentest.Token) {
	t.Helper()
	if tk.InitParams != "" {
		return
	}
	cmd := exec.Command("pkcs11-tool", "--module", tk.Library, "--token-label", tk.Label, "--login", "--pin", tk.PIN, "--list-objects")
	cmd.Env = append(os.Environ(), tk.Env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pkcs11-tool cannot log in with the right PIN: %v\n%s", err, out)
	}
}
