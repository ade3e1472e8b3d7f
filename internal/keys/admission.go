package keys

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// The one door: every use of key material — encrypt, decrypt, rewrap, datakey, sign, verify with an HMAC, hmac,
// csr — is admitted here before the HSM is called, once per request (a batch is judged once, for all its items).
// It knows the caller (entity, groups, source address, token) and the operation; it is where a key's access
// conditions and grants are checked, and where usage analytics and algorithm policy plug in. Paths that never
// touch key material (reading a key, verifying a signature with a public key) do not pass it.

// Operation is a use of key material, as access conditions and grants name it.
type Operation string

// The operations that use key material.
const (
	OpEncrypt Operation = "encrypt"
	OpDecrypt Operation = "decrypt"
	OpRewrap  Operation = "rewrap"
	OpDatakey Operation = "datakey"
	OpSign    Operation = "sign"
	OpVerify  Operation = "verify" // an HMAC's verification: it recomputes the HMAC with the secret
	OpHMAC    Operation = "hmac"
	OpCSR     Operation = "csr"
)

// Operations lists every operation, in the order the API documents them.
var Operations = []Operation{OpEncrypt, OpDecrypt, OpRewrap, OpDatakey, OpSign, OpVerify, OpHMAC, OpCSR}

// Identity resolves what the caller's Vault identity carries: its groups and metadata, from the identity store the
// plugin's system view offers. Only conditions that need them ask.
type Identity interface {
	// Entity returns the entity's metadata and the ids and names of its groups (direct and inherited); nil, nil
	// for an entity the store does not know.
	Entity(ctx context.Context, entityID string) (*EntityInfo, error)
}

// EntityInfo is what conditions read of an entity.
type EntityInfo struct {
	Name     string
	Metadata map[string]string
	Groups   []GroupRef
}

// GroupRef names a group by id and name; a condition may name either.
type GroupRef struct{ ID, Name string }

// Caller is who uses a key, as Vault tells the plugin of a request.
type Caller struct {
	Actor             // entity, display name, token accessor, request id
	RemoteAddr string // the request's source address (Vault's Connection.RemoteAddr)
	Identity   Identity
	// Protocol is what a protocol the engine serves besides Vault's API judges of the use, beside the key's own
	// conditions (AWS's External Key Store: its store's and external key's rules on the AWS principal, VPC
	// endpoint and KMS key): the condition that refuses it and why, "" when it admits it. Nil for Vault's requests.
	Protocol func(k *Key) (condition, reason string)
}

// DeniedError is a use of a key its access settings refuse: HTTP 403, its message naming the condition that
// failed and never another condition's values.
type DeniedError struct {
	Key       string
	Operation Operation
	Condition string // the failed condition's name: allowed_cidrs, allowed_hours, grant, ...
	msg       string
}

func (e *DeniedError) Error() string {
	return fmt.Sprintf("permission denied: %s on key %q: %s", e.Operation, e.Key, e.msg)
}

// IsDenied reports whether err is, or wraps, a DeniedError.
func IsDenied(err error) bool {
	var d *DeniedError
	return errors.As(err, &d)
}

// Access is a key's access settings (keys/:name/access), kept on the key so that every use checks them from the
// cached snapshot. Conditions all hold for a use to be admitted; a live grant stands in for the identity
// conditions (allowed_entity_ids, allowed_groups), and with GrantsRequired is needed besides them.
type Access struct {
	AllowedCIDRs           []string          `json:"allowed_cidrs,omitempty"`
	AllowedHours           []string          `json:"allowed_hours,omitempty"` // "mon-fri 08:00-18:00"
	TimeZone               string            `json:"time_zone,omitempty"`     // IANA name; UTC when empty
	AllowedEntityIDs       []string          `json:"allowed_entity_ids,omitempty"`
	AllowedGroups          []string          `json:"allowed_groups,omitempty"` // names or ids
	RequiredEntityMetadata map[string]string `json:"required_entity_metadata,omitempty"`
	// Operations the conditions govern; empty: every operation.
	Operations     []Operation   `json:"operations,omitempty"`
	GrantsRequired bool          `json:"grants_required,omitempty"`
	MaxGrantTTL    time.Duration `json:"max_grant_ttl,omitempty"`
}
