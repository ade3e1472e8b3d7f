package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// Config selects a token and how to use it. The library path must come from the plugin's environment, never
// from an API request.
type Config struct {
	Library    string
	TokenLabel string // preferred: slots are renumbered when tokens are initialised
	Slot       uint   // used when TokenLabel is empty
	PIN        string
	PoolSize   int // sessions used for operations at once (the login session is extra)
}

const (
	minBackoff = 500 * time.Millisecond
	maxBackoff = 30 * time.Second
)

// Token is a logged-in connection to one token: a pool of sessions and a cache of object handles. It recovers
// from lost sessions, lost login and lost devices by itself; while the device is unreachable, calls fail fast
// with ErrUnavailable and reconnection is tried with backoff.
type Token struct {
	cfg   Config
	log   hclog.Logger
	mod   *module
	slots chan struct{} // a place in the pool; at most PoolSize operations at once

	// epoch changes at every reconnect: sessions and cached handles of an older epoch are not reused.
	epoch atomic.Uint64

	mu           sync.Mutex
	closed       bool
	connected    bool
	needReinit   bool   // the next reconnect re-initialises the module first
	gen          uint64 // module generation of the current connection
	slot         uint
	info         TokenInfo
	loginSession pkcs11.SessionHandle // kept open: SoftHSM drops login and handles when the last session closes
	idle         []pooledSession
	lastErr      error
	retryAt      time.Time
	backoff      time.Duration

	hmu     sync.RWMutex
	handles map[handleKey]cachedHandle

	rawOAEP sync.Map // crypto.Hash → true when the token's CKM_RSA_PKCS_OAEP refuses that hash

	// missing records, per handleKey, when an object this Token looked for was not on the token: a version
	// whose material was destroyed outside Vault. Cleared when the object is found again.
	missing sync.Map
}

type pooledSession struct {
	h     pkcs11.SessionHandle
	epoch uint64
}

type handleKey struct {
	kind keyKind
	id   string
}

type cachedHandle struct {
	h     pkcs11.ObjectHandle
	epoch uint64
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
	mod, err := acquireModule(cfg.Library)
	if err != nil {
		return nil, err
	}
	t := &Token{cfg: cfg, log: log, mod: mod, handles: map[handleKey]cachedHandle{}}
	t.mu.Lock()
	err = t.reconnectLocked(true)
	if err == nil && t.info.MaxSessionCount > 0 && uint(cfg.PoolSize)+1 > t.info.MaxSessionCount {
		// Respect the token's session cap, keeping one for the login session.
		capped := int(t.info.MaxSessionCount) - 1
		if capped < 1 {
			capped = 1
		}
		log.Warn("session pool capped by the token's session limit", "requested", cfg.PoolSize, "used", capped)
		t.cfg.PoolSize = capped
	}
	t.mu.Unlock()
	if err != nil {
		t.mod.release()
		return nil, err
	}
	t.slots = make(chan struct{}, t.cfg.PoolSize)
	return t, nil
}

// Close closes this Token's sessions (never C_Logout or C_CloseAllSessions: other mounts may share the token)
// and releases the module.
func (t *Token) Close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	t.closed = true
	t.closeSessionsLocked()
	t.mu.Unlock()
	t.mod.release()
}

// PoolSize is the number of sessions used for operations at once.
func (t *Token) PoolSize() int { return t.cfg.PoolSize }

// Status says whether the token is reachable now, and the last error if not. It makes no PKCS#11 call.
func (t *Token) Status() (connected bool, lastErr error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.connected && t.gen == t.mod.generation.Load(), t.lastErr
}

// closeSessionsLocked closes our sessions if they still belong to the live module generation. After a
// re-initialisation the numbers may already name other users' sessions, so they are only forgotten.
func (t *Token) closeSessionsLocked() {
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	live := t.connected && t.gen == t.mod.generation.Load()
	if live {
		for _, s := range t.idle {
			_ = t.mod.calls.CloseSession(s.h)
		}
		if t.loginSession != 0 {
			_ = t.mod.calls.CloseSession(t.loginSession)
		}
	}
	t.idle = nil
	t.loginSession = 0
	t.connected = false
}

// reconnectLocked (re)establishes the connection: optional module re-initialisation, slot lookup by label,
// login session, login. Called with t.mu held.
func (t *Token) reconnectLocked(first bool) error {
	t.closeSessionsLocked()
	t.epoch.Add(1)
	if t.needReinit {
		if err := t.mod.reinitialize(t.gen); err != nil {
			return err
		}
		t.needReinit = false
	}
	slot, err := t.findSlot()
	if errors.Is(err, ErrTokenNotFound) {
		// SoftHSM (and some real modules) fix the slot list at C_Initialize: look again after re-initialising.
		if rerr := t.mod.reinitialize(t.mod.generation.Load()); rerr != nil {
			return rerr
		}
		slot, err = t.findSlot()
	}
	if err != nil {
		return err
	}
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	gen := t.mod.generation.Load()
	ctx := t.mod.calls
	ti, err := ctx.GetTokenInfo(slot)
	if err != nil {
		return opError("C_GetTokenInfo", err)
	}
	sh, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return opError("C_OpenSession", err)
	}
	serial := strings.TrimSpace(ti.SerialNumber)
	err = ctx.Login(sh, pkcs11.CKU_USER, t.cfg.PIN)
	already := false
	if rv, ok := rvOf(err); ok && rv == pkcs11.CKR_USER_ALREADY_LOGGED_IN {
		err, already = nil, true
	}
	if err == nil {
		err = t.mod.checkLogin(slotKey(t.cfg.Library, serial, ti.Label), t.cfg.PIN, already)
	}
	if err != nil {
		_ = ctx.CloseSession(sh)
		if errors.Is(err, ErrPINIncorrect) {
			return fmt.Errorf("C_Login: %w", ErrPINIncorrect)
		}
		return opError("C_Login", err)
	}
	t.slot, t.gen, t.loginSession, t.connected = slot, gen, sh, true
	t.info = tokenInfoFrom(slot, ti)
	t.lastErr, t.backoff = nil, 0
	if !first {
		t.log.Warn("reconnected to the HSM token", "token", t.info.Label, "slot", slot)
	}
	return nil
}

func slotKey(lib, serial, label string) string {
	return lib + "\x00" + serial + "\x00" + strings.TrimSpace(label)
}

func (t *Token) findSlot() (uint, error) {
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	slots, err := t.mod.calls.GetSlotList(true)
	if err != nil {
		return 0, opError("C_GetSlotList", err)
	}
	for _, s := range slots {
		if t.cfg.TokenLabel == "" {
			if s == t.cfg.Slot {
				return s, nil
			}
			continue
		}
		ti, err := t.mod.calls.GetTokenInfo(s)
		if err != nil {
			continue
		}
		if strings.TrimSpace(ti.Label) == t.cfg.TokenLabel && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			return s, nil
		}
	}
	if t.cfg.TokenLabel != "" {
		return 0, fmt.Errorf("%w: no initialised token labelled %q", ErrTokenNotFound, t.cfg.TokenLabel)
	}
	return 0, fmt.Errorf("%w: no token in slot %d", ErrTokenNotFound, t.cfg.Slot)
}

// ensureConnected reconnects if the connection is gone, honouring the backoff.
func (t *Token) ensureConnected() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return fmt.Errorf("%w: connection closed", ErrUnavailable)
	}
	if t.connected && t.gen == t.mod.generation.Load() {
		return nil
	}
	if t.lastErr != nil && time.Now().Before(t.retryAt) {
		return fmt.Errorf("%w: %v (next reconnection attempt in %s)", ErrUnavailable, t.lastErr,
			time.Until(t.retryAt).Round(100*time.Millisecond))
	}
	err := t.reconnectLocked(false)
	if err != nil {
		t.backoff = min(max(2*t.backoff, minBackoff), maxBackoff)
		t.lastErr, t.retryAt = err, time.Now().Add(t.backoff)
		t.log.Warn("HSM reconnection failed", "error", err, "retry_in", t.backoff)
		if errors.Is(err, ErrUnavailable) {
			return err
		}
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// markLost records that the connection is unusable; device-class faults also re-initialise the module.
func (t *Token) markLost(epoch uint64, reinit bool, cause error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.epoch.Load() != epoch || !t.connected {
		return // someone already reconnected or marked it
	}
	t.connected = false
	t.needReinit = t.needReinit || reinit
	t.lastErr = cause
	t.log.Warn("HSM connection lost", "error", cause, "reinitialise", reinit)
}

func (t *Token) getSession() (pooledSession, error) {
	epoch := t.epoch.Load()
	t.mu.Lock()
	for len(t.idle) > 0 {
		s := t.idle[len(t.idle)-1]
		t.idle = t.idle[:len(t.idle)-1]
		if s.epoch == epoch {
			t.mu.Unlock()
			return s, nil
		}
	}
	slot := t.slot
	t.mu.Unlock()
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	h, err := t.mod.calls.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return pooledSession{}, err
	}
	return pooledSession{h: h, epoch: epoch}, nil
}

func (t *Token) putSession(s pooledSession) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s.epoch == t.epoch.Load() && t.connected && !t.closed {
		t.idle = append(t.idle, s)
		return
	}
	if t.gen == t.mod.generation.Load() && !t.closed {
		t.mod.mu.RLock()
		_ = t.mod.calls.CloseSession(s.h)
		t.mod.mu.RUnlock()
	}
}

func (t *Token) dropSession(s pooledSession) {
	if s.h == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	if t.mod.generation.Load() == t.gen && !t.closed {
		_ = t.mod.calls.CloseSession(s.h)
	}
}

// do runs fn on a pooled session, applying the recovery rules: a dead session is replaced, a lost login is
// restored, a stale handle is looked up again, a lost device is re-initialised; each at most once per call.
// fn must be safe to repeat after any of those errors (they mean the operation did not happen).
func (t *Token) do(ctx context.Context, op string, fn func(p pkcs11API, s pooledSession) error) error {
	select {
	case t.slots <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("%s: %w: no HSM session free: %v", op, ErrUnavailable, ctx.Err())
	}
	defer func() { <-t.slots }()

	var last error
	for attempt := 0; attempt < 2; attempt++ {
		if err := t.ensureConnected(); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		s, err := t.getSession()
		if err == nil {
			t.mod.mu.RLock()
			err = fn(t.mod.calls, s)
			t.mod.mu.RUnlock()
			if err == nil {
				t.putSession(s)
				return nil
			}
		}
		switch classify(err) {
		case classSession:
			t.dropSession(s)
		case classLogin:
			if s.h != 0 {
				t.putSession(s)
			}
			t.markLost(s.epoch, false, err)
		case classHandle:
			t.clearHandles()
			if s.h != 0 {
				t.putSession(s)
			}
		case classDevice:
			t.markLost(s.epoch, true, err)
		default:
			if s.h != 0 {
				t.putSession(s)
			}
			return opError(op, err)
		}
		last = err
		t.log.Debug("retrying HSM operation after recoverable error", "op", op, "error", err)
	}
	if c := classify(last); c == classSession || c == classLogin || c == classHandle {
		// Failed again after its recovery (a fresh session, login or lookup): the token is not serving now,
		// and a later call may succeed. An object that is gone fails the lookup instead (ErrObjectNotFound).
		return fmt.Errorf("%s: %w: %v", op, ErrUnavailable, last)
	}
	return opError(op, last)
}

// doObjects is do for operations that create or destroy token objects: one at a time per module, and, since
// every such operation here is idempotent (creation keeps an object already carrying its CKA_ID; destruction
// of what is gone succeeds), repeated after CKR_GENERAL_ERROR, which SoftHSM's file object store returns now
// and then under load.
func (t *Token) doObjects(ctx context.Context, op string, fn func(p pkcs11API, s pooledSession) error) error {
	t.mod.objects.Lock()
	defer t.mod.objects.Unlock()
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = t.do(ctx, op, fn); !isGeneralError(err) {
			return err
		}
		t.log.Warn("token object operation failed with CKR_GENERAL_ERROR; repeating it", "op", op, "attempt", attempt+1)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt+1) * 20 * time.Millisecond):
		}
	}
	return err
}

func isGeneralError(err error) bool {
	rv, ok := rvOf(err)
	return ok && rv == pkcs11.CKR_GENERAL_ERROR
}

func (t *Token) clearHandles() {
	t.hmu.Lock()
	t.handles = map[handleKey]cachedHandle{}
	t.hmu.Unlock()
}

// findKey returns the handle of the key object of this kind with CKA_ID id, from the cache when possible:
// searching the token per request is slow on SoftHSM once it holds many objects.
func (t *Token) findKey(p pkcs11API, s pooledSession, kind keyKind, id []byte) (pkcs11.ObjectHandle, error) {
	k := handleKey{kind, string(id)}
	t.hmu.RLock()
	c, ok := t.handles[k]
	t.hmu.RUnlock()
	if ok && c.epoch == s.epoch {
		return c.h, nil
	}
	hs, err := findObjects(p, s.h, kind.searchTemplate(id), 2)
	if err != nil {
		return 0, err
	}
	switch len(hs) {
	case 0:
		if _, seen := t.missing.LoadOrStore(k, time.Now().UTC()); !seen {
			t.log.Error("key object missing from the token: destroyed outside Vault?", "kind", kind.String(), "id", fmt.Sprintf("%x", id))
		}
		return 0, fmt.Errorf("%w: %s with CKA_ID %x", ErrObjectNotFound, kind, id)
	case 1:
		t.missing.Delete(k)
	default:
		return 0, fmt.Errorf("several %s objects share CKA_ID %x", kind, id)
	}
	t.cacheHandle(kind, id, hs[0], s.epoch)
	return hs[0], nil
}

// cacheHandle remembers the handle of an object this Token just made.
func (t *Token) cacheHandle(kind keyKind, id []byte, h pkcs11.ObjectHandle, epoch uint64) {
	t.hmu.Lock()
	t.handles[handleKey{kind, string(id)}] = cachedHandle{h: h, epoch: epoch}
	t.hmu.Unlock()
}

// MissingObjects names the objects with CKA_ID id (kinds: "aes key", "hmac secret", …) that this Token looked
// for and did not find on the token, with when that was first seen. It makes no PKCS#11 call.
func (t *Token) MissingObjects(id []byte) map[string]time.Time {
	var out map[string]time.Time
	t.missing.Range(func(k, v any) bool {
		if hk := k.(handleKey); hk.id == string(id) {
			if out == nil {
				out = map[string]time.Time{}
			}
			out[hk.kind.String()] = v.(time.Time)
		}
		return true
	})
	return out
}

func (t *Token) forgetHandles(id []byte) {
	t.hmu.Lock()
	for k := range t.handles {
		if k.id == string(id) {
			delete(t.handles, k)
		}
	}
	t.hmu.Unlock()
	t.missing.Range(func(k, _ any) bool {
		if k.(handleKey).id == string(id) {
			t.missing.Delete(k)
		}
		return true
	})
}

func findObjects(p pkcs11API, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(sh, tmpl); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for max <= 0 || len(all) < max {
		hs, _, err := p.FindObjects(sh, 100)
		if err != nil {
			_ = p.FindObjectsFinal(sh)
			return nil, err
		}
		all = append(all, hs...)
		if len(hs) == 0 {
			break
		}
	}
	if err := p.FindObjectsFinal(sh); err != nil {
		return nil, err
	}
	return all, nil
}
