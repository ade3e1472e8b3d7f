package main

import (
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// check is one thing verifying found: what was checked, whether it holds, and what exactly.
type check struct {
	Name   string
	Holds  bool
	Detail string
}

// result is what checking one bundle found, for the text verdict and the report alike.
type result struct {
	OK      bool
	Checks  []check
	Checked *evidence.Checked // nil when the bundle could not be read at all
	Given   []trustedKey
	// UsedKeys are the trusted keys by the version they checked.
	UsedKeys map[int]trustedKey
}

// Document is the bundle's document, nil when unreadable.
func (r *result) Document() *evidence.Document {
	if r.Checked == nil {
		return nil
	}
	return r.Checked.Document
}

// checkBundle verifies raw with the given keys, and, given an earlier bundle of the key (previous, nil when none),
// that its history goes on from that one's. The document is read once without keys to learn which audit key
// versions the bundle names, then checked with the trusted keys mapped to them (auditKeysFor).
func checkBundle(raw []byte, given []trustedKey, previous []byte) *result {
	r := &result{Given: given, UsedKeys: map[int]trustedKey{}}
	peek, err := evidence.Check(raw, evidence.AuditKeys{})
	if err != nil {
		r.Checks = append(r.Checks, check{Name: "bundle", Detail: "cannot be read: " + err.Error()})
		return r
	}
	named := []int{peek.SignedWith}
	if h := peek.Document.History.Head; h != nil {
		named = append(named, h.AuditKeyVersion)
	}
	keys := auditKeysFor(given, peek.Document.AuditKeys, named)
	for v, pub := range keys {
		for _, k := range given {
			if k.Key.Equal(pub) {
				r.UsedKeys[v] = k
				break
			}
		}
	}
	c, err := evidence.Check(raw, keys)
	if err != nil { // it read a moment ago
		r.Checks = append(r.Checks, check{Name: "bundle", Detail: "cannot be read: " + err.Error()})
		return r
	}
	r.Checked = c
	doc := c.Document
	r.Checks = append(r.Checks, check{Name: "bundle", Holds: true,
		Detail: fmt.Sprintf("%s for key %q (%s), generated %s by mount %q", evidence.BundleFormat, doc.Key.Name, doc.Key.Type,
			doc.GeneratedAt.UTC().Format("2006-01-02 15:04:05 UTC"), doc.Mount)})
	if c.SignatureErr == nil {
		r.Checks = append(r.Checks, check{Name: "signature", Holds: true,
			Detail: fmt.Sprintf("the document is signed by audit key version %d (%s)", c.SignedWith, r.keyName(c.SignedWith))})
	} else {
		r.Checks = append(r.Checks, check{Name: "signature",
			Detail: "the document's signature does not verify: " + c.SignatureErr.Error() +
				"; what the document says of the key is not vouched for (its history events only by the chain head's own signature)"})
	}
	r.Checks = append(r.Checks, historyCheck(c, r))
	e := doc.History.Verification
	if c.EngineAgrees {
		r.Checks = append(r.Checks, check{Name: "engine's verification", Holds: true,
			Detail: "the engine's own verification in the document says the same"})
	} else {
		r.Checks = append(r.Checks, check{Name: "engine's verification",
			Detail: fmt.Sprintf("the document says verified=%v, first broken event %s; re-verifying found verified=%v, first broken event %s",
				e.Verified, brokenName(e.Broken), c.History.Verified, brokenName(c.History.Broken))})
	}
	r.OK = c.OK()
	if previous != nil {
		cont := continuityCheck(previous, given, doc)
		r.Checks = append(r.Checks, cont)
		r.OK = r.OK && cont.Holds
	}
	return r
}

// continuityCheck checks that doc's history goes on from the earlier bundle's, which must itself be signed by a
// trusted audit key (its history is what an auditor saw and kept).
func continuityCheck(previous []byte, given []trustedKey, doc *evidence.Document) check {
	const name = "continuity with the earlier bundle"
	prev := checkBundle(previous, given, nil)
	if prev.Checked == nil || prev.Checked.SignatureErr != nil || !prev.Checked.History.Verified {
		return check{Name: name, Detail: "the earlier bundle does not verify itself, so it proves nothing: " + firstFailure(prev)}
	}
	pd := prev.Checked.Document
	if err := evidence.Extends(pd, doc); err != nil {
		return check{Name: name, Detail: err.Error()}
	}
	return check{Name: name, Holds: true, Detail: fmt.Sprintf("the history goes on from the earlier bundle's head (seq %d, generated %s)",
		pd.History.Head.Seq, pd.GeneratedAt.UTC().Format("2006-01-02 15:04:05 UTC"))}
}

// firstFailure is the first check of r that does not hold.
func firstFailure(r *result) string {
	for _, c := range r.Checks {
		if !c.Holds {
			return c.Name + ": " + c.Detail
		}
	}
	return "it does not verify"
}

func historyCheck(c *evidence.Checked, r *result) check {
	v := c.History
	if v.Verified {
		d := fmt.Sprintf("%d events chained", v.Events-v.Unchained)
		if v.HeadSigned {
			d += fmt.Sprintf(", head seq %d signed by audit key version %d (%s) at %s", v.HeadSeq, v.HeadKeyVer, r.keyName(v.HeadKeyVer), v.HeadTimeUTC)
		}
		if v.Unchained > 0 {
			d += fmt.Sprintf("; %d earlier events predate chaining and nothing vouches for them", v.Unchained)
		}
		return check{Name: "history", Holds: true, Detail: d}
	}
	d := v.Reason
	if v.Broken >= 0 && v.Broken < v.Events {
		d = fmt.Sprintf("first broken event: %s: %s", eventName(v.Broken, v.BrokenSeq), v.Reason)
	}
	return check{Name: "history", Detail: d}
}

// eventName names an event as the engine's verification does: its index in the bundle's list, from 0 (the
// report's index column), and its seq.
func eventName(index, seq int) string {
	if seq > 0 {
		return fmt.Sprintf("index %d (seq %d)", index, seq)
	}
	return fmt.Sprintf("index %d", index)
}

func brokenName(index int) string {
	if index < 0 {
		return "none"
	}
	return fmt.Sprintf("index %d", index)
}

// keyName says which given key a version was checked with.
func (r *result) keyName(version int) string {
	k, ok := r.UsedKeys[version]
	if !ok {
		return "no key given"
	}
	return k.Source + ", SHA-256 " + k.Fingerprint()[:16]
}

func (r *result) writeText(w io.Writer) {
	for _, c := range r.Checks {
		mark := "ok    "
		if !c.Holds {
			mark = "FAILED"
		}
		fmt.Fprintf(w, "%s %s: %s\n", mark, c.Name, c.Detail)
	}
	versions := make([]int, 0, len(r.UsedKeys))
	for v := range r.UsedKeys {
		versions = append(versions, v)
	}
	sort.Ints(versions)
	var used []string
	for _, v := range versions {
		used = append(used, fmt.Sprintf("v%d = %s", v, r.keyName(v)))
	}
	if len(used) > 0 {
		fmt.Fprintf(w, "audit keys: %s\n", strings.Join(used, "; "))
	}
	if r.OK {
		fmt.Fprintln(w, "VERIFIED: the bundle verifies whole")
	} else {
		fmt.Fprintln(w, "FAILED: the bundle does not verify")
	}
}
