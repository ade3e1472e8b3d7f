//go:build cmkfaults

package hsm

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// heard is an Observer that keeps what it hears.
type heard struct {
	mu         sync.Mutex
	calls      map[string]int // "op result"
	recoveries map[string]int
}

func (h *heard) ObserveCall(op string, _ time.Duration, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	result := "ok"
	if err != nil {
		result = "error"
	}
	h.calls[op+" "+result]++
}

func (h *heard) ObserveRecovery(class string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recoveries[class]++
}

func (h *heard) count(m map[string]int, k string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return m[k]
}

// Every operation is heard once, whatever recoveries it took, and each recovery by its class.
func TestObserverHearsEveryCallAndRecovery(t *testing.T) {
	h := &heard{calls: map[string]int{}, recoveries: map[string]int{}}
	tok, _ := newToken(t, 2, func(c *Config) { c.Observer = h })
	ctx := context.Background()
	aes := newVersion(t, tok, 256)
	f := injectFaults(t, tok)
	encrypt := func() error { _, _, err := tok.EncryptGCM(ctx, aes, make([]byte, 12), nil, []byte("x")); return err }

	if err := encrypt(); err != nil {
		t.Fatal(err)
	}
	f.fail(pkcs11.CKR_SESSION_HANDLE_INVALID, 1, "EncryptInit")
	if err := encrypt(); err != nil {
		t.Fatal(err)
	}
	f.fail(pkcs11.CKR_USER_NOT_LOGGED_IN, 1, "EncryptInit")
	if err := encrypt(); err != nil {
		t.Fatal(err)
	}
	f.fail(pkcs11.CKR_FUNCTION_FAILED, 1, "EncryptInit")
	if err := encrypt(); err == nil {
		t.Fatal("an injected CKR_FUNCTION_FAILED did not fail the call")
	}
	if got := h.count(h.calls, "AES-GCM encrypt ok"); got != 3 {
		t.Errorf("heard %d successful encryptions, want 3 (one per call, recoveries inside)", got)
	}
	if got := h.count(h.calls, "AES-GCM encrypt error"); got != 1 {
		t.Errorf("heard %d failed encryptions, want 1", got)
	}
	for _, class := range []string{"session", "login"} {
		if got := h.count(h.recoveries, class); got != 1 {
			t.Errorf("heard %d %s recoveries, want 1", got, class)
		}
	}
}

// Check passes on a serving token and names a login the token keeps refusing to honour.
func TestCheckNamesALostLogin(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	if err := tok.Check(ctx); err != nil {
		t.Fatalf("check of a serving token: %v", err)
	}
	f := injectFaults(t, tok)
	f.fail(pkcs11.CKR_USER_NOT_LOGGED_IN, -1, "GetSessionInfo")
	if err := tok.Check(ctx); !errors.Is(err, ErrNotLoggedIn) {
		t.Fatalf("check of sessions that stay logged out: %v, want ErrNotLoggedIn", err)
	}
	f.clear()
	if err := tok.Check(ctx); err != nil {
		t.Fatalf("check after the login is back: %v", err)
	}
	if got := tok.SessionsInUse(); got != 0 {
		t.Fatalf("%d sessions in use after the calls returned", got)
	}
}
