package cmk

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// health asks the health path as a caller without a Vault token would: the answer's status and text.
func (e *testEnv) health() (int, string) {
	e.t.Helper()
	resp, err := e.b.HandleRequest(context.Background(), &logical.Request{ID: fmt.Sprint("req-", requestCount.Add(1)),
		Operation: logical.ReadOperation, Path: "health", Storage: e.storage, Unauthenticated: true})
	return status(resp, err), fmt.Sprint(respText(resp), err)
}

// passHealthCache moves the backend's clock past the health answer's reuse.
func (e *testEnv) passHealthCache() {
	now := e.b.now().Add(healthCacheFor + time.Second)
	e.b.now = func() time.Time { return now }
}

// loggedOutToken is the real token whose sessions report a lost login that logging in again does not restore,
// as a token whose PIN was changed would.
type loggedOutToken struct{ hsmToken }

func (t loggedOutToken) Check(ctx context.Context) error {
	if err := t.hsmToken.Check(ctx); err != nil {
		return err
	}
	return fmt.Errorf("%w: the test's token", hsm.ErrNotLoggedIn)
}

func TestHealthNamesWhyTheTokenDoesNotServeAndNothingElse(t *testing.T) {
	if !slices.Contains(newUnconfiguredBackend(t).b.PathsSpecial.Unauthenticated, "health") {
		t.Fatal("health is not callable without a Vault token")
	}
	secrets := func(e *testEnv) []string { return []string{e.label, testPIN, softhsm.Library, "keys/"} }
	check := func(e *testEnv, wantStatus int, want string) {
		t.Helper()
		e.passHealthCache()
		got, text := e.health()
		if got != wantStatus || !strings.Contains(text, want) {
			t.Fatalf("health: %d %s, want %d %q", got, text, wantStatus, want)
		}
		for _, s := range secrets(e) {
			if s != "" && strings.Contains(text, s) {
				t.Fatalf("health reveals %q: %s", s, text)
			}
		}
	}

	e := newUnconfiguredBackend(t)
	check(e, 503, "not configured")

	e = newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	check(e, 200, "ok")

	// The token is gone from the module (a label no token carries): the connection fails.
	e.b.resetToken()
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		c.TokenLabel += "-removed"
		return hsm.Open(c, l)
	}
	check(e, 503, "connection failed")

	// The token is there and refuses the login.
	e.b.resetToken()
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		c.PIN += "-changed"
		return hsm.Open(c, l)
	}
	check(e, 503, "not logged in")

	// Connected, and the sessions stay logged out.
	e.b.resetToken()
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		tok, err := hsm.Open(c, l)
		if err != nil {
			return nil, err
		}
		return loggedOutToken{tok}, nil
	}
	check(e, 503, "not logged in")

	e.b.resetToken()
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) { return hsm.Open(c, l) }
	check(e, 200, "ok")
}

// Health answers from one check per second, whoever calls: a caller without a token cannot keep the HSM busy.
func TestHealthChecksTheTokenAtMostOncePerSecond(t *testing.T) {
	e := newTestBackend(t)
	e.passHealthCache()
	calls := func() float64 {
		return e.value(e.scrape(), "cmk_hsm_call_duration_seconds", map[string]string{"operation": "check", "result": "ok"})
	}
	for range 5 {
		if got, text := e.health(); got != 200 {
			t.Fatalf("health: %d %s", got, text)
		}
	}
	if got := calls(); got != 1 {
		t.Fatalf("5 health requests within a second made %v checks, want 1", got)
	}
	e.passHealthCache()
	e.health()
	if got := calls(); got != 2 {
		t.Fatalf("a health request after a second made no check: %v", got)
	}
}
