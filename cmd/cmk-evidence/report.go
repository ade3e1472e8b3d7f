package main

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// The report is one HTML file that needs nothing else: inline CSS, inline SVG charts, no script, no font or
// image to fetch. html/template escapes every value from the bundle, which is untrusted text.
//
//go:embed report.html.tmpl
var reportTemplateText string

var reportTemplate = template.Must(template.New("report").Funcs(template.FuncMap{
	"when":  formatTime,
	"count": formatCount,
}).Parse(reportTemplateText))

// field is one labelled value of the key's inventory data.
type field struct {
	Name, Value string
}

// table is a list of JSON objects shown as rows, one column per member.
type table struct {
	Columns []string
	Rows    [][]string
}

// versionRow is a key version with its rotation ages.
type versionRow struct {
	evidence.KeyVersion
	Age          string // from creation to the document's generation
	ActiveFor    string // from creation to the next version's creation, "" for the latest
	UsedOfLimit  string
	LimitPercent float64
}

// historyRow is one stored event with its verification mark.
type historyRow struct {
	Index int    // from 0, as the verdict and the engine's verification name events
	Mark  string // "verified", "broken" or "unverified"
	Cells []string
	Hash  string
}

type reportView struct {
	*result
	Doc          *evidence.Document
	Inventory    []field
	Tags         []field
	Versions     []versionRow
	Charts       []chart
	UsageJSON    string
	Anomalies    table
	Grants       table
	AccessJSON   string
	History      table
	HistoryRows  []historyRow
	MissingAfter string // why the chain's end is not vouched for, when the break is after the last event
	Keys         []keyRow
	GeneratedBy  string
	CheckedAt    string
}

type keyRow struct {
	Version     int
	Source      string
	Fingerprint string
}

func writeReport(w io.Writer, r *result) error {
	v := &reportView{result: r, Doc: r.Document(), GeneratedBy: "cmk-evidence",
		CheckedAt: time.Now().UTC().Format("2006-01-02 15:04:05 UTC")}
	for ver, k := range r.UsedKeys {
		v.Keys = append(v.Keys, keyRow{Version: ver, Source: k.Source, Fingerprint: k.Fingerprint()})
	}
	sort.Slice(v.Keys, func(i, j int) bool { return v.Keys[i].Version < v.Keys[j].Version })
	if doc := v.Doc; doc != nil {
		v.Inventory, v.Tags = inventory(doc)
		v.Versions = versionRows(doc)
		charts, err := usageCharts(doc.Usage)
		if err != nil {
			return err
		}
		v.Charts = charts
		v.UsageJSON = indentJSON(doc.Usage)
		v.Anomalies = objectTable(doc.Anomalies, []string{"time", "detected_at", "caller", "entity_id", "display_name", "operation", "kind", "reason", "details", "action"})
		v.Grants = objectTable(doc.Grants, []string{"id", "entity_id", "operations", "created_at", "expires_at", "uses_left", "reason"})
		v.AccessJSON = indentJSON(doc.Access)
		v.History, v.HistoryRows = historyRows(doc.History.Events, r.Checked)
		if h := r.Checked.History; !h.Verified && h.Broken >= len(doc.History.Events) {
			v.MissingAfter = h.Reason
		}
	}
	var buf bytes.Buffer // written whole or not at all
	if err := reportTemplate.Execute(&buf, v); err != nil {
		return err
	}
	_, err := buf.WriteTo(w)
	return err
}

func inventory(doc *evidence.Document) ([]field, []field) {
	k := doc.Key
	f := []field{{"Name", k.Name}, {"Type", k.Type}, {"State", k.State}, {"Owner", orNone(k.Owner)},
		{"Description", orNone(k.Description)}, {"Data assets", orNone(strings.Join(k.DataAssets, ", "))},
		{"Created", formatTime(k.CreatedAt) + age(k.CreatedAt, doc.GeneratedAt)},
		{"Latest version", fmt.Sprint(k.LatestVersion)},
		{"Min decryption / encryption version", fmt.Sprintf("%d / %d", k.MinDecryptionVersion, k.MinEncryptionVersion)},
		{"Auto-rotate period", orNone(k.AutoRotatePeriod)}}
	if k.LastRotated != nil {
		f = append(f, field{"Last rotated", formatTime(*k.LastRotated) + age(*k.LastRotated, doc.GeneratedAt)})
	}
	if k.NextRotation != nil {
		f = append(f, field{"Next rotation", formatTime(*k.NextRotation)})
	}
	if k.DeleteAt != nil {
		f = append(f, field{"Deletion scheduled for", formatTime(*k.DeleteAt)})
	}
	if k.ApprovalsRequired > 0 {
		f = append(f, field{"Approvals required", fmt.Sprint(k.ApprovalsRequired)})
	}
	for _, name := range sortedKeys(k.Extra) {
		f = append(f, field{name, cellText(k.Extra[name])})
	}
	var tags []field
	for _, name := range sortedKeys(k.Tags) {
		tags = append(tags, field{name, k.Tags[name]})
	}
	return f, tags
}

func versionRows(doc *evidence.Document) []versionRow {
	vs := append([]evidence.KeyVersion(nil), doc.Versions...)
	sort.Slice(vs, func(i, j int) bool { return vs[i].Version < vs[j].Version })
	rows := make([]versionRow, len(vs))
	for i, ver := range vs {
		rows[i] = versionRow{KeyVersion: ver, Age: duration(doc.GeneratedAt.Sub(ver.CreatedAt))}
		if i+1 < len(vs) {
			rows[i].ActiveFor = duration(vs[i+1].CreatedAt.Sub(ver.CreatedAt))
		}
		if ver.Encryptions != nil {
			rows[i].UsedOfLimit = formatCount(float64(*ver.Encryptions))
			if ver.Limit != nil && *ver.Limit > 0 {
				rows[i].LimitPercent = 100 * float64(*ver.Encryptions) / float64(*ver.Limit)
				rows[i].UsedOfLimit += fmt.Sprintf(" of %s (%.1f%%)", formatCount(float64(*ver.Limit)), rows[i].LimitPercent)
			}
		}
	}
	return rows
}

// historyRows lays the stored events out as rows with their marks: broken for the first event the chain check
// names, verified when the signed head vouches for the event in its place (evidence.Vouched), unverified otherwise.
func historyRows(events []json.RawMessage, c *evidence.Checked) (table, []historyRow) {
	t := objectTable(events, []string{evidence.FieldSeq, "time", "event", "version", "cause", "display_name", "entity_id", "token_accessor_hmac", "details"})
	// the chain fields are shown as the short hash column, not as cells
	var keep []int
	var cols []string
	for i, c := range t.Columns {
		if c != evidence.FieldPrev && c != evidence.FieldHash {
			keep = append(keep, i)
			cols = append(cols, c)
		}
	}
	rows := make([]historyRow, len(events))
	for i := range events {
		var f struct {
			Hash string `json:"hash"`
		}
		_ = json.Unmarshal(events[i], &f)
		cells := make([]string, len(keep))
		for j, k := range keep {
			cells[j] = t.Rows[i][k]
		}
		mark := "unverified"
		switch {
		case i == c.History.Broken: // even when vouched for: a missing event before it is the break
			mark = "broken"
		case i < len(c.Vouched) && c.Vouched[i]:
			mark = "verified"
		}
		rows[i] = historyRow{Index: i, Mark: mark, Cells: cells, Hash: f.Hash}
	}
	return table{Columns: cols}, rows
}

// objectTable lays JSON objects out as a table: the preferred members first, in that order, then the others by
// name. A member that is not a string or a number is shown as its JSON.
func objectTable(objects []json.RawMessage, preferred []string) table {
	var t table
	parsed := make([]map[string]json.RawMessage, len(objects))
	seen := map[string]bool{}
	for i, raw := range objects {
		if err := json.Unmarshal(raw, &parsed[i]); err != nil {
			parsed[i] = map[string]json.RawMessage{"(not an object)": raw}
		}
		for n := range parsed[i] {
			seen[n] = true
		}
	}
	for _, n := range preferred {
		if seen[n] {
			t.Columns = append(t.Columns, n)
			delete(seen, n)
		}
	}
	t.Columns = append(t.Columns, sortedKeys(seen)...)
	for _, obj := range parsed {
		row := make([]string, len(t.Columns))
		for j, n := range t.Columns {
			if raw, ok := obj[n]; ok {
				row[j] = rawText(raw)
			}
		}
		t.Rows = append(t.Rows, row)
	}
	return t
}

// rawText is a JSON value as a person reads it: a string without its quotes, anything else as compact JSON.
func rawText(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var b bytes.Buffer
	if json.Compact(&b, raw) == nil {
		return b.String()
	}
	return string(raw)
}

func cellText(v interface{}) string {
	if s, ok := v.(string); ok {
		return s
	}
	b, _ := json.Marshal(v)
	return string(b)
}

func indentJSON(raw json.RawMessage) string {
	if len(raw) == 0 || string(raw) == "null" {
		return ""
	}
	var b bytes.Buffer
	if json.Indent(&b, raw, "", "  ") != nil {
		return string(raw)
	}
	return b.String()
}

func sortedKeys[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return "(unknown)"
	}
	return t.UTC().Format("2006-01-02 15:04:05 UTC")
}

func age(t, now time.Time) string {
	if t.IsZero() || now.IsZero() {
		return ""
	}
	return " (" + duration(now.Sub(t)) + " before the bundle)"
}

// duration says a span in the largest units that matter to an auditor: days and hours, or hours and minutes.
func duration(d time.Duration) string {
	if d < 0 {
		return "-" + duration(-d)
	}
	switch days := int(d.Hours()) / 24; {
	case days > 0:
		return fmt.Sprintf("%dd %dh", days, int(d.Hours())%24)
	case d >= time.Hour:
		return fmt.Sprintf("%dh %dm", int(d.Hours()), int(d.Minutes())%60)
	default:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	}
}

func formatCount(f float64) string {
	if f == float64(int64(f)) {
		return fmt.Sprint(int64(f))
	}
	return fmt.Sprintf("%.2f", f)
}
