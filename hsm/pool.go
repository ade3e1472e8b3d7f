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

// Reconnection backoff: after a failed reconnection, calls fail fast until the next attempt. It starts short
// (a flaky network HSM fails one call in a hundred, reconnections among them) and doubles up to maxBackoff while
// the token stays away.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 30 * time.Second
	// reconnectAttempts are made at once before the backoff starts: a reconnection is several calls, and one of
	// them failing does not mean the token is gone.
	reconnectAttempts = 2
)

// session is a PKCS#11 session of one connection: usable only while the module generation and the connection's
// epoch it was opened in are current.
type session struct {
	h     pkcs11.SessionHandle
	gen   uint64
	epoch uint64
}

// pool is a Token's connection to its token: the slot, a login session kept open for the connection's life
// (SoftHSM forgets logins and handles when an application's last session closes), and idle sessions for
// operations. A reconnection ends the connection's epoch; sessions of an ended epoch are never used again.
//
// Lock order: pool.mu, then the module's lock, then calls, then the token's store guard (storeGuard). A
// reconnection holds mu while it waits for this connection's calls to leave the library (calls, for writing), and
// while a re-initialisation waits for every call of every connection to leave it (the module's lock, for writing).
// So nothing that runs inside a library call (module.enter) may take mu: what such code needs to know of the token
// (its info, its shared state) is read from found, which needs no lock. Connecting, reconnecting and closing take
// no lock of the module's for writing, only a real re-initialisation does: a mount's configuration holds up no
// other mount's calls.
type pool struct {
	mod   *module
	cfg   Config
	log   hclog.Logger
	slots chan struct{} // a place in the pool; at most PoolSize operations at once

	// epoch changes, with calls held for writing, whenever the connection is replaced or closed.
	epoch atomic.Uint64
	// calls is held for reading by each of this connection's calls while it is inside the library (pool.run,
	// pool.get), and for writing while the epoch changes: no session of an ended epoch is in use when its
	// sessions are closed.
	calls sync.RWMutex

	// found is the token the last connection found: set by each reconnection, read without a lock.
	found atomic.Pointer[foundToken]

	mu           sync.Mutex // guards what follows; never held while waiting for a call in another connection
	closed       bool
	connected    bool
	needReinit   bool   // the next reconnection re-initialises the module first
	provenFor    string // the token key this connection's PIN logged in to: such logins are never held up by others' failures
	gen          uint64 // module generation of the current connection
	slot         uint
	loginSession pkcs11.SessionHandle
	// copyOwner holds the connection's working copies (copies.go), opened on first need: session objects live
	// as long as the session that made them, so closing it, as the epoch's end does, destroys every copy.
	copyOwner session
	idle      []session
	lastErr   error
	retryAt   time.Time
	backoff   time.Duration
}

// foundToken is what a connection learnt of its token.
type foundToken struct {
	info  TokenInfo
	state *tokenState // what the process knows of the token, shared with other mounts on it
}

// current reports whether s belongs to the connection's current epoch. Read with calls held, it stays true until
// the call made under that lock returns.
func (p *pool) current(s session) bool { return s.epoch == p.epoch.Load() }

// connect establishes the first connection; a wrong label, slot or PIN fails here.
func (p *pool) connect() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.reconnectLocked(true); err != nil {
		return err
	}
	// A mount configured, or set up on a node taking over as active: another process (the node active before)
	// may have made objects since this one read the token's. A reconnection after a fault, or a re-initialisation
	// of the module, forgets nothing: this process made nothing meanwhile unseen, and under a flaky HSM that
	// reconnects often, reading the token whole after each would make every rotation pay for it.
	p.tokenState().objects.forget()
	return nil
}

// close ends the connection for good: the epoch ends under calls, so calls of this Token still in flight finish
// first and later ones fail cleanly; then the sessions are closed. Never C_Logout or
// C_CloseAllSessions: other mounts may share the token.
func (p *pool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	p.endEpochLocked(false)
}

// endEpochLocked ends the current epoch (and with reinit, the module generation) and closes the connection's
// sessions if the library still knows them. Sessions handed out and not yet returned are closed when they come
// back (put).
func (p *pool) endEpochLocked(reinit bool) error {
	idle, login, owner, gen := p.idle, p.loginSession, p.copyOwner, p.gen
	p.idle, p.loginSession, p.copyOwner, p.connected = nil, 0, session{}, false
	var rerr error
	if reinit {
		err := p.mod.exclusive(func() error {
			p.epoch.Add(1)
			rerr = p.mod.reinitializeLocked(gen)
			return nil
		})
		if err != nil {
			return err
		}
	} else {
		p.calls.Lock() // this connection's calls only: other connections' go on
		p.epoch.Add(1)
		p.calls.Unlock()
	}
	_ = p.mod.enter(gen, func(c pkcs11API) error { // only if the generation is still live
		for _, s := range idle {
			_ = c.CloseSession(s.h)
		}
		if owner.h != 0 && owner.gen == gen {
			_ = c.CloseSession(owner.h)
		}
		if login != 0 {
			_ = c.CloseSession(login)
		}
		return nil
	})
	return rerr
}

// reconnectLocked (re)establishes the connection: the old epoch ends (re-initialising the module first when a
// device fault asked for it), then slot lookup by label, a login session, and the login.
func (p *pool) reconnectLocked(first bool) error {
	if err := p.endEpochLocked(p.needReinit); err != nil {
		return err
	}
	p.needReinit = false
	gen := p.mod.generation.Load()
	slot, err := p.findSlot(gen)
	if errors.Is(err, errStale) {
		gen = p.mod.generation.Load()
		slot, err = p.findSlot(gen)
	}
	reinitToFind := false
	if errors.Is(err, ErrTokenNotFound) {
		var lerr error
		if reinitToFind, lerr = p.mod.mayReinitializeToFind(p.cfg); lerr != nil {
			p.log.Warn("a token missing from the module's list is not looked for again: other mounts use the module, and a fresh copy of the library could not be asked whether the token exists", "error", lerr)
		}
	}
	if reinitToFind {
		// SoftHSM (and some real modules) fix the slot list at C_Initialize: look again after re-initialising.
		// Every other user of the module reconnects after that, so that happens under them only for a token that
		// exists (see mayReinitializeToFind).
		if rerr := p.mod.exclusive(func() error { return p.mod.reinitializeLocked(gen) }); rerr != nil {
			return rerr
		}
		gen = p.mod.generation.Load()
		if slot, err = p.findSlot(gen); errors.Is(err, ErrTokenNotFound) {
			p.mod.foundNothingByReinitializing()
		}
	}
	if err != nil {
		return err
	}
	var ti pkcs11.TokenInfo
	var sh pkcs11.SessionHandle
	err = p.mod.enter(gen, func(c pkcs11API) error {
		var err error
		if ti, err = c.GetTokenInfo(slot); err != nil {
			return opError("C_GetTokenInfo", err)
		}
		if sh, err = c.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
			return opError("C_OpenSession", err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := p.loginLocked(gen, sh, slotKey(p.cfg.Library, ti), ti.Flags); err != nil {
		_ = p.mod.enter(gen, func(c pkcs11API) error { return c.CloseSession(sh) })
		return err
	}
	p.slot, p.gen, p.loginSession, p.connected = slot, gen, sh, true
	p.provenFor = slotKey(p.cfg.Library, ti)
	info := tokenInfoFrom(slot, ti)
	p.found.Store(&foundToken{info: info, state: p.mod.token(slotKey(p.cfg.Library, ti))})
	p.lastErr, p.backoff = nil, 0
	if !first {
		p.log.Warn("reconnected to the HSM token", "token", info.Label, "slot", slot)
	}
	return nil
}

// loginLocked logs the process in on the login session, through the module's guard of wrong PINs. flags are the
// token's CKF_ flags.
func (p *pool) loginLocked(gen uint64, sh pkcs11.SessionHandle, token string, flags uint) error {
	loginErr := p.mod.logins.admit(token, p.cfg.PIN, p.provenFor == token, flags)
	switch {
	case errors.Is(loginErr, ErrPINIncorrect):
		return loginErr // the wait, or a token that must not see an unverified PIN: nothing to count
	case loginErr == nil:
		if err := p.mod.enter(gen, func(c pkcs11API) error {
			loginErr = c.Login(sh, pkcs11.CKU_USER, p.cfg.PIN)
			return nil
		}); err != nil {
			return err
		}
	}
	verdict, locked := p.mod.logins.result(token, p.cfg.PIN, loginErr)
	if locked {
		p.log.Warn("wrong PIN for the HSM token again: further login attempts are delayed, but for connections already logged in with the PIN",
			"mount", p.cfg.Mount, "token", strings.TrimSpace(tokenLabel(token)))
	}
	switch {
	case verdict == nil:
		return nil
	case errors.Is(verdict, ErrPINIncorrect):
		return fmt.Errorf("C_Login: %w", ErrPINIncorrect)
	}
	return opError("C_Login", verdict)
}

// slotKey names a token within the process: the module, its serial and its label.
func slotKey(lib string, ti pkcs11.TokenInfo) string {
	return lib + "\x00" + strings.TrimSpace(ti.SerialNumber) + "\x00" + strings.TrimSpace(ti.Label)
}

func tokenLabel(key string) string {
	parts := strings.Split(key, "\x00")
	return parts[len(parts)-1]
}

func (p *pool) findSlot(gen uint64) (uint, error) {
	var found uint
	err := p.mod.enter(gen, func(c pkcs11API) error {
		slots, err := c.GetSlotList(true)
		if err != nil {
			return opError("C_GetSlotList", err)
		}
		for _, s := range slots {
			if p.cfg.TokenLabel == "" {
				if s == p.cfg.Slot {
					found = s
					return nil
				}
				continue
			}
			ti, err := c.GetTokenInfo(s)
			if err != nil {
				continue
			}
			if strings.TrimSpace(ti.Label) == p.cfg.TokenLabel && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
				found = s
				return nil
			}
		}
		return ErrTokenNotFound
	})
	if err == ErrTokenNotFound {
		err = p.slotMissing()
	}
	return found, err
}

// slotMissing says which token was not found. Never called within enter: onlyUser takes the modules' lock,
// which release holds while it waits for calls to leave the library.
func (p *pool) slotMissing() error {
	hint := ""
	if wait := p.mod.reinitializeToFindIn(); wait > 0 {
		hint = fmt.Sprintf(" (the module's token list was re-read a moment ago for another unknown token; a token created since is looked for again in %s)", wait.Round(time.Second))
	}
	if p.cfg.TokenLabel != "" {
		return fmt.Errorf("%w: no initialised token labelled %q%s", ErrTokenNotFound, p.cfg.TokenLabel, hint)
	}
	return fmt.Errorf("%w: no token in slot %d%s", ErrTokenNotFound, p.cfg.Slot, hint)
}

// ensure reconnects if the connection is gone, honouring the backoff.
func (p *pool) ensure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("%w: connection closed", ErrUnavailable)
	}
	if p.connected && p.gen == p.mod.generation.Load() {
		return nil
	}
	if p.lastErr != nil && time.Now().Before(p.retryAt) {
		return fmt.Errorf("%w: %v (next reconnection attempt in %s)", ErrUnavailable, p.lastErr,
			time.Until(p.retryAt).Round(100*time.Millisecond))
	}
	var err error
	for attempt := 0; attempt < reconnectAttempts; attempt++ {
		if err = p.reconnectLocked(false); err == nil || errors.Is(err, ErrPINIncorrect) {
			break
		}
		p.needReinit = p.needReinit || errors.Is(err, ErrUnavailable) // a device fault: re-initialise this time
	}
	if err != nil {
		p.backoff = min(max(2*p.backoff, minBackoff), maxBackoff)
		p.lastErr, p.retryAt = err, time.Now().Add(p.backoff)
		p.log.Warn("HSM reconnection failed", "error", err, "retry_in", p.backoff)
		if errors.Is(err, ErrUnavailable) {
			return err
		}
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// reinitialize re-initialises the module now and reconnects (quirks.reinitAfterDestroy); a failure is left to the
// next call's reconnection.
func (p *pool) reinitialize() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.needReinit = true
	if err := p.reconnectLocked(true); err != nil {
		p.connected, p.lastErr = false, err
		p.log.Warn("re-initialising the module after an object's destruction failed", "error", err)
	}
}

// markLost records that the connection s belongs to is unusable; device-class faults also re-initialise the
// module at the next reconnection.
func (p *pool) markLost(s session, reinit bool, cause error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s.epoch != p.epoch.Load() || !p.connected {
		return // someone already reconnected or marked it
	}
	p.connected = false
	p.needReinit = p.needReinit || reinit
	p.lastErr = cause
	p.log.Warn("HSM connection lost", "error", cause, "reinitialise", reinit)
}

// get returns an idle session of the current connection or opens one. On failure the returned session still
// names the connection it was meant for, so that the failure is charged to that connection.
func (p *pool) get() (session, error) {
	p.mu.Lock()
	if n := len(p.idle); n > 0 {
		s := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return s, nil
	}
	p.mu.Unlock()
	return p.open()
}

// open opens a session of the current connection, never an idle one. On failure the returned session still names
// the connection it was meant for.
func (p *pool) open() (session, error) {
	p.mu.Lock()
	s := session{gen: p.gen, epoch: p.epoch.Load()}
	slot := p.slot
	p.mu.Unlock()
	err := p.enterCurrent(s, func(c pkcs11API) error {
		h, err := c.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		s.h = h
		return err
	})
	return s, err
}

// run makes fn's calls on session s, if s still belongs to the current connection. On modules whose object store
// races, the calls pass the token's store guard, which gives up waiting when ctx ends; on every module, the
// objects they create or destroy are recorded in the token's object index.
func (p *pool) run(ctx context.Context, s session, fn func(c pkcs11API, s session) error) error {
	return p.enterCurrent(s, func(c pkcs11API) error {
		if state := p.tokenState(); state != nil {
			if p.mod.storeRaces {
				c = storeGuard{pkcs11API: c, ctx: ctx, lock: state.store}
			}
			c = indexedCalls{pkcs11API: c, x: &state.objects}
		}
		return fn(c, s)
	})
}

// enterCurrent runs fn inside the library if s belongs to the live generation and to the connection's current
// epoch, holding calls for reading so that the epoch stays current until fn returns.
func (p *pool) enterCurrent(s session, fn func(c pkcs11API) error) error {
	return p.mod.enter(s.gen, func(c pkcs11API) error {
		p.calls.RLock()
		defer p.calls.RUnlock()
		if !p.current(s) {
			return errStale
		}
		return fn(c)
	})
}

// copyOwnerSession returns the session that holds the current connection's working copies, opening it if
// needed. Its caller holds the copies' owner lock (workingCopies.owner): one opening at a time.
func (p *pool) copyOwnerSession() (session, error) {
	p.mu.Lock()
	if s := p.copyOwner; s.h != 0 && p.current(s) && p.connected {
		p.mu.Unlock()
		return s, nil
	}
	p.mu.Unlock()
	s, err := p.open()
	if err != nil {
		return s, err
	}
	p.mu.Lock()
	if !p.current(s) || !p.connected || p.closed {
		p.mu.Unlock()
		p.discard(s)
		return s, errStale
	}
	p.copyOwner = s
	p.mu.Unlock()
	return s, nil
}

// closeCopyOwner closes the session holding working copies, and with it every copy it holds, if it is still s.
func (p *pool) closeCopyOwner(s session) {
	p.mu.Lock()
	mine := p.copyOwner == s
	if mine {
		p.copyOwner = session{}
	}
	p.mu.Unlock()
	if !mine || s.h == 0 {
		return
	}
	err := p.mod.enter(s.gen, func(c pkcs11API) error { return c.CloseSession(s.h) })
	if err != nil && !errors.Is(err, errStale) {
		// The session, and the copies it holds, may live on: the connection is made again, on a re-initialised
		// module, which ends every session of the process's.
		p.markLost(s, true, fmt.Errorf("closing the session holding working copies: %w", err))
	}
}

// put returns a session after a call that left it usable.
func (p *pool) put(s session) {
	p.mu.Lock()
	if p.current(s) && p.connected && !p.closed {
		p.idle = append(p.idle, s)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	p.discard(s)
}

// discard closes a session that must not be reused, if the library still knows it: a session of an ended epoch
// in the live generation is still open, and nobody else holds its number.
func (p *pool) discard(s session) {
	if s.h == 0 {
		return
	}
	_ = p.mod.enter(s.gen, func(c pkcs11API) error { return c.CloseSession(s.h) })
}

// status says whether the connection is up now, and the last error if not.
func (p *pool) status() (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.connected && p.gen == p.mod.generation.Load(), p.lastErr
}

// tokenInfo and tokenState take no lock: code inside a library call may use them (see pool's lock order).
func (p *pool) tokenInfo() TokenInfo {
	if f := p.found.Load(); f != nil {
		return f.info
	}
	return TokenInfo{}
}

func (p *pool) tokenState() *tokenState {
	if f := p.found.Load(); f != nil {
		return f.state
	}
	return nil
}
