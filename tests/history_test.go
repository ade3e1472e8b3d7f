package tests

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// historyPage is one page of a key's history in Vault's storage, as sys/raw reads and writes it.
type historyPage struct {
	path   string // sys/raw/logical/<mount uuid>/history/<key>/<page>
	events []json.RawMessage
}

// Someone with access to Vault's storage (sys/raw on a server started with raw_storage_endpoint) alters, deletes,
// reorders and rewrites a key's history: history/verify names the first broken event each time, a chain
// rewritten whole with its hashes recomputed is caught by the head the HSM's audit key signed, and a history deleted
// whole is missing.
func TestHistoryTamperedInStorageIsNamed(t *testing.T) {
	s, err := vaulttest.NewServer(filepath.Join(workDir, "raw"), vaultBin, pluginBin, softhsm)
	if err != nil {
		t.Fatal(err)
	}
	s.RawStorage = true
	if err := s.StartDevMode("e2e-raw-root"); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if err := s.RegisterPlugin(pluginBin, "", ""); err != nil {
		t.Fatal(err)
	}
	m := newMount(t, s)
	c := s.Client
	// 105 events: two pages of history (a page holds 100).
	mustWrite(t, c, m.Path+"/keys/k", nil)
	for i := 1; i < 105; i++ {
		mustWrite(t, c, m.Path+"/keys/k/config", map[string]interface{}{"owner": fmt.Sprintf("team-%d", i)})
	}
	mounts, err := c.Sys().ListMounts()
	if err != nil {
		t.Fatal(err)
	}
	uuid := mounts[m.Path+"/"].UUID
	if uuid == "" {
		t.Fatalf("no UUID for mount %s", m.Path)
	}
	pages := []*historyPage{readPage(t, c, uuid, 0), readPage(t, c, uuid, 1)}
	if len(pages[0].events) != 100 || len(pages[1].events) != 5 {
		t.Fatalf("pages of %d and %d events", len(pages[0].events), len(pages[1].events))
	}
	original := [][]json.RawMessage{append([]json.RawMessage(nil), pages[0].events...), append([]json.RawMessage(nil), pages[1].events...)}
	verify := func() map[string]interface{} {
		t.Helper()
		sec, err := c.Logical().Read(m.Path + "/keys/k/history/verify")
		if err != nil || sec == nil {
			t.Fatalf("history/verify: %v %v", sec, err)
		}
		return sec.Data
	}
	restore := func() {
		t.Helper()
		for i, p := range pages {
			p.events = append([]json.RawMessage(nil), original[i]...)
			writePage(t, c, p)
		}
		if v := verify(); v["verified"] != true || fmt.Sprint(v["events"]) != "105" {
			t.Fatalf("the restored history does not verify: %v", v)
		}
	}
	if v := verify(); v["verified"] != true || fmt.Sprint(v["head_seq"]) != "105" || v["head_signed"] != true {
		t.Fatalf("the untouched history: %v", v)
	}

	cases := []struct {
		name   string
		tamper func()
		index  int // first_broken_index
		seq    int // first_broken_seq
		reason string
	}{
		{"alter an event", func() {
			pages[0].events[41] = json.RawMessage(strings.Replace(string(pages[0].events[41]), "team-41", "team-x", 1))
			writePage(t, c, pages[0])
		}, 41, 42, "altered"},
		{"delete an event", func() {
			pages[0].events = append(pages[0].events[:7:7], pages[0].events[8:]...)
			writePage(t, c, pages[0])
		}, 7, 9, "removed"},
		{"reorder two events", func() {
			pages[1].events[1], pages[1].events[2] = pages[1].events[2], pages[1].events[1]
			writePage(t, c, pages[1])
		}, 101, 103, "moved"},
		{"delete the first page", func() { deletePage(t, c, pages[0]) }, 0, 101, "follows an event that is missing"},
		{"delete the last page", func() { deletePage(t, c, pages[1]) }, 100, 101, "removed from its end"},
		{"rewrite the whole chain with recomputed hashes", func() {
			pages[0].events[2] = json.RawMessage(strings.Replace(string(pages[0].events[2]), "team-2", "team-x", 1))
			rehash(t, pages)
			for _, p := range pages {
				writePage(t, c, p)
			}
		}, 104, 105, "not the one the head signed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.tamper()
			v := verify()
			if v["verified"] != false || fmt.Sprint(v["first_broken_index"]) != fmt.Sprint(tc.index) ||
				fmt.Sprint(v["first_broken_seq"]) != fmt.Sprint(tc.seq) || !strings.Contains(v["reason"].(string), tc.reason) {
				t.Errorf("verify: %v; want first_broken_index %d, first_broken_seq %d, reason with %q", v, tc.index, tc.seq, tc.reason)
			}
			restore()
		})
	}

	// The whole history deleted, pages and head: missing, and the key's next event begins no signed chain over it.
	headPath := fmt.Sprintf("sys/raw/logical/%s/history/k/head", uuid)
	head, err := c.Logical().Read(headPath)
	if err != nil || head == nil {
		t.Fatalf("read %s: %v %v", headPath, head, err)
	}
	for _, p := range pages {
		deletePage(t, c, p)
	}
	if _, err := c.Logical().Delete(headPath); err != nil {
		t.Fatal(err)
	}
	if v := verify(); v["verified"] != false || fmt.Sprint(v["events"]) != "0" || !strings.Contains(v["reason"].(string), "history missing") {
		t.Fatalf("the whole history deleted: %v", v)
	}
	mustWrite(t, c, m.Path+"/keys/k/config", map[string]interface{}{"owner": "team-after-deletion"})
	if v := verify(); v["verified"] != false || fmt.Sprint(v["head_seq"]) != "0" || !strings.Contains(v["reason"].(string), "does not begin at the key's creation") {
		t.Fatalf("after an event on a deleted history: %v", v)
	}
	if _, err := c.Logical().Write(headPath, map[string]interface{}{"value": head.Data["value"]}); err != nil {
		t.Fatal(err)
	}
	restore()

	// A rewritten chain stays caught after the key's next event: the engine signs no head over it.
	pages[0].events[2] = json.RawMessage(strings.Replace(string(pages[0].events[2]), "team-2", "team-x", 1))
	rehash(t, pages)
	for _, p := range pages {
		writePage(t, c, p)
	}
	mustWrite(t, c, m.Path+"/keys/k/config", map[string]interface{}{"owner": "team-after"})
	if v := verify(); v["verified"] != false || fmt.Sprint(v["head_seq"]) != "105" || fmt.Sprint(v["events"]) != "106" {
		t.Fatalf("after an event on a rewritten chain: %v", v)
	}
}

func readPage(t *testing.T, c *api.Client, uuid string, page int) *historyPage {
	t.Helper()
	return readPageOf(t, c, uuid, "k", page)
}

// readPageOf reads page of key name's history through sys/raw.
func readPageOf(t *testing.T, c *api.Client, uuid, name string, page int) *historyPage {
	t.Helper()
	p := &historyPage{path: fmt.Sprintf("sys/raw/logical/%s/history/%s/%08d", uuid, name, page)}
	sec, err := c.Logical().Read(p.path)
	if err != nil || sec == nil {
		t.Fatalf("read %s: %v %v", p.path, sec, err)
	}
	if err := json.Unmarshal([]byte(sec.Data["value"].(string)), &p.events); err != nil {
		t.Fatalf("%s: %v", p.path, err)
	}
	return p
}

func writePage(t *testing.T, c *api.Client, p *historyPage) {
	t.Helper()
	b, err := json.Marshal(p.events)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Logical().Write(p.path, map[string]interface{}{"value": string(b)}); err != nil {
		t.Fatalf("write %s: %v", p.path, err)
	}
}

func deletePage(t *testing.T, c *api.Client, p *historyPage) {
	t.Helper()
	if _, err := c.Logical().Delete(p.path); err != nil {
		t.Fatalf("delete %s: %v", p.path, err)
	}
}

// rehash recomputes every event's prev_hash and hash across the pages, as someone who rewrites history in storage
// and knows how the chain is made would.
func rehash(t *testing.T, pages []*historyPage) {
	t.Helper()
	prev := ""
	for _, p := range pages {
		for i, raw := range p.events {
			d := json.NewDecoder(strings.NewReader(string(raw)))
			d.UseNumber()
			var ev map[string]interface{}
			if err := d.Decode(&ev); err != nil {
				t.Fatal(err)
			}
			delete(ev, evidence.FieldHash)
			if prev != "" {
				ev[evidence.FieldPrev] = prev
			}
			b, _ := json.Marshal(ev)
			h, err := evidence.EventHash(b)
			if err != nil {
				t.Fatal(err)
			}
			ev[evidence.FieldHash] = h
			if p.events[i], err = json.Marshal(ev); err != nil {
				t.Fatal(err)
			}
			prev = h
		}
	}
}
