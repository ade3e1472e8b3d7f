package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

func runTool(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(args, strings.NewReader(""), &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestVerifyAnIntactBundle(t *testing.T) {
	f := newFixture(t)
	path := f.bundle("bundle.json", f.document(f.events))
	code, out, errOut := runTool("verify", "--audit-key", f.pemKey, path)
	if code != exitVerified || !strings.Contains(out, "VERIFIED: the bundle verifies whole") {
		t.Fatalf("exit %d, stdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	for _, want := range []string{"ok     signature: the document is signed by audit key version 1",
		"ok     history: 5 events chained, head seq 5 signed by audit key version 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("the verdict lacks %q:\n%s", want, out)
		}
	}
	// the bundle bare (not in vault read's envelope), flags after the file, and from standard input
	raw, _ := os.ReadFile(path)
	var env struct{ Data json.RawMessage }
	_ = json.Unmarshal(raw, &env)
	bare := f.write("bare.json", env.Data)
	if code, out, _ := runTool("verify", bare, "--audit-key", f.pemKey); code != exitVerified {
		t.Errorf("a bare bundle, flags after it: exit %d\n%s", code, out)
	}
	var stdout bytes.Buffer
	if code := run([]string{"verify", "--audit-key", f.pemKey, "-"}, bytes.NewReader(raw), &stdout, &stdout); code != exitVerified {
		t.Errorf("a bundle on standard input: exit %d\n%s", code, stdout.String())
	}
}

// tampered are the ways a bundle can be changed after the engine wrote it, or its history changed in storage
// before; each must fail verification and say why, naming the first broken event.
func tampered(t *testing.T, f *fixture) map[string]struct {
	path, why string
} {
	genuine := f.document(f.events)
	docBytes, _ := json.Marshal(genuine)
	altered := append([]json.RawMessage(nil), f.events...)
	altered[2] = json.RawMessage(strings.Replace(string(altered[2]), `"config_changed"`, `"exported"`, 1))
	deleted := append(append([]json.RawMessage(nil), f.events[:2]...), f.events[3:]...)
	reordered := append([]json.RawMessage(nil), f.events...)
	reordered[2], reordered[3] = reordered[3], reordered[2]
	return map[string]struct{ path, why string }{
		// the document changed after signing: the signature fails
		"altered document": {f.bundleOf("altered-document.json", strings.Replace(string(docBytes), "team-payments", "team-other", 1), f.sign(docBytes)),
			"FAILED signature: the document's signature does not verify"},
		// history changed in storage before the engine signed the bundle: the chain fails
		"altered event":   {f.bundle("altered-event.json", f.document(altered)), "FAILED history: first broken event: index 2 (seq 3): event 2 (seq 3) was altered"},
		"deleted event":   {f.bundle("deleted-event.json", f.document(deleted)), "FAILED history: first broken event: index 2 (seq 4): event 2 has seq 4 where 3 was expected"},
		"reordered event": {f.bundle("reordered-event.json", f.document(reordered)), "FAILED history: first broken event: index 2 (seq 4): event 2 has seq 4 where 3 was expected"},
		"truncated history": {f.bundle("truncated.json", f.document(f.events[:4])),
			"FAILED history: the head vouches for seq 5 but the chain ends at 4"},
	}
}

func TestVerifyTamperedBundlesFail(t *testing.T) {
	f := newFixture(t)
	for name, c := range tampered(t, f) {
		t.Run(name, func(t *testing.T) {
			code, out, _ := runTool("verify", "--audit-key", f.pemKey, c.path)
			if code != exitFailed || !strings.Contains(out, "FAILED: the bundle does not verify") {
				t.Fatalf("exit %d:\n%s", code, out)
			}
			if !strings.Contains(out, c.why) {
				t.Errorf("the verdict does not say %q:\n%s", c.why, out)
			}
		})
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherPEM, _ := evidence.MarshalAuditKey(&other.PublicKey)
	otherKey := f.write("other.pem", []byte(otherPEM))
	path := f.bundle("bundle.json", f.document(f.events))
	code, out, _ := runTool("verify", "--audit-key", otherKey, path)
	if code != exitFailed || !strings.Contains(out, "FAILED signature") || !strings.Contains(out, "FAILED history: head: signature does not verify") {
		t.Errorf("a bundle checked with another audit key: exit %d\n%s", code, out)
	}
	notBundle := f.write("not-bundle.json", []byte(`{"data":{"keys":["payments"]}}`))
	if code, out, _ := runTool("verify", "--audit-key", f.pemKey, notBundle); code != exitFailed || !strings.Contains(out, "FAILED bundle: cannot be read") {
		t.Errorf("not a bundle: exit %d\n%s", code, out)
	}
}

func TestAuditKeyForms(t *testing.T) {
	f := newFixture(t)
	path := f.bundle("bundle.json", f.document(f.events))
	pemText, _ := evidence.MarshalAuditKey(&f.priv.PublicKey)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherPEM, _ := evidence.MarshalAuditKey(&other.PublicKey)
	otherKey := f.write("other.pem", []byte(otherPEM))
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	verifies := map[string]string{
		"versioned PEM": "1=" + f.pemKey,
		// the other key first: the bundle's own list of audit keys tells which given key is version 1
		"two bare PEMs":              otherKey + "," + f.pemKey,
		"vault read, map of objects": f.write("a.json", []byte(`{"data":{"latest_version":2,"keys":{"1":{"public_key":`+q(pemText)+`},"2":{"public_key":`+q(otherPEM)+`}}}}`)),
		"map of PEM strings":         f.write("b.json", []byte(`{"keys":{"1":`+q(pemText)+`}}`)),
		"list of versions":           f.write("c.json", []byte(`{"data":{"versions":[{"version":1,"public_key":`+q(pemText)+`}]}}`)),
	}
	for name, spec := range verifies {
		if code, out, errOut := runTool("verify", "--audit-key", spec, path); code != exitVerified {
			t.Errorf("%s: exit %d\n%s%s", name, code, out, errOut)
		}
	}
	fails := map[string]string{
		"the other key as version 1": "1=" + otherKey,
		"JSON with the other key":    f.write("d.json", []byte(`{"data":{"keys":{"1":{"public_key":`+q(otherPEM)+`}}}}`)),
	}
	for name, spec := range fails {
		if code, out, _ := runTool("verify", "--audit-key", spec, path); code != exitFailed {
			t.Errorf("%s: exit %d\n%s", name, code, out)
		}
	}
	usage := map[string][]string{
		"no audit key":       {"verify", path},
		"missing key file":   {"verify", "--audit-key", f.dir + "/nope.pem", path},
		"not a key":          {"verify", "--audit-key", path, path},
		"bad version":        {"verify", "--audit-key", "x=" + f.pemKey, path},
		"no bundle":          {"verify", "--audit-key", f.pemKey},
		"two bundles":        {"verify", "--audit-key", f.pemKey, path, path},
		"missing bundle":     {"verify", "--audit-key", f.pemKey, f.dir + "/nope.json"},
		"report without -o":  {"report", "--audit-key", f.pemKey, path},
		"unknown command":    {"check", path},
		"unknown flag":       {"verify", "--key", f.pemKey, path},
		"JSON with version":  {"verify", "--audit-key", "1=" + verifies["map of PEM strings"], path},
		"no command at all:": {},
	}
	for name, args := range usage {
		if code, out, errOut := runTool(args...); code != exitUsage || !strings.Contains(errOut, "usage:") {
			t.Errorf("%s: exit %d, want %d with the usage\n%s%s", name, code, exitUsage, out, errOut)
		}
	}
}

// TestReportEscapesAndStaysOffline reads the HTML itself; the browser test sees it rendered.
func TestReportEscapesAndStaysOffline(t *testing.T) {
	f := newFixture(t)
	path := f.bundle("bundle.json", f.document(f.events))
	report := f.dir + "/report.html"
	if code, out, errOut := runTool("report", "--audit-key", f.pemKey, "-o", report, path); code != exitVerified {
		t.Fatalf("exit %d\n%s%s", code, out, errOut)
	}
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	html := string(b)
	if strings.Contains(html, "<script") || strings.Contains(html, "<img") || strings.Contains(html, "<b>evil") {
		t.Error("markup from the bundle reached the report unescaped")
	}
	if !strings.Contains(html, "&lt;script&gt;document.title=") || !strings.Contains(html, "&lt;b&gt;evil&lt;/b&gt;") {
		t.Error("the event detail and the caller name with markup are not shown as text")
	}
	// nothing to fetch: no element with a source or a link (the escaped <img src=x> in the detail is text), no
	// stylesheet import, no URL in CSS
	if m := regexp.MustCompile(`(?i)<[a-z][^<>]*\s(src|href|xlink:href)\s*=|<link|@import|url\(|<iframe|<object`).FindString(html); m != "" {
		t.Errorf("the report refers to a resource to fetch: %q", m)
	}
	if n := strings.Count(html, "<svg"); n != 6 { // encrypt and decrypt by caller, per minute, hour and day
		t.Errorf("%d charts, want 6", n)
	}
	for _, want := range []string{"team-payments", "db/cards", "env=prod", "decrypt_only", "14d 0h (until the next rotation)", "412 uses in a minute"} {
		if !strings.Contains(html, want) {
			t.Errorf("the report lacks %q", want)
		}
	}
}

func TestUsageSeriesAreFoundWhereverTheyAre(t *testing.T) {
	raw := json.RawMessage(`{"total":{"hours":[{"start":"2026-11-30T10:00:00Z","uses":4},{"start":"2026-11-30T09:00:00Z","uses":2,"denials":1}]},
		"operations":{"sign":{"callers":{"a":{"days":[{"start":"2026-11-29T00:00:00Z","uses":7,"denials":0}]},"b":{"days":[{"start":"2026-11-29T00:00:00Z","denials":2}]}}}},
		"not_a_series":[{"start":"yesterday","uses":1}],"note":"x"}`)
	got := findSeries(raw)
	var paths []string
	for _, s := range got {
		paths = append(paths, fmt.Sprintf("%s:%d", strings.Join(s.Path, "/"), len(s.Buckets)))
	}
	want := "operations/sign/callers/a/days:1 operations/sign/callers/b/days:1 total/hours:2"
	if strings.Join(paths, " ") != want {
		t.Fatalf("series %v, want %s", paths, want)
	}
	if got[2].Buckets[0].Uses != 2 || got[2].Buckets[0].Denials != 1 {
		t.Errorf("buckets are not in time order with their counts: %+v", got[2].Buckets)
	}
	charts, err := usageCharts(raw)
	if err != nil || len(charts) != 2 || charts[0].Title != "operations / sign / callers" || len(charts[0].Lines) != 2 || charts[1].Title != "usage" {
		t.Fatalf("charts: %v %+v", err, charts)
	}
}

func TestManyCallersShareOneLine(t *testing.T) {
	var b strings.Builder
	b.WriteString(`{"callers":{`)
	for i := 0; i < 50; i++ {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `"c%02d":{"hours":[{"start":"2026-11-30T10:00:00Z","uses":%d}]}`, i, i)
	}
	b.WriteString(`}}`)
	charts, err := usageCharts(json.RawMessage(b.String()))
	if err != nil || len(charts) != 1 {
		t.Fatal(err, charts)
	}
	lines := charts[0].Lines
	if len(lines) != maxLines || lines[0].Label != "c49" || lines[maxLines-1].Merged != 43 || lines[maxLines-1].Uses != float64(42*43/2) {
		t.Errorf("lines: %+v", lines)
	}
}

func TestTimeTicksAreRoundUTCTimes(t *testing.T) {
	day := time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		from, to time.Time
		first    string
		n        int
	}{
		{day.Add(-time.Minute), day.Add(time.Minute), "11-22 23:59", 3},                      // one bucket, the axis widened
		{day.Add(13*time.Minute + 7*time.Second), day.Add(23 * time.Hour), "11-23 03:00", 7}, // 3-hourly
		{day.Add(time.Hour), day.Add(6*24*time.Hour + time.Hour), "2026-11-24", 6},           // daily
	} {
		ticks := timeTicker{}.Ticks(float64(c.from.Unix()), float64(c.to.Unix()))
		if len(ticks) != c.n || ticks[0].Label != c.first {
			t.Errorf("%s to %s: %d ticks from %q, want %d from %q", c.from, c.to, len(ticks), ticks[0].Label, c.n, c.first)
		}
	}
}

func TestReportOfAnUnreadableBundleSaysFailed(t *testing.T) {
	f := newFixture(t)
	report := f.dir + "/report.html"
	code, _, _ := runTool("report", "--audit-key", f.pemKey, "-o", report, f.write("x.json", []byte(`{"format":"cmk-evidence/v0"}`)))
	b, _ := os.ReadFile(report)
	if code != exitFailed || !strings.Contains(string(b), `<div class="word" id="verdict-word">FAILED</div>`) ||
		!strings.Contains(string(b), "cannot be read: bundle format &#34;cmk-evidence/v0&#34; is not &#34;cmk-evidence/v1&#34;") {
		t.Errorf("exit %d, report:\n%s", code, b)
	}
}

// --previous: a bundle whose history goes on from an earlier one's head verifies; a later bundle whose storage was
// rolled back to that earlier head, which verifies alone, fails against the bundle kept from in between.
func TestVerifyAgainstAnEarlierBundle(t *testing.T) {
	f := newFixture(t)
	full := f.bundle("full.json", f.document(f.events))
	all := f.events
	f.events = all[:3]
	early := f.document(f.events)
	early.GeneratedAt = f.now.Add(-time.Hour)
	earlier := f.bundle("earlier.json", early)
	rolled := f.document(f.events)
	rolled.GeneratedAt = f.now.Add(time.Hour)
	rolledBack := f.bundle("rolled-back.json", rolled)
	f.events = all

	if code, out, _ := runTool("verify", "--audit-key", f.pemKey, "--previous", earlier, full); code != exitVerified ||
		!strings.Contains(out, "ok     continuity with the earlier bundle: the history goes on from the earlier bundle's head (seq 3") {
		t.Fatalf("a history that goes on: exit %d\n%s", code, out)
	}
	if code, out, _ := runTool("verify", "--audit-key", f.pemKey, rolledBack); code != exitVerified {
		t.Fatalf("the rolled-back bundle alone should verify: exit %d\n%s", code, out)
	}
	if code, out, _ := runTool("verify", "--audit-key", f.pemKey, "--previous", full, rolledBack); code != exitFailed ||
		!strings.Contains(out, "FAILED continuity with the earlier bundle: history rolled back: the earlier bundle's head was signed at seq 5, this one's is at seq 3") {
		t.Fatalf("a rollback: exit %d\n%s", code, out)
	}
	report := filepath.Join(f.dir, "r.html")
	if code, _, _ := runTool("report", "--audit-key", f.pemKey, "--previous", full, "-o", report, rolledBack); code != exitFailed {
		t.Fatalf("report of a rollback: exit %d", code)
	}
	if html, _ := os.ReadFile(report); !strings.Contains(string(html), "history rolled back") {
		t.Fatal("the report of a rollback does not say so")
	}
	if code, _, _ := runTool("verify", "--audit-key", f.pemKey, "--previous", filepath.Join(f.dir, "missing.json"), full); code != exitUsage {
		t.Fatalf("a missing earlier bundle: exit %d", code)
	}
}
