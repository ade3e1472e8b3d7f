//go:build cmkfaults

package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// injectFaults routes tok's module through a faultyCalls until the test ends.
func injectFaults(t *testing.T, tok *Token) *faultyCalls {
	t.Helper()
	m := tok.mod
	m.mu.Lock()
	real := m.calls
	f := newFaultyCalls(real)
	m.calls = f
	m.mu.Unlock()
	t.Cleanup(func() {
		m.mu.Lock()
		m.calls = real
		m.mu.Unlock()
	})
	return f
}

// recoverable are the error classes of the recovery rules, each with what recovering from it must involve.
var recoverable = []struct {
	rv        uint
	name      string
	recovered func(f *faultyCalls, tok *Token, genBefore uint64, before map[string]int) error
}{
	{pkcs11.CKR_SESSION_HANDLE_INVALID, "session handle invalid", newSessionOpened},
	{pkcs11.CKR_SESSION_CLOSED, "session closed", newSessionOpened},
	{pkcs11.CKR_USER_NOT_LOGGED_IN, "user not logged in", loggedInAgain},
	{pkcs11.CKR_OBJECT_HANDLE_INVALID, "object handle invalid", nil},
	{pkcs11.CKR_KEY_HANDLE_INVALID, "key handle invalid", nil},
	{pkcs11.CKR_DEVICE_ERROR, "device error", moduleReinitialised},
	{pkcs11.CKR_DEVICE_REMOVED, "device removed", moduleReinitialised},
	{pkcs11.CKR_TOKEN_NOT_PRESENT, "token not present", moduleReinitialised},
	{pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, "cryptoki not initialized", moduleReinitialised},
}

func newSessionOpened(f *faultyCalls, _ *Token, _ uint64, before map[string]int) error {
	if f.count("OpenSession") <= before["OpenSession"] {
		return errors.New("no new session was opened in place of the failed one")
	}
	return nil
}

func loggedInAgain(f *faultyCalls, _ *Token, _ uint64, before map[string]int) error {
	if f.count("Login") <= before["Login"] {
		return errors.New("C_Login was not called again")
	}
	return nil
}

func moduleReinitialised(f *faultyCalls, tok *Token, genBefore uint64, before map[string]int) error {
	if tok.mod.generation.Load() <= genBefore {
		return errors.New("the module was not re-initialised")
	}
	return loggedInAgain(f, tok, genBefore, before)
}

// Every error class of the recovery rules, injected into the first PKCS#11 call of every kind of operation on
// the real token: the operation recovers within the call, the recovery did what the rule says, and the next
// call succeeds with no fault left.
func TestEveryRecoverableFaultIsRecovered(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	aes := newVersion(t, tok, 256)
	ec := randomID(t)
	if _, err := tok.GenerateVersion(ctx, ECDSAP256, ec, "cmk/test/ec/v1", HMACKeySize); err != nil {
		t.Fatal(err)
	}
	nonce, sealed, err := tok.EncryptGCM(ctx, aes, make([]byte, 12), nil, []byte("kept"))
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("signed"))
	ops := []struct {
		name, firstCall string
		run             func() error
	}{
		{"encrypt", "EncryptInit", func() error { _, _, err := tok.EncryptGCM(ctx, aes, make([]byte, 12), nil, []byte("x")); return err }},
		{"decrypt", "DecryptInit", func() error {
			pt, err := tok.DecryptGCM(ctx, aes, nonce, nil, sealed)
			if err == nil && string(pt) != "kept" {
				return fmt.Errorf("decrypted %q", pt)
			}
			return err
		}},
		{"sign", "SignInit", func() error { _, err := tok.SignECDSA(ctx, ec, digest[:]); return err }},
		{"hmac", "SignInit", func() error { _, err := tok.HMAC(ctx, aes, crypto.SHA256, []byte("x")); return err }},
		{"random", "GenerateRandom", func() error { _, err := tok.GenerateRandom(ctx, 32); return err }},
		{"generate", "GenerateKey", func() error {
			_, err := tok.GenerateVersion(ctx, AES256, randomID(t), "cmk/test/gen/v1", 0)
			return err
		}},
	}
	f := injectFaults(t, tok)
	for _, op := range ops {
		for _, c := range recoverable {
			t.Run(op.name+"/"+strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
				before := map[string]int{"OpenSession": f.count("OpenSession"), "Login": f.count("Login")}
				gen := tok.mod.generation.Load()
				f.fail(c.rv, 1, op.firstCall)
				if err := op.run(); err != nil {
					t.Fatalf("not recovered from %s: %v", c.name, err)
				}
				if f.count(op.firstCall) < 2 {
					t.Fatalf("%s was not repeated after %s", op.firstCall, c.name)
				}
				if c.recovered != nil {
					if err := c.recovered(f, tok, gen, before); err != nil {
						t.Fatal(err)
					}
				}
				if err := op.run(); err != nil {
					t.Fatalf("next call after recovery: %v", err)
				}
			})
		}
	}
}

// A device that stays gone: calls fail with ErrUnavailable and a message naming the fault; while the backoff
// runs they fail without touching the library; when the device is back, calls succeed again by themselves.
func TestLostDeviceFailsFastAndRecovers(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	nonce, sealed, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("kept"))
	if err != nil {
		t.Fatal(err)
	}
	f := injectFaults(t, tok)
	f.fail(pkcs11.CKR_DEVICE_REMOVED, -1, "EncryptInit", "DecryptInit", "GetSlotList", "OpenSession")
	_, _, err = tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x"))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "CKR_DEVICE_REMOVED") {
		t.Fatalf("encrypt with the device gone: %v", err)
	}
	if ok, last := tok.Status(); ok || last == nil {
		t.Fatalf("status with the device gone: connected %v, last error %v", ok, last)
	}
	calls := f.total()
	for range 20 {
		if _, err := tok.DecryptGCM(ctx, id, nonce, nil, sealed); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("decrypt with the device gone: %v", err)
		}
	}
	if n := f.total() - calls; n > 2 {
		t.Fatalf("%d PKCS#11 calls during the backoff: calls should fail fast", n)
	}
	f.clear()
	deadline := time.Now().Add(time.Minute)
	for {
		pt, err := tok.DecryptGCM(ctx, id, nonce, nil, sealed)
		if err == nil {
			if string(pt) != "kept" {
				t.Fatalf("decrypted %q", pt)
			}
			break
		}
		if !errors.Is(err, ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("not recovered after the device came back: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if ok, _ := tok.Status(); !ok {
		t.Fatal("status not connected after recovery")
	}
}

// A recoverable fault that comes back on the repeated call means the token is not serving now: ErrUnavailable
// (503), never a bare error (500); the call after that succeeds.
func TestRepeatedFaultIsUnavailable(t *testing.T) {
	tok, _ := newToken(t, 1)
	id := newVersion(t, tok, 256)
	f := injectFaults(t, tok)
	for _, rv := range []uint{pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_DEVICE_ERROR} {
		f.fail(rv, 2, "EncryptInit")
		_, _, err := tok.EncryptGCM(context.Background(), id, make([]byte, 12), nil, []byte("x"))
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("%#x twice: %v", rv, err)
		}
		deadline := time.Now().Add(time.Minute) // a device fault leaves a reconnection backoff behind
		for {
			_, _, err = tok.EncryptGCM(context.Background(), id, make([]byte, 12), nil, []byte("x"))
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after %#x twice, not recovered: %v", rv, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// A fault that is no recovery case (here a mechanism the token refuses) is not repeated: it fails at once with
// its own name.
func TestOtherFaultsAreNotRetried(t *testing.T) {
	tok, _ := newToken(t, 1)
	id := newVersion(t, tok, 256)
	f := injectFaults(t, tok)
	f.fail(pkcs11.CKR_MECHANISM_INVALID, 1, "EncryptInit")
	_, _, err := tok.EncryptGCM(context.Background(), id, make([]byte, 12), nil, []byte("x"))
	if !errors.Is(err, ErrMechanismUnsupported) || f.count("EncryptInit") != 1 {
		t.Fatalf("got %v after %d calls", err, f.count("EncryptInit"))
	}
}

// Concurrent operations while random faults of every recovery class, device faults among them, keep forcing the
// module to be re-initialised: the process survives (the race detector watches), no call of a finished
// generation reaches the library, every ciphertext and signature issued decrypts or verifies afterwards with the
// right key, and no valid ciphertext is ever refused as tampered during the faults.
func TestNoCrashNoLossUnderFaultStorm(t *testing.T) {
	tok, _ := newToken(t, 4)
	ctx := context.Background()
	aesIDs := [][]byte{newVersion(t, tok, 256), newVersion(t, tok, 256), newVersion(t, tok, 128)}
	ecID := randomID(t)
	ecPub, err := tok.GenerateVersion(ctx, ECDSAP256, ecID, "cmk/test/storm-ec/v1", 0)
	if err != nil {
		t.Fatal(err)
	}
	type sealed struct {
		id, nonce, ct, pt []byte
	}
	type signed struct{ digest, sig []byte }
	var mu sync.Mutex
	var issued []sealed
	var signatures []signed
	var refused atomic.Int64
	f := injectFaults(t, tok)
	f.mu.Lock()
	f.rate = 0.03
	f.mu.Unlock()
	gen0 := tok.mod.generation.Load()
	deadline := time.Now().Add(4 * time.Second)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; time.Now().Before(deadline); i++ {
				id := aesIDs[(g+i)%len(aesIDs)]
				pt := []byte(fmt.Sprintf("%d-%d", g, i))
				nonce := make([]byte, GCMNonceSize)
				copy(nonce, pt)
				used, ct, err := tok.EncryptGCM(ctx, id, nonce, nil, pt)
				if err == nil {
					mu.Lock()
					issued = append(issued, sealed{id, used, ct, pt})
					mu.Unlock()
					got, err := tok.DecryptGCM(ctx, id, used, nil, ct)
					if errors.Is(err, ErrInvalidCiphertext) {
						refused.Add(1)
					} else if err == nil && !bytes.Equal(got, pt) {
						t.Errorf("decrypted %q, want %q", got, pt)
					}
				} else if !errors.Is(err, ErrUnavailable) {
					t.Errorf("encrypt: %v", err)
				}
				d := sha256.Sum256(pt)
				if sig, err := tok.SignECDSA(ctx, ecID, d[:]); err == nil {
					mu.Lock()
					signatures = append(signatures, signed{d[:], sig})
					mu.Unlock()
				} else if !errors.Is(err, ErrUnavailable) {
					t.Errorf("sign: %v", err)
				}
			}
		}(g)
	}
	wg.Wait()
	f.mu.Lock()
	f.rate = 0
	f.mu.Unlock()
	if n := tok.mod.generation.Load() - gen0; n < 3 {
		t.Fatalf("only %d re-initialisations: the storm did not exercise the module's lifetime", n)
	}
	if n := refused.Load(); n > 0 {
		t.Errorf("%d valid ciphertexts refused as tampered during the faults", n)
	}
	lost := 0
	for _, s := range issued {
		var got []byte
		var err error
		for attempt := 0; attempt < 20; attempt++ {
			if got, err = tok.DecryptGCM(ctx, s.id, s.nonce, nil, s.ct); !errors.Is(err, ErrUnavailable) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil || !bytes.Equal(got, s.pt) {
			lost++
		}
	}
	pub := ecPub.(*ecdsa.PublicKey)
	badSigs := 0
	for _, s := range signatures {
		r, ss := new(big.Int).SetBytes(s.sig[:32]), new(big.Int).SetBytes(s.sig[32:])
		if !ecdsa.Verify(pub, s.digest, r, ss) {
			badSigs++
		}
	}
	t.Logf("%d ciphertexts and %d signatures issued over %d re-initialisations; %d faults injected in %d calls",
		len(issued), len(signatures), tok.mod.generation.Load()-gen0, f.injected(), f.total())
	if lost > 0 || badSigs > 0 {
		t.Fatalf("%d of %d ciphertexts lost, %d of %d signatures invalid", lost, len(issued), badSigs, len(signatures))
	}
}

// SoftHSM 2.6 answers a GCM tag mismatch with CKR_GENERAL_ERROR, which is also what a failing device says. One
// such answer on a valid ciphertext is a fault: asked again on another session, the ciphertext decrypts. The same
// answer twice is a bad ciphertext.
func TestAmbiguousRefusalIsAskedAgain(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	nonce, ct, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("valid"))
	if err != nil {
		t.Fatal(err)
	}
	f := injectFaults(t, tok)
	f.fail(pkcs11.CKR_GENERAL_ERROR, 1, "Decrypt")
	if pt, err := tok.DecryptGCM(ctx, id, nonce, nil, ct); err != nil || string(pt) != "valid" {
		t.Fatalf("valid ciphertext after one ambiguous refusal: %q, %v", pt, err)
	}
	f.fail(pkcs11.CKR_GENERAL_ERROR, 2, "Decrypt")
	if _, err := tok.DecryptGCM(ctx, id, nonce, nil, ct); !errors.Is(err, ErrInvalidCiphertext) {
		t.Fatalf("the same refusal twice: %v", err)
	}
}

// Defect F: object creation used to be serialised by one lock for the whole process, which ignored cancellation:
// one slow key-pair generation (RSA-4096 takes seconds) held up key creation on every other token and mount. It
// came back with SoftHSM's store guard, one per module (issue 19, 7). The generation is held here inside the
// library call, so inside every lock it takes (the module's, its connection's, its token's store guard and
// object-write turn): another token's creations go on meanwhile, and on the same token, where SoftHSM's object
// store needs writes and searches apart, a waiting creation or search gives up when its context ends.
func TestSlowKeyCreationBlocksNoOtherToken(t *testing.T) {
	slow, _ := newToken(t, 2)
	other, _ := newToken(t, 2)
	ctx := context.Background()
	for _, tok := range []*Token{slow, other} { // probe both tokens before the module is held
		if _, err := tok.Capabilities(ctx); err != nil {
			t.Fatal(err)
		}
	}
	onSlow, onOther := newVersion(t, slow, 256), newVersion(t, other, 256)
	f := injectFaults(t, slow) // the module is shared: other's calls pass through f as well
	release := holdInside(t, f, "GenerateKeyPair")
	done, finished := make(chan error, 1), make(chan struct{})
	go func() {
		defer close(finished)
		_, err := slow.GenerateVersion(ctx, RSA4096, randomID(t), "cmk/test/slow/v1", 0)
		done <- err
	}()
	t.Cleanup(func() { release(); <-finished }) // a failed test still waits for the generation to end
	for f.waiting("GenerateKeyPair") == 0 {
		time.Sleep(time.Millisecond)
	}
	if slow.mod.storeRaces && slow.pool.tokenState().store.TryAcquire(1) {
		t.Fatal("the held generation is not inside its token's store guard")
	}
	other.handles.clear() // the encrypt looks its key up: a search on the other token's store
	encrypted := make(chan error, 1)
	go func() {
		_, _, err := other.EncryptGCM(ctx, onOther, make([]byte, GCMNonceSize), nil, []byte("x"))
		encrypted <- err
	}()
	whileHeld(t, "an encrypt on another token", encrypted, release)
	created := make(chan error, 1)
	go func() {
		_, err := other.GenerateVersion(ctx, AES256, randomID(t), "cmk/test/other/v1", 0)
		created <- err
	}()
	whileHeld(t, "a key creation on another token", created, release)
	if slow.quirks().serialObjectWrites {
		short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		_, err := slow.GenerateVersion(short, AES256, randomID(t), "cmk/test/waiting/v1", 0)
		cancel()
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "context deadline exceeded") {
			t.Fatalf("creation waiting behind a slow one on the same token, with its context ended: %v", err)
		}
	}
	if slow.mod.storeRaces {
		// A search on the same token waits for the generation to leave the store, until its context ends.
		slow.handles.clear()
		searched := make(chan error, 1)
		go func() {
			short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			defer cancel()
			_, _, err := slow.EncryptGCM(short, onSlow, make([]byte, GCMNonceSize), nil, []byte("x"))
			if err == nil || !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "context deadline exceeded") {
				err = fmt.Errorf("a search waiting for the store, with its context ended: %v", err)
			} else {
				err = nil
			}
			searched <- err
		}()
		whileHeld(t, "a search on the same token with its context ended", searched, release)
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// Issue 19 (7): an encrypt with a cached handle waited 6.1 s on a third mount while a second mount rewrote its
// config/hsm during a slow key generation: connecting and closing took the module's lock for writing, which waits
// for the generation to leave the library, and every new call waits behind it. A mount whose handles are cached
// now waits for no other mount's configuration or key creation, on every token of the matrix.
func TestSlowGenerationHoldsUpNoOtherMount(t *testing.T) {
	onEveryToken(t, 1, func(t *testing.T, tk tokentest.Token, slow *Token) {
		ctx := context.Background()
		caps, err := slow.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pair := RSA2048
		if ok, _ := caps.Serves(ECDSAP256); ok {
			pair = ECDSAP256
		}
		cached := openToken(t, tk, 1) // the third mount: its handle is cached
		op := anyServedOp(t, cached)
		id := op.version(t)
		if _, err := op.use(id); err != nil {
			t.Fatal(err)
		}
		configured, err := Open(configFor(tk, 1), nil) // the second mount, whose configuration is rewritten
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(configured.Close)
		f := injectFaults(t, slow)
		release := holdInside(t, f, "GenerateKeyPair")
		slowID := randomID(t)
		done, finished := make(chan error, 1), make(chan struct{})
		go func() {
			defer close(finished)
			_, err := slow.GenerateVersion(ctx, pair, slowID, "cmk/test/slow-pair", 0)
			done <- err
		}()
		t.Cleanup(func() { release(); <-finished }) // a failed test still waits for the generation to end
		for f.waiting("GenerateKeyPair") == 0 {
			time.Sleep(time.Millisecond)
		}
		rewritten := make(chan error, 1)
		go func() { // config/hsm written again: a new connection replaces the old one
			tok, err := Open(configFor(tk, 1), nil)
			if err == nil {
				configured.Close()
				tok.Close()
			}
			rewritten <- err
		}()
		for waiting := false; !waiting; { // until the rewrite is done, or waits for the module's lock
			select {
			case err := <-rewritten:
				rewritten <- err
				waiting = true
			default:
				if slow.mod.mu.TryRLock() {
					slow.mod.mu.RUnlock()
					time.Sleep(time.Millisecond)
				} else {
					waiting = true
				}
			}
		}
		used := make(chan error, 1)
		go func() {
			_, err := op.use(id)
			used <- err
		}()
		whileHeld(t, "a cached-handle operation on a third mount", used, release)
		whileHeld(t, "another mount's configuration write", rewritten, release)
		release()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if _, err := slow.DestroyKeys(ctx, slowID); err != nil {
			t.Fatal(err)
		}
	})
}

// holdInside makes calls of fn wait inside the library call until the returned release (which the test's end calls
// too) is called.
func holdInside(t *testing.T, f *faultyCalls, fn string) (release func()) {
	var once sync.Once
	r := f.hold(fn)
	release = func() { once.Do(r) }
	t.Cleanup(release)
	return release
}

// whileHeld fails the test unless done gives nil while a call is held; a call that never returns before the
// release is found by a generous deadline, after which the held call is released.
func whileHeld(t *testing.T, what string, done chan error, release func()) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			release()
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(30 * time.Second):
		release()
		t.Fatalf("%s waited for a held call of another mount", what)
	}
}

// The soak's first 10-minute run: SoftHSM answered CKR_TEMPLATE_INCONSISTENT to the AES template it takes every
// other time (a 500 on a rotation), and a passing refusal of the key-pair template was learnt as the token's
// need for good, after which its EC keys were made without the flags denying decryption. Now such an answer is
// repeated and nothing is learnt from it.
func TestPassingTemplateRefusalIsRepeatedNotLearnt(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	f := injectFaults(t, tok)
	f.fail(pkcs11.CKR_TEMPLATE_INCONSISTENT, 1, "GenerateKey")
	if _, err := tok.GenerateVersion(ctx, AES256, randomID(t), "cmk/faults/aes", 0); err != nil {
		t.Fatalf("a passing template refusal of an AES key: %v", err)
	}
	f.fail(pkcs11.CKR_TEMPLATE_INCONSISTENT, 1, "GenerateKeyPair")
	id := randomID(t)
	if _, err := tok.GenerateVersion(ctx, ECDSAP256, id, "cmk/faults/ec", 0); err != nil {
		t.Fatalf("a passing template refusal of an EC pair: %v", err)
	}
	if learnt := tok.pool.tokenState().pairTemplates.Load(); learnt != 0 {
		t.Fatalf("a passing refusal was learnt as the token's need: %b", learnt)
	}
	objs, err := tok.ListObjects(ctx, "cmk/faults/ec")
	if err != nil || len(objs) != 1 {
		t.Fatalf("objects %v, %v", objs, err)
	}
	if u := strings.Join(objs[0].Usage, ","); u != "sign" {
		t.Fatalf("the EC key's usage is %q, want sign only", u)
	}
}

// abortDeadlocked ends the run when goroutines of a test wait for each other for good: the test's cleanups would
// wait too (closing its token needs the locks they hold), so it prints every goroutine's stack, stops the matrix's
// daemons, removes the run's tokens and exits.
func abortDeadlocked(t *testing.T, what string) {
	buf := make([]byte, 1<<20)
	fmt.Fprintf(os.Stderr, "--- FAIL: %s: deadlock: %s\n%s\n", t.Name(), what, buf[:runtime.Stack(buf, true)])
	for _, p := range matrix {
		p.Close()
	}
	os.RemoveAll(testDir)
	os.Exit(1)
}

// The fourth 10-minute soak: every request hung for three minutes, until the kill half-way replaced the plugin
// process. A key-pair generation that SoftHSM refused once with a template error asked for the token's identity,
// which took the pool's lock, from inside its library call, while another request's reconnection held that lock
// and waited for every call to leave the library. Code inside a library call takes no pool lock now.
func TestReconnectionDuringATemplateRefusalDoesNotDeadlock(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	f := injectFaults(t, tok)
	f.fail(pkcs11.CKR_TEMPLATE_INCONSISTENT, 1, "GenerateKeyPair")
	release := f.hold("GenerateKeyPair")
	generated := make(chan error, 1)
	go func() {
		_, err := tok.GenerateVersion(ctx, ECDSAP256, randomID(t), "cmk/faults/deadlock", 0)
		generated <- err
	}()
	for f.waiting("GenerateKeyPair") == 0 { // the generation is inside the library call
		time.Sleep(time.Millisecond)
	}
	// Another request meets a device fault: its reconnection takes the pool's lock and waits for the library.
	tok.pool.mu.Lock()
	s := session{gen: tok.pool.gen, epoch: tok.pool.epoch.Load()}
	tok.pool.mu.Unlock()
	tok.pool.markLost(s, true, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))
	reconnected := make(chan error, 1)
	go func() { reconnected <- tok.pool.ensure() }()
	for tok.pool.mu.TryLock() { // until the reconnection holds the lock
		tok.pool.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
	release() // the call comes back refused, while the reconnection waits for it to leave the library
	deadline := time.After(time.Minute)
	for _, ch := range []chan error{generated, reconnected} {
		select {
		case err := <-ch:
			if err != nil {
				t.Errorf("after a template refusal during a reconnection: %v", err)
			}
		case <-deadline:
			abortDeadlocked(t, "a reconnection and a call inside the library wait for each other")
		}
	}
}

// The soak's first 10-minute run: a search found nothing, for several seconds, for a key pair made a moment earlier
// and present on the token. A search that finds nothing is asked again on a re-initialised module before the
// object is called missing, and at most once per pause per token, so that material really gone does not reset the
// connection on every request.
func TestUnseenObjectIsLookedForAgain(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	f := injectFaults(t, tok)
	gen := tok.mod.generation.Load()
	tok.handles.clear()
	f.hideFromSearches(1)
	if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x")); err != nil {
		t.Fatalf("an object the first search missed: %v", err)
	}
	if tok.mod.generation.Load() == gen {
		t.Fatal("the module was not re-initialised before the object was looked for again")
	}
	if _, err := tok.DestroyKeys(ctx, id); err != nil {
		t.Fatal(err)
	}
	gen = tok.mod.generation.Load()
	for i := 0; i < 5; i++ {
		if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x")); !errors.Is(err, ErrObjectNotFound) {
			t.Fatalf("destroyed material: %v", err)
		}
	}
	if g := tok.mod.generation.Load(); g > gen+1 {
		t.Fatalf("%d re-initialisations for 5 requests on destroyed material", g-gen)
	}
}
