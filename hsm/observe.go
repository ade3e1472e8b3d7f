package hsm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/miekg/pkcs11"
)

// Observer hears what the engine's metrics count of a Token: every operation (one do or doAside, recoveries
// included) with how long it took and how it ended, and every recovery by its class. It is called on the
// operation's goroutine and must not block; it knows nothing of PKCS#11.
type Observer interface {
	ObserveCall(op string, took time.Duration, err error)
	ObserveRecovery(class string)
}

func (t *Token) observeCall(op string, took time.Duration, err error) {
	if t.cfg.Observer != nil {
		t.cfg.Observer.ObserveCall(op, took, err)
	}
}

func (t *Token) observeRecovery(c errorClass) {
	if t.cfg.Observer != nil {
		t.cfg.Observer.ObserveRecovery(c.String())
	}
}

// String names a recovery class, for metrics and logs.
func (c errorClass) String() string {
	switch c {
	case classSession:
		return "session"
	case classLogin:
		return "login"
	case classHandle:
		return "handle"
	case classDevice:
		return "device"
	case classStale:
		return "stale"
	case classAmbiguous:
		return "ambiguous"
	case classUnseen:
		return "unseen"
	}
	return "other"
}

// SessionsInUse is how many of the pool's places operations hold now. It makes no PKCS#11 call.
func (t *Token) SessionsInUse() int { return len(t.pool.slots) }

// ErrNotLoggedIn: the token answers, and its sessions are not logged in even after logging in again.
var ErrNotLoggedIn = errors.New("the token's sessions are not logged in")

// Check makes one cheap call (C_GetSessionInfo) on a pooled session, with every operation's recovery (a lost
// session, login or device is restored first), and says whether the token serves now: nil, or why not. A token
// whose sessions stay logged out fails with ErrNotLoggedIn, a refused login with ErrPINIncorrect, the rest with
// ErrUnavailable.
func (t *Token) Check(ctx context.Context) error {
	loggedOut := false // as the last attempt found it
	err := t.do(ctx, "check", func(c pkcs11API, s session) error {
		lost, err := loginLost(c, s)
		rv, _ := rvOf(err)
		loggedOut = (err == nil && lost) || rv == pkcs11.CKR_USER_NOT_LOGGED_IN
		if err == nil && lost {
			return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN) // do logs in again once, then gives up
		}
		return err
	})
	if err != nil && loggedOut {
		return fmt.Errorf("%w: %v", ErrNotLoggedIn, err)
	}
	return err
}
