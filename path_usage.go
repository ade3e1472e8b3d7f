package cmk

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Usage analytics and anomalies (internal/keys/analytics.go, anomaly.go): config/analytics switches them,
// keys/:name/usage shows a key's counts, keys/:name/anomalies its recent anomalies and the actions in force, and
// keys/:name/anomalies/lift ends an action early. None of them reads key material.

const configAnalyticsPath = "config/analytics"

// analyticsConfig is config/analytics.
type analyticsConfig struct {
	Disabled bool `json:"disabled"` // stored inverted, so that no entry means on
	// EnabledAt is when analytics were last turned back on (zero: never turned off): the migration view's counts
	// of versions made before it are incomplete.
	EnabledAt time.Time `json:"enabled_at,omitempty"`
}

func (b *backend) pathConfigAnalytics() *framework.Path {
	return &framework.Path{
		Pattern:      configAnalyticsPath,
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk"},
		Fields: map[string]*framework.FieldSchema{
			"enabled": {
				Type:        framework.TypeBool,
				Default:     true,
				Description: "Count every use and denial of the keys per operation and caller (keys/:name/usage) and judge them for anomalies (keys/:name/anomalies). On by default. Off, nothing is counted or judged; anomaly actions already in force still apply.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.pathConfigAnalyticsRead,
				Summary:      "Read whether usage analytics are on.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read", OperationSuffix: "analytics-configuration"},
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     handle(b.pathConfigAnalyticsWrite),
				Summary:      "Turn usage analytics and anomaly detection on or off; it applies at once.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "configure", OperationSuffix: "analytics"},
			},
		},
		HelpSynopsis:    "Turn the keys' usage analytics and anomaly detection on or off (on by default).",
		HelpDescription: "enabled=false stops counting uses (keys/:name/usage) and judging them (keys/:name/anomalies) on every key of the mount, for example to measure what they cost; counts already made are written to storage and their memory freed (they are read again once analytics are back on and the keys used), and anomaly actions in force still apply. Other nodes apply a change at their next periodic run.",
	}
}

func (b *backend) readAnalyticsConfig(ctx context.Context, s logical.Storage) (analyticsConfig, error) {
	var c analyticsConfig
	e, err := s.Get(ctx, configAnalyticsPath)
	if err != nil || e == nil {
		return c, err
	}
	return c, e.DecodeJSON(&c)
}

// applyAnalyticsConfig switches analytics from storage: when the mount is set up, and when another node changed it.
func (b *backend) applyAnalyticsConfig(ctx context.Context, s logical.Storage) error {
	c, err := b.readAnalyticsConfig(ctx, s)
	if err != nil {
		return err
	}
	b.keys.SetAnalytics(!c.Disabled, c.EnabledAt)
	return nil
}

func (b *backend) pathConfigAnalyticsRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	c, err := b.readAnalyticsConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{"enabled": !c.Disabled}}, nil
}

func (b *backend) pathConfigAnalyticsWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	cur, err := b.readAnalyticsConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	c := analyticsConfig{Disabled: !d.Get("enabled").(bool), EnabledAt: cur.EnabledAt}
	if cur.Disabled && !c.Disabled {
		c.EnabledAt = time.Now().UTC()
	}
	e, err := logical.StorageEntryJSON(configAnalyticsPath, c)
	if err != nil {
		return nil, err
	}
	if err := req.Storage.Put(ctx, e); err != nil {
		return nil, err
	}
	b.keys.SetAnalytics(!c.Disabled, c.EnabledAt)
	// Off, what was counted goes to storage and its memory is freed: analytics cost nothing while off.
	if err := b.keys.FreeAnalytics(ctx, req.Storage); err != nil {
		return nil, fmt.Errorf("analytics are off; some counts are not stored yet and stay in memory until the next flush: %w", err)
	}
	return b.pathConfigAnalyticsRead(ctx, req, d)
}

func (b *backend) pathUsage() []*framework.Path {
	return []*framework.Path{
		{
			Pattern:      "keys/" + framework.GenericNameRegex("name") + "/usage",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "key-usage"},
			Fields:       map[string]*framework.FieldSchema{"name": fieldName},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback: b.pathUsageRead,
					Summary:  "Read the key's uses and denials per operation and caller, by minute, hour and day.",
				},
			},
			HelpSynopsis:    "The key's uses and denials, per operation and per caller, by minute, hour and day.",
			HelpDescription: usageHelp,
		},
		{
			Pattern:      "keys/" + framework.GenericNameRegex("name") + "/anomalies",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "key-anomalies"},
			Fields:       map[string]*framework.FieldSchema{"name": fieldName},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback: b.pathAnomaliesRead,
					Summary:  "Read the key's recent anomalies and the actions in force on its callers.",
				},
			},
			HelpSynopsis:    "Unusual uses of the key, and the actions (require_grant, block_caller) in force on their callers.",
			HelpDescription: anomaliesHelp,
		},
		{
			Pattern:      "keys/" + framework.GenericNameRegex("name") + "/anomalies/lift",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "lift", OperationSuffix: "key-anomaly-action"},
			Fields: map[string]*framework.FieldSchema{
				"name": fieldName,
				"caller": {
					Type:        framework.TypeString,
					Required:    true,
					Description: `The caller whose action to end, as keys/:name/anomalies names it: an entity id, or "token:hmac-sha256:<hex>" (its token accessor's HMAC, as the key's history records it) for a token without an entity.`,
				},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{
					Callback: handle(b.pathAnomalyLift),
					Summary:  "End the action in force on a caller of the key before it lapses.",
				},
			},
			HelpSynopsis:    "End an anomaly's action (require_grant, block_caller) on a caller of the key early.",
			HelpDescription: "Ends the action in force on caller's use of the key, as an operator does who has looked at the anomaly and found it benign. The key's history records anomaly_action_lifted and who lifted it. A caller under no action is a 400.",
		},
	}
}

func (b *backend) pathUsageRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil || k == nil {
		return nil, err
	}
	return jsonResponse(b.keys.Usage(ctx, req.Storage, name))
}

func (b *backend) pathAnomaliesRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil || k == nil {
		return nil, err
	}
	actions, err := b.keys.AnomalyActions(ctx, req.Storage, name)
	if err != nil {
		return respond(err)
	}
	return jsonResponse(anomaliesView{b.keys.Anomalies(ctx, req.Storage, name), actions}) // stored with the usage counts
}

// anomaliesView is keys/:name/anomalies' answer.
type anomaliesView struct {
	Anomalies []keys.Anomaly       `json:"anomalies"`
	Actions   []keys.AnomalyAction `json:"actions"`
}

// liftView is keys/:name/anomalies/lift's answer: the action ended.
type liftView struct {
	Lifted keys.AnomalyAction `json:"lifted"`
}

func (b *backend) pathAnomalyLift(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name, caller := d.Get("name").(string), strings.TrimSpace(d.Get("caller").(string))
	if caller == "" {
		return respond(callerf("caller is required: the entity id, or token:hmac-sha256:<hex>, that keys/%s/anomalies names", name))
	}
	lifted, err := b.keys.LiftAnomalyAction(ctx, req.Storage, name, caller, actorOf(req))
	if err != nil {
		return respond(err)
	}
	if lifted == nil {
		return respond(callerf("no anomaly action is in force on caller %q of key %q", caller, name))
	}
	return jsonResponse(liftView{*lifted})
}

// jsonResponse answers with v's JSON form.
func jsonResponse(v interface{}) (*logical.Response, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var data map[string]interface{}
	if err := json.Unmarshal(raw, &data); err != nil {
		return nil, err
	}
	return &logical.Response{Data: data}, nil
}

var usageHelp = fmt.Sprintf(`
Every use of the key's material (encrypt, decrypt, rewrap, datakey, sign, verify of an HMAC, hmac, csr) and every
denial of one passes the engine's door, which counts it per operation and per caller: a batch of N items is N
uses (or N denials). A caller is its Vault entity id, or for a token without an entity (root, orphan tokens)
"token:hmac-sha256:<hex>", its accessor's HMAC under the mount's salt as the key's history records it: each such
token is a caller of its own, whatever its display name (shown as display_name). Never a token or its accessor.

The response gives the totals (uses, denials, denials_by_condition) since counting began (since) and, per
operation and caller, the totals and the buckets with a use: minutes (the last %d), hours (the last %d, a week)
and days (the last %d). Counts saturate at 2^32-1 per bucket.

The counts are kept in memory on the active node (no storage write per request) and written to storage about once
a minute by the periodic function, one entry per key that changed, and at a clean shutdown: a restart or a failover
loses at most the last minute's counts. A performance standby counts what it serves in its own memory only.

Memory is bounded whatever the number of callers: at most %d callers per key and %d (key, caller) pairs per mount
are tracked; the uses of the others are counted under the caller "%s", and callers_folded says how many callers
were folded so. A deleted key's usage is dropped with it (its history stays). config/analytics turns counting off.
`, keys.MinuteBuckets, keys.HourBuckets, keys.DayBuckets, keys.MaxCallersPerKey, keys.MaxCallersTracked, keys.OtherCallers)

var anomaliesHelp = fmt.Sprintf(`
Each use is judged before it is admitted, against the caller's own use of the key (its usage buckets):

  rate_above_limit     its uses in the current minute pass the key's anomaly_rate_limit (per caller, all operations)
  rate_above_baseline  they pass 10 times its mean per minute over its last 24 hours, once it has been seen for
                       6 hours, with at least 100 uses in the minute
  new_caller           a caller not seen before on a key whose callers (5 at most) have been the same for 3 days
  unusual_hour         a use at an hour of day (UTC) neither in nor next to the hours it used the key in over the
                       last week, once it has been seen for 3 days, on 2 days or more

An anomaly is logged (WARN, naming key, caller and what was unusual), recorded in the key's history (event
"anomaly"), counted in cmk_anomalies_total{kind}, and listed here (the last 50); a repeat of one caller and kind
within 15 minutes is not reported again. The key's on_anomaly then acts for anomaly_action_period (default %s):
alert does nothing more; require_grant lets the caller use the key only under a live grant (keys/:name/grants);
block_caller denies its uses. Both answer 403 naming the condition "anomaly", are stored so that they hold across
a failover, and end early with keys/:name/anomalies/lift, which also excuses the caller's current use: it is not
judged unusual again for 15 minutes. A caller under an action is not judged again until it lapses. An action on a
token without an entity holds for that token only: a child token, or another token of the same display name, is
another caller.

A caller counted under "%s" (past the callers tracked per key or per mount) has no baseline of its own: it is
judged as a new caller, and against anomaly_rate_limit on its own uses in the minute, counted for up to %d such
callers a minute per key; beyond, on the uses of all the callers under "%s" in the minute, and the anomaly says
so. The action applies to the caller alone, as to any other.
`, keys.DefaultAnomalyActionPeriod, keys.OtherCallers, keys.MaxFoldedPerMinute, keys.OtherCallers)
