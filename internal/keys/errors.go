package keys

import (
	"errors"
	"fmt"
)

// CallerError is a request the caller must change: an unknown key, a version out of range, a state change the
// lifecycle forbids. It answers HTTP 400 with its message, on every path and in every batch item alike.
type CallerError struct{ msg string }

func (e *CallerError) Error() string { return e.msg }

// Callerf makes a CallerError.
func Callerf(format string, args ...interface{}) error {
	return &CallerError{msg: fmt.Sprintf(format, args...)}
}

// IsCaller reports whether err is, or wraps, a CallerError.
func IsCaller(err error) bool {
	var c *CallerError
	return errors.As(err, &c)
}

// ErrNotFound: the key does not exist (a CallerError's reason, for callers that branch on it).
var ErrNotFound = errors.New("key not found")

// notFound is the CallerError for a missing key.
func notFound(name string) error {
	return fmt.Errorf("%w: %w", &CallerError{msg: fmt.Sprintf("key %q not found", name)}, ErrNotFound)
}
