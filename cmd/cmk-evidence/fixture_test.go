package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// scriptDetail is an event detail an attacker could write into a key's history: the report must show it as text.
const scriptDetail = `<script>document.title="pwned"; console.error("injected")</script><img src=x onerror="console.error('img')">`

// fixture is an audit key made in software (the engine's is in the HSM; this tool only ever sees public keys)
// and the pieces of a bundle for key "payments".
type fixture struct {
	t      *testing.T
	dir    string
	priv   *ecdsa.PrivateKey
	pemKey string // the audit public key file
	events []json.RawMessage
	now    time.Time
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, dir: t.TempDir(), priv: priv, now: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	pemText, err := evidence.MarshalAuditKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	f.pemKey = f.write("audit.pem", []byte(pemText))
	details := []string{"created by the platform team", "scheduled rotation", scriptDetail, "grant issued to batch-job", "rotated for usage"}
	kinds := []string{"created", "rotated", "config_changed", "grant_created", "rotated"}
	for i := range kinds {
		f.events = append(f.events, f.chained(i+1, map[string]interface{}{
			"time": f.now.Add(time.Duration(i-30) * 24 * time.Hour), "event": kinds[i], "version": i/2 + 1,
			"display_name": "approle-admin", "entity_id": "e-1234", "details": details[i]}))
	}
	return f
}

// chained is ev as the engine stores it at seq: with its predecessor's hash (the last of f.events) and its own.
func (f *fixture) chained(seq int, ev map[string]interface{}) json.RawMessage {
	ev[evidence.FieldSeq] = seq
	if seq > 1 {
		var prev struct {
			Hash string `json:"hash"`
		}
		_ = json.Unmarshal(f.events[seq-2], &prev)
		ev[evidence.FieldPrev] = prev.Hash
	}
	b, _ := json.Marshal(ev)
	h, err := evidence.EventHash(b)
	if err != nil {
		f.t.Fatal(err)
	}
	ev[evidence.FieldHash] = h
	b, _ = json.Marshal(ev)
	return b
}

func (f *fixture) write(name string, b []byte) string {
	p := filepath.Join(f.dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		f.t.Fatal(err)
	}
	return p
}

func (f *fixture) sign(msg []byte) string {
	d := sha256.Sum256(msg)
	sig, err := ecdsa.SignASN1(rand.Reader, f.priv, d[:])
	if err != nil {
		f.t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(sig)
}

// usage is a report in the shape the engine's usage analytics write: per operation, per caller, buckets.
func (f *fixture) usage(callers ...string) json.RawMessage {
	ops := map[string]interface{}{}
	for oi, op := range []string{"encrypt", "decrypt"} {
		byCaller := map[string]interface{}{}
		for ci, c := range callers {
			var hours, days []map[string]interface{}
			for h := 0; h < 24; h++ {
				hours = append(hours, map[string]interface{}{"start": f.now.Add(time.Duration(h-24) * time.Hour),
					"uses": (ci + 1) * (10 + h*(oi+1)), "denials": map[bool]int{true: 3}[h == 20 && ci == 0]})
			}
			for d := 0; d < 7; d++ {
				days = append(days, map[string]interface{}{"start": f.now.Truncate(24 * time.Hour).Add(time.Duration(d-7) * 24 * time.Hour),
					"uses": (ci + 1) * 500 * (d + 1), "denials": 0})
			}
			byCaller[c] = map[string]interface{}{"hours": hours, "days": days,
				"minutes": []map[string]interface{}{{"start": f.now.Add(-time.Minute), "uses": ci + 1, "denials": 0}}}
		}
		ops[op] = map[string]interface{}{"callers": byCaller}
	}
	b, _ := json.Marshal(map[string]interface{}{"operations": ops, "flushed_at": f.now})
	return b
}

// document is an evidence document over events, with the head signed as the engine signs it.
func (f *fixture) document(events []json.RawMessage) evidence.Document {
	last := f.events[len(f.events)-1]
	var lastFields struct {
		Hash string `json:"hash"`
	}
	_ = json.Unmarshal(last, &lastFields)
	head := &evidence.Head{Key: "payments", Seq: len(f.events), Hash: lastFields.Hash, SignedAt: f.now, AuditKeyVersion: 1}
	head.Signature = f.sign(head.SignedBytes())
	pemText, _ := evidence.MarshalAuditKey(&f.priv.PublicKey)
	enc, limit := uint64(1200), uint64(1<<32)
	ver := func(v int, state string, ageDays int) evidence.KeyVersion {
		return evidence.KeyVersion{Version: v, State: state, CreatedAt: f.now.Add(-time.Duration(ageDays) * 24 * time.Hour), Encryptions: &enc, Limit: &limit}
	}
	keys := evidence.AuditKeys{1: &f.priv.PublicKey}
	rotated := f.now.Add(-2 * 24 * time.Hour)
	return evidence.Document{GeneratedAt: f.now, Mount: "cmk/",
		Key: evidence.KeyMetadata{Name: "payments", Type: "aes256-gcm96", Owner: "team-payments", Description: "card data at rest",
			Tags: map[string]string{"env": "prod", "pci": "true"}, DataAssets: []string{"db/cards", "s3://statements"},
			CreatedAt: f.now.Add(-30 * 24 * time.Hour), State: "active", LatestVersion: 3, MinDecryptionVersion: 1,
			MinEncryptionVersion: 1, AutoRotatePeriod: "720h0m0s", LastRotated: &rotated},
		Versions: []evidence.KeyVersion{ver(1, "decrypt_only", 30), ver(2, "active", 16), ver(3, "active", 2)},
		Access:   json.RawMessage(`{"conditions":[{"type":"cidr","cidrs":["10.0.0.0/8"]}]}`),
		Grants:   []json.RawMessage{json.RawMessage(`{"id":"g-1","entity_id":"e-77","operations":["decrypt"],"expires_at":"2026-12-01T00:00:00Z"}`)},
		History:  evidence.History{Events: events, Head: head, Verification: evidence.VerifyChain("payments", events, head, keys)},
		Usage:    f.usage("app-frontend", "batch-job", "<b>evil</b>"),
		Anomalies: []json.RawMessage{json.RawMessage(fmt.Sprintf(`{"time":%q,"caller":"batch-job","kind":"rate","details":"412 uses in a minute against a baseline of 20"}`,
			f.now.Add(-4*time.Hour).Format(time.RFC3339)))},
		AuditKeys: map[int]string{1: pemText}}
}

// bundle signs doc as the engine does and writes it as `vault read -format=json` would.
func (f *fixture) bundle(name string, doc evidence.Document) string {
	docBytes, err := json.Marshal(doc)
	if err != nil {
		f.t.Fatal(err)
	}
	return f.bundleOf(name, string(docBytes), f.sign(docBytes))
}

func (f *fixture) bundleOf(name, document, signature string) string {
	b := evidence.Bundle{Format: evidence.BundleFormat, Document: document,
		Signature: evidence.Signature{Algorithm: evidence.SignatureAlgorithm, AuditKeyVersion: 1, Value: signature}}
	raw, _ := json.MarshalIndent(map[string]interface{}{"request_id": "r-1", "data": b}, "", "  ")
	return f.write(name, raw)
}
