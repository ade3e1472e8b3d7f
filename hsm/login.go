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
// answers CKR_USER_ALREADY_LOGGED_IN to any PIN. The guard keeps, per token, a keyed digest (HMAC under a random
// key of the process's) of the PIN the token once accepted, for the module's life: re-initialisations log the
// process out but do not change the PIN. Another PIN is refused by comparing digests, in constant time, without
// C_Login: it would prove nothing while the process is logged in, and tokens that check it anyway count it
// towards their lockout (opencryptoki locks the user PIN after three), which would let one mount's mistakes lock
// out every mount and the token's other users. The guard also counts wrong PINs, so that whoever can write
// config/hsm on some mount cannot guess the PIN at memory speed.
type loginGuard struct {
	mu       sync.Mutex
	key      []byte
	verified map[string][]byte // token key → digest of the PIN the token accepted
	failing  map[string]*failedLogins
}

type failedLogins struct {
	count int
	until time.Time // no attempt with a PIN the connection has not proven before this
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
		g.verified, g.failing = map[string][]byte{}, map[string]*failedLogins{}
	}
	m := hmac.New(sha256.New, g.key)
	m.Write([]byte(pin))
	return m.Sum(nil)
}

// admit says whether a login with pin may be tried on the token now. proven says that the asking connection has
// logged in with this PIN before: such a connection is never held up by the failures of others, so that a
// guesser cannot keep the mounts that know the PIN from reconnecting. During a wait, every other attempt gets the
// same answer, the right PIN as a wrong one, by the same steps: a wait that let the right PIN through would tell
// the guesser when they found it. Outside a wait, a PIN other than the verified one is refused here (errNotThePIN).
// flags are the token's CKF_ flags: a token that warns that the next wrong PIN locks its user PIN is given no PIN
// it has not accepted before.
func (g *loginGuard) admit(token, pin string, proven bool, flags uint) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	d := g.digest(pin)
	good, known := g.verified[token]
	right := known && hmac.Equal(good, d)
	if proven && right {
		return nil
	}
	if f := g.failing[token]; f != nil && time.Now().Before(f.until) {
		return g.waitErr(f)
	}
	switch {
	case right:
		return nil
	case known:
		return errNotThePIN
	case flags&(pkcs11.CKF_USER_PIN_FINAL_TRY|pkcs11.CKF_USER_PIN_LOCKED) != 0:
		return fmt.Errorf("%w: the token locks its user PIN at the next wrong one (CKF_USER_PIN_FINAL_TRY), so a PIN it has not accepted in this process is not tried; log in once with the right PIN with the token's own tool (pkcsconf, pkcs11-tool --login) to reset its count", ErrPINIncorrect)
	}
	return nil
}

// waitErr is the answer to every attempt during a wait. It names the end of the wait, not the time left, so that
// two answers given a moment apart read alike.
func (g *loginGuard) waitErr(f *failedLogins) error {
	return fmt.Errorf("%w: %d wrong PINs in a row for this token; the next attempt is allowed from %s", ErrLoginBackoff,
		f.count, f.until.UTC().Format(time.TimeOnly+" UTC"))
}

// errNotThePIN: the PIN differs from the one the token accepted (admit's verdict, not the token's).
var errNotThePIN = pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)

// result records the outcome of C_Login with pin. loginErr is C_Login's error; CKR_USER_ALREADY_LOGGED_IN is
// judged by comparing the PIN with the one the token accepted. It returns nil when the PIN is right,
// ErrPINIncorrect when it is wrong, and locked reports that this failure started or lengthened a wait.
func (g *loginGuard) result(token, pin string, loginErr error) (err error, locked bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	d := g.digest(pin)
	rv, isRV := rvOf(loginErr)
	switch {
	case loginErr == nil:
		g.verified[token] = d
		delete(g.failing, token)
		return nil, false
	case isRV && rv == pkcs11.CKR_USER_ALREADY_LOGGED_IN:
		good, ok := g.verified[token]
		if !ok {
			// Logged in by a user of the library this process does not know of: the PIN cannot be vouched for.
			return fmt.Errorf("token is already logged in by another user of the library; cannot verify the PIN"), false
		}
		if hmac.Equal(good, d) {
			return nil, false
		}
	case isRV && (rv == pkcs11.CKR_PIN_INCORRECT || rv == pkcs11.CKR_PIN_INVALID || rv == pkcs11.CKR_PIN_LEN_RANGE):
		if good, ok := g.verified[token]; ok && hmac.Equal(good, d) {
			delete(g.verified, token) // the token refused the PIN it accepted before: it was changed outside Vault
		}
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
		wait := min(firstLoginWait<<min(f.count-freeLoginFailures, 20), maxLoginWait) // bounded shift: no overflow
		f.until = time.Now().Add(wait)
		return ErrPINIncorrect, true
	}
	return ErrPINIncorrect, false
}
