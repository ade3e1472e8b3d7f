package keys

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// IV sources for GCM nonces, set by config/hsm's iv_source.
const (
	IVSourceHSM = "hsm" // the token's RNG (C_GenerateRandom), fetched in blocks
	IVSourceOS  = "os"  // the operating system's RNG; a nonce needs uniqueness, not secrecy
)

// nonceBlock is how many bytes one C_GenerateRandom call fetches: 256 nonces per HSM round trip.
const nonceBlock = 256 * hsm.GCMNonceSize

// nonceLowWater is when the next block is fetched: once fewer nonces than this remain, in the background, so that
// under load no encryption waits for the round trip and no lock is held across it (on a network HSM a draw that
// held the lock through C_GenerateRandom stalled every encryption of the connection for a round trip).
const nonceLowWater = 128 * hsm.GCMNonceSize

// Nonces hands out 96-bit random GCM nonces for one connection to the token.
type Nonces struct {
	source string
	rng    interface {
		GenerateRandom(ctx context.Context, n int) ([]byte, error)
	}
	mu       sync.Mutex
	buf      []byte
	fetching chan struct{} // closed when the block being fetched has arrived or failed; nil when none is
	fetchErr error         // why the last fetch failed, for the draws that waited on it
}

// NewNonces is the nonce source of a connection to tok, drawing from source (IVSourceHSM when empty).
func NewNonces(source string, tok Crypto) *Nonces {
	if source == "" {
		source = IVSourceHSM
	}
	return &Nonces{source: source, rng: tok}
}

// Next is the next nonce for an AES-GCM encryption with the token, for a use outside a key's (a health check).
func (n *Nonces) Next(ctx context.Context) ([]byte, error) { return n.next(ctx) }

func (n *Nonces) next(ctx context.Context) ([]byte, error) {
	nonce := make([]byte, hsm.GCMNonceSize)
	if n.source == IVSourceOS {
		_, err := rand.Read(nonce)
		return nonce, err
	}
	n.mu.Lock()
	for len(n.buf) < hsm.GCMNonceSize {
		done := n.fetchLocked(ctx)
		n.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return nil, fmt.Errorf("GCM nonce: %w: %v", hsm.ErrUnavailable, ctx.Err())
		}
		n.mu.Lock()
		if err := n.fetchErr; err != nil && len(n.buf) < hsm.GCMNonceSize {
			n.mu.Unlock()
			return nil, err
		}
	}
	copy(nonce, n.buf)
	clear(n.buf[:hsm.GCMNonceSize]) // a nonce is handed out once
	n.buf = n.buf[hsm.GCMNonceSize:]
	if len(n.buf) < nonceLowWater {
		n.fetchLocked(ctx)
	}
	n.mu.Unlock()
	return nonce, nil
}

// fetchLocked starts fetching a block unless one is on its way, and returns the channel that closes when it has
// arrived. The fetch outlives the draw that started it (its request may end first): others wait on it too.
func (n *Nonces) fetchLocked(ctx context.Context) chan struct{} {
	if n.fetching != nil {
		return n.fetching
	}
	done := make(chan struct{})
	n.fetching = done
	go func() {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		b, err := n.rng.GenerateRandom(fctx, nonceBlock)
		cancel()
		n.mu.Lock()
		if err == nil {
			n.buf = append(n.buf, b...)
		}
		n.fetchErr, n.fetching = err, nil
		n.mu.Unlock()
		close(done)
	}()
	return done
}
