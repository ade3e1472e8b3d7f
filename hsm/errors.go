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
)

// errorClass says what recovery a PKCS#11 return value calls for.
type errorClass int

const (
	classOther   errorClass = iota
	classSession            // the session is unusable: drop it and use another
	classLogin              // the token forgot our login: log in again
	classHandle             // a cached object handle went stale: look the object up again
	classDevice             // the module, slot or token went away: re-initialise with backoff
)

func rvOf(err error) (uint, bool) {
	var e pkcs11.Error
	if errors.As(err, &e) {
		return uint(e), true
	}
	return 0, false
}

func classify(err error) errorClass {
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

// opError wraps a PKCS#11 failure with the operation's name and, where one applies, a sentinel.
func opError(op string, err error) error {
	if err == nil {
		return nil
	}
	if rv, ok := rvOf(err); ok {
		switch {
		case classify(err) == classDevice:
			return fmt.Errorf("%s: %w: %v", op, ErrUnavailable, err)
		case rv == pkcs11.CKR_MECHANISM_INVALID || rv == pkcs11.CKR_MECHANISM_PARAM_INVALID:
			return fmt.Errorf("%s: %w: %v", op, ErrMechanismUnsupported, err)
		case rv == pkcs11.CKR_PIN_INCORRECT || rv == pkcs11.CKR_PIN_LOCKED || rv == pkcs11.CKR_PIN_INVALID ||
			rv == pkcs11.CKR_PIN_LEN_RANGE || rv == pkcs11.CKR_PIN_EXPIRED:
			return fmt.Errorf("%s: %w: %v", op, ErrPINIncorrect, err)
		}
	}
	return fmt.Errorf("%s: %w", op, err)
}
