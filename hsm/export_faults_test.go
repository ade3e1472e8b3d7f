//go:build cmkfaults

package hsm

import "testing"

// For tests of package hsm_test, which drive the key model (internal/keys imports hsm) on a real token.

// OpenTestToken opens a fresh SoftHSM token of the test run.
func OpenTestToken(t *testing.T) *Token {
	tok, _ := newToken(t, 2)
	return tok
}

// HideFromSearches makes tok's next n searches (C_FindObjects) find nothing, whatever the token holds, as
// SoftHSM 2.6.1's object store does now and then while another process writes.
func HideFromSearches(t *testing.T, tok *Token, n int) {
	injectFaults(t, tok).hideFromSearches(n)
}
