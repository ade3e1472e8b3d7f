package cmk

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// The mount's metrics, in a Prometheus registry of its own: the plugin process serves several mounts, and the
// default registry would mix them. Requests are counted where every request that uses a key passes (handle, with
// the key and operation the model noted at Manager.Usable), HSM calls where every call passes (hsm's Token.do),
// denials and rotations where the model makes them (keys.Observer). Labels are bounded: operations, statuses, key
// types, HSM operations, recovery classes, causes and conditions are fixed sets; key names appear only where the
// operator opts in (config/metrics), capped, the rest aggregated as key="_other".

// otherKeys is the key label of the keys beyond the per-key cap.
const otherKeys = "_other"

type metrics struct {
	registry   *prometheus.Registry
	collectors []prometheus.Collector // what registry serves

	requests       *prometheus.CounterVec // operation, status, key_type
	keyRequests    *prometheus.CounterVec // key, operation: only with per-key labels
	keysAggregated prometheus.Counter     // keys counted under key="_other"
	hsmCalls       *prometheus.HistogramVec
	recoveries     *prometheus.CounterVec
	rotations      *prometheus.CounterVec
	denials        *prometheus.CounterVec
	anomalies      *prometheus.CounterVec
	deprecatedUses *prometheus.CounterVec // key_type
	keysByState    *prometheus.GaugeVec
	versions       *prometheus.GaugeVec
	nearLimit      prometheus.Gauge
	overdue        prometheus.Gauge
	xksRequests    *prometheus.CounterVec   // operation, error
	xksDuration    *prometheus.HistogramVec // operation

	perKeyMu   sync.Mutex
	perKey     bool
	perKeyCap  int
	named      map[string]bool // keys with a label of their own
	aggregated map[string]bool // keys counted under otherKeys
}

func newMetrics(token func() hsmToken) *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_requests_total",
			Help: "Requests that use a key, by operation, HTTP status and key type (key_type \"none\" when the key was not found)."},
			[]string{"operation", "status", "key_type"}),
		keyRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_key_requests_total",
			Help: "Requests by key and operation, where config/metrics enables per-key labels; keys beyond its cap are key=\"_other\"."},
			[]string{"key", "operation"}),
		keysAggregated: prometheus.NewCounter(prometheus.CounterOpts{Name: "cmk_metrics_keys_aggregated_total",
			Help: "Keys counted under key=\"_other\" because the per-key label cap was reached."}),
		hsmCalls: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "cmk_hsm_call_duration_seconds",
			Help:    "Time of each HSM operation, recoveries and waits for a session included, by operation and result.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}},
			[]string{"operation", "result"}),
		recoveries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_hsm_recoveries_total",
			Help: "Recoveries from HSM errors, by class: session, login, handle, device, ambiguous, unseen."},
			[]string{"class"}),
		rotations: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_rotations_total",
			Help: "Key rotations stored, by cause: manual, scheduled, usage."}, []string{"cause"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_denials_total",
			Help: "Uses of keys refused by their access conditions, grants or anomaly actions, by the condition that refused."},
			[]string{"condition"}),
		anomalies: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_anomalies_total",
			Help: "Unusual uses of keys found, by kind: " + strings.Join(keys.AnomalyKinds, ", ") + " (repeats of one key, caller and kind within 15 minutes are not counted)."},
			[]string{"kind"}),
		deprecatedUses: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_deprecated_type_uses_total",
			Help: "Uses of key versions whose type the mount deprecates (config/keys deprecated_types), by key type: each item of a batch counts."},
			[]string{"key_type"}),
		keysByState: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "cmk_keys",
			Help: "Keys of the mount by state: active, disabled, deletion_scheduled, deleting."}, []string{"state"}),
		versions: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "cmk_key_versions",
			Help: "Key versions of the mount by state."}, []string{"state"}),
		nearLimit: prometheus.NewGauge(prometheus.GaugeOpts{Name: "cmk_key_versions_near_usage_limit",
			Help: "Encrypting versions that have made 90% or more of the encryptions they may make."}),
		overdue: prometheus.NewGauge(prometheus.GaugeOpts{Name: "cmk_keys_rotation_overdue",
			Help: "Keys whose scheduled rotation is more than 10 minutes late (the periodic function rotates them within about a minute)."}),
		xksRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cmk_xks_requests_total",
			Help: "AWS External Key Store requests, by operation (metadata, encrypt, decrypt, health; unknown before the path is read) and the XKS error name answered (\"\" for success)."},
			[]string{"operation", "error"}),
		xksDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "cmk_xks_request_duration_seconds",
			Help:    "Time the engine takes to serve an AWS External Key Store request, by operation (AWS KMS gives up after 250 ms, the front end's and network's time included).",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1}},
			[]string{"operation"}),
		named:      map[string]bool{},
		aggregated: map[string]bool{},
	}
	m.collectors = []prometheus.Collector{m.requests, m.keyRequests, m.keysAggregated, m.hsmCalls, m.recoveries, m.rotations,
		m.denials, m.anomalies, m.deprecatedUses, m.keysByState, m.versions, m.nearLimit, m.overdue, m.xksRequests, m.xksDuration,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cmk_hsm_sessions_in_use",
			Help: "HSM sessions operations hold now."}, func() float64 {
			if t := token(); t != nil {
				return float64(t.SessionsInUse())
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cmk_hsm_sessions",
			Help: "HSM sessions the pool may hold at once (pool_size, or the token's cap)."}, func() float64 {
			if t := token(); t != nil {
				return float64(t.PoolSize())
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cmk_hsm_connected",
			Help: "1 while the mount's connection to its HSM token is up, as last seen (no HSM call is made to tell)."}, func() float64 {
			if t := token(); t != nil {
				if up, _ := t.Status(); up {
					return 1
				}
			}
			return 0
		}),
	}
	for _, kind := range keys.AnomalyKinds {
		m.anomalies.WithLabelValues(kind) // present at zero, so that an alert on its increase sees the first
	}
	for _, t := range keys.TypeNames {
		m.deprecatedUses.WithLabelValues(t) // likewise: a deprecated type's first use after a start is an increase
	}
	m.registry.MustRegister(m.collectors...)
	return m
}

// ObserveCall and ObserveRecovery make metrics an hsm.Observer.
func (m *metrics) ObserveCall(op string, took time.Duration, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.hsmCalls.WithLabelValues(op, result).Observe(took.Seconds())
}

func (m *metrics) ObserveRecovery(class string) { m.recoveries.WithLabelValues(class).Inc() }

// Judging, Denied, Rotated and Anomaly make metrics a keys.Observer.
func (m *metrics) Judging(ctx context.Context, name string, op keys.Operation, k *keys.Key) {
	n, _ := ctx.Value(requestNoteKey{}).(*requestNote)
	if n == nil {
		return
	}
	n.m, n.name, n.op, n.keyType = m, name, op, "none"
	if k != nil {
		n.keyType, n.found = string(k.Type), true
	}
}

// xksServed counts an XKS request the engine answered.
func (m *metrics) xksServed(op, errorName interface{}, took time.Duration) {
	o, e := fmt.Sprint(op), fmt.Sprint(errorName)
	m.xksRequests.WithLabelValues(o, e).Inc()
	m.xksDuration.WithLabelValues(o).Observe(took.Seconds())
}

func (m *metrics) Denied(_, condition string) { m.denials.WithLabelValues(condition).Inc() }

func (m *metrics) Rotated(_, cause string) { m.rotations.WithLabelValues(cause).Inc() }

func (m *metrics) Anomaly(_, kind string) { m.anomalies.WithLabelValues(kind).Inc() }

// requestNote is what a request's use of a key tells handle to count, and to say in the answer.
type requestNote struct {
	m       *metrics // nil until the request asks for a key
	name    string
	op      keys.Operation
	keyType string
	found   bool

	mu         sync.Mutex              // batch items note in parallel
	deprecated map[keys.Type]time.Time // types of the versions used that the mount deprecates, since when
}

// DeprecatedUse makes metrics a keys.Observer: counted, and noted for the request's answer (warn).
func (m *metrics) DeprecatedUse(ctx context.Context, _ string, t keys.Type, since time.Time) {
	m.deprecatedUses.WithLabelValues(string(t)).Inc()
	n, _ := ctx.Value(requestNoteKey{}).(*requestNote)
	if n == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.deprecated == nil {
		n.deprecated = map[keys.Type]time.Time{}
	}
	n.deprecated[t] = since
}

// warn adds to resp a warning for each deprecated type the request used.
func (n *requestNote) warn(resp *logical.Response) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if resp == nil || len(n.deprecated) == 0 {
		return
	}
	types := slices.Sorted(maps.Keys(n.deprecated))
	for _, t := range types {
		resp.AddWarning(fmt.Sprintf("key type %s is deprecated on this mount since %s (config/keys deprecated_types): this request used a version of it; rotate the key to another type and rewrap or re-sign what its versions protect (keys/:name/migration)",
			t, formatDay(n.deprecated[t])))
	}
}

type requestNoteKey struct{}

func withRequestNote(ctx context.Context) (context.Context, *requestNote) {
	n := &requestNote{}
	return context.WithValue(ctx, requestNoteKey{}, n), n
}

// count counts a request that asked for a key, with the status Vault answers it with.
func (n *requestNote) count(req *logical.Request, resp *logical.Response, err error) {
	if n.m == nil {
		return
	}
	n.m.requests.WithLabelValues(string(n.op), strconv.Itoa(statusOf(req, resp, err)), n.keyType).Inc()
	if n.found {
		if key, ok := n.m.keyLabel(n.name); ok {
			n.m.keyRequests.WithLabelValues(key, string(n.op)).Inc()
		}
	}
}

// keyLabel is the key label key name is counted under, when per-key labels are on: its own name while fewer than
// the cap have one, otherwise otherKeys (counted once per key in keysAggregated).
func (m *metrics) keyLabel(name string) (string, bool) {
	m.perKeyMu.Lock()
	defer m.perKeyMu.Unlock()
	switch {
	case !m.perKey:
		return "", false
	case m.named[name]:
		return name, true
	case len(m.named) < m.perKeyCap:
		m.named[name] = true
		return name, true
	}
	if !m.aggregated[name] {
		m.aggregated[name] = true
		m.keysAggregated.Inc()
	}
	return otherKeys, true
}

// setPerKey applies config/metrics' per-key settings; a change forgets which keys had labels, and the series of
// per-key labels with them, so that a lowered cap or a disabled option takes effect at once.
func (m *metrics) setPerKey(on bool, limit int) {
	m.perKeyMu.Lock()
	defer m.perKeyMu.Unlock()
	if on == m.perKey && limit == m.perKeyCap {
		return
	}
	m.perKey, m.perKeyCap = on, limit
	m.named, m.aggregated = map[string]bool{}, map[string]bool{}
	m.keyRequests.Reset()
}

// exposition writes the registry in Prometheus's text format (version 0.0.4), with the gauges of the mount's keys
// taken from ks (the cached snapshots; versions near their limit from the in-memory usage counts).
func (m *metrics) exposition(ks []*keys.Key, mgr *keys.Manager, now time.Time) ([]byte, error) {
	m.setKeyGauges(ks, mgr, now)
	families, err := m.registry.Gather()
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, f := range families {
		if err := enc.Encode(f); err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}

// keyStates are the states cmk_keys reports, each present even at zero so that an alert on one sees it.
var keyStates = []string{"active", "disabled", "deletion_scheduled", "deleting"}

var versionStates = []string{keys.StateActive, keys.StateDecryptOnly, keys.StateDisabled, keys.StateDestroyScheduled, keys.StateDestroyed}

func (m *metrics) setKeyGauges(ks []*keys.Key, mgr *keys.Manager, now time.Time) {
	byState := map[string]float64{}
	versions := map[string]float64{}
	near, overdue := 0.0, 0.0
	for _, k := range ks {
		if rotationOverdue(k, now) {
			overdue++
		}
		byState[keyState(k)]++
		for n := range k.Versions {
			versions[k.VersionState(n)]++
		}
		if nearUsageLimit(k, mgr) {
			near++
		}
	}
	for _, s := range keyStates {
		m.keysByState.WithLabelValues(s).Set(byState[s])
	}
	for _, s := range versionStates {
		m.versions.WithLabelValues(s).Set(versions[s])
	}
	m.nearLimit.Set(near)
	m.overdue.Set(overdue)
}

// rotationLate is how late a scheduled rotation may be before it counts as overdue: the periodic function runs
// about once a minute, and a rotation that fails is tried again on the next run.
const rotationLate = 10 * time.Minute

// rotationOverdue: a rotation the key's schedule asks for is late, where the periodic function would make it
// (not for a disabled key or one whose deletion is scheduled, which it leaves alone).
func rotationOverdue(k *keys.Key, now time.Time) bool {
	return !k.NextRotation.IsZero() && now.Sub(k.NextRotation) > rotationLate && !k.Disabled && k.DeleteAt.IsZero() && !k.Deleting
}

func keyState(k *keys.Key) string {
	switch {
	case k.Deleting:
		return "deleting"
	case !k.DeleteAt.IsZero():
		return "deletion_scheduled"
	case k.Disabled:
		return "disabled"
	}
	return "active"
}

// nearUsageLimit: the key's latest version (the one that encrypts) has made 90% or more of its encryptions.
func nearUsageLimit(k *keys.Key, mgr *keys.Manager) bool {
	if !k.Type.IsAES() || k.LatestVersion == 0 {
		return false
	}
	used, ok := mgr.EncryptionCount(k.Name, k.LatestVersion)
	limit := k.EncryptionLimit()
	return ok && limit > 0 && used >= limit-limit/10
}

var _ hsm.Observer = (*metrics)(nil)
var _ keys.Observer = (*metrics)(nil)
