// Package hsm talks PKCS#11 to the token that holds the engine's keys: the module's lifetime (one C_Initialize
// per process, shared by every mount), a bounded pool of logged-in sessions, attribute templates, operations and
// error recovery. It never returns secret key material and knows nothing of Vault.
package hsm

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// module is one loaded PKCS#11 library. The plugin is multiplexed, so every mount in the process shares it;
// it is finalized only when the last Token using it closes.
type module struct {
	path  string
	ctx   *pkcs11.Ctx // the module's lifetime: C_Initialize, C_Finalize
	calls pkcs11API   // every other call: ctx itself, or a fault-injecting wrapper in tests

	// mu is held for reading by every PKCS#11 call and for writing by re-initialisation, so that C_Finalize
	// never runs under another goroutine's call.
	mu sync.RWMutex
	// generation counts (re)initialisations; sessions, handles and logins of an older generation are gone.
	generation atomic.Uint64
	lastInit   time.Time

	// objects serialises the creation and destruction of token objects: SoftHSM's file object store fails
	// (CKR_GENERAL_ERROR) when sessions create objects in parallel. They are rare next to cryptographic
	// operations, which stay parallel.
	objects sync.Mutex

	// refs and logins are guarded by modulesMu.
	refs int
	// logins remembers, per token serial, a keyed digest of the PIN that logged the process in. PKCS#11 login
	// is per application, so a second mount on the same token gets CKR_USER_ALREADY_LOGGED_IN whatever PIN
	// it gives; comparing digests stops a mount without the right PIN from riding on another's login.
	logins map[string][]byte
}

// wrapCalls is the identity, except in the soak test's plugin build (failpoints.go).
var wrapCalls = func(c pkcs11API) pkcs11API { return c }

var (
	modulesMu sync.Mutex
	modules   = map[string]*module{}
	pinKey    = func() []byte {
		k := make([]byte, 32)
		if _, err := rand.Read(k); err != nil {
			panic(err)
		}
		return k
	}()
)

func pinDigest(pin string) []byte {
	m := hmac.New(sha256.New, pinKey)
	m.Write([]byte(pin))
	return m.Sum(nil)
}

// acquireModule loads and initialises the library at path, or returns the process's existing instance.
func acquireModule(path string) (*module, error) {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m, ok := modules[path]; ok {
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("%w: cannot load PKCS#11 library %q", ErrUnavailable, path)
	}
	if err := initialize(ctx); err != nil {
		ctx.Destroy()
		return nil, fmt.Errorf("%w: C_Initialize: %v", ErrUnavailable, err)
	}
	m := &module{path: path, ctx: ctx, calls: wrapCalls(ctx), refs: 1, lastInit: time.Now(), logins: map[string][]byte{}}
	m.generation.Store(1)
	modules[path] = m
	return m, nil
}

func initialize(ctx *pkcs11.Ctx) error {
	err := ctx.Initialize()
	if code, ok := rvOf(err); ok && code == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
		return nil
	}
	return err
}

// release drops one reference; the last one finalizes and unloads the library.
func (m *module) release() {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules, m.path)
	m.mu.Lock()
	defer m.mu.Unlock()
	_ = m.ctx.Finalize()
	m.ctx.Destroy()
}

// reinitialize finalizes and initialises the library again, which is how PKCS#11 recovers from a lost device and
// how SoftHSM notices tokens created after C_Initialize. seen is the generation the caller found broken: if
// another caller has re-initialised since, nothing is done. Tokens notice the new generation and reconnect.
func (m *module) reinitialize(seen uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.generation.Load() != seen {
		return nil
	}
	_ = m.ctx.Finalize()
	err := initialize(m.ctx)
	m.generation.Add(1)
	m.lastInit = time.Now()
	modulesMu.Lock()
	m.logins = map[string][]byte{}
	modulesMu.Unlock()
	if err != nil {
		return fmt.Errorf("%w: C_Initialize: %v", ErrUnavailable, err)
	}
	return nil
}

// checkLogin records or compares the PIN digest for a token serial. It reports whether this PIN is the one the
// process is logged in with (or the first).
func (m *module) checkLogin(serial, pin string, alreadyLoggedIn bool) error {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	d := pinDigest(pin)
	prev, ok := m.logins[serial]
	if !ok {
		if alreadyLoggedIn {
			// Logged in by someone else in this process that we do not know of: we cannot vouch for the PIN.
			return errors.New("token is already logged in by another user of the library; cannot verify the PIN")
		}
		m.logins[serial] = d
		return nil
	}
	if !hmac.Equal(prev, d) {
		return ErrPINIncorrect
	}
	return nil
}
