package keys

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	_ "time/tzdata" // time_zone names resolve the same wherever the plugin runs, with or without the host's zoneinfo

	"github.com/hashicorp/vault/sdk/logical"
)

// A key's access conditions (keys/:name/access): the second gate after Vault's ACL. A token whose policy lets it
// call encrypt/<key> still uses the key only from the networks, at the hours and as the identities the key's
// owner allows. Checked by Admit from the key's cached snapshot.

// hourWindow is one parsed allowed_hours entry: the weekdays it starts on, and minutes from midnight
// [from, to); to may pass midnight (22:00-06:00 runs into the next day).
type hourWindow struct {
	days     [7]bool // time.Weekday → the window opens that day
	from, to int
}

var weekdayNames = []string{"sun", "mon", "tue", "wed", "thu", "fri", "sat"}

// parseHours reads "mon-fri 08:00-18:00", "sat,sun 10:00-14:00", "daily 00:00-24:00", "fri 22:00-06:00".
func parseHours(s string) (hourWindow, error) {
	var w hourWindow
	fields := strings.Fields(strings.ToLower(s))
	if len(fields) != 2 {
		return w, fmt.Errorf("allowed_hours entry %q: want \"<days> <HH:MM>-<HH:MM>\", e.g. \"mon-fri 08:00-18:00\"", s)
	}
	day := func(name string) (int, error) {
		if i := slices.Index(weekdayNames, name); i >= 0 {
			return i, nil
		}
		return 0, fmt.Errorf("allowed_hours entry %q: unknown weekday %q (use mon, tue, wed, thu, fri, sat, sun, or daily)", s, name)
	}
	for _, part := range strings.Split(fields[0], ",") {
		if part == "daily" || part == "*" {
			w.days = [7]bool{true, true, true, true, true, true, true}
			continue
		}
		first, last, isRange := strings.Cut(part, "-")
		a, err := day(first)
		if err != nil {
			return w, err
		}
		b := a
		if isRange {
			if b, err = day(last); err != nil {
				return w, err
			}
		}
		for d := a; ; d = (d + 1) % 7 { // "fri-mon" wraps over the weekend
			w.days[d] = true
			if d == b {
				break
			}
		}
	}
	minute := func(hm string) (int, error) {
		h, m, ok := strings.Cut(hm, ":")
		hh, err1 := strconv.Atoi(h)
		mm, err2 := strconv.Atoi(m)
		if !ok || err1 != nil || err2 != nil || hh < 0 || mm < 0 || mm > 59 || hh > 24 || (hh == 24 && mm != 0) {
			return 0, fmt.Errorf("allowed_hours entry %q: %q is not a time HH:MM between 00:00 and 24:00", s, hm)
		}
		return hh*60 + mm, nil
	}
	from, to, ok := strings.Cut(fields[1], "-")
	if !ok {
		return w, fmt.Errorf("allowed_hours entry %q: want a range HH:MM-HH:MM", s)
	}
	var err error
	if w.from, err = minute(from); err != nil {
		return w, err
	}
	if w.to, err = minute(to); err != nil {
		return w, err
	}
	if w.from == w.to || w.from == 24*60 {
		return w, fmt.Errorf("allowed_hours entry %q: an empty range", s)
	}
	return w, nil
}

// contains says whether t (in the key's time zone) falls in the window.
func (w hourWindow) contains(t time.Time) bool {
	m := t.Hour()*60 + t.Minute()
	today := int(t.Weekday())
	if w.from < w.to {
		return w.days[today] && m >= w.from && m < w.to
	}
	// Past midnight: the evening part belongs to today, the morning part to the window opened yesterday.
	return (w.days[today] && m >= w.from) || (w.days[(today+6)%7] && m < w.to)
}

// Validate checks access settings as written, and puts them in the form they are stored in.
func (a *Access) Validate() error {
	for i, c := range a.AllowedCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			addr, aerr := netip.ParseAddr(strings.TrimSpace(c))
			if aerr != nil {
				return Callerf("allowed_cidrs: %q is not a CIDR block (e.g. 10.0.0.0/8, 192.0.2.7/32, 2001:db8::/32)", c)
			}
			p = netip.PrefixFrom(addr, addr.BitLen())
		}
		a.AllowedCIDRs[i] = p.Masked().String()
	}
	for _, h := range a.AllowedHours {
		if _, err := parseHours(h); err != nil {
			return Callerf("%v", err)
		}
	}
	if a.TimeZone != "" {
		if _, err := time.LoadLocation(a.TimeZone); err != nil {
			return Callerf("time_zone: %q is not an IANA time zone name (e.g. Europe/Paris, America/New_York, UTC)", a.TimeZone)
		}
	}
	if a.TimeZone != "" && len(a.AllowedHours) == 0 {
		return Callerf("time_zone applies to allowed_hours, which is not set")
	}
	for _, op := range a.Operations {
		if !slices.Contains(Operations, op) {
			return Callerf("operations: %q is not an operation on key material; they are %s", op, OperationNames())
		}
	}
	slices.Sort(a.Operations)
	a.Operations = slices.Compact(a.Operations)
	for k := range a.RequiredEntityMetadata {
		if k == "" {
			return Callerf("required_entity_metadata: an empty key")
		}
	}
	if a.MaxGrantTTL < 0 || a.MaxGrantTTL > MaxGrantTTLCeiling {
		return Callerf("max_grant_ttl must be between 0 and %s", MaxGrantTTLCeiling)
	}
	return nil
}

// Empty says whether the settings ask for nothing: the same as no settings.
func (a *Access) Empty() bool {
	return a == nil || (len(a.AllowedCIDRs) == 0 && len(a.AllowedHours) == 0 && len(a.AllowedEntityIDs) == 0 &&
		len(a.AllowedGroups) == 0 && len(a.RequiredEntityMetadata) == 0 && !a.GrantsRequired && a.MaxGrantTTL == 0 &&
		len(a.Operations) == 0)
}

// governs says whether the settings apply to op.
func (a *Access) governs(op Operation) bool {
	return len(a.Operations) == 0 || slices.Contains(a.Operations, op)
}

// needsIdentity says whether admission must resolve the caller's entity.
func (a *Access) needsIdentity() bool {
	return len(a.AllowedEntityIDs) > 0 || len(a.AllowedGroups) > 0 || len(a.RequiredEntityMetadata) > 0 || a.GrantsRequired
}

// identityListed says whether the caller's entity or one of its groups is allowed by name; true when the settings
// name no identity.
func (a *Access) identityListed(entityID string, info *EntityInfo) bool {
	if len(a.AllowedEntityIDs) == 0 && len(a.AllowedGroups) == 0 {
		return true
	}
	if entityID != "" && slices.Contains(a.AllowedEntityIDs, entityID) {
		return true
	}
	return info != nil && info.inAnyGroup(a.AllowedGroups)
}

// identityConditions names the identity conditions set, as a denial names them.
func (a *Access) identityConditions() string {
	switch {
	case len(a.AllowedEntityIDs) > 0 && len(a.AllowedGroups) > 0:
		return "allowed_entity_ids/allowed_groups"
	case len(a.AllowedEntityIDs) > 0:
		return "allowed_entity_ids"
	}
	return "allowed_groups"
}

// inAnyGroup says whether the entity is in one of the groups named (by id or name).
func (e *EntityInfo) inAnyGroup(names []string) bool {
	for _, g := range e.Groups {
		if slices.Contains(names, g.ID) || slices.Contains(names, g.Name) {
			return true
		}
	}
	return false
}

// sourceAllowed says whether the request's source address falls in one of the CIDR blocks. An address Vault did
// not give (no connection: a request from inside Vault) falls in none.
func (a *Access) sourceAllowed(remote string) bool {
	addr, err := netip.ParseAddr(remote)
	if err != nil {
		ap, perr := netip.ParseAddrPort(remote)
		if perr != nil {
			return false
		}
		addr = ap.Addr()
	}
	addr = addr.Unmap()
	for _, c := range a.AllowedCIDRs {
		if p, err := netip.ParsePrefix(c); err == nil && p.Contains(addr) {
			return true
		}
	}
	return false
}

// hoursAllow says whether now falls in one of the allowed windows, in the key's time zone.
func (a *Access) hoursAllow(now time.Time) bool {
	loc := time.UTC
	if a.TimeZone != "" {
		l, err := time.LoadLocation(a.TimeZone)
		if err != nil {
			return false // validated when written; a zone the binary no longer knows admits nothing
		}
		loc = l
	}
	local := now.In(loc)
	for _, h := range a.AllowedHours {
		if w, err := parseHours(h); err == nil && w.contains(local) {
			return true
		}
	}
	return false
}

// Admit decides whether caller may use k for op on items items (1 for a single request; a batch is judged once).
// It reads the cached snapshot k, never storage, except what a grant's use count needs and the key's anomaly
// actions (once per process); the caller's entity is resolved only when a condition needs it. A nil error admits.
// Conditions are checked in a fixed order, and the denial names the first that failed, never another's values.
//
// An anomaly's action in force on the caller (anomaly.go) comes first, for every operation, with or without
// conditions: block_caller denies, require_grant asks for a live grant of the caller's as grants_required does
// (denied as condition "anomaly").
func (m *Manager) Admit(ctx context.Context, s logical.Storage, k *Key, c Caller, op Operation, items int) error {
	deny := func(condition, format string, args ...interface{}) error {
		m.denied(k.Name, condition)
		m.log.Debug("use of key denied by its access conditions", "key", k.Name, "operation", op, "condition", condition,
			"entity_id", c.EntityID, "remote_addr", c.RemoteAddr)
		return &DeniedError{Key: k.Name, Operation: op, Condition: condition, msg: fmt.Sprintf(format, args...)}
	}
	acting, err := m.actionOn(ctx, s, k.Name, CallerLabel(c.Actor), m.now())
	if err != nil {
		return err
	}
	if acting != nil && acting.Action == ActionBlockCaller {
		return deny("anomaly", "anomaly: the caller is blocked from this key until %s, its use having been unusual (%s); keys/%s/anomalies/lift lifts it",
			FormatTime(acting.Until), acting.Kind, k.Name)
	}
	if c.Protocol != nil {
		if condition, why := c.Protocol(k); condition != "" {
			return deny(condition, "%s", why)
		}
	}
	a := k.Access
	governed := a != nil && a.governs(op)
	if !governed && acting == nil {
		return nil
	}
	if !governed {
		a = &Access{} // only the anomaly's require_grant applies
	}
	if len(a.AllowedCIDRs) > 0 && !a.sourceAllowed(c.RemoteAddr) {
		src := c.RemoteAddr
		if src == "" {
			src = "unknown"
		}
		return deny("allowed_cidrs", "allowed_cidrs: the request's source address (%s) is not in a network the key allows", src)
	}
	if len(a.AllowedHours) > 0 && !a.hoursAllow(m.now()) {
		return deny("allowed_hours", "allowed_hours: the key may not be used at this time (%s)", m.now().UTC().Format(time.RFC3339))
	}
	if !a.needsIdentity() && acting == nil {
		return nil
	}
	if c.EntityID == "" && acting != nil {
		return deny("anomaly", "anomaly: the caller must hold a live grant for this key until %s, its use having been unusual (%s), and a token without an entity can hold none",
			FormatTime(acting.Until), acting.Kind)
	}
	if c.EntityID == "" {
		return deny("entity", "the key admits Vault entities only, and this token has none (root and orphan tokens have no entity; log in through an auth method)")
	}
	var info *EntityInfo
	if c.Identity != nil {
		var err error
		if info, err = c.Identity.Entity(ctx, c.EntityID); err != nil {
			return fmt.Errorf("resolve the caller's entity for the access conditions of key %q: %w", k.Name, err)
		}
	}
	if info == nil {
		// The identity store does not know the entity (deleted, or not replicated here): nothing about it can be
		// vouched for, its id included, so a token it left behind uses nothing.
		return deny("entity", "the caller's entity is not in Vault's identity store")
	}
	for key, want := range a.RequiredEntityMetadata {
		if got, ok := info.Metadata[key]; !ok || got != want {
			return deny("required_entity_metadata", "required_entity_metadata: the caller's entity does not carry the metadata the key requires")
		}
	}
	listed := a.identityListed(c.EntityID, info)
	if listed && !a.GrantsRequired && acting == nil {
		return nil
	}
	granted, err := m.admitByGrant(ctx, s, k, c, info, op, items)
	switch {
	case err != nil:
		if IsDenied(err) {
			m.denied(k.Name, "grant")
		}
		return err
	case granted:
		return nil
	case acting != nil:
		return deny("anomaly", "anomaly: the caller holds no live grant for %s on this key, which it needs until %s, its use having been unusual (%s)",
			op, FormatTime(acting.Until), acting.Kind)
	case a.GrantsRequired:
		return deny("grants_required", "grants_required: the caller holds no live grant for %s on this key", op)
	}
	cond := a.identityConditions()
	return deny(cond, "%s: the caller's entity is not one the key allows, and holds no live grant for %s", cond, op)
}

// denialCounts keeps, per key, how many uses each condition denied since the process started, and when last:
// what keys/:name/access reports. In memory: a denied caller must not be able to make the engine write storage.
type denialCounts struct {
	mu   sync.Mutex
	keys map[string]*Denials
}

// Denials is a key's denial record.
type Denials struct {
	ByCondition map[string]uint64
	Last        time.Time
}

func (d *denialCounts) record(name, condition string, at time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.keys == nil {
		d.keys = map[string]*Denials{}
	}
	e := d.keys[name]
	if e == nil {
		e = &Denials{ByCondition: map[string]uint64{}}
		d.keys[name] = e
	}
	e.ByCondition[condition]++
	e.Last = at
}

// Denials returns a copy of key name's denial record since this process started (zero when none).
func (m *Manager) Denials(name string) Denials {
	m.denials.mu.Lock()
	defer m.denials.mu.Unlock()
	e := m.denials.keys[name]
	if e == nil {
		return Denials{ByCondition: map[string]uint64{}}
	}
	out := Denials{ByCondition: make(map[string]uint64, len(e.ByCondition)), Last: e.Last}
	for c, n := range e.ByCondition {
		out.ByCondition[c] = n
	}
	return out
}

// SetAccess replaces the key's access settings (nil removes them), recording what changed.
func (tx *Tx) SetAccess(a *Access) error {
	if a != nil {
		if err := a.Validate(); err != nil {
			return err
		}
		if a.Empty() {
			a = nil
		}
	}
	if a == nil && tx.Key.Access == nil {
		return nil
	}
	tx.Key.Access = a
	tx.Changed()
	if a == nil {
		tx.Record("access_removed", 0, "", "")
		return nil
	}
	tx.Record("access_changed", 0, "", a.Summary())
	return nil
}

// Summary describes the settings in one line, for history and the key's read.
func (a *Access) Summary() string {
	if a == nil {
		return "none"
	}
	var parts []string
	add := func(name string, list []string) {
		if len(list) > 0 {
			parts = append(parts, name+"="+strings.Join(list, ","))
		}
	}
	add("allowed_cidrs", a.AllowedCIDRs)
	add("allowed_hours", a.AllowedHours)
	if a.TimeZone != "" {
		parts = append(parts, "time_zone="+a.TimeZone)
	}
	add("allowed_entity_ids", a.AllowedEntityIDs)
	add("allowed_groups", a.AllowedGroups)
	if len(a.RequiredEntityMetadata) > 0 {
		keys := make([]string, 0, len(a.RequiredEntityMetadata))
		for k := range a.RequiredEntityMetadata {
			keys = append(keys, k+"="+a.RequiredEntityMetadata[k])
		}
		slices.Sort(keys)
		add("required_entity_metadata", keys)
	}
	ops := make([]string, len(a.Operations))
	for i, op := range a.Operations {
		ops[i] = string(op)
	}
	add("operations", ops)
	if a.GrantsRequired {
		parts = append(parts, "grants_required=true")
	}
	if a.MaxGrantTTL > 0 {
		parts = append(parts, "max_grant_ttl="+a.MaxGrantTTL.String())
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}
