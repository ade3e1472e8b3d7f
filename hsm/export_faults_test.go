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

// OpenTestTokenConfig opens a fresh SoftHSM token of the test run and returns its configuration too, for a test
// that opens the token again (a restart) or hands it to another process.
func OpenTestTokenConfig(t *testing.T) (*Token, Config) {
	return newToken(t, 2)
}
