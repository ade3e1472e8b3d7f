package hsm

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// PKCS#11 login belongs to the application, not to a session: once one mount has logged the process in, C_Login
// answers CKR_USER_ALREADY_LOGGED_IN to any PIN. The guard keeps, per token, a keyed digest of the PIN that logged
// in, so that a mount giving another PIN is refused rather than riding on the first one's login; and it counts
// wrong PINs, so that whoever can write config/hsm on some mount cannot guess the PIN at memory speed (or lock a
// real HSM's partition by guessing at it).
type loginGuard struct {
	mu      sync.Mutex
	key     []byte
	good    map[string][]byte // token key → digest of the PIN the process is logged in with
	failing map[string]*failedLogins
}

type failedLogins struct {
	count int
	until time.Time // no attempt with an unknown PIN before this
}

const (
	// freeLoginFailures wrong PINs in a row cost nothing; each one after that doubles a wait, up to maxLoginWait.
	freeLoginFailures = 3
	firstLoginWait    = time.Second
	maxLoginWait      = 5 * time.Minute
)

func (g *loginGuard) digest(pin string) []byte {
	if g.key == nil {
		g.key = make([]byte, 32)
		if _, err := rand.Read(g.key); err != nil {
			panic(err)
		}
	}
	m := hmac.New(sha256.New, g.key)
	m.Write([]byte(pin))
	return m.Sum(nil)
}

// admit says whether a login with pin may be tried on the token now. The PIN that logged the process in is always
// admitted, so that a guesser cannot keep the mounts that know the PIN from reconnecting. Another PIN, while the
// process is logged in, is refused here without asking the token: C_Login would prove nothing (it answers
// CKR_USER_ALREADY_LOGGED_IN), and tokens that check it anyway count it towards their lockout (opencryptoki locks
// the user PIN after three), which would let a guesser lock out everyone.
func (g *loginGuard) admit(token, pin string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if good, ok := g.good[token]; ok {
		if hmac.Equal(good, g.digest(pin)) {
			return nil
		}
		if f := g.failing[token]; f != nil && time.Now().Before(f.until) {
			return g.waitErr(f)
		}
		return errNotThePIN
	}
	if f := g.failing[token]; f != nil && time.Now().Before(f.until) {
		return g.waitErr(f)
	}
	return nil
}

func (g *loginGuard) waitErr(f *failedLogins) error {
	return fmt.Errorf("%w: %d wrong PINs in a row for this token; next attempt allowed in %s", ErrLoginBackoff,
		f.count, time.Until(f.until).Round(time.Second))
}

// errNotThePIN: the PIN differs from the one the process is logged in with (admit's verdict, not the token's).
var errNotThePIN = pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)

// result records the outcome of C_Login with pin. loginErr is C_Login's error; CKR_USER_ALREADY_LOGGED_IN is
// judged by comparing the PIN with the one that logged in. It returns nil when the PIN is right, ErrPINIncorrect
// when it is wrong, and locked reports that this failure started or lengthened a wait.
func (g *loginGuard) result(token, pin string, loginErr error) (err error, locked bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.good == nil {
		g.good, g.failing = map[string][]byte{}, map[string]*failedLogins{}
	}
	d := g.digest(pin)
	rv, isRV := rvOf(loginErr)
	switch {
	case loginErr == nil:
		g.good[token] = d
		delete(g.failing, token)
		return nil, false
	case isRV && rv == pkcs11.CKR_USER_ALREADY_LOGGED_IN:
		good, ok := g.good[token]
		if !ok {
			// Logged in by a user of the library this process does not know of: the PIN cannot be vouched for.
			return fmt.Errorf("token is already logged in by another user of the library; cannot verify the PIN"), false
		}
		if hmac.Equal(good, d) {
			return nil, false
		}
	case isRV && (rv == pkcs11.CKR_PIN_INCORRECT || rv == pkcs11.CKR_PIN_INVALID || rv == pkcs11.CKR_PIN_LEN_RANGE):
	default:
		return loginErr, false // not a verdict on the PIN (a device fault, a locked PIN…)
	}
	f := g.failing[token]
	if f == nil {
		f = &failedLogins{}
		g.failing[token] = f
	}
	f.count++
	if f.count >= freeLoginFailures {
		wait := min(firstLoginWait<<(f.count-freeLoginFailures), maxLoginWait)
		f.until = time.Now().Add(wait)
		return ErrPINIncorrect, true
	}
	return ErrPINIncorrect, false
}

// forgetAll drops the record of logins: C_Finalize logged the process out of every token. Failed attempts stay.
func (g *loginGuard) forgetAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.good = map[string][]byte{}
}
