package hsm

import (
	"crypto/subtle"
	"fmt"
	"sync"

	"github.com/hashicorp/go-hclog"
)

// Config selects a token and how to use it. The library path and its parameters must come from the plugin's
// environment, never from an API request.
type Config struct {
	Library    string
	InitParams string // the library's C_Initialize parameters (NSS needs them); empty for none
	TokenLabel string // preferred: slots are renumbered when tokens are initialised
	Slot       uint   // used when TokenLabel is empty
	PIN        string
	PoolSize   int    // sessions used for operations at once (the login session is extra)
	Mount      string // who uses the connection, for the logs
	// RawRSAOAEPFallback lets an import whose RSA-OAEP hash the token lacks recover the ephemeral AES key with raw
	// RSA in the HSM and decode the OAEP padding in the plugin: the ephemeral key is then in plugin memory for
	// a moment. Off unless the operator chooses it.
	RawRSAOAEPFallback bool
	// Succeeds is the connection this one replaces, when its PIN was not given by the caller (a config/hsm write
	// that keeps the stored PIN): if it logged in to the same token with the same PIN, this one is not held up by
	// other mounts' wrong PINs either. A PIN the caller gives is never vouched for that way, or a wait would tell
	// the mount's writer when they guessed its PIN.
	Succeeds *Token
	// Observer, when set, hears of every operation and recovery (the mount's metrics).
	Observer Observer
	// WorkingCopies bounds the session-object copies of hot AES keys kept on the token (copies.go); 0 for none.
	// They are made only where the token's probe found them faster.
	WorkingCopies int
}

// Token is a logged-in connection to one token: a pool of sessions, a cache of object handles, and what the
// token can do. It recovers from lost sessions, lost login and lost devices by itself; while the device is
// unreachable, calls fail fast with ErrUnavailable and reconnection is tried with backoff.
type Token struct {
	cfg     Config
	log     hclog.Logger
	mod     *module
	pool    *pool
	handles handleCache
	copies  workingCopies
	// scans is the one place for a session of its own outside the pool (doAside): whole-token scans run there, one
	// at a time, so that they never hold a session the data plane is waiting for.
	scans chan struct{}

	rawOAEP   sync.Map // crypto.Hash → true when the token's CKM_RSA_PKCS_OAEP refuses that hash
	closeOnce sync.Once
}

// Open loads the module (shared per process), finds the token, opens a session and logs in. A wrong label,
// slot or PIN fails here, so that a bad configuration is refused when it is written.
func Open(cfg Config, log hclog.Logger) (*Token, error) {
	if cfg.Library == "" {
		return nil, fmt.Errorf("%w: no PKCS#11 library configured", ErrInvalidArgument)
	}
	if cfg.PoolSize < 1 {
		cfg.PoolSize = 1
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	mod, err := acquireModule(cfg.Library, cfg.InitParams)
	if err != nil {
		return nil, err
	}
	prev := cfg.Succeeds
	cfg.Succeeds = nil // not kept: the connection it replaces is closed
	p := &pool{mod: mod, cfg: cfg, log: log}
	if prev != nil && subtle.ConstantTimeCompare([]byte(prev.cfg.PIN), []byte(cfg.PIN)) == 1 {
		prev.pool.mu.Lock()
		p.provenFor = prev.pool.provenFor
		prev.pool.mu.Unlock()
	}
	if err := p.connect(); err != nil {
		p.close()
		mod.release()
		return nil, err
	}
	if limit := p.tokenInfo().MaxSessionCount; limit > 0 && uint(cfg.PoolSize)+1 > limit {
		// Respect the token's session cap, keeping one for the login session.
		capped := max(int(limit)-1, 1)
		log.Warn("session pool capped by the token's session limit", "requested", cfg.PoolSize, "used", capped)
		cfg.PoolSize = capped
		p.cfg.PoolSize = capped
	}
	if quirksOf(mod.info, p.tokenInfo()).oneSession && cfg.PoolSize > 1 {
		log.Warn("this token's module is not safe with concurrent sessions: operations use one session at a time",
			"requested", cfg.PoolSize)
		cfg.PoolSize, p.cfg.PoolSize = 1, 1
	}
	p.slots = make(chan struct{}, cfg.PoolSize)
	t := &Token{cfg: cfg, log: log, mod: mod, pool: p, scans: make(chan struct{}, 1)}
	t.copies.limit = max(cfg.WorkingCopies, 0)
	return t, nil
}

// Close ends the connection: calls of this Token still inside the library finish first, later ones fail with
// ErrUnavailable. The last Token of the process to close unloads the library.
func (t *Token) Close() {
	t.closeOnce.Do(func() {
		t.pool.close()
		t.mod.release()
	})
}

// PoolSize is the number of sessions used for operations at once.
func (t *Token) PoolSize() int { return t.cfg.PoolSize }

// Status says whether the token is reachable now, and the last error if not. It makes no PKCS#11 call.
func (t *Token) Status() (connected bool, lastErr error) { return t.pool.status() }

// Info returns the token's description as read when the connection was made.
func (t *Token) Info() TokenInfo { return t.pool.tokenInfo() }
