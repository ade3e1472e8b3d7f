package hsm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
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
