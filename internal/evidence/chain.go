// Package evidence is what an auditor needs to check the engine's evidence with the audit public key alone: the
// hash chain of a key's history, the signed chain head, and the signed evidence bundle. It has no dependency on
// Vault or on an HSM, so that the offline verifier (cmd/cmk-evidence) and the engine compute one thing one way.
package evidence

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"time"
)

// The fields of a stored history event that chain it: its place in the chain, the previous event's hash and its own.
const (
	FieldSeq  = "seq"
	FieldPrev = "prev_hash"
	FieldHash = "hash"
)

// SignatureAlgorithm is how the audit key signs: ECDSA on P-256 over SHA-256, the signature ASN.1 DER encoded (as
// Go's crypto/ecdsa, OpenSSL and Transit's "asn1" marshaling write it).
const SignatureAlgorithm = "ecdsa-p256-sha256"

// Canonical is an event's bytes as hashed: the JSON object without its "hash" member, members sorted by name,
// numbers as written, no insignificant white space. Any field an engine adds later is covered without this code
// knowing it.
func Canonical(event json.RawMessage) ([]byte, error) {
	d := json.NewDecoder(bytes.NewReader(event))
	d.UseNumber()
	var obj map[string]interface{}
	if err := d.Decode(&obj); err != nil {
		return nil, fmt.Errorf("event is not a JSON object: %w", err)
	}
	delete(obj, FieldHash)
	return json.Marshal(obj) // encoding/json writes map members sorted by name
}

// EventHash is the hex SHA-256 of an event's canonical bytes. The event carries its predecessor's hash in
// prev_hash, so the hash covers the whole chain before it.
func EventHash(event json.RawMessage) (string, error) {
	c, err := Canonical(event)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(c)
	return hex.EncodeToString(sum[:]), nil
}

// CreationEvents are the kinds of event a key's history chain begins with when no unchained events come before it:
// the key made, generated ("created") or imported ("imported"). A chain that begins with any other event is what is
// left of a history deleted whole, or the start of one stored after it.
var CreationEvents = map[string]bool{"created": true, "imported": true}

// UnchainedPin is the prev_hash of seq 1 when events stored before the engine chained history (unchained) come
// before it: the hex SHA-256 over their hashes in order, so that the signed chain pins them as they were stored when
// it began (their order, their number and their content).
func UnchainedPin(unchained []json.RawMessage) (string, error) {
	hashes := make([]string, len(unchained))
	for i, raw := range unchained {
		h, err := EventHash(raw)
		if err != nil {
			return "", fmt.Errorf("unchained event %d: %w", i, err)
		}
		hashes[i] = h
	}
	b, err := json.Marshal(struct {
		Purpose string   `json:"purpose"`
		Hashes  []string `json:"hashes"`
	}{"cmk unchained events", hashes})
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// Head is a key's chain head: the last event's place and hash, signed by a version of the mount's audit key.
type Head struct {
	Key             string    `json:"key"`
	Seq             int       `json:"seq"`
	Hash            string    `json:"hash"`
	SignedAt        time.Time `json:"signed_at"`
	AuditKeyVersion int       `json:"audit_key_version"`
	Signature       string    `json:"signature"` // base64 of the DER signature over SignedBytes
}

// SignedBytes is what the audit key signs for a head: the key's name binds the head to its key, so that one key's
// head cannot stand for another's.
func (h Head) SignedBytes() []byte {
	b, _ := json.Marshal(struct {
		Purpose  string `json:"purpose"`
		Key      string `json:"key"`
		Seq      int    `json:"seq"`
		Hash     string `json:"hash"`
		SignedAt string `json:"signed_at"`
	}{"cmk history head", h.Key, h.Seq, h.Hash, h.SignedAt.UTC().Format(time.RFC3339Nano)})
	return b
}

// AuditKeys are the audit key's public keys by version.
type AuditKeys map[int]*ecdsa.PublicKey

// ParseAuditKey reads a PEM "PUBLIC KEY" (PKIX) block holding a P-256 key.
func ParseAuditKey(pemText string) (*ecdsa.PublicKey, error) {
	b, _ := pem.Decode([]byte(pemText))
	if b == nil {
		return nil, errors.New("no PEM block in the audit public key")
	}
	pub, err := x509.ParsePKIXPublicKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("audit public key: %w", err)
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || ec.Curve.Params().Name != "P-256" {
		return nil, errors.New("the audit public key is not an ECDSA P-256 key")
	}
	return ec, nil
}

// MarshalAuditKey writes an audit public key as a PEM "PUBLIC KEY" block.
func MarshalAuditKey(pub *ecdsa.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

// Verify checks a base64 DER signature over msg with version of the audit keys.
func (ks AuditKeys) Verify(version int, msg []byte, signature string) error {
	pub := ks[version]
	if pub == nil {
		return fmt.Errorf("signed with audit key version %d, which is not among the public keys given", version)
	}
	sig, err := base64.StdEncoding.DecodeString(signature)
	if err != nil {
		return fmt.Errorf("signature is not base64: %w", err)
	}
	digest := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		return fmt.Errorf("signature does not verify with audit key version %d", version)
	}
	return nil
}

// Verification is what checking a key's history found. Broken names the first event that does not verify (its
// position in the list given, from 0, and its seq when it has one); -1 when none is broken.
type Verification struct {
	Verified bool `json:"verified"`
	Events   int  `json:"events"`
	// Unchained events were written before the engine chained history: they are listed but nothing vouches for them.
	Unchained   int    `json:"unchained_events"`
	Broken      int    `json:"first_broken_index"`
	BrokenSeq   int    `json:"first_broken_seq,omitempty"`
	Reason      string `json:"reason,omitempty"`
	HeadSeq     int    `json:"head_seq,omitempty"`
	HeadSigned  bool   `json:"head_signed"`
	HeadKeyVer  int    `json:"head_audit_key_version,omitempty"`
	HeadTimeUTC string `json:"head_signed_at,omitempty"`
}

type chainFields struct {
	Seq   *int   `json:"seq"`
	Prev  string `json:"prev_hash"`
	Hash  string `json:"hash"`
	Event string `json:"event"`
}

// beginning checks the chain's first event, first (events[i]), which the events before it (all unchained) precede:
// it is seq 1, and either pins those events (UnchainedPin) or, with none before it, is the key's creation. It
// returns the prev_hash seq 1 must carry, or why the chain does not begin as it must.
func beginning(before []json.RawMessage, first chainFields) (string, string) {
	seq := *first.Seq
	switch {
	case seq != 1 && first.Prev != "":
		return "", fmt.Sprintf("the chain's first event (seq %d) follows an event that is missing", seq)
	case seq != 1:
		return "", fmt.Sprintf("the chain starts at seq %d: its first events are missing", seq)
	case len(before) == 0 && first.Prev == "" && !CreationEvents[first.Event]:
		return "", fmt.Sprintf("the chain does not begin at the key's creation: its first event is %q (the history before it was deleted)", first.Event)
	case len(before) == 0:
		return "", ""
	}
	pin, err := UnchainedPin(before)
	if err != nil {
		return "", err.Error()
	}
	if first.Prev != pin {
		return "", fmt.Sprintf("the %d unchained events before the chain are not the ones its first event pinned: altered, added or removed", len(before))
	}
	return pin, ""
}

// CheckBeginning says why events, oldest first, do not begin a chain as the engine begins one (seq 1 at the key's
// creation, or pinning the unchained events before it); nil when they do, or hold no chained event.
func CheckBeginning(events []json.RawMessage) error {
	for i, raw := range events {
		var f chainFields
		if err := json.Unmarshal(raw, &f); err != nil {
			return fmt.Errorf("event %d is not a JSON object: %w", i, err)
		}
		if f.Seq != nil {
			if _, why := beginning(events[:i], f); why != "" {
				return errors.New(why)
			}
			return nil
		}
	}
	return nil
}

// VerifyChain checks a key's events, oldest first, against its signed head: each chained event's hash is its own,
// follows its predecessor's hash and seq, and the last one is the head the audit key signed. The chain begins at
// seq 1 with the key's creation, or, after events stored before the engine chained history (counted as unchained),
// with seq 1 pinning them (UnchainedPin); an unchained event after a chained one is a break (a chain is not given
// up). No history at all, a nil head, or one no given key verifies, fails: an altered chain could otherwise be
// rehashed whole, or deleted whole.
func VerifyChain(key string, events []json.RawMessage, head *Head, keys AuditKeys) Verification {
	v := Verification{Events: len(events), Broken: -1}
	fail := func(i, seq int, format string, args ...interface{}) Verification {
		v.Verified, v.Broken, v.BrokenSeq, v.Reason = false, i, seq, fmt.Sprintf(format, args...)
		return v
	}
	prevHash, prevSeq, chained := "", 0, false
	for i, raw := range events {
		var f chainFields
		if err := json.Unmarshal(raw, &f); err != nil {
			return fail(i, 0, "event %d is not a JSON object: %v", i, err)
		}
		if f.Seq == nil {
			if chained {
				return fail(i, 0, "event %d carries no chain fields after chained events", i)
			}
			v.Unchained++
			continue
		}
		seq := *f.Seq
		want := prevSeq + 1
		if !chained {
			pin, why := beginning(events[:i], f)
			if why != "" {
				return fail(i, seq, "event %d: %s", i, why)
			}
			want, prevHash = seq, pin
		}
		if seq != want {
			return fail(i, seq, "event %d has seq %d where %d was expected (an event was removed, added or moved)", i, seq, want)
		}
		if f.Prev != prevHash {
			return fail(i, seq, "event %d (seq %d) does not follow the event before it (prev_hash differs)", i, seq)
		}
		h, err := EventHash(raw)
		if err != nil {
			return fail(i, seq, "event %d: %v", i, err)
		}
		if h != f.Hash {
			return fail(i, seq, "event %d (seq %d) was altered: its content does not match its hash", i, seq)
		}
		prevHash, prevSeq, chained = h, seq, true
	}
	if head == nil {
		switch {
		case len(events) == 0:
			return fail(0, 0, "history missing: no events and no signed head (a key's history begins at its creation)")
		case !chained:
			v.Reason = "the history predates chaining and no head vouches for it"
			return v
		}
		return fail(len(events), 0, "no signed head: the chain's end is not vouched for")
	}
	v.HeadSeq, v.HeadKeyVer, v.HeadTimeUTC = head.Seq, head.AuditKeyVersion, head.SignedAt.UTC().Format(time.RFC3339)
	if head.Key != key {
		return fail(len(events), 0, "the head is for key %q, not %q", head.Key, key)
	}
	if err := keys.Verify(head.AuditKeyVersion, head.SignedBytes(), head.Signature); err != nil {
		return fail(len(events), 0, "head: %v", err)
	}
	v.HeadSigned = true
	switch {
	case head.Seq > prevSeq:
		// the first event missing is the one after the chain's end
		return fail(len(events), prevSeq+1, "the head vouches for seq %d but the chain ends at %d: events were removed from its end", head.Seq, prevSeq)
	case head.Seq < prevSeq:
		// events after the head's seq are not vouched for; the first such is the break
		for i, raw := range events {
			var f chainFields
			_ = json.Unmarshal(raw, &f)
			if f.Seq != nil && *f.Seq == head.Seq+1 {
				return fail(i, head.Seq+1, "event %d (seq %d) comes after the signed head (seq %d)", i, head.Seq+1, head.Seq)
			}
		}
	case head.Hash != prevHash:
		return fail(len(events)-1, prevSeq, "the last event (seq %d) is not the one the head signed", prevSeq)
	}
	v.Verified = true
	return v
}
