package keys

import (
	"context"
	"crypto/rand"
	"sync"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// IV sources for GCM nonces, set by config/hsm's iv_source.
const (
	IVSourceHSM = "hsm" // the token's RNG (C_GenerateRandom), fetched in blocks
	IVSourceOS  = "os"  // the operating system's RNG; a nonce needs uniqueness, not secrecy
)

// nonceBlock is how many bytes one C_GenerateRandom call fetches: 256 nonces per HSM round trip.
const nonceBlock = 256 * hsm.GCMNonceSize

// Nonces hands out 96-bit random GCM nonces for one connection to the token.
type Nonces struct {
	source string
	rng    interface {
		GenerateRandom(ctx context.Context, n int) ([]byte, error)
	}
	mu  sync.Mutex
	buf []byte
}

// NewNonces is the nonce source of a connection to tok, drawing from source (IVSourceHSM when empty).
func NewNonces(source string, tok Crypto) *Nonces {
	if source == "" {
		source = IVSourceHSM
	}
	return &Nonces{source: source, rng: tok}
}

func (n *Nonces) next(ctx context.Context) ([]byte, error) {
	nonce := make([]byte, hsm.GCMNonceSize)
	if n.source == IVSourceOS {
		_, err := rand.Read(nonce)
		return nonce, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.buf) < hsm.GCMNonceSize {
		b, err := n.rng.GenerateRandom(ctx, nonceBlock)
		if err != nil {
			return nil, err
		}
		n.buf = b
	}
	copy(nonce, n.buf)
	clear(n.buf[:hsm.GCMNonceSize]) // a nonce is handed out once
	n.buf = n.buf[hsm.GCMNonceSize:]
	return nonce, nil
}
