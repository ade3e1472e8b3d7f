package cmk

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

const healthPath = "health"

// healthCacheFor bounds how often health calls the HSM: the path needs no token, so anyone who reaches Vault can
// call it, and must not be able to keep the pool's sessions busy with it.
const healthCacheFor = time.Second

// healthTimeout bounds a check: a token that has not served one cheap call in that time does not serve (every
// session busy that long counts as not serving too).
const healthTimeout = 5 * time.Second

// Why health answers 503. Each names the state and nothing of the configuration: the path needs no Vault token.
var (
	errHealthNotConfigured = errors.New("not configured: the mount has no HSM token configured")
	errHealthUnreachable   = errors.New("connection failed: the HSM token cannot be reached")
	errHealthNotLoggedIn   = errors.New("not logged in: the HSM token is reachable and its login is refused or lost")
)

// healthCheck is the last answer of health, reused for healthCacheFor.
type healthCheck struct {
	mu  sync.Mutex
	at  time.Time
	err error
}

func (b *backend) pathHealth() *framework.Path {
	return &framework.Path{
		Pattern:      healthPath,
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathHealthRead,
				Summary:  "Whether the mount's HSM token is reachable and logged in: 200, or 503 naming why not. Needs no Vault token.",
				DisplayAttrs: &framework.DisplayAttributes{
					OperationVerb: "read", OperationSuffix: "health",
				},
			},
		},
		HelpSynopsis: "Whether the mount's HSM token serves, for a load balancer or a monitor; needs no Vault token.",
		HelpDescription: `Answers 200 with {"status": "ok"} when the mount's HSM token is reachable and its sessions are logged in,
and 503 naming why not: "not configured" (config/hsm was never written), "connection failed" (the module, slot
or token cannot be reached), or "not logged in" (the login is refused or was lost and cannot be restored). It
reveals nothing else: no token label, library, PIN or key. Like Vault's sys/health it needs no Vault token, so a
load balancer can call it. It makes at most one cheap HSM call (C_GetSessionInfo) per second, whoever calls, and
connects to the token if the mount has not yet.`,
	}
}

func (b *backend) pathHealthRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if err := b.checkHealth(ctx, req.Storage); err != nil {
		return nil, logical.CodedError(http.StatusServiceUnavailable, err.Error())
	}
	return &logical.Response{Data: map[string]interface{}{"status": "ok"}}, nil
}

// checkHealth says whether the token serves: nil, or one of the errHealth errors, at most one check per
// healthCacheFor.
func (b *backend) checkHealth(ctx context.Context, s logical.Storage) error {
	b.health.mu.Lock()
	defer b.health.mu.Unlock()
	if b.now().Before(b.health.at.Add(healthCacheFor)) {
		return b.health.err
	}
	err := b.probeHealth(ctx, s)
	b.health.at, b.health.err = b.now(), err
	return err
}

func (b *backend) probeHealth(ctx context.Context, s logical.Storage) error {
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	tok, _, err := b.getToken(ctx, s)
	var loginRefused bool // the connection's last attempt to log in was refused
	if err == nil {
		err = tok.Check(ctx)
		_, last := tok.Status()
		loginRefused = errors.Is(last, hsm.ErrPINIncorrect)
	} else {
		var oe *openError
		loginRefused = errors.As(err, &oe) && errors.Is(oe.cause, hsm.ErrPINIncorrect)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errNotConfigured):
		return errHealthNotConfigured
	case loginRefused, errors.Is(err, hsm.ErrNotLoggedIn):
		b.logger.Debug("health: the HSM token is not logged in", "error", err)
		return errHealthNotLoggedIn
	}
	b.logger.Debug("health: the HSM token cannot be reached", "error", err)
	return errHealthUnreachable
}
