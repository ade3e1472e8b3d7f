//go:build cmkfaults

package hsm

import (
	"context"
	"sync"
	"testing"
	"time"
)

// Every session of the pool has a call in flight at once: nothing in the engine's path to the token (a lock held
// across a call, a per-key queue, one session per key) makes concurrent operations on one key wait for each
// other. On a network HSM each call is a round trip, and anything serialised there caps the engine at one call
// per round trip. The calls are held inside the module, as a slow HSM holds them, until all are there.
func TestEveryPoolSessionHasACallInFlight(t *testing.T) {
	const pool = 8
	tok, _ := newToken(t, pool)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	// The key's handle is known, as in steady use: the held calls are the encryptions themselves.
	if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, GCMNonceSize), nil, []byte("warm")); err != nil {
		t.Fatal(err)
	}
	f := injectFaults(t, tok)
	release := f.hold("EncryptInit")
	var wg sync.WaitGroup
	errs := make(chan error, pool)
	for i := 0; i < pool; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, err := tok.EncryptGCM(ctx, id, make([]byte, GCMNonceSize), nil, []byte("x"))
			errs <- err
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for f.waiting("EncryptInit") < pool && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	inFlight := f.waiting("EncryptInit")
	release()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if inFlight != pool {
		t.Fatalf("%d of %d encryptions on one key reached the token at once on a pool of %d sessions", inFlight, pool, pool)
	}
}

// The network-HSM model waits its delay before every call and leaves the answer as the module gave it.
func TestLatentCallsDelayAndPassThrough(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	nonce := make([]byte, GCMNonceSize)
	if _, _, err := tok.EncryptGCM(ctx, id, nonce, nil, []byte("warm")); err != nil { // the handle is known
		t.Fatal(err)
	}
	f := injectFaults(t, tok) // counts the calls that reach the module
	var mu sync.Mutex
	var waits []time.Duration
	m := tok.mod
	m.mu.Lock()
	m.calls = latentCalls{pkcs11API: f, delay: time.Millisecond, sleep: func(d time.Duration) {
		mu.Lock()
		waits = append(waits, d)
		mu.Unlock()
	}}
	m.mu.Unlock() // injectFaults' cleanup puts the module's own calls back
	_, sealed, err := tok.EncryptGCM(ctx, id, nonce, nil, []byte("through a network"))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := tok.DecryptGCM(ctx, id, nonce, nil, sealed)
	if err != nil || string(pt) != "through a network" {
		t.Fatalf("decrypt through the model: %q, %v", pt, err)
	}
	mu.Lock()
	n := len(waits)
	mu.Unlock()
	if n < 4 { // C_EncryptInit, C_Encrypt, C_DecryptInit, C_Decrypt at least
		t.Fatalf("%d waits for an encryption and a decryption", n)
	}
	for _, d := range waits {
		if d != time.Millisecond {
			t.Fatalf("a call waited %s, not the model's delay", d)
		}
	}
	// As the plugin's build has it: time.Sleep itself.
	m.mu.Lock()
	m.calls = latentCalls{pkcs11API: f, delay: time.Millisecond}
	m.mu.Unlock()
	if _, _, err := tok.EncryptGCM(ctx, id, nonce, nil, []byte("asleep")); err != nil {
		t.Fatal(err)
	}
}
