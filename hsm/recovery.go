package hsm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/miekg/pkcs11"
)

// errorClass says what recovery a failed call calls for.
type errorClass int

const (
	classOther     errorClass = iota
	classSession              // the session is unusable: drop it and use another
	classLogin                // the token forgot our login: log in again
	classHandle               // a cached object handle went stale: look the object up again
	classDevice               // the module, slot or token went away: re-initialise with backoff
	classStale                // the session belongs to a finished connection: the call was not made
	classAmbiguous            // a verdict the token also gives for faults: ask once more on another session
	classUnseen               // a search found nothing for an object the caller knows: look again on a fresh module
)

// errUnseen: a search for a version's object found nothing. SoftHSM's file store has been seen (under the soak's
// heavy parallel object writes and re-initialisations) to answer a search with nothing for an object it holds; a
// re-initialised module reads the token afresh. So the object is looked for once more that way, at most every
// lookAgainPause per module (re-initialising it resets every token and mount using it), before it is called
// missing.
var errUnseen = errors.New("object not seen by the token's search")

// lookAgainPause bounds how often a search that found nothing re-initialises the module, so that a version whose
// material really is gone (destroyed outside Vault) cannot make every request reset the token's connection.
const lookAgainPause = 5 * time.Second

func rvOf(err error) (uint, bool) {
	var e pkcs11.Error
	if errors.As(err, &e) {
		return uint(e), true
	}
	return 0, false
}

func classify(err error) errorClass {
	switch {
	case errors.Is(err, errStale):
		return classStale
	case errors.Is(err, errAmbiguousVerdict):
		return classAmbiguous
	case errors.Is(err, errUnseen):
		return classUnseen
	}
	rv, ok := rvOf(err)
	if !ok {
		return classOther
	}
	switch rv {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_OPERATION_ACTIVE:
		return classSession
	case pkcs11.CKR_USER_NOT_LOGGED_IN:
		return classLogin
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID:
		return classHandle
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT,
		pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_SLOT_ID_INVALID,
		pkcs11.CKR_DEVICE_MEMORY:
		return classDevice
	}
	return classOther
}

// mayMeanLoggedOut: answers that modules give, instead of CKR_USER_NOT_LOGGED_IN, once a C_Logout or
// C_CloseAllSessions elsewhere has logged the application out: private objects are then invisible.
func mayMeanLoggedOut(err error) bool {
	rv, ok := rvOf(err)
	if !ok {
		return false
	}
	switch rv {
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_MECHANISM_INVALID,
		pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED, pkcs11.CKR_KEY_TYPE_INCONSISTENT:
		return true
	}
	return false
}

// maxStaleRetries bounds the fresh sessions a call takes after connections ended under it.
const maxStaleRetries = 3

// do runs fn on a pooled session, applying the recovery rules: a dead session is replaced, a lost login is
// restored, a stale handle is looked up again, a lost device is re-initialised, each at most once per call; a
// session whose connection ended before its call is replaced without counting as a fault. fn must be safe to
// repeat after any of those errors (they mean the operation did not happen).
func (t *Token) do(ctx context.Context, op string, fn func(c pkcs11API, s session) error) (err error) {
	start := time.Now()
	defer func() { t.observeCall(op, time.Since(start), err) }()
	return t.doRecovering(ctx, op, fn)
}

// doRecovering is do's work, unobserved: doAside's fallback, observed there, runs it.
func (t *Token) doRecovering(ctx context.Context, op string, fn func(c pkcs11API, s session) error) error {
	select {
	case t.pool.slots <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("%s: %w: no HSM session free: %v", op, ErrUnavailable, ctx.Err())
	}
	defer func() { <-t.pool.slots }()

	var last error
	var recovered [classUnseen + 1]bool // each recovery at most once per call
	stale := 0
	for {
		if err := t.pool.ensure(); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		s, err := t.pool.get()
		if err == nil {
			if err = t.pool.run(ctx, s, fn); err == nil {
				t.pool.put(s)
				return nil
			}
		}
		class := classify(err)
		if class == classHandle || (class == classOther && mayMeanLoggedOut(err)) {
			if t.loggedOut(ctx, s) {
				class = classLogin
			}
		}
		switch class {
		case classStale:
			if stale++; stale > maxStaleRetries {
				return fmt.Errorf("%s: %w: the connection to the token keeps being replaced", op, ErrUnavailable)
			}
			continue // not a fault of this call's: get a session of the current connection
		case classSession, classAmbiguous:
			t.pool.discard(s)
		case classLogin:
			t.pool.put(s)
			t.pool.markLost(s, false, err)
		case classHandle:
			t.handles.clear()
			t.dropCopies()
			t.pool.put(s)
		case classDevice:
			t.pool.markLost(s, true, err)
		case classUnseen:
			t.pool.put(s)
			now, after := time.Now().UnixNano(), t.mod.lookAgainAfter.Load()
			if recovered[classUnseen] || now < after || !t.mod.lookAgainAfter.CompareAndSwap(after, now+int64(lookAgainPause)) {
				return opError(op, unseenAsMissing(err))
			}
			t.log.Warn("a search found nothing for a key object; looking again on a re-initialised module", "op", op)
			t.pool.reinitialize()
		default:
			t.pool.put(s)
			if t.quirks().reinitAfterRefusal {
				t.mod.refusedSinceInit.Store(true) // a later destruction may need a re-initialisation (doObjects)
			}
			return opError(op, err)
		}
		last = err
		if recovered[class] {
			break
		}
		recovered[class] = true
		t.observeRecovery(class)
		t.log.Debug("retrying HSM operation after recoverable error", "op", op, "error", err)
	}
	switch classify(last) {
	case classSession, classLogin, classHandle:
		// Failed again after its recovery (a fresh session, login or lookup): the token is not serving now, and a
		// later call may succeed. An object that is gone fails the lookup instead (ErrObjectNotFound).
		return fmt.Errorf("%s: %w: %v", op, ErrUnavailable, last)
	case classAmbiguous:
		if t.quirks().reinitAfterRefusal {
			t.mod.refusedSinceInit.Store(true)
		}
		return fmt.Errorf("%s: %w", op, ErrInvalidCiphertext) // the same verdict twice: the ciphertext is bad
	}
	return opError(op, last)
}

// doAside is do for long scans of the whole token: fn runs on a session opened for it and closed after, outside
// the pool's places, so that data-plane calls never wait behind it. One scan at a time per Token; waiting honours
// ctx. Where the module's sessions interfere (quirks.oneSession) or the token has no session to spare, it is do.
func (t *Token) doAside(ctx context.Context, op string, fn func(c pkcs11API, s session) error) (err error) {
	if t.quirks().oneSession {
		return t.do(ctx, op, fn)
	}
	start := time.Now()
	defer func() { t.observeCall(op, time.Since(start), err) }()
	return t.doAsideOnce(ctx, op, fn)
}

// doAsideOnce is doAside's work, unobserved.

func (t *Token) doAsideOnce(ctx context.Context, op string, fn func(c pkcs11API, s session) error) error {
	select {
	case t.scans <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("%s: %w: waiting for another scan of the token: %v", op, ErrUnavailable, ctx.Err())
	}
	defer func() { <-t.scans }()
	recovered := false
	for stale := 0; ; {
		if err := t.pool.ensure(); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		s, err := t.pool.open()
		if rv, ok := rvOf(err); ok && rv == pkcs11.CKR_SESSION_COUNT {
			return t.doRecovering(ctx, op, fn)
		}
		if err == nil {
			err = t.pool.run(ctx, s, fn)
		}
		t.pool.discard(s)
		if err == nil {
			return nil
		}
		switch class := classify(err); {
		case class == classStale && stale < maxStaleRetries:
			stale++
			continue
		case (class == classSession || class == classLogin || class == classDevice) && !recovered:
			recovered = true
			t.observeRecovery(class)
			if class != classSession {
				t.pool.markLost(s, class == classDevice, err)
			}
			continue
		case class == classSession || class == classLogin || class == classDevice || class == classStale:
			return fmt.Errorf("%s: %w: %v", op, ErrUnavailable, err)
		}
		return opError(op, err)
	}
}

// loggedOut reports whether session s has lost its login, asking the module on the session itself.
func (t *Token) loggedOut(ctx context.Context, s session) bool {
	if s.h == 0 {
		return false
	}
	lost := false
	_ = t.pool.run(ctx, s, func(c pkcs11API, s session) error {
		var err error
		lost, err = loginLost(c, s)
		return err
	})
	return lost
}

// doObjects is do for operations that create or destroy token objects. On tokens whose object store fails under
// parallel writes they run one at a time per token, and CKR_GENERAL_ERROR (or a template error), which SoftHSM's
// file store returns now and then under load, is repeated: every such operation here is idempotent (creation keeps an object
// already carrying its CKA_ID; destruction of what is gone succeeds). Waiting honours ctx.
func (t *Token) doObjects(ctx context.Context, op string, fn func(c pkcs11API, s session) error) error {
	state := t.pool.tokenState()
	q := t.quirks()
	if q.serialObjectWrites && state != nil {
		select {
		case state.objectWrites <- struct{}{}:
			defer func() { <-state.objectWrites }()
		case <-ctx.Done():
			return fmt.Errorf("%s: %w: waiting for another object write on the token: %v", op, ErrUnavailable, ctx.Err())
		}
	}
	attempts := 1
	if q.retryGeneralError {
		attempts = 3
	}
	destroyRepeated := false
	var err error
	for attempt := 1; ; attempt++ {
		err = t.doObjectsOnce(ctx, op, q, fn)
		if errors.Is(err, errDestroyAfterRefusal) && !destroyRepeated {
			// The destruction met a refusal's leftover; the module has been re-initialised since (doObjectsOnce):
			// once more, no sooner than the pause allows, so that refusals cannot make destructions re-initialise
			// the module under every mount at will.
			destroyRepeated = true
			if werr := t.mod.waitRefusalReinitTurn(ctx); werr != nil {
				return fmt.Errorf("%s: %w: %v", op, ErrUnavailable, werr)
			}
			t.log.Warn("a destruction was refused after another operation's refusal; repeating it on the re-initialised module", "op", op)
			attempt--
			continue
		}
		// SoftHSM's file store also answers, now and then under parallel writes, a template error to a template it
		// takes every other time (CKR_TEMPLATE_INCONSISTENT to the AES template of every version, twice in a
		// 10-minute soak): repeated like CKR_GENERAL_ERROR. A template it really refuses fails every attempt.
		if !(isGeneralError(err) || (q.retryGeneralError && refusesTemplate(err))) || attempt >= attempts {
			return err
		}
		t.log.Warn("token object operation failed with an error the module gives to passing faults; repeating it", "op", op, "attempt", attempt, "error", err)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt) * 20 * time.Millisecond):
		}
	}
}

// doObjectsOnce runs fn through do once; on modules that renumber objects after a destruction
// (quirks.reinitAfterDestroy), a call that destroyed anything (or tried to) re-initialises the module before the
// token's object-write turn is given up, so nothing is made meanwhile.
func (t *Token) doObjectsOnce(ctx context.Context, op string, q quirks, fn func(c pkcs11API, s session) error) error {
	if !q.reinitAfterDestroy {
		return t.do(ctx, op, fn)
	}
	var destroyed bool
	err := t.do(ctx, op, func(c pkcs11API, s session) error {
		return fn(destroyCounter{pkcs11API: c, destroyed: &destroyed, mod: t.mod, refusals: q.reinitAfterRefusal}, s)
	})
	if destroyed {
		t.pool.reinitialize()
	}
	return err
}
func isGeneralError(err error) bool {
	rv, ok := rvOf(err)
	return ok && rv == pkcs11.CKR_GENERAL_ERROR
}

// destroyCounter notes that a call destroyed an object, or tried to (for quirks.reinitAfterDestroy), and marks
// a destruction that a refusal's leftover may have failed (quirks.reinitAfterRefusal) with errDestroyAfterRefusal.
type destroyCounter struct {
	pkcs11API
	destroyed *bool
	mod       *module
	refusals  bool
}

func (d destroyCounter) DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error {
	*d.destroyed = true
	refused := d.refusals && d.mod.refusedSinceInit.Load()
	err := d.pkcs11API.DestroyObject(sh, oh)
	if rv, ok := rvOf(err); ok && rv == pkcs11.CKR_FUNCTION_FAILED && refused {
		return fmt.Errorf("%w: %w", errDestroyAfterRefusal, err)
	}
	return err
}

// errDestroyAfterRefusal: C_DestroyObject failed (CKR_FUNCTION_FAILED) on a module where an operation was refused
// since it was last initialised. tpm2-pkcs11 1.9 leaves the key of a refused operation undestroyable until the
// module is re-initialised; refusals themselves re-initialise nothing (a batch of bad ciphertexts would otherwise
// reset the module under every mount thousands of times), so only a destruction that meets one pays for it.
var errDestroyAfterRefusal = errors.New("destruction refused after an earlier refused operation")

// refusalReinitPause is the least time between two destructions repeated after a refusal (each one re-initialises
// the module, resetting every mount's connection to it).
const refusalReinitPause = 2 * time.Second
