package keys

import (
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// heldRNG answers C_GenerateRandom only when a test lets it: each call waits for a value on gate.
type heldRNG struct {
	mu    sync.Mutex
	calls int
	gate  chan error
	asked chan struct{} // a value for every call, as it is made
}

func (r *heldRNG) GenerateRandom(ctx context.Context, n int) ([]byte, error) {
	r.mu.Lock()
	r.calls++
	r.mu.Unlock()
	r.asked <- struct{}{}
	select {
	case err := <-r.gate:
		if err != nil {
			return nil, err
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b, nil
}

func (r *heldRNG) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

// The next block is fetched before the nonces run out, and draws go on while it is on its way: no encryption
// waits for the HSM's round trip, and none holds the source's lock across it.
func TestNoncesFetchAheadWithoutHoldingDraws(t *testing.T) {
	rng := &heldRNG{gate: make(chan error, 8), asked: make(chan struct{}, 8)}
	n := &Nonces{source: IVSourceHSM, rng: rng}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // a draw that waits wrongly fails
	defer cancel()
	rng.gate <- nil // the first block
	seen := map[string]bool{}
	perBlock := nonceBlock / hsm.GCMNonceSize
	for i := 0; i < perBlock; i++ { // the whole first block; the second fetch is held (no value on gate)
		nonce, err := n.next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if seen[string(nonce)] {
			t.Fatalf("nonce %d handed out twice", i)
		}
		seen[string(nonce)] = true
	}
	for asked := 0; asked < 2; asked++ {
		select {
		case <-rng.asked:
		case <-time.After(10 * time.Second):
			t.Fatalf("%d fetches after drawing one block: the next block was not asked for before the nonces ran out", asked)
		}
	}
	rng.gate <- nil // the second block arrives
	for i := 0; i < perBlock; i++ {
		nonce, err := n.next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if seen[string(nonce)] {
			t.Fatalf("nonce handed out twice after a fetch")
		}
		seen[string(nonce)] = true
	}
	rng.gate <- nil // the third, asked for at the low-water mark of the second
}

// A failed fetch fails the draws that waited for it; the next draw asks again.
func TestNoncesFetchFailureIsReportedAndRetried(t *testing.T) {
	rng := &heldRNG{gate: make(chan error, 8), asked: make(chan struct{}, 8)}
	n := &Nonces{source: IVSourceHSM, rng: rng}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	broken := errors.New("device error")
	rng.gate <- broken
	if _, err := n.next(ctx); !errors.Is(err, broken) {
		t.Fatalf("draw after a failed fetch: %v", err)
	}
	rng.gate <- nil
	if _, err := n.next(ctx); err != nil {
		t.Fatalf("draw after the HSM came back: %v", err)
	}
	if rng.count() < 2 {
		t.Fatalf("%d fetches: the failed one was not retried", rng.count())
	}
	rng.gate <- nil
}
