// Package xks is AWS KMS's External Key Store proxy API, v1 (specification aws/aws-kms-xksproxy-api-spec): its
// requests and errors, the AES-GCM parameters it carries and how they bind the engine's key version, and SigV4
// verification of requests as the front end (cmd/cmk-xks-proxy) received them. It holds no key and calls no HSM:
// the engine (xks.go in the root package) does that through the door every use of a key passes.
package xks

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"
)

// Error is an XKS error: its HTTP status and errorName, and a message of printable ASCII under 512 characters.
type Error struct {
	Status  int
	Name    string
	Message string
}

func (e *Error) Error() string { return e.Name + ": " + e.Message }

// The specification's error names, with their statuses.
const (
	ValidationException           = "ValidationException"
	InvalidStateException         = "InvalidStateException"
	InvalidCiphertextException    = "InvalidCiphertextException"
	InvalidKeyUsageException      = "InvalidKeyUsageException"
	AuthenticationFailedException = "AuthenticationFailedException"
	AccessDeniedException         = "AccessDeniedException"
	KeyNotFoundException          = "KeyNotFoundException"
	InvalidURIPathException       = "InvalidUriPathException"
	ThrottlingException           = "ThrottlingException"
	UnsupportedOperationException = "UnsupportedOperationException"
	DependencyTimeoutException    = "DependencyTimeoutException"
	InternalException             = "InternalException"
)

var statusOf = map[string]int{
	ValidationException:           http.StatusBadRequest,
	InvalidStateException:         http.StatusBadRequest,
	InvalidCiphertextException:    http.StatusBadRequest,
	InvalidKeyUsageException:      http.StatusBadRequest,
	AuthenticationFailedException: http.StatusUnauthorized,
	AccessDeniedException:         http.StatusForbidden,
	KeyNotFoundException:          http.StatusNotFound,
	InvalidURIPathException:       http.StatusNotFound,
	ThrottlingException:           http.StatusTooManyRequests,
	UnsupportedOperationException: http.StatusNotImplemented,
	DependencyTimeoutException:    http.StatusServiceUnavailable,
	InternalException:             http.StatusInternalServerError,
}

// Errorf makes the error name with its status and a message.
func Errorf(name, format string, args ...interface{}) *Error {
	status, ok := statusOf[name]
	if !ok {
		name, status = InternalException, http.StatusInternalServerError
	}
	return &Error{Status: status, Name: name, Message: printable(fmt.Sprintf(format, args...))}
}

// printable keeps a message to what the specification allows: 0x20–0x7e, under 512 characters.
func printable(s string) string {
	var b strings.Builder
	for _, r := range s {
		if b.Len() >= 500 {
			break
		}
		if r < 0x20 || r > 0x7e {
			r = '?'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Body is the error's JSON body.
func (e *Error) Body() []byte {
	b, _ := json.Marshal(map[string]string{"errorName": e.Name, "errorMessage": e.Message})
	return b
}

// The path's grammar: [/<prefix>]/kms/xks/v1, then keys/<externalKeyId>/<operation> or health.
const (
	APISuffix     = "/kms/xks/v1"
	maxURIPathLen = 128 // XksProxyUriPath
	maxKeyIDLen   = 128
	maxARNLen     = 2048
)

var (
	uriPathChars = regexp.MustCompile(`^[a-zA-Z0-9/_-]*$`)
	keyIDPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)
)

// CheckURIPath says whether p is a valid XksProxyUriPath: [/<prefix>]/kms/xks/v1, at most 128 characters of
// a-z, A-Z, 0-9, /, - and _.
func CheckURIPath(p string) error {
	switch {
	case len(p) > maxURIPathLen:
		return fmt.Errorf("the URI path %q is longer than %d characters", p, maxURIPathLen)
	case !uriPathChars.MatchString(p):
		return fmt.Errorf("the URI path %q has characters other than a-z, A-Z, 0-9, /, - and _", p)
	case !strings.HasSuffix(p, APISuffix):
		return fmt.Errorf("the URI path %q does not end in %s", p, APISuffix)
	case strings.Contains(p, "//"), p != APISuffix && !strings.HasPrefix(p, "/"):
		return fmt.Errorf("the URI path %q is not /<prefix>%s", p, APISuffix)
	}
	return nil
}

// CheckKeyID says whether id is a valid externalKeyId: 1–128 of A-Z, a-z, 0-9, '-', '.' and '_'.
func CheckKeyID(id string) error {
	if !keyIDPattern.MatchString(id) {
		return fmt.Errorf("external key id %q is not 1 to %d of A-Z, a-z, 0-9, '-', '.' and '_'", id, maxKeyIDLen)
	}
	return nil
}

// Operation is what a request's path asks for.
type Operation string

// The API's operations, as their paths name them.
const (
	OpMetadata Operation = "metadata"
	OpEncrypt  Operation = "encrypt"
	OpDecrypt  Operation = "decrypt"
	OpHealth   Operation = "health"
)

// Route splits a request path under uriPath into the operation and the external key id (none for health).
func Route(path, uriPath string) (Operation, string, *Error) {
	rest, ok := strings.CutPrefix(path, uriPath+"/")
	if !ok {
		return "", "", Errorf(InvalidURIPathException, "the path is not under this key store's %s", uriPath)
	}
	if rest == string(OpHealth) {
		return OpHealth, "", nil
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 3 || parts[0] != "keys" {
		return "", "", Errorf(InvalidURIPathException, "no XKS operation at this path")
	}
	switch op := Operation(parts[2]); op {
	case OpMetadata, OpEncrypt, OpDecrypt:
		if CheckKeyID(parts[1]) != nil {
			return "", "", Errorf(InvalidURIPathException, "the path's external key id is not 1 to %d of A-Z, a-z, 0-9, '-', '.' and '_'", maxKeyIDLen)
		}
		return op, parts[1], nil
	}
	return "", "", Errorf(InvalidURIPathException, "no XKS operation %q", parts[2])
}

// RequestMetadata is requestMetadata: who in AWS asked, and for which KMS call. Fields the specification may add
// later are ignored.
type RequestMetadata struct {
	AWSPrincipalARN string `json:"awsPrincipalArn"`
	AWSSourceVPC    string `json:"awsSourceVpc"`
	AWSSourceVPCE   string `json:"awsSourceVpce"`
	KMSKeyARN       string `json:"kmsKeyArn"`
	KMSOperation    string `json:"kmsOperation"` // any value: the specification says new ones may come
	KMSRequestID    string `json:"kmsRequestId"`
	KMSViaService   string `json:"kmsViaService"`
}

// Body is a request body of any operation; which fields are required depends on the operation.
type Body struct {
	RequestMetadata *RequestMetadata `json:"requestMetadata"`
	Plaintext       *string          `json:"plaintext"`
	Ciphertext      *string          `json:"ciphertext"`
	AAD             *string          `json:"additionalAuthenticatedData"`
	Algorithm       *string          `json:"encryptionAlgorithm"`
	CDIVAlgorithm   *string          `json:"ciphertextDataIntegrityValueAlgorithm"`
	Metadata        *string          `json:"ciphertextMetadata"`
	IV              *string          `json:"initializationVector"`
	Tag             *string          `json:"authenticationTag"`
}

// Limits beyond the specification's minimums (4,300 bytes of plaintext, 8,192 of AAD): larger values are
// UnsupportedOperationException, as the specification says. The AAD's length must fit the two bytes the HSM's
// AAD gives it.
const (
	MaxPlaintext = 64 << 10
	MaxAAD       = 1<<16 - 1
	MaxMetadata  = 20
)

// Parse reads a request body for op and checks what the specification requires of it.
func Parse(op Operation, raw []byte) (*Body, *Error) {
	var b Body
	if err := json.Unmarshal(raw, &b); err != nil {
		return nil, Errorf(ValidationException, "the body is not a JSON object: %v", err)
	}
	md := b.RequestMetadata
	if md == nil {
		return nil, Errorf(ValidationException, "requestMetadata is missing")
	}
	if md.KMSRequestID == "" || md.KMSOperation == "" {
		return nil, Errorf(ValidationException, "requestMetadata needs kmsRequestId and kmsOperation")
	}
	if op == OpHealth {
		return &b, nil
	}
	if md.AWSPrincipalARN == "" {
		return nil, Errorf(ValidationException, "requestMetadata needs awsPrincipalArn")
	}
	if (op == OpEncrypt || op == OpDecrypt) && md.KMSKeyARN == "" {
		return nil, Errorf(ValidationException, "requestMetadata needs kmsKeyArn")
	}
	for _, s := range []string{md.AWSPrincipalARN, md.KMSKeyARN, md.AWSSourceVPC, md.AWSSourceVPCE} {
		if len(s) > maxARNLen {
			return nil, Errorf(ValidationException, "a requestMetadata value is longer than %d characters", maxARNLen)
		}
	}
	if op == OpMetadata {
		return &b, nil
	}
	switch {
	case b.Algorithm == nil:
		return nil, Errorf(ValidationException, "encryptionAlgorithm is missing")
	case *b.Algorithm != "AES_GCM":
		return nil, Errorf(UnsupportedOperationException, "encryptionAlgorithm %q is not supported: only AES_GCM", *b.Algorithm)
	}
	if op == OpEncrypt {
		if b.Plaintext == nil || *b.Plaintext == "" {
			return nil, Errorf(ValidationException, "plaintext is missing")
		}
		if b.CDIVAlgorithm != nil && *b.CDIVAlgorithm != "SHA_256" {
			return nil, Errorf(UnsupportedOperationException, "ciphertextDataIntegrityValueAlgorithm %q is not supported: only SHA_256", *b.CDIVAlgorithm)
		}
		return &b, nil
	}
	for name, v := range map[string]*string{"ciphertext": b.Ciphertext, "initializationVector": b.IV, "authenticationTag": b.Tag} {
		if v == nil {
			return nil, Errorf(ValidationException, "%s is missing", name)
		}
	}
	return &b, nil
}

// Decode reads a Base64 field of at most max bytes: invalid Base64 is the ValidationException the specification
// gives for an invalid input, a value over the engine's limit UnsupportedOperationException.
func Decode(field string, v *string, max int) ([]byte, *Error) {
	if v == nil {
		return nil, nil
	}
	if base64.StdEncoding.DecodedLen(len(*v)) > max+2 {
		return nil, Errorf(UnsupportedOperationException, "%s is longer than the %d bytes this engine supports", field, max)
	}
	b, err := base64.StdEncoding.DecodeString(*v)
	if err != nil {
		return nil, Errorf(ValidationException, "%s is not valid Base64", field)
	}
	if len(b) > max {
		return nil, Errorf(UnsupportedOperationException, "%s is longer than the %d bytes this engine supports", field, max)
	}
	return b, nil
}

// Ciphertext metadata: the engine's key version, so that a rotation is invisible to AWS. One format byte (how the
// HSM's AAD was made, as the specification advises), then the version, big-endian.
const metadataFormat = 1

// Metadata is the ciphertextMetadata of a ciphertext made by version v.
func Metadata(v int) []byte {
	md := make([]byte, 5)
	md[0] = metadataFormat
	binary.BigEndian.PutUint32(md[1:], uint32(v))
	return md
}

// VersionOf reads the version from ciphertextMetadata; false for metadata this engine never made.
func VersionOf(md []byte) (int, bool) {
	if len(md) != 5 || md[0] != metadataFormat {
		return 0, false
	}
	v := binary.BigEndian.Uint32(md[1:])
	if v == 0 || v > 1<<31-1 {
		return 0, false
	}
	return int(v), true
}

// HSMAAD is the AAD the HSM authenticates: the 2-byte big-endian length of the caller's AAD, the AAD, the 1-byte
// length of the ciphertext metadata, the metadata. The lengths keep AAD and metadata from standing in for each
// other.
func HSMAAD(aad, md []byte) []byte {
	out := make([]byte, 0, 3+len(aad)+len(md))
	out = binary.BigEndian.AppendUint16(out, uint16(len(aad)))
	out = append(out, aad...)
	out = append(out, byte(len(md)))
	return append(out, md...)
}

// CDIV is the ciphertextDataIntegrityValue: SHA-256 over AAD ‖ metadata ‖ IV ‖ ciphertext ‖ tag, without lengths
// (Appendix C).
func CDIV(aad, md, iv, ct, tag []byte) []byte {
	h := sha256.New()
	for _, p := range [][]byte{aad, md, iv, ct, tag} {
		h.Write(p)
	}
	return h.Sum(nil)
}

// EncryptResponse is the encrypt operation's answer.
type EncryptResponse struct {
	Ciphertext string `json:"ciphertext"`
	Metadata   string `json:"ciphertextMetadata,omitempty"`
	IV         string `json:"initializationVector"`
	Tag        string `json:"authenticationTag"`
	CDIV       string `json:"ciphertextDataIntegrityValue,omitempty"`
}

// Sealed splits what the HSM returns for AES-GCM (ciphertext ‖ 16-byte tag).
func Sealed(sealed []byte) (ct, tag []byte) {
	n := len(sealed) - 16
	return sealed[:n:n], sealed[n:]
}

// Join is the HSM's input for decryption: ciphertext ‖ tag.
func Join(ct, tag []byte) []byte { return bytes.Join([][]byte{ct, tag}, nil) }

// Health answers GetHealthStatus.
type Health struct {
	FleetSize    int            `json:"xksProxyFleetSize"`
	ProxyVendor  string         `json:"xksProxyVendor"`
	ProxyModel   string         `json:"xksProxyModel"`
	EKMVendor    string         `json:"ekmVendor"`
	FleetDetails []FleetDetails `json:"ekmFleetDetails"`
}

// FleetDetails is one HSM of ekmFleetDetails.
type FleetDetails struct {
	ID           string `json:"id"`
	Model        string `json:"model"`
	HealthStatus string `json:"healthStatus"` // ACTIVE, DEGRADED or UNAVAILABLE
}

// KeyMetadata answers GetKeyMetadata.
type KeyMetadata struct {
	KeySpec   string   `json:"keySpec"`
	KeyUsage  []string `json:"keyUsage"`
	KeyStatus string   `json:"keyStatus"`
}
