// Package cmk is a Vault secrets engine for customer-managed keys whose material lives in a PKCS#11 HSM. Its API is
// Transit's; every operation on key material is a PKCS#11 call, and Vault storage holds metadata only.
package cmk

import (
	"context"
	"crypto/rsa"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// LibraryEnv names the environment variable that holds the PKCS#11 module path. Only the operator sets it, at
// plugin registration: a path taken from a request would let a caller load arbitrary code into the plugin.
const LibraryEnv = "CMK_PKCS11_LIBRARY"

// InitParamsEnv names the environment variable that holds the module's C_Initialize parameters, which some
// modules need (NSS softokn: configdir='sql:/path' certPrefix=” keyPrefix=” secmod=” flags=). Set by the
// operator at registration, like the library path; never from the API.
const InitParamsEnv = "CMK_PKCS11_INIT_PARAMS"

// Version is the plugin's version, reported to Vault (`vault plugin list`, a mount's running_plugin_version). A
// release sets it at build time (make build: -ldflags "-X …cmk.Version=v…", from the VERSION file); a build
// without it reports v0.0.0-dev.
var Version = "v0.0.0-dev"

// hsmToken is what the backend needs of the HSM: *hsm.Token, or a fault-injecting wrapper in unit tests.
type hsmToken interface {
	keys.HSM // what the key model needs: versions made, imported, found, destroyed, used, their usage witnessed
	GenerateWrappingKey(ctx context.Context, id []byte, label string) (*rsa.PublicKey, error)
	MissingObjects(id []byte) map[string]time.Time
	Capabilities(ctx context.Context) (*hsm.Capabilities, error)
	Info() hsm.TokenInfo
	Status() (connected bool, lastErr error)
	Check(ctx context.Context) error // one cheap call: does the token serve now (health)
	SessionsInUse() int
	WorkingCopiesHeld() int
	WorkingCopies(ctx context.Context) (hsm.WorkingCopyProbe, error)
	Close()
}

type backend struct {
	*framework.Backend
	logger     hclog.Logger
	library    string // PKCS#11 module path from LibraryEnv
	initParams string // its C_Initialize parameters, from InitParamsEnv
	mountID    string // the mount's backend UUID, in HSM object labels

	// openToken connects to the HSM; tests replace it to wrap the real token.
	openToken func(hsm.Config, hclog.Logger) (hsmToken, error)

	tokenMu     sync.Mutex
	token       hsmToken
	nonces      *keys.Nonces
	openErr     error // last failure to connect, returned without retrying until openRetryAt
	openRetryAt time.Time

	keys     *keys.Manager  // the mount's keys: every change goes through its Update, every use through its Use
	identity *identityStore // callers' entities and groups, for the keys' access conditions

	configMu   sync.RWMutex
	keysConfig *keysConfig // nil until loaded

	wrappingMu sync.Mutex // serialises the creation of the mount's wrapping key

	cacheConfigChanged     atomic.Bool // another node changed cache-config
	metricsConfigChanged   atomic.Bool // another node changed config/metrics
	analyticsConfigChanged atomic.Bool // another node changed config/analytics

	// storage is the mount's storage as Vault gave it at setup: what Clean flushes the usage analytics to, since
	// Clean is given none.
	storage logical.Storage

	metrics *metrics    // the mount's Prometheus registry (metrics.go)
	health  healthCheck // the last answer of health, reused for a second (path_health.go)

	xks xksState // AWS External Key Store: configuration cache, throttles, health (xks.go)

	approvals *approvals       // dual control: requests held for approval (approvals.go)
	now       func() time.Time // the clock approvals expire by; tests move it
}

// Factory builds the backend for one mount. The plugin is served multiplexed: every mount in the process shares
// the PKCS#11 module, never its sessions' state or its keys.
func Factory(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
	b := newBackend(conf)
	if err := b.Setup(ctx, conf); err != nil {
		return nil, err
	}
	return b, nil
}

func newBackend(conf *logical.BackendConfig) *backend {
	b := &backend{
		logger:     conf.Logger,
		library:    os.Getenv(LibraryEnv),
		initParams: os.Getenv(InitParamsEnv),
		mountID:    conf.BackendUUID,
		approvals:  newApprovals(),
		storage:    conf.StorageView,
		now:        time.Now,
		openToken: func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
			return hsm.Open(c, l)
		},
	}
	if b.logger == nil {
		b.logger = hclog.NewNullLogger()
	}
	if b.mountID == "" {
		b.mountID = "unmounted"
	}
	b.keys = keys.NewManager(b.logger, b.mountID, func(ctx context.Context, s logical.Storage) (keys.HSM, *keys.Nonces, error) {
		tok, nonces, err := b.getToken(ctx, s)
		if err != nil {
			return nil, nil, err
		}
		return tok, nonces, nil
	})
	b.metrics = newMetrics(b.connectedToken)
	b.keys.Observer = b.metrics
	b.keys.TypeRule = func(ctx context.Context, s logical.Storage, t keys.Type) error {
		c, err := b.readKeysConfig(ctx, s)
		if err != nil {
			return err
		}
		return c.refusesType(t, time.Now())
	}
	b.keys.Deprecated = func(ctx context.Context, s logical.Storage, t keys.Type) (time.Time, bool) {
		c, err := b.readKeysConfig(ctx, s)
		if err != nil {
			return time.Time{}, false // the rule cannot be read: the use is not held up for a warning
		}
		return c.deprecatedSince(t, time.Now())
	}
	b.keys.Connected = func() keys.HSM {
		if tok := b.connectedToken(); tok != nil {
			return tok
		}
		return nil // not a nil *hsm.Token in a non-nil interface
	}
	b.identity = newIdentityStore(func() logical.SystemView { return b.System() })
	b.Backend = &framework.Backend{
		Help:        backendHelp,
		BackendType: logical.TypeLogical,
		// The version the binary reports to Vault: registering it under another -version fails, as Vault checks.
		RunningVersion: Version,
		PathsSpecial: &logical.Paths{
			// sudo in the caller's policy, beside the operation's capability: config/hsm chooses the token and
			// PIN every key depends on; adoption on an operator's word takes material whose origin the token
			// cannot show. Vault matches these exactly or by prefix.
			Root: []string{configHSMPath, adoptUnverifiedPath, adoptUnverifiedPath + "/*"},
			// The PIN is kept in config/hsm, a held import_version's wrapped key in its approval, and the XKS stores'
			// SigV4 secrets under xks/credentials/: seal-wrap them
			// where Vault offers seal wrapping.
			SealWrapStorage: []string{"config/hsm", approvalRequestsPrefix, xksCredentialsPrefix},
			// Whether the token serves, for load balancers, as Vault's sys/health: it reveals nothing else.
			Unauthenticated: []string{healthPath},
		},
		Paths: framework.PathAppend(
			[]*framework.Path{b.pathConfigHSM(), b.pathConfigKeys(), b.pathCacheConfig(), b.pathConfigMetrics(), b.pathConfigAnalytics()},
			b.pathKeys(),
			[]*framework.Path{b.pathRotate(), b.pathWrappingKey(), b.pathImport(false), b.pathImport(true)},
			b.pathLifecycle(),
			[]*framework.Path{b.pathAccess()},
			b.pathGrants(),
			b.pathUsage(),
			[]*framework.Path{b.pathMigration()},
			[]*framework.Path{b.pathEncrypt(), b.pathDecrypt(), b.pathRewrap(), b.pathDatakey(), b.pathRandom(), b.pathHash(),
				b.pathSign(), b.pathVerify(), b.pathHMAC()},
			[]*framework.Path{b.pathExport(), b.pathCSR(), b.pathSetCertificate()},
			b.pathRefused(),
			b.pathReconcile(),
			b.pathApprovals(),
			b.pathInventory(),
			[]*framework.Path{b.pathMetrics(), b.pathHealth()},
			b.pathAuditKey(),
			[]*framework.Path{b.pathEvidence()},
			b.pathXKS(),
		),
		InitializeFunc: func(ctx context.Context, req *logical.InitializationRequest) error {
			if err := b.applyMetricsConfig(ctx, req.Storage); err != nil {
				return err
			}
			if err := b.applyAnalyticsConfig(ctx, req.Storage); err != nil {
				return err
			}
			return b.applyCacheConfig(ctx, req.Storage)
		},
		PeriodicFunc:      b.periodic,
		Invalidate:        b.invalidate,
		Clean:             b.clean,
		WALRollback:       b.walRollback,
		WALRollbackMinAge: walRollbackMinAge,
	}
	return b
}

// invalidate drops what another node changed in storage (performance standbys and replicas).
func (b *backend) invalidate(_ context.Context, key string) {
	switch key {
	case configHSMPath:
		b.resetToken()
	case configKeysPath:
		b.configMu.Lock()
		b.keysConfig = nil
		b.configMu.Unlock()
	case configCachePath:
		b.cacheConfigChanged.Store(true) // applied by the next periodic pass, which has storage
	case configMetricsPath:
		b.metricsConfigChanged.Store(true)
	case configAnalyticsPath:
		b.analyticsConfigChanged.Store(true)
	default:
		if strings.HasPrefix(key, approvalsPrefix) {
			b.approvals.forget()
			return
		}
		if strings.HasPrefix(key, "xks/") {
			b.xks.drop()
			return
		}
		b.keys.Invalidate(key)
	}
}

// clean runs when Vault unmounts, reloads or seals the mount: the usage counts of the last flush interval are
// written first (on the node that may write), then the token is let go.
func (b *backend) clean(ctx context.Context) {
	if b.storage != nil && b.System() != nil && b.WriteSafeReplicationState() {
		ctx, cancel := context.WithTimeout(ctx, analyticsFlushTimeout)
		if err := b.keys.FlushAnalytics(ctx, b.storage); err != nil {
			b.logger.Warn("could not write the usage analytics at shutdown; the counts since the last flush are lost", "error", err)
		}
		cancel()
	}
	b.resetToken()
}

// analyticsFlushTimeout bounds the flush at shutdown, which must not hold up Vault's unmount or step-down.
const analyticsFlushTimeout = 10 * time.Second

func (b *backend) resetToken() {
	b.tokenMu.Lock()
	defer b.tokenMu.Unlock()
	if b.token != nil {
		b.token.Close()
	}
	b.token, b.nonces, b.openErr = nil, nil, nil
}

// openRetryDelay keeps a failing first connection from re-initialising the module on every request.
const openRetryDelay = 2 * time.Second

// getToken returns the connected token, connecting on first use from config/hsm.
func (b *backend) getToken(ctx context.Context, s logical.Storage) (hsmToken, *keys.Nonces, error) {
	b.tokenMu.Lock()
	defer b.tokenMu.Unlock()
	if b.token != nil {
		return b.token, b.nonces, nil
	}
	if b.openErr != nil && time.Now().Before(b.openRetryAt) {
		return nil, nil, b.openErr
	}
	cfg, err := readHSMConfig(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	if cfg == nil {
		return nil, nil, errNotConfigured
	}
	tok, err := b.openToken(b.tokenConfig(cfg), b.logger.Named("hsm"))
	if err != nil {
		b.openErr, b.openRetryAt = &openError{cause: err}, time.Now().Add(openRetryDelay)
		return nil, nil, b.openErr
	}
	b.token, b.nonces, b.openErr = tok, keys.NewNonces(cfg.IVSource, tok), nil
	return b.token, b.nonces, nil
}

// openError is a failure to connect to the token: hsm.ErrUnavailable to callers (a 503, whatever the cause: a
// PIN the token refuses now was accepted when config/hsm was written), its cause kept for health.
type openError struct{ cause error }

func (e *openError) Error() string        { return hsm.ErrUnavailable.Error() + ": " + e.cause.Error() }
func (e *openError) Is(target error) bool { return target == hsm.ErrUnavailable }

// connectedToken is the token if this mount has connected to it, else nil; it never connects.
func (b *backend) connectedToken() hsmToken {
	b.tokenMu.Lock()
	defer b.tokenMu.Unlock()
	return b.token
}

// setToken installs a token connected by a config write, closing the previous one.
func (b *backend) setToken(tok hsmToken, ivSource string) {
	b.tokenMu.Lock()
	defer b.tokenMu.Unlock()
	if b.token != nil {
		b.token.Close()
	}
	b.token, b.nonces, b.openErr = tok, keys.NewNonces(ivSource, tok), nil
}

func (b *backend) tokenConfig(c *hsmConfig) hsm.Config {
	return hsm.Config{Library: b.library, InitParams: b.initParams, TokenLabel: c.TokenLabel, Slot: c.Slot, PIN: c.PIN,
		PoolSize: c.PoolSize, Mount: b.mountID, RawRSAOAEPFallback: c.RawRSAOAEPFallback, Observer: b.metrics,
		WorkingCopies: c.workingCopies()}
}

// periodic is Vault's periodic function: the keys' lifecycle work that is due.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if b.cacheConfigChanged.Swap(false) {
		if err := b.applyCacheConfig(ctx, req.Storage); err != nil {
			b.cacheConfigChanged.Store(true)
			return err
		}
	}
	if b.metricsConfigChanged.Swap(false) {
		if err := b.applyMetricsConfig(ctx, req.Storage); err != nil {
			b.metricsConfigChanged.Store(true)
			return err
		}
	}
	if b.analyticsConfigChanged.Swap(false) {
		if err := b.applyAnalyticsConfig(ctx, req.Storage); err != nil {
			b.analyticsConfigChanged.Store(true)
			return err
		}
	}
	if !b.WriteSafeReplicationState() {
		return nil // a replica: the primary's active node manages the lifecycle
	}
	// The usage analytics are flushed here, about once a minute on the active node, rather than by a goroutine of
	// the backend's: Vault runs this only where storage may be written, with the storage to write to, and stops
	// calling it on step-down; Clean flushes once more at shutdown.
	if err := b.keys.FlushAnalytics(ctx, req.Storage); err != nil {
		b.logger.Warn("could not write some keys' usage analytics; the next periodic run tries again", "error", err)
	}
	if err := b.tickApprovals(ctx, req.Storage); err != nil {
		return err
	}
	if cfg, err := readHSMConfig(ctx, req.Storage); err != nil || cfg == nil {
		return err // nothing can be due before the HSM is configured
	}
	return b.keys.Tick(ctx, req.Storage, time.Now())
}

// walRollbackMinAge is long enough for any key generation to finish; the rollback also takes the key's lock, so
// it can never race a creation still in progress.
const walRollbackMinAge = 2 * time.Minute

// walRollback destroys the HSM objects of a version (or wrapping key, or audit key version) whose metadata never
// reached storage.
// Nothing that storage references is ever destroyed here.
func (b *backend) walRollback(ctx context.Context, req *logical.Request, kind string, data interface{}) error {
	switch kind {
	case keys.WALKindVersion:
		return b.keys.RollbackVersion(ctx, req.Storage, data)
	case walKindWrappingKey:
		return b.rollbackWrappingKey(ctx, req.Storage, data)
	case keys.WALKindAuditKey:
		return b.keys.RollbackAuditKey(ctx, req.Storage, data)
	}
	return fmt.Errorf("unknown WAL entry kind %q", kind)
}

// actorOf is who makes a request, for the keys' history: entity, display name, token accessor (never the token;
// the accessor itself is recorded and logged only as its HMAC under the mount's salt, see internal/keys/actor.go).
func actorOf(req *logical.Request) keys.Actor {
	if req == nil {
		return keys.Actor{}
	}
	return keys.Actor{EntityID: req.EntityID, DisplayName: req.DisplayName, Accessor: req.ClientTokenAccessor, RequestID: req.ID}
}

// callerOf is who uses a key, for the door every use of key material passes (keys.Manager.Use): the actor, the
// request's source address (Vault's Connection.RemoteAddr, which honours its listener's x_forwarded_for settings)
// and the caller's identity, resolved only if a condition needs it.
func (b *backend) callerOf(req *logical.Request) keys.Caller {
	c := keys.Caller{Actor: actorOf(req), Identity: b.identity}
	if req != nil && req.Connection != nil {
		c.RemoteAddr = req.Connection.RemoteAddr
	}
	return c
}

const backendHelp = `
The cmk secrets engine gives Vault customer-managed keys whose material is generated and kept inside a PKCS#11
HSM as sensitive, non-extractable objects. Its API is Transit's: encrypt, decrypt, rewrap, datakey, random and
hash behave as they do in Transit, and a Transit client works by changing only the mount path. Key material
never leaves the HSM, so export and plaintext backup are refused.

Configure the token with config/hsm, then create keys with keys/<name>.
`
