package cmk

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

const (
	configMetricsPath = "config/metrics"
	// metricsContentType is Prometheus's text exposition format.
	metricsContentType = "text/plain; version=0.0.4; charset=utf-8"

	defaultPerKeyLabelLimit = 100
	maxPerKeyLabelLimit     = 10000
)

// metricsConfig is config/metrics: whether requests are also counted per key, and for how many keys at most.
type metricsConfig struct {
	PerKeyLabels     bool `json:"per_key_labels"`
	PerKeyLabelLimit int  `json:"per_key_label_limit"`
}

func (b *backend) pathMetrics() *framework.Path {
	return &framework.Path{
		Pattern:      "metrics",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk"},
		Fields: map[string]*framework.FieldSchema{
			"format": {
				Type:          framework.TypeString,
				Default:       "prometheus",
				AllowedValues: []interface{}{"prometheus"},
				Description:   `The exposition format: "prometheus" (the default and only one; accepted so that a scrape configuration written for Vault's sys/metrics works).`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: handle(b.pathMetricsRead),
				Summary:  "The mount's metrics in Prometheus's text exposition format.",
				DisplayAttrs: &framework.DisplayAttributes{
					OperationVerb: "read", OperationSuffix: "metrics",
				},
			},
		},
		HelpSynopsis:    "The mount's metrics, for Prometheus to scrape.",
		HelpDescription: metricsHelp,
	}
}

func (b *backend) pathConfigMetrics() *framework.Path {
	return &framework.Path{
		Pattern:      "config/metrics",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk"},
		Fields: map[string]*framework.FieldSchema{
			"per_key_labels": {
				Type:        framework.TypeBool,
				Description: "Also count requests per key (cmk_key_requests_total{key,operation}). Off by default: a label per key makes a series per key, which a mount with many keys should not pay for.",
			},
			"per_key_label_limit": {
				Type:        framework.TypeInt,
				Default:     defaultPerKeyLabelLimit,
				Description: fmt.Sprintf("How many keys get a label of their own (1 to %d, default %d): the first used since the plugin started or this setting changed; the others are counted as key=\"_other\", and how many they are in cmk_metrics_keys_aggregated_total.", maxPerKeyLabelLimit, defaultPerKeyLabelLimit),
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.pathConfigMetricsRead,
				Summary:      "Read the metrics settings.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read", OperationSuffix: "metrics-configuration"},
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     handle(b.pathConfigMetricsWrite),
				Summary:      "Set the metrics settings; they apply at once.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "configure", OperationSuffix: "metrics"},
			},
		},
		HelpSynopsis: "Per-key labels of the mount's metrics: off by default, capped.",
		HelpDescription: `The metrics path labels requests by operation, status and key type only, so that its series stay few
whatever the number of keys. per_key_labels=true adds cmk_key_requests_total{key,operation} for at most
per_key_label_limit keys (default 100): the first keys used get a label of their own, the rest are counted as
key="_other", and cmk_metrics_keys_aggregated_total counts how many keys that is. A change applies at once and
starts the per-key series afresh.`,
	}
}

func (b *backend) readMetricsConfig(ctx context.Context, s logical.Storage) (metricsConfig, error) {
	c := metricsConfig{PerKeyLabelLimit: defaultPerKeyLabelLimit}
	e, err := s.Get(ctx, configMetricsPath)
	if err != nil || e == nil {
		return c, err
	}
	return c, e.DecodeJSON(&c)
}

// applyMetricsConfig sets the metrics' per-key labels from storage: when the mount is set up, and when another
// node changed them.
func (b *backend) applyMetricsConfig(ctx context.Context, s logical.Storage) error {
	c, err := b.readMetricsConfig(ctx, s)
	if err != nil {
		return err
	}
	b.metrics.setPerKey(c.PerKeyLabels, c.PerKeyLabelLimit)
	return nil
}

func (b *backend) pathConfigMetricsRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	c, err := b.readMetricsConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{
		"per_key_labels":      c.PerKeyLabels,
		"per_key_label_limit": c.PerKeyLabelLimit,
	}}, nil
}

func (b *backend) pathConfigMetricsWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	c, err := b.readMetricsConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if v, ok := d.GetOk("per_key_labels"); ok {
		c.PerKeyLabels = v.(bool)
	}
	if v, ok := d.GetOk("per_key_label_limit"); ok {
		c.PerKeyLabelLimit = v.(int)
	}
	if c.PerKeyLabelLimit < 1 || c.PerKeyLabelLimit > maxPerKeyLabelLimit {
		return respond(callerf("per_key_label_limit must be between 1 and %d, not %d", maxPerKeyLabelLimit, c.PerKeyLabelLimit))
	}
	e, err := logical.StorageEntryJSON(configMetricsPath, c)
	if err != nil {
		return nil, err
	}
	if err := req.Storage.Put(ctx, e); err != nil {
		return nil, err
	}
	b.metrics.setPerKey(c.PerKeyLabels, c.PerKeyLabelLimit)
	return b.pathConfigMetricsRead(ctx, req, d)
}

func (b *backend) pathMetricsRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if f := d.Get("format").(string); f != "prometheus" {
		return respond(callerf("format %q is not offered: the metrics are in Prometheus's text format (format=prometheus)", f))
	}
	names, err := keys.List(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	ks := make([]*keys.Key, 0, len(names))
	for _, name := range names {
		k, err := b.keys.Get(ctx, req.Storage, name)
		if err != nil {
			return nil, err
		}
		if k != nil {
			ks = append(ks, k)
		}
	}
	body, err := b.metrics.exposition(ks, b.keys, time.Now())
	if err != nil {
		return nil, fmt.Errorf("write the metrics: %w", err)
	}
	return &logical.Response{Data: map[string]interface{}{
		logical.HTTPContentType: metricsContentType,
		logical.HTTPRawBody:     body,
		logical.HTTPStatusCode:  http.StatusOK,
	}}, nil
}

const metricsHelp = `
The mount's metrics in Prometheus's text exposition format (version 0.0.4), written with the Prometheus Go
client from a registry of the mount's own. Like Vault's sys/metrics, the path is governed by Vault's ACL: a
scraper needs a token whose policy grants read on <mount>/metrics.

    cmk_requests_total{operation,status,key_type}    requests that use a key, with the HTTP status answered
    cmk_key_requests_total{key,operation}            the same per key, only where config/metrics enables it
    cmk_metrics_keys_aggregated_total                keys counted as key="_other" beyond the per-key cap
    cmk_denials_total{condition}                     uses the keys' access conditions, grants or anomaly actions refused
    cmk_anomalies_total{kind}                        unusual uses found (keys/:name/anomalies): rate_above_limit, ...
    cmk_rotations_total{cause}                       rotations: manual, scheduled, usage
    cmk_keys{state}                                  keys: active, disabled, deletion_scheduled, deleting
    cmk_key_versions{state}                          versions by state
    cmk_key_versions_near_usage_limit                encrypting versions at 90% or more of their encryption limit
    cmk_keys_rotation_overdue                        keys whose scheduled rotation is more than 10 minutes late
    cmk_hsm_call_duration_seconds{operation,result}  HSM operations' time, recoveries included (histogram)
    cmk_hsm_recoveries_total{class}                  recoveries from HSM errors: session, login, handle, device, ...
    cmk_hsm_sessions_in_use, cmk_hsm_sessions        sessions operations hold now, and the pool's size
    cmk_hsm_connected                                1 while the connection to the token is up

Counters start at zero when the plugin process starts, and count what this node served. The key gauges are
taken from the key snapshots when scraped; the path makes no HSM call.
`
