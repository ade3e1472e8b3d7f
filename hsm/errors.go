package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Sentinel errors callers branch on. Every error returned by this package wraps at most one of them.
var (
	// ErrUnavailable: the module, slot or token cannot be reached now; the call may succeed later.
	ErrUnavailable = errors.New("HSM unavailable")
	// ErrTokenNotFound: no token with the configured label or slot.
	ErrTokenNotFound = errors.New("token not found")
	// ErrPINIncorrect: login refused. The message never carries the PIN.
	ErrPINIncorrect = errors.New("PIN incorrect or locked")
	// ErrObjectNotFound: no key object with the requested CKA_ID on the token.
	ErrObjectNotFound = errors.New("key object not found on the token")
	// ErrInvalidCiphertext: the token refused to authenticate the ciphertext (tampered, truncated, wrong key or
	// associated data).
	ErrInvalidCiphertext = errors.New("ciphertext invalid or tampered")
	// ErrMechanismUnsupported: the token does not offer a mechanism this operation needs.
	ErrMechanismUnsupported = errors.New("mechanism not supported by the token")
	// ErrInvalidArgument: the caller passed something the operation cannot take (checked before any call, so
	// that bad input never reaches the library: SoftHSM crashes on some of it).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrLoginBackoff: too many wrong PINs for the token in a row; every login waits, but those of connections
	// that logged in with the PIN before. It is an ErrPINIncorrect.
	ErrLoginBackoff = fmt.Errorf("%w: login attempts delayed", ErrPINIncorrect)
	// ErrUntrustedObject: an object where the engine would generate one (a version's HMAC secret) cannot be shown
	// to be generated on the token and never extractable, so it is never used: someone holding the PIN may have
	// put a secret they know there. An *UntrustedObjectError says which object and why.
	ErrUntrustedObject = errors.New("object of unproven origin on the token")
)

// UntrustedObjectError names an object of unproven origin (ErrUntrustedObject) and why it cannot be trusted.
type UntrustedObjectError struct {
	Kind   string // what the engine looked for, e.g. "HMAC key"
	Label  string
	ID     []byte
	Reason string
}

func (e *UntrustedObjectError) Error() string {
	return fmt.Sprintf("%s: the token holds a %s labelled %q with CKA_ID %x where this engine would generate one, and it cannot be shown to be generated on the token and never extractable (%s). It is never used: someone holding the token's PIN may have put a secret they know there, and no record of this engine says it made it. An operator removes it from the token (for instance pkcs11-tool --delete-object --type secrkey --id %x); the next use then makes a new one, and HMACs made with the removed one no longer verify",
		ErrUntrustedObject, e.Kind, e.Label, e.ID, e.Reason, e.ID)
}

func (e *UntrustedObjectError) Is(target error) bool { return target == ErrUntrustedObject }

// errAmbiguousVerdict: the token refused a ciphertext with a code it also gives for faults (SoftHSM 2.6 reports a
// GCM tag mismatch as CKR_GENERAL_ERROR). The call is asked once more on another session; the same answer twice
// is ErrInvalidCiphertext.
var errAmbiguousVerdict = errors.New("ciphertext refused with an ambiguous code")

// opError wraps a PKCS#11 failure with the operation's name and, where one applies, a sentinel; the PKCS#11
// error stays in the chain (rvOf finds it).
func opError(op string, err error) error {
	if err == nil {
		return nil
	}
	if rv, ok := rvOf(err); ok {
		switch {
		case classify(err) == classDevice:
			return fmt.Errorf("%s: %w: %w", op, ErrUnavailable, err)
		case rv == pkcs11.CKR_MECHANISM_INVALID || rv == pkcs11.CKR_MECHANISM_PARAM_INVALID:
			return fmt.Errorf("%s: %w: %w", op, ErrMechanismUnsupported, err)
		case rv == pkcs11.CKR_ARGUMENTS_BAD || rv == pkcs11.CKR_DATA_LEN_RANGE || rv == pkcs11.CKR_KEY_SIZE_RANGE:
			// What the caller chose (a hash, a salt, a message length) is not one the token takes with this key.
			return fmt.Errorf("%s: %w: %w", op, ErrInvalidArgument, err)
		case rv == pkcs11.CKR_PIN_INCORRECT || rv == pkcs11.CKR_PIN_LOCKED || rv == pkcs11.CKR_PIN_INVALID ||
			rv == pkcs11.CKR_PIN_LEN_RANGE || rv == pkcs11.CKR_PIN_EXPIRED:
			return fmt.Errorf("%s: %w: %w", op, ErrPINIncorrect, err)
		}
	}
	return fmt.Errorf("%s: %w", op, err)
}
