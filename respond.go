package cmk

import (
	"errors"
	"net/http"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// The one mapping from an error to what the caller sees, for single requests and batch items alike: 403 when the
// key's access conditions or grants refuse the use, 400 for what
// the caller must change (a keys.CallerError, a ciphertext the key does not authenticate, an argument or mechanism
// the HSM refuses for the caller's choice), 409 when a version number is held on the token by material that may
// not be adopted, or where the engine would generate an object the token holds one it cannot trust (an operator
// decides), 403 for a use of a key its access settings refuse (keys.DeniedError, from the door), 503 while the HSM
// cannot be reached or is not configured, 500 for the rest.

// errNotConfigured is returned until an operator writes config/hsm.
var errNotConfigured = errors.New("the HSM is not configured: write config/hsm (token_label and pin) first")

// classify returns an error's HTTP status and the message to give.
func classify(err error) (int, string) {
	var taken *keys.NumberTakenError
	switch {
	case errors.As(err, &taken), errors.Is(err, hsm.ErrUntrustedObject):
		// Not the caller's mistake: the token holds material an operator must decide about.
		return http.StatusConflict, err.Error()
	case keys.IsDenied(err):
		// The key's own access conditions or grants refuse the use: Vault's ACL admitted the path, the key did not.
		return http.StatusForbidden, err.Error()
	case keys.IsCaller(err):
		return http.StatusBadRequest, err.Error()
	case errors.Is(err, hsm.ErrInvalidCiphertext):
		return http.StatusBadRequest, "invalid ciphertext: " + hsm.ErrInvalidCiphertext.Error()
	case errors.Is(err, hsm.ErrInvalidArgument), errors.Is(err, hsm.ErrMechanismUnsupported),
		errors.Is(err, hsm.ErrPINIncorrect), errors.Is(err, hsm.ErrTokenNotFound):
		return http.StatusBadRequest, err.Error()
	case errors.Is(err, hsm.ErrUnavailable), errors.Is(err, errNotConfigured):
		return http.StatusServiceUnavailable, err.Error()
	case errors.Is(err, hsm.ErrObjectNotFound):
		// Not the caller's mistake and not a passing fault: the material was destroyed outside Vault. The version
		// is reported on the key (hsm_objects_missing) until the object is back.
		return http.StatusInternalServerError, "this key version's material is missing from the HSM token (destroyed outside Vault?): " + err.Error()
	}
	return http.StatusInternalServerError, err.Error()
}

// respond turns a request's failure into Vault's response for its status.
func respond(err error) (*logical.Response, error) {
	switch status, msg := classify(err); status {
	case http.StatusBadRequest:
		return logical.ErrorResponse("%s", msg), logical.ErrInvalidRequest
	default:
		return nil, logical.CodedError(status, msg)
	}
}

// callerf is keys.Callerf, the handlers' way of naming a caller's mistake.
var callerf = keys.Callerf

// statusOf is the HTTP status Vault answers a handler's outcome with: a raw response's own status, 200 or 204 on
// success, else Vault's own mapping of errors (logical.RespondErrorCommon, then AdjustErrorStatusCode, which keeps
// a coded error's code). The metrics count requests by it.
func statusOf(req *logical.Request, resp *logical.Response, err error) int {
	if resp != nil && resp.Data != nil {
		if code, ok := resp.Data[logical.HTTPStatusCode].(int); ok {
			return code
		}
	}
	if err == nil && (resp == nil || !resp.IsError()) {
		if resp == nil {
			return http.StatusNoContent
		}
		return http.StatusOK
	}
	code, cerr := logical.RespondErrorCommon(req, resp, err)
	logical.AdjustErrorStatusCode(&code, cerr)
	return code
}
