package cmk

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// The mount's keys as an owner or an auditor asks about them: inventory (a filtered, paginated list of key
// summaries) and reports/compliance (what needs attention). Both read the keys' cached snapshots and in-memory
// counts: no HSM call, and no storage read per key once the snapshots are cached (cache-config size 0 caches them
// all).

// Inventory pages: limit's default and bound.
const (
	defaultInventoryLimit = 100
	maxInventoryLimit     = 1000
)

// nearUsageLimit: a version is near its usage limit once it has made this share of its encryptions (90%).
const nearUsageLimitPercent = 90

// Key states as inventory filters and shows them.
const (
	inventoryActive            = "active"
	inventoryDisabled          = "disabled"
	inventoryDeletionScheduled = "deletion_scheduled"
)

func (b *backend) pathInventory() []*framework.Path {
	filterOps := map[logical.Operation]framework.OperationHandler{
		logical.ListOperation: &framework.PathOperation{
			Callback: b.pathInventoryRead,
			Summary:  "List the mount's keys with their summaries, filtered and paginated.",
		},
		logical.ReadOperation: &framework.PathOperation{
			Callback: b.pathInventoryRead,
			Summary:  "The same as LIST, for clients that cannot send LIST with query fields.",
		},
	}
	return []*framework.Path{
		{
			Pattern:      "inventory/?$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "inventory"},
			Fields: map[string]*framework.FieldSchema{
				"tag":                  {Type: framework.TypeStringSlice, Description: "Only keys with this tag, as key=value; repeat it for keys that have every one given.", Query: true},
				"owner":                {Type: framework.TypeString, Description: "Only keys of this owner (exact match).", Query: true},
				"type":                 {Type: framework.TypeString, Description: "Only keys of this type (" + strings.Join(keys.TypeNames, ", ") + ").", Query: true},
				"state":                {Type: framework.TypeString, AllowedValues: []interface{}{inventoryActive, inventoryDisabled, inventoryDeletionScheduled}, Description: "Only keys in this state: active, disabled (keys/:name/disable) or deletion_scheduled.", Query: true},
				"rotation_overdue":     {Type: framework.TypeBool, Description: "true: only keys whose next_rotation_time has passed without a rotation; false: only the others.", Query: true},
				"near_usage_limit":     {Type: framework.TypeBool, Description: fmt.Sprintf("true: only AES keys whose latest version has made %d%% or more of its encryption limit (max_encryptions_per_version, or 2^32); false: only the others. Counts are those known to this node: a version's count is loaded with its first encryption since the node started.", nearUsageLimitPercent), Query: true},
				"pending_deletion":     {Type: framework.TypeBool, Description: "true: only keys whose deletion, or a version's destruction, is scheduled; false: only the others.", Query: true},
				"pending_approvals":    {Type: framework.TypeBool, Description: "true: only keys with requests pending approval (approvals/); false: only the others.", Query: true},
				"no_rotation_schedule": {Type: framework.TypeBool, Description: "true: only keys with neither auto_rotate_period nor next_rotation_time; false: only the others.", Query: true},
				"no_access_conditions": {Type: framework.TypeBool, Description: "true: only keys without access conditions (keys/:name/access); false: only the others.", Query: true},
				"after":                {Type: framework.TypeString, Description: "Pagination: only keys whose name sorts after this one (the previous page's next_after).", Query: true},
				"limit":                {Type: framework.TypeInt, Default: defaultInventoryLimit, Description: fmt.Sprintf("Pagination: at most this many keys (1 to %d, default %d).", maxInventoryLimit, defaultInventoryLimit), Query: true},
			},
			Operations:      filterOps,
			HelpSynopsis:    "The mount's keys with owner, tags, state, rotation, usage and pending work, filtered and paginated.",
			HelpDescription: inventoryHelp,
		},
		{
			Pattern:      "reports/compliance$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "compliance-report"},
			Fields: map[string]*framework.FieldSchema{
				"max_version_age": {Type: framework.TypeDurationSecond, Default: int((365 * 24 * time.Hour).Seconds()), Description: "A key whose encrypting version (the latest, for AES and RSA keys) is older than this is a finding (default 365 days).", Query: true},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback: b.pathComplianceReport,
					Summary:  "The mount's compliance findings: what needs an owner's attention, each naming the key and why.",
				},
			},
			HelpSynopsis:    "The mount's compliance findings, in JSON.",
			HelpDescription: complianceHelp,
		},
	}
}

// keySummary is what inventory knows of one key, from its snapshot and in-memory counts.
type keySummary struct {
	k                *keys.Key
	state            string
	rotationOverdue  bool
	encryptions      uint64 // of the latest version; AES keys only
	countKnown       bool
	nearUsageLimit   bool
	destroyScheduled []int // versions whose destruction is scheduled
	pendingApprovals int
	noSchedule       bool
	noConditions     bool
}

func (b *backend) summarize(k *keys.Key, pending map[string]map[string]pendingApproval, now time.Time) keySummary {
	s := keySummary{
		k:                k,
		state:            inventoryActive,
		rotationOverdue:  !k.NextRotation.IsZero() && now.After(k.NextRotation),
		pendingApprovals: len(pending[k.Name]),
		noSchedule:       k.AutoRotatePeriod == 0 && k.NextRotation.IsZero(),
		noConditions:     k.Access.Summary() == "none",
	}
	switch {
	case !k.DeleteAt.IsZero() || k.Deleting:
		s.state = inventoryDeletionScheduled
	case k.Disabled:
		s.state = inventoryDisabled
	}
	if k.Type.IsAES() {
		s.encryptions, s.countKnown = b.keys.EncryptionCount(k.Name, k.LatestVersion)
		s.nearUsageLimit = s.countKnown && s.encryptions*100 >= k.EncryptionLimit()*nearUsageLimitPercent // at most 2^32 × 100: no overflow
	}
	for n, v := range k.Versions {
		if v.State == keys.StateDestroyScheduled {
			s.destroyScheduled = append(s.destroyScheduled, n)
		}
	}
	sort.Ints(s.destroyScheduled)
	return s
}

func (s keySummary) pendingDeletion() bool {
	return s.state == inventoryDeletionScheduled || len(s.destroyScheduled) > 0
}

// view is the summary as inventory shows it.
func (s keySummary) view() map[string]interface{} {
	k := s.k
	m := map[string]interface{}{
		"name":                 k.Name,
		"type":                 string(k.Type),
		"owner":                k.Owner,
		"tags":                 tagsView(k.Tags),
		"latest_version":       k.LatestVersion,
		"state":                s.state,
		"last_rotated":         keys.FormatTime(k.LastRotated),
		"next_rotation_time":   keys.FormatTime(k.NextRotation),
		"rotation_overdue":     s.rotationOverdue,
		"near_usage_limit":     s.nearUsageLimit,
		"pending_deletion":     s.pendingDeletion(),
		"pending_approvals":    s.pendingApprovals,
		"no_rotation_schedule": s.noSchedule,
		"access":               k.Access.Summary(),
	}
	if k.Type.IsAES() {
		m["max_encryptions_per_version"] = k.EncryptionLimit()
		if s.countKnown {
			m["encryptions"] = s.encryptions
		}
	}
	if !k.DeleteAt.IsZero() {
		m["deletion_scheduled_time"] = keys.FormatTime(k.DeleteAt)
	}
	if len(s.destroyScheduled) > 0 {
		m["versions_destroy_scheduled"] = s.destroyScheduled
	}
	return m
}

// inventoryFilter is what inventory was asked to keep.
type inventoryFilter struct {
	tags  map[string]string
	owner string
	typ   string
	state string
	flags map[string]bool // the boolean filters given, by field name
}

func inventoryFilterFrom(d *framework.FieldData) (inventoryFilter, error) {
	f := inventoryFilter{owner: d.Get("owner").(string), state: d.Get("state").(string), flags: map[string]bool{}}
	if raw := d.Get("type").(string); raw != "" {
		typ, err := keys.ParseType(raw)
		if err != nil {
			return f, err
		}
		f.typ = string(typ)
	}
	if f.state != "" && !slices.Contains([]string{inventoryActive, inventoryDisabled, inventoryDeletionScheduled}, f.state) {
		return f, callerf("state must be active, disabled or deletion_scheduled, not %q", f.state)
	}
	for _, tag := range d.Get("tag").([]string) {
		key, value, ok := strings.Cut(tag, "=")
		if !ok || strings.TrimSpace(key) == "" {
			return f, callerf("tag %q must be key=value", tag)
		}
		if f.tags == nil {
			f.tags = map[string]string{}
		}
		f.tags[strings.TrimSpace(key)] = value
	}
	for _, name := range []string{"rotation_overdue", "near_usage_limit", "pending_deletion", "pending_approvals", "no_rotation_schedule", "no_access_conditions"} {
		if v, ok := d.GetOk(name); ok {
			f.flags[name] = v.(bool)
		}
	}
	return f, nil
}

func (f inventoryFilter) keeps(s keySummary) bool {
	k := s.k
	switch {
	case f.owner != "" && k.Owner != f.owner,
		f.typ != "" && string(k.Type) != f.typ,
		f.state != "" && s.state != f.state:
		return false
	}
	for key, value := range f.tags {
		if got, ok := k.Tags[key]; !ok || got != value {
			return false
		}
	}
	has := map[string]bool{
		"rotation_overdue":     s.rotationOverdue,
		"near_usage_limit":     s.nearUsageLimit,
		"pending_deletion":     s.pendingDeletion(),
		"pending_approvals":    s.pendingApprovals > 0,
		"no_rotation_schedule": s.noSchedule,
		"no_access_conditions": s.noConditions,
	}
	for name, want := range f.flags {
		if has[name] != want {
			return false
		}
	}
	return true
}

// eachKey calls visit with the summary of every key of the mount whose name sorts after after, in name order,
// until visit returns false. One storage LIST, then the cached snapshots.
func (b *backend) eachKey(ctx context.Context, s logical.Storage, after string, visit func(keySummary) bool) error {
	names, err := keys.List(ctx, s)
	if err != nil {
		return err
	}
	sort.Strings(names)
	now := b.now()
	pending, err := b.pendingApprovals(ctx, s, now)
	if err != nil {
		return err
	}
	for _, name := range names[sort.SearchStrings(names, after):] {
		if name <= after {
			continue
		}
		k, err := b.keys.Get(ctx, s, name)
		if err != nil {
			return err
		}
		if k == nil {
			continue // deleted since the list
		}
		if !visit(b.summarize(k, pending, now)) {
			return nil
		}
	}
	return nil
}

func (b *backend) pathInventoryRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	f, err := inventoryFilterFrom(d)
	if err != nil {
		return respond(err)
	}
	limit := d.Get("limit").(int)
	if limit < 1 || limit > maxInventoryLimit {
		return respond(callerf("limit must be between 1 and %d", maxInventoryLimit))
	}
	var names []string
	info := map[string]interface{}{}
	more := false
	err = b.eachKey(ctx, req.Storage, d.Get("after").(string), func(s keySummary) bool {
		if !f.keeps(s) {
			return true
		}
		if len(names) == limit {
			more = true
			return false
		}
		names = append(names, s.k.Name)
		info[s.k.Name] = s.view()
		return true
	})
	if err != nil {
		return nil, err
	}
	resp := logical.ListResponseWithInfo(names, info)
	if more {
		resp.Data["next_after"] = names[len(names)-1]
	}
	return resp, nil
}

// finding is one entry of reports/compliance.
func finding(key, why string, extra map[string]interface{}) map[string]interface{} {
	m := map[string]interface{}{"key": key, "reason": why}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

func (b *backend) pathComplianceReport(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	maxAge := time.Duration(d.Get("max_version_age").(int)) * time.Second
	if maxAge <= 0 {
		return respond(callerf("max_version_age must be positive"))
	}
	now := b.now()
	sections := map[string][]map[string]interface{}{}
	add := func(section string, f map[string]interface{}) { sections[section] = append(sections[section], f) }
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	algorithms := map[string]*algorithmSummary{}
	var names []string
	err = b.eachKey(ctx, req.Storage, "", func(s keySummary) bool {
		k := s.k
		names = append(names, k.Name)
		if still := summarizeAlgorithms(algorithms, k, cfg, now); len(still) > 0 {
			for _, t := range sortedKeys(still) {
				since, _ := cfg.deprecatedSince(keys.Type(t), now)
				add("deprecated_types_in_use", finding(k.Name, fmt.Sprintf("versions %v are %s, deprecated since %s, and still serve (decrypt and verify, or rewrap when retired): rewrap or re-sign what they protect (keys/%s/migration), then raise min_decryption_version past them or destroy them",
					still[t], t, formatDay(since), k.Name), map[string]interface{}{"type": t, "versions": still[t]}))
			}
		}
		if s.noSchedule {
			add("no_rotation_schedule", finding(k.Name, "neither auto_rotate_period nor next_rotation_time is set: the key is rotated only by hand", nil))
		}
		if s.rotationOverdue {
			add("rotation_overdue", finding(k.Name, "next_rotation_time "+keys.FormatTime(k.NextRotation)+" has passed without a rotation", nil))
		}
		if k.Owner == "" {
			add("no_owner", finding(k.Name, "no owner is set (keys/"+k.Name+"/config owner)", nil))
		}
		if v := k.Versions[k.LatestVersion]; v != nil && (k.Type.IsAES() || k.Type.IsRSA()) && s.state == inventoryActive && now.Sub(v.CreatedAt) > maxAge {
			age := now.Sub(v.CreatedAt).Truncate(time.Hour)
			add("old_versions_encrypting", finding(k.Name, fmt.Sprintf("version %d encrypts and was created %s ago (%s), more than max_version_age %s", k.LatestVersion, age, keys.FormatTime(v.CreatedAt), maxAge),
				map[string]interface{}{"version": k.LatestVersion, "creation_time": keys.FormatTime(v.CreatedAt)}))
		}
		if s.nearUsageLimit {
			add("near_usage_limit", finding(k.Name, fmt.Sprintf("version %d has made %d of its %d encryptions", k.LatestVersion, s.encryptions, k.EncryptionLimit()),
				map[string]interface{}{"version": k.LatestVersion, "encryptions": s.encryptions, "max_encryptions_per_version": k.EncryptionLimit()}))
		}
		if !k.DeleteAt.IsZero() || k.Deleting {
			add("pending_deletions", finding(k.Name, "the key's deletion is scheduled for "+keys.FormatTime(k.DeleteAt), map[string]interface{}{"deletion_scheduled_time": keys.FormatTime(k.DeleteAt)}))
		}
		for _, n := range s.destroyScheduled {
			at := keys.FormatTime(k.Versions[n].DestroyAt)
			add("pending_deletions", finding(k.Name, fmt.Sprintf("version %d's destruction is scheduled for %s", n, at), map[string]interface{}{"version": n, "destruction_scheduled_time": at}))
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	pending, err := b.pendingApprovals(ctx, req.Storage, now)
	if err != nil {
		return nil, err
	}
	for _, key := range sortedKeys(pending) {
		for _, id := range sortedKeys(pending[key]) {
			p := pending[key][id]
			add("pending_approvals", finding(key, fmt.Sprintf("%q awaits approval until %s", p.Action, keys.FormatTime(p.ExpiresAt)),
				map[string]interface{}{"approval_id": id, "expires_at": keys.FormatTime(p.ExpiresAt)}))
		}
	}
	// Live grants: each key's grants are read from storage the first time (then kept in memory).
	for _, name := range names {
		grants, err := b.keys.Grants(ctx, req.Storage, name)
		if errors.Is(err, keys.ErrNotFound) {
			continue // deleted since
		}
		if err != nil {
			return nil, err
		}
		for _, g := range grants {
			if g.State != keys.GrantLive {
				continue
			}
			grantee := g.EntityID
			if grantee == "" {
				grantee = "group " + g.Group
			}
			add("grants_outstanding", finding(name, fmt.Sprintf("grant %s to %s is live until %s", g.ID, grantee, keys.FormatTime(g.ExpiresAt)),
				map[string]interface{}{"grant_id": g.ID, "expires_at": keys.FormatTime(g.ExpiresAt)}))
		}
	}
	found := func(section string) []map[string]interface{} {
		return append([]map[string]interface{}{}, sections[section]...)
	}
	total := 0
	for _, list := range sections {
		total += len(list)
	}
	data := map[string]interface{}{
		"generated_at":            keys.FormatTime(now),
		"keys_examined":           len(names),
		"max_version_age":         int64(maxAge.Seconds()),
		"findings":                total,
		"no_rotation_schedule":    found("no_rotation_schedule"),
		"rotation_overdue":        found("rotation_overdue"),
		"no_owner":                found("no_owner"),
		"old_versions_encrypting": found("old_versions_encrypting"),
		"near_usage_limit":        found("near_usage_limit"),
		"pending_deletions":       found("pending_deletions"),
		"pending_approvals":       found("pending_approvals"),
		"grants_outstanding":      found("grants_outstanding"),
		"deprecated_types_in_use": found("deprecated_types_in_use"),
		"algorithms":              algorithms,
	}
	return &logical.Response{Data: data}, nil
}

// algorithmSummary is one key type's line of the compliance report's mount-wide migration summary.
type algorithmSummary struct {
	Keys            int    `json:"keys"`              // keys whose current type it is
	Versions        int    `json:"versions"`          // versions of it not destroyed
	InDecryptWindow int    `json:"in_decrypt_window"` // of which still decrypt and verify (retired ones rewrap)
	DeprecatedSince string `json:"deprecated_since,omitempty"`
}

// summarizeAlgorithms adds key k to the per-type summary, and returns, by deprecated type, its versions of that
// type that still decrypt, verify or rewrap.
func summarizeAlgorithms(sum map[string]*algorithmSummary, k *keys.Key, cfg *keysConfig, now time.Time) map[string][]int {
	line := func(t keys.Type) *algorithmSummary {
		a := sum[string(t)]
		if a == nil {
			a = &algorithmSummary{}
			if since, ok := cfg.deprecatedSince(t, now); ok {
				a.DeprecatedSince = formatDay(since)
			}
			sum[string(t)] = a
		}
		return a
	}
	line(k.Type).Keys++
	var still map[string][]int
	for n := 1; n <= k.LatestVersion; n++ {
		v := k.Versions[n]
		if v == nil || v.State == keys.StateDestroyed {
			continue
		}
		a := line(v.Type)
		a.Versions++
		switch k.VersionState(n) {
		case keys.StateActive, keys.StateDecryptOnly, keys.StateRetired:
			a.InDecryptWindow++
			if a.DeprecatedSince != "" {
				if still == nil {
					still = map[string][]int{}
				}
				still[string(v.Type)] = append(still[string(v.Type)], n)
			}
		}
	}
	return still
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

const inventoryHelp = `
Lists the mount's keys in name order, each with a summary: name, type, owner, tags, latest_version, state (active,
disabled, deletion_scheduled), last_rotated, next_rotation_time, rotation_overdue, encryptions of the latest AES
version and its max_encryptions_per_version, near_usage_limit (90% or more of that limit), pending_deletion (the key's
deletion or a version's destruction is scheduled), pending_approvals (how many requests about the key await approval),
no_rotation_schedule and access (its access conditions in one line, "none" without). Query fields filter: tag
(key=value, repeatable: every one must match), owner, type, state and the booleans rotation_overdue,
near_usage_limit, pending_deletion, pending_approvals, no_rotation_schedule, no_access_conditions (true keeps the keys
that have the property, false those that do not). Pages: limit (default 100, at most 1000) and after; the response's
next_after, when present, is the after of the next page.

It calls no HSM and reads no key from storage once the keys' metadata is cached (cache-config; size 0 caches every
key): one storage LIST of the key names per request, and the pending approvals read once after a start. Encryption
counts are those this node knows: a version's count is loaded with its first encryption since the node started.
LIST and READ answer the same.
`

const complianceHelp = `
The mount's findings, in JSON, each naming the key and why: no_rotation_schedule (neither auto_rotate_period nor
next_rotation_time), rotation_overdue, no_owner, old_versions_encrypting (an enabled AES or RSA key whose latest
version, the one that encrypts, is older than max_version_age, default 365 days), near_usage_limit (the latest AES
version has made 90% or more of its encryptions, as this node counts them), pending_deletions (a key's deletion or a
version's destruction scheduled), pending_approvals (requests held for dual control, with their approval_id) and
grants_outstanding (live grants, with grant_id and expires_at) and deprecated_types_in_use (versions of a type that
config/keys deprecated_types deprecates and that still decrypt, verify or rewrap). findings is the total;
keys_examined how many keys were read. algorithms summarises the mount's migration between algorithms: for each key
type, how many keys have it as their current type, how many versions of it are not destroyed, how many of those still
decrypt and verify (or rewrap, when retired), and since when it is deprecated (keys/:name/migration gives a key's
detail).

Like inventory it calls no HSM and reads keys from their cached metadata, but grants are kept per key and read from
storage the first time a key's grants are needed since the node started: the first report after a start lists each
key's grants in storage and reads each grant once.
`
