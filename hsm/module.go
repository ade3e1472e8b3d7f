package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
	"golang.org/x/sync/semaphore"
)

// module is one loaded PKCS#11 library. The plugin is multiplexed, so every mount in the process shares it; it
// is finalised when the last Token using it closes, and initialised again by the next. It is never unloaded:
// libraries are not all written to be unloaded and loaded again in one process (opencryptoki 3.8 crashes in its
// next C_Initialize).
//
// Every call into the library passes through enter, which holds mu for reading until the call returns and first
// checks that the caller's session belongs to the live generation. C_Finalize, re-initialisation and unloading
// hold mu for writing: so no call is ever inside the library while it is finalised, and no session or object
// handle of a finished generation is ever passed to it: after a re-initialisation a module gives the same numbers
// to other sessions and objects, and a stale number names another key (a ciphertext sealed with it is lost) or a
// session another goroutine is using (SoftHSM then crashes the whole plugin process). A connection's own epoch is
// guarded by the connection (pool.calls), never by mu: connecting, reconnecting and closing one mount holds up no
// call of another; only a real re-initialisation does.
type module struct {
	path   string
	params string // C_Initialize's pReserved: library parameters (NSS needs them); "" passes NULL
	ctx    *pkcs11.Ctx
	calls  pkcs11API // every call other than the lifetime's: ctx itself, or a fault-injecting wrapper
	own    ownCalls
	info   pkcs11.Info // what the library says of itself (C_GetInfo), read once
	// storeRaces: the module's object store is not safe for searches during object writes (storeGuard).
	storeRaces bool

	mu         sync.RWMutex
	generation atomic.Uint64 // changed only with mu held for writing
	finalized  bool          // guarded by mu: no Token uses the module; C_Finalize has been called
	lastInit   time.Time     // guarded by mu

	refs int // guarded by modulesMu

	logins loginGuard // per token: the PIN that logged the process in, and failed attempts

	// tokens holds, per token serial, what was learnt of the token once (capabilities, object-write lock).
	tokensMu          sync.Mutex
	tokens            map[string]*tokenState
	findByReinitAfter time.Time // guarded by tokensMu: see mayReinitializeToFind

	// lookAgainAfter: when an object a search did not find may next be looked for after re-initialising the
	// module (see classUnseen), in UnixNano. Per module: re-initialising resets every token and mount using it.
	lookAgainAfter atomic.Int64

	// refusedSinceInit: an operation was refused since the module was last initialised (only noted on modules with
	// quirks.reinitAfterRefusal); a destruction failing meanwhile is repeated after a re-initialisation.
	refusedSinceInit atomic.Bool
	// refusalReinitAfter: when such a destruction may next be repeated, in UnixNano (see refusalReinitPause).
	refusalReinitAfter atomic.Int64
}

// waitRefusalReinitTurn waits until a destruction that met a refusal's leftover may be repeated, and takes the turn.
func (m *module) waitRefusalReinitTurn(ctx context.Context) error {
	for {
		now, after := time.Now().UnixNano(), m.refusalReinitAfter.Load()
		if now >= after {
			if m.refusalReinitAfter.CompareAndSwap(after, now+int64(refusalReinitPause)) {
				return nil
			}
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(after - now)):
		}
	}
}

// errStale: the caller's session belongs to a module generation or a connection epoch that has ended. The call
// was not made; the caller takes a session of the current connection and tries again.
var errStale = errors.New("session of a finished connection")

// errFinalized: the last user closed the module.
var errFinalized = fmt.Errorf("%w: the PKCS#11 module has been closed", ErrUnavailable)

// wrapCalls is the identity, except in the soak test's plugin build (failpoints.go).
var wrapCalls = func(c pkcs11API) pkcs11API { return c }

var (
	modulesMu sync.Mutex
	modules   = map[string]*module{}
)

// acquireModule loads and initialises the library at path with the given parameters, or returns the process's
// instance, initialised again if its last user had closed it. A library is initialised once per process, so every
// user must ask with the same parameters.
func acquireModule(path, params string) (*module, error) {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m, ok := modules[path]; ok {
		if m.params != params {
			return nil, fmt.Errorf("%w: the module %q is already loaded with other library parameters", ErrInvalidArgument, path)
		}
		if m.refs == 0 {
			err := m.exclusiveEvenFinalized(func() error {
				if err := m.initialize(); err != nil {
					return err
				}
				m.finalized = false
				m.generation.Add(1)
				return nil
			})
			if err != nil {
				return nil, fmt.Errorf("%w: C_Initialize: %v", ErrUnavailable, err)
			}
		}
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("%w: cannot load PKCS#11 library %q", ErrUnavailable, path)
	}
	m := &module{path: path, params: params, ctx: ctx, refs: 1, tokens: map[string]*tokenState{}}
	if err := m.initialize(); err != nil {
		ctx.Destroy()
		return nil, fmt.Errorf("%w: C_Initialize: %v", ErrUnavailable, err)
	}
	own, err := loadOwnCalls(path)
	if err != nil {
		_ = ctx.Finalize()
		ctx.Destroy()
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	m.own = own
	m.info, _ = ctx.GetInfo()
	m.calls = wrapCalls(moduleCalls{Ctx: ctx, own: own})
	m.storeRaces = storeRaces(m.info)
	m.generation.Store(1)
	modules[path] = m
	return m, nil
}

// initialize calls C_Initialize, with the library parameters when there are any. A module that another user in
// the process initialised already is fine.
func (m *module) initialize() error {
	var err error
	if m.params == "" {
		err = m.ctx.Initialize()
	} else {
		p := newCString(m.params)
		defer p.free()
		err = m.ctx.Initialize(pkcs11.InitializeWithReserved(p.ptr()))
	}
	m.lastInit = time.Now()
	if code, ok := rvOf(err); ok && code == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
		return nil
	}
	return err
}

// release drops one reference. The last one finalises the library, once every call in flight has returned;
// calls made after that fail with errFinalized, never inside a finalised library.
func (m *module) release() {
	modulesMu.Lock()
	defer modulesMu.Unlock() // held until C_Finalize returns: a new user must not initialise meanwhile
	m.refs--
	if m.refs > 0 {
		return
	}
	_ = m.exclusive(func() error {
		m.finalized = true
		m.generation.Add(1)
		return m.ctx.Finalize()
	})
}

// findByReinitPause is how long, after a re-initialisation that was made to find a token and found none, another
// such re-initialisation waits when other users share the module: each one makes every mount of the process
// reconnect and look its objects up again.
const findByReinitPause = 30 * time.Second

// mayReinitializeToFind reports whether a token missing from the slot list may be looked for by re-initialising.
// With no other user of the module, it may. With others, only a token that a fresh copy of the library lists
// (listedByFreshLibrary) is looked for that way: a configuration naming an absent token never re-initialises the
// module under the other mounts, and an API caller cannot create tokens, so such re-initialisations are bounded
// by the tokens an operator creates.
func (m *module) mayReinitializeToFind(cfg Config) (bool, error) {
	modulesMu.Lock()
	alone := m.refs <= 1
	modulesMu.Unlock()
	if alone {
		return true, nil
	}
	if m.reinitializeToFindIn() > 0 {
		return false, nil
	}
	return listedByFreshLibrary(m.path, m.params, cfg)
}

func (m *module) foundNothingByReinitializing() {
	m.tokensMu.Lock()
	m.findByReinitAfter = time.Now().Add(findByReinitPause)
	m.tokensMu.Unlock()
}

// reinitializeToFindIn is how long until a missing token may again be looked for by re-initialising.
func (m *module) reinitializeToFindIn() time.Duration {
	m.tokensMu.Lock()
	defer m.tokensMu.Unlock()
	return max(time.Until(m.findByReinitAfter), 0)
}

// enter runs fn with the library's calls if gen is still the live generation. fn must not take any pool's mu;
// it may take its own connection's calls lock (pool.run), which is taken after mu, never before.
func (m *module) enter(gen uint64, fn func(p pkcs11API) error) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.finalized {
		return errFinalized
	}
	if gen != m.generation.Load() {
		return errStale
	}
	return fn(m.calls)
}

// exclusive runs fn with no call inside the library: for re-initialisation.
func (m *module) exclusive(fn func() error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.finalized {
		return errFinalized
	}
	return fn()
}

// exclusiveEvenFinalized is exclusive for initialising the module again after its last user closed it.
func (m *module) exclusiveEvenFinalized(fn func() error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return fn()
}

// reinitializeLocked finalises and initialises the library again, which is how PKCS#11 recovers from a lost device
// and how SoftHSM notices tokens created after C_Initialize. seen is the generation the caller found broken: if it
// is no longer the live one, someone else has re-initialised since and nothing is done. Called within exclusive.
func (m *module) reinitializeLocked(seen uint64) error {
	if m.generation.Load() != seen {
		return nil
	}
	_ = m.ctx.Finalize()
	err := m.initialize()
	m.generation.Add(1) // C_Finalize logged every token out; the PINs the tokens accepted stay known (loginGuard)
	m.refusedSinceInit.Store(false)
	if err != nil {
		return fmt.Errorf("%w: C_Initialize: %v", ErrUnavailable, err)
	}
	return nil
}

// tokenState is what the process learns once about one token (by serial) and shares between its mounts.
type tokenState struct {
	capsMu sync.Mutex // held while the token is probed: one probe per token
	caps   *Capabilities

	// copyProbe is what the working-copy probe measured (copies.go), once per token, on first need.
	copyProbeMu sync.Mutex
	copyProbe   *WorkingCopyProbe

	// objectWrites serialises the creation and destruction of objects on tokens whose object store fails under
	// parallel writes (SoftHSM's file store answers CKR_GENERAL_ERROR). A channel, so that waiting honours
	// cancellation; per token, so that one token's slow key generation never holds up another's.
	objectWrites chan struct{}

	// store is the token's storeGuard lock, on modules whose object store needs one.
	store *semaphore.Weighted

	// objects is what the process knows of the token's objects' labels and CKA_IDs (objectIndex).
	objects objectIndex

	// pairTemplates is what the token was found to need in key-pair templates (pairTemplateOptions), learnt at
	// the first key pair.
	pairTemplates atomic.Uint32
}

func (m *module) token(serial string) *tokenState {
	m.tokensMu.Lock()
	defer m.tokensMu.Unlock()
	ts, ok := m.tokens[serial]
	if !ok {
		ts = &tokenState{objectWrites: make(chan struct{}, 1), store: newStoreLock()}
		m.tokens[serial] = ts
	}
	return ts
}
