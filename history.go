package cmk

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// A key's lifecycle events are kept in pages of historyPageSize under history/<name>/<page>, so that no storage
// entry grows with the key's life. History outlives the key: it is the evidence of its destruction.
const (
	historyPrefix   = "history/"
	historyPageSize = 100
)

// event is one lifecycle event: what happened, to which version, why, and who caused it.
type event struct {
	Time        time.Time `json:"time"`
	Event       string    `json:"event"`
	Version     int       `json:"version,omitempty"`
	Cause       string    `json:"cause,omitempty"`
	EntityID    string    `json:"entity_id,omitempty"`
	DisplayName string    `json:"display_name,omitempty"`
	Accessor    string    `json:"token_accessor,omitempty"`
	Details     string    `json:"details,omitempty"`
}

func (a actor) event(kind string, version int, cause, details string) event {
	return event{Time: time.Now().UTC(), Event: kind, Version: version, Cause: cause,
		EntityID: a.EntityID, DisplayName: a.DisplayName, Accessor: a.Accessor, Details: details}
}

func historyPageKey(name string, page int) string {
	return fmt.Sprintf("%s%s/%08d", historyPrefix, name, page)
}

// record appends ev to the key's history (with the key's lock held). A failure is logged, not returned: the
// change it records has already been made, and Vault's audit device has the request either way.
func (b *backend) record(ctx context.Context, s logical.Storage, name string, ev event) {
	if err := appendHistory(ctx, s, name, ev); err != nil {
		b.logger.Error("could not record lifecycle event", "key", name, "event", ev.Event, "error", err)
	}
}

func appendHistory(ctx context.Context, s logical.Storage, name string, ev event) error {
	pages, err := historyPages(ctx, s, name)
	if err != nil {
		return err
	}
	page := 0
	var events []event
	if len(pages) > 0 {
		page = pages[len(pages)-1]
		if events, err = readHistoryPage(ctx, s, name, page); err != nil {
			return err
		}
		if len(events) >= historyPageSize {
			page, events = page+1, nil
		}
	}
	e, err := logical.StorageEntryJSON(historyPageKey(name, page), append(events, ev))
	if err != nil {
		return err
	}
	return s.Put(ctx, e)
}

func historyPages(ctx context.Context, s logical.Storage, name string) ([]int, error) {
	keys, err := s.List(ctx, historyPrefix+name+"/")
	if err != nil {
		return nil, err
	}
	var pages []int
	for _, k := range keys {
		if n, err := strconv.Atoi(k); err == nil {
			pages = append(pages, n)
		}
	}
	sort.Ints(pages)
	return pages, nil
}

func readHistoryPage(ctx context.Context, s logical.Storage, name string, page int) ([]event, error) {
	e, err := s.Get(ctx, historyPageKey(name, page))
	if err != nil || e == nil {
		return nil, err
	}
	var events []event
	return events, json.Unmarshal(e.Value, &events)
}

// readHistory returns the key's events, oldest first, at most limit of the newest ones (0: all).
func readHistory(ctx context.Context, s logical.Storage, name string, limit int) ([]event, error) {
	pages, err := historyPages(ctx, s, name)
	if err != nil {
		return nil, err
	}
	var out []event
	for i := len(pages) - 1; i >= 0; i-- {
		events, err := readHistoryPage(ctx, s, name, pages[i])
		if err != nil {
			return nil, err
		}
		out = append(events, out...)
		if limit > 0 && len(out) >= limit {
			return out[len(out)-limit:], nil
		}
	}
	return out, nil
}
