package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// Defect A: the module lost while no session is pooled. Opening a session then fails with a device-class error,
// and that loss must be charged to the live connection (not to "epoch 0", where it was ignored and every later
// call answered "HSM unavailable" for good).
func TestModuleLossWithNoPooledSession(t *testing.T) {
	onEveryToken(t, 1, func(t *testing.T, _ tokentest.Token, tok *Token) {
		op := anyServedOp(t, tok)
		id := op.version(t)
		tok.pool.mu.Lock()
		for _, s := range tok.pool.idle {
			_ = tok.mod.ctx.CloseSession(s.h)
		}
		tok.pool.idle = nil
		tok.pool.mu.Unlock()
		tok.mod.mu.Lock()
		_ = tok.mod.ctx.Finalize() // behind the token's back, as a lost device looks to the library's users
		tok.mod.mu.Unlock()
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, err := op.use(id)
			if err == nil {
				break
			}
			if !errors.Is(err, ErrUnavailable) || time.Now().After(deadline) {
				t.Fatalf("not recovered from losing the module with no session pooled: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

// Defect B: a C_Logout or C_CloseAllSessions by another user of the library logs the application out. Modules
// then answer with handle errors and empty searches rather than CKR_USER_NOT_LOGGED_IN; the engine must log in
// again, not report the key as destroyed outside Vault.
func TestLoggedOutBehindOurBack(t *testing.T) {
	for _, how := range []string{"C_Logout", "C_CloseAllSessions"} {
		t.Run(how, func(t *testing.T) {
			onEveryToken(t, 2, func(t *testing.T, _ tokentest.Token, tok *Token) {
				op := anyServedOp(t, tok)
				id := op.version(t)
				if _, err := op.use(id); err != nil {
					t.Fatal(err)
				}
				tok.pool.mu.Lock()
				login, slot := tok.pool.loginSession, tok.pool.slot
				tok.pool.mu.Unlock()
				var err error
				tok.mod.mu.RLock()
				if how == "C_Logout" {
					err = tok.mod.ctx.Logout(login)
				} else {
					err = tok.mod.ctx.CloseAllSessions(slot)
				}
				tok.mod.mu.RUnlock()
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < 3; i++ {
					out, err := op.use(id)
					if err != nil {
						t.Fatalf("use %d after %s elsewhere: %v", i, how, err)
					}
					if err := op.madeBy(id, out); err != nil {
						t.Fatalf("result %v", err)
					}
				}
				if m := tok.MissingObjects(id); len(m) != 0 {
					t.Fatalf("key reported missing after %s: %v", how, m)
				}
			})
		})
	}
}

// Defect D: once the process is logged in, C_Login answers CKR_USER_ALREADY_LOGGED_IN to any PIN, so guesses
// cost nothing but a digest comparison. After a few wrong PINs in a row, attempts wait, with a warning naming the
// mount. Issue 19 (6): during the wait the right PIN from a new connection (a config/hsm write) is refused exactly
// as a wrong one, or the wait would tell the guesser which guess was right; a connection that logged in with the
// PIN before is never held up, even when a re-initialisation logged the process out meanwhile.
func TestWrongPINsAreSlowedDown(t *testing.T) {
	onEveryToken(t, 1, func(t *testing.T, tk tokentest.Token, tok *Token) {
		defer endLoginWaits(tok) // later tests open the token anew
		op := anyServedOp(t, tok)
		id := op.version(t)
		cfg := configFor(tk, 1)
		var logs bytes.Buffer
		var logMu sync.Mutex
		log := hclog.New(&hclog.LoggerOptions{Output: writerFunc(func(p []byte) (int, error) {
			logMu.Lock()
			defer logMu.Unlock()
			return logs.Write(p)
		}), Level: hclog.Warn})
		bad := cfg
		bad.Mount = "cmk-guesser/"
		for i := 1; i <= freeLoginFailures; i++ {
			bad.PIN = fmt.Sprintf("guess-%d", i) // at most 8 characters: opencryptoki's limit
			if _, err := Open(bad, log); !errors.Is(err, ErrPINIncorrect) || errors.Is(err, ErrLoginBackoff) {
				t.Fatalf("wrong PIN %d: %v", i, err)
			}
		}
		start := time.Now()
		for tries := 0; time.Since(start) < 200*time.Millisecond; tries++ {
			bad.PIN = fmt.Sprintf("fast-%d", tries)
			if _, err := Open(bad, log); !errors.Is(err, ErrLoginBackoff) {
				t.Fatalf("guess during the wait: %v", err)
			}
		}
		bad.PIN = "fast-x"
		_, wrongErr := Open(bad, log)
		right := cfg
		right.Mount = "cmk-guesser/"
		good, rightErr := Open(right, log)
		if rightErr == nil {
			good.Close()
			t.Fatal("the right PIN from a new connection was accepted during the wait: the wait tells a guesser the PIN")
		}
		if rightErr.Error() != wrongErr.Error() {
			t.Fatalf("during the wait the right PIN is answered %q, a wrong one %q", rightErr, wrongErr)
		}
		// The mount that knows the PIN reconnects during the wait, after a re-initialisation logged it out.
		tok.pool.reinitialize()
		if _, err := op.use(id); err != nil {
			t.Fatalf("a connection that knows the PIN, during another mount's wait: %v", err)
		}
		logMu.Lock()
		out := logs.String()
		logMu.Unlock()
		if !strings.Contains(out, "cmk-guesser/") || strings.Contains(out, "guess-") || strings.Contains(out, cfg.PIN) {
			t.Fatalf("lockout warning should name the mount and no PIN:\n%s", out)
		}
	})
}

// endLoginWaits forgets wrong PINs counted on tok's module, as the end of their wait would.
func endLoginWaits(tok *Token) {
	tok.mod.logins.mu.Lock()
	clear(tok.mod.logins.failing)
	tok.mod.logins.mu.Unlock()
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// Defect E: closing the last connection to the module while operations run used to unload the library under
// them (SIGSEGV of the whole plugin). Calls in flight finish first; later ones fail with ErrUnavailable.
func TestCloseUnderLoad(t *testing.T) {
	onEveryTokenUnopened(t, func(t *testing.T, tk tokentest.Token) {
		cfg := configFor(tk, 4)
		first, err := Open(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		op := anyServedOp(t, first)
		id := op.version(t)
		if _, err := op.use(id); err != nil {
			t.Fatal(err)
		}
		first.Close()
		for round := 0; round < 40; round++ {
			tok, err := Open(cfg, nil) // the last user of the module: Close unloads it
			if err != nil {
				t.Fatal(err)
			}
			op.tok = tok
			var ops atomic.Int64
			var wg sync.WaitGroup
			stop := make(chan struct{})
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						if _, err := op.use(id); err != nil && !errors.Is(err, ErrUnavailable) {
							t.Errorf("call during close: %v", err)
							return
						}
						ops.Add(1)
					}
				}()
			}
			for ops.Load() < 20 {
				time.Sleep(time.Millisecond)
			}
			tok.Close()
			time.Sleep(5 * time.Millisecond) // calls keep coming after the close
			close(stop)
			wg.Wait()
		}
		tok, err := Open(cfg, nil) // the module loads again
		if err != nil {
			t.Fatal(err)
		}
		op.tok = tok
		if _, err := tok.DestroyKeys(context.Background(), id); err != nil {
			t.Fatal(err)
		}
		tok.Close()
	})
}
