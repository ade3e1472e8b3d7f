package hsm

import (
	"context"
	"fmt"
)

// GenerateRandom returns n bytes from the token's RNG.
func (t *Token) GenerateRandom(ctx context.Context, n int) ([]byte, error) {
	if n <= 0 {
		return nil, fmt.Errorf("%w: random length %d", ErrInvalidArgument, n)
	}
	var out []byte
	err := t.do(ctx, "C_GenerateRandom", func(c pkcs11API, s session) error {
		b, err := c.GenerateRandom(s.h, n)
		out = b
		return err
	})
	return out, err
}
