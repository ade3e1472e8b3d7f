package keys

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Anomalies: a caller's use of a key that is unusual for that caller on that key. Judged at the door (judgeUse), before
// admission (admitCounted), from the caller's own usage buckets (analytics.go), so that the request that crosses
// a line is the first the key's action applies to:
//
//   - rate_above_limit: the caller's uses in the current minute pass the key's anomaly_rate_limit;
//   - rate_above_baseline: they pass baselineFactor times the caller's mean per minute over its last
//     baselineWindowHours hours, once the caller has been seen for baselineMinAge and with at least
//     burstMinPerMinute uses in the minute (a quiet caller's first small burst is no alarm);
//   - new_caller: a caller not seen before on a key whose few callers (newCallerMaxCallers at most) have all been
//     the same for newCallerSettledFor;
//   - unusual_hour: a use at an hour of day (UTC) neither in nor next to the hours the caller used the key in over
//     the last week, once it has been seen for usualHoursMinAge, on two days or more.
//
// Each is a WARN log line naming the key, caller and what was unusual, a history event ("anomaly"), a metric
// (Observer.Anomaly), and is kept among the key's recent anomalies; one per key, caller and kind per
// anomalyRepeatPeriod. The key's on_anomaly then acts: alert (nothing more), require_grant (the caller must hold a
// live grant for the key until the action lapses) or block_caller (its uses are denied, condition "anomaly").
// Actions are stored (anomaly_actions/<key>), so that they hold across a failover, and an operator may lift one
// early. A caller under an action is not judged again until it lapses. A caller folded into OtherCallers has no
// baseline of its own: it is judged new or not, and against anomaly_rate_limit on its own uses in the minute, counted
// for at most MaxFoldedPerMinute folded callers a minute; beyond, on all the folded callers' uses, and the anomaly
// says so. Its action applies to it alone, as to a tracked caller.

// Kinds of anomaly.
const (
	AnomalyRateAboveLimit    = "rate_above_limit"
	AnomalyRateAboveBaseline = "rate_above_baseline"
	AnomalyNewCaller         = "new_caller"
	AnomalyUnusualHour       = "unusual_hour"
)

// AnomalyKinds lists the kinds, for help and metrics.
var AnomalyKinds = []string{AnomalyRateAboveLimit, AnomalyRateAboveBaseline, AnomalyNewCaller, AnomalyUnusualHour}

// What a key does on an anomaly (on_anomaly).
const (
	ActionAlert        = "alert"
	ActionRequireGrant = "require_grant"
	ActionBlockCaller  = "block_caller"
)

// AnomalyActionNames are the values of on_anomaly.
var AnomalyActionNames = []string{ActionAlert, ActionRequireGrant, ActionBlockCaller}

// Detection thresholds and action periods.
const (
	baselineFactor       = 10
	baselineMinAge       = 6 * time.Hour
	baselineWindowHours  = 24
	burstMinPerMinute    = 100
	newCallerMaxCallers  = 5
	newCallerSettledFor  = 72 * time.Hour
	usualHoursMinAge     = 72 * time.Hour
	anomalyRepeatPeriod  = 15 * time.Minute
	anomalyActionsPrefix = "anomaly_actions/" // anomaly_actions/<name>: the actions in force on the key's callers

	// DefaultAnomalyActionPeriod is how long require_grant or block_caller lasts when anomaly_action_period is 0.
	DefaultAnomalyActionPeriod = time.Hour
	// MaxAnomalyActionPeriod bounds anomaly_action_period.
	MaxAnomalyActionPeriod = 30 * 24 * time.Hour
)

// Anomaly is one unusual use of a key by a caller, and the action the key took.
type Anomaly struct {
	Time      time.Time `json:"time"`
	Key       string    `json:"key"`
	Caller    string    `json:"caller"` // as CallerLabel names it
	Kind      string    `json:"kind"`
	Operation Operation `json:"operation"`
	Details   string    `json:"details"`
	Action    string    `json:"action"`
	// Until is when the action lapses (require_grant, block_caller); absent for alert.
	Until *time.Time `json:"until,omitempty"`
}

func (a Anomaly) describe() string {
	d := fmt.Sprintf("%s by caller %s (%s): %s; action %s", a.Kind, a.Caller, a.Operation, a.Details, a.Action)
	if a.Until != nil {
		d += " until " + FormatTime(*a.Until)
	}
	return d
}

// AnomalyAction is an action in force on a caller's use of a key.
type AnomalyAction struct {
	Caller  string    `json:"caller"`
	Action  string    `json:"action"`
	Kind    string    `json:"kind"`
	Since   time.Time `json:"since"`
	Until   time.Time `json:"until"`
	Details string    `json:"details"`
}

// judgedHour is what judging a caller derives from its hour buckets, once per hour.
type judgedHour struct {
	hour       uint32 // the hour judged, plus one (0: none yet)
	baselineOK bool
	perMinute  float64
	hours      uint32 // the hours the baseline spans
	unusual    bool   // this hour of day is not one of the caller's usual hours (reported once)
	usual      string
	// reportedUnusual: unusual was reported this hour; held in memory only, so the key's analytics are not
	// released while it stands (releaseIdle), or a reload would report it again within the hour.
	reportedUnusual bool
}

// OnAnomalyAction is the key's on_anomaly, alert by default.
func (k *Key) OnAnomalyAction() string {
	if k.OnAnomaly == "" {
		return ActionAlert
	}
	return k.OnAnomaly
}

// ActionPeriod is how long the key's require_grant or block_caller lasts.
func (k *Key) ActionPeriod() time.Duration {
	if k.AnomalyActionPeriod <= 0 {
		return DefaultAnomalyActionPeriod
	}
	return k.AnomalyActionPeriod
}

// judgeUse finds what is unusual in caller's use of key k for op on items items, before it is admitted; it returns
// the anomalies to act on, with the key's action, already rate-limited and kept among the key's recent ones.
func (m *Manager) judgeUse(ctx context.Context, s logical.Storage, k *Key, caller Actor, op Operation, items int) []Anomaly {
	label := CallerLabel(caller)
	now := m.now()
	if a, err := m.actionOn(ctx, s, k.Name, label, now); err != nil || a != nil {
		return nil // acting already (or the door fails on the same read)
	}
	n := uint64(max(items, 1))
	ku := m.lockLive(ctx, s, k.Name, m.keyUsage(ctx, s, k.Name))
	defer ku.mu.Unlock()
	var found []Anomaly
	note := func(kind, format string, args ...interface{}) {
		mark := label + "\x00" + kind
		if at, ok := ku.reported[mark]; ok && now.Sub(at) < anomalyRepeatPeriod && !now.Before(at) {
			return
		}
		if ku.reported == nil {
			ku.reported = map[string]time.Time{}
		}
		ku.reported[mark] = now
		a := Anomaly{Time: now.UTC(), Key: k.Name, Caller: label, Kind: kind, Operation: op, Details: fmt.Sprintf(format, args...),
			Action: k.OnAnomalyAction()}
		if a.Action != ActionAlert {
			until := a.Time.Add(k.ActionPeriod())
			a.Until = &until
		}
		ku.anomalies = append(ku.anomalies, a)
		if len(ku.anomalies) > maxRecentAnomalies {
			ku.anomalies = slices.Delete(ku.anomalies, 0, len(ku.anomalies)-maxRecentAnomalies)
		}
		ku.dirty = true
		found = append(found, a)
	}
	limit := k.AnomalyRateLimit
	mn, hr, _ := slots(now)
	cu := ku.callers[label]
	if cu == nil {
		// New to the key: judged so whether it will be tracked or folded (the check needs no tracking of it).
		if settled, callers := settledCallers(ku, now); settled {
			note(AnomalyNewCaller, "first use by this caller; the key's %d callers (%s) have been the same for %s or more",
				len(callers), strings.Join(callers, ", "), newCallerSettledFor)
		}
		// A caller folded into OtherCallers has no baseline of its own, but is judged against the cap on its own
		// uses in the minute (or its group's, past MaxFoldedPerMinute callers).
		minute, own := n, true
		if m.foldsLocked(ku, label) {
			minute, own = ku.foldedUses(label, mn)
			minute += n
		}
		switch {
		case limit == 0 || minute <= limit:
		case own:
			note(AnomalyRateAboveLimit, "%d uses in this minute, above the key's anomaly_rate_limit of %d per minute per caller", minute, limit)
		default:
			note(AnomalyRateAboveLimit, "%d uses in this minute by the callers counted under %s, judged as one (more of them "+
				"than the %d the key counts one by one), above the key's anomaly_rate_limit of %d per minute per caller",
				minute, OtherCallers, MaxFoldedPerMinute, limit)
		}
		return found
	}
	minute := n + cu.minuteUses(mn)
	if limit > 0 && minute > limit {
		note(AnomalyRateAboveLimit, "%d uses in this minute, above the key's anomaly_rate_limit of %d per minute per caller", minute, limit)
	}
	j := cu.judgeHour(now, hr)
	if j.baselineOK && minute >= burstMinPerMinute && float64(minute) > baselineFactor*j.perMinute {
		note(AnomalyRateAboveBaseline, "%d uses in this minute, more than %d times the caller's mean of %.2f per minute over its last %d hours",
			minute, baselineFactor, j.perMinute, j.hours)
	}
	if j.unusual {
		cu.judged.unusual, cu.judged.reportedUnusual = false, true
		note(AnomalyUnusualHour, "use at %02d:00 UTC; over the last week the caller used the key at %s UTC only", hr%24, j.usual)
	}
	return found
}

// settledCallers says whether the key has had the same few callers for newCallerSettledFor, and names them.
func settledCallers(ku *keyUsage, now time.Time) (bool, []string) {
	var names []string
	for label, cu := range ku.callers {
		if label == OtherCallers || now.Sub(cu.firstSeen) < newCallerSettledFor {
			return false, nil
		}
		names = append(names, label)
	}
	slices.Sort(names)
	return len(names) > 0 && len(names) <= newCallerMaxCallers, names
}

// judgeHour derives, once per hour, the caller's baseline rate and whether this hour of day is one of its usual
// hours, from its hour buckets over every operation (the hours before this one).
func (cu *callerUsage) judgeHour(now time.Time, hr uint32) judgedHour {
	if cu.judged.hour == hr+1 {
		return cu.judged
	}
	j := judgedHour{hour: hr + 1}
	first := uint32(cu.firstSeen.Unix() / 3600)
	if now.Sub(cu.firstSeen) >= baselineMinAge && first < hr {
		from := max(first, hr-baselineWindowHours)
		var sum uint64
		for _, sr := range cu.ops {
			if sr == nil {
				continue
			}
			for _, b := range sr.hours {
				if b.slot >= from && b.slot < hr {
					sum += uint64(b.uses) + uint64(b.denials)
				}
			}
		}
		j.hours = hr - from
		j.perMinute = float64(sum) / float64(j.hours*60)
		j.baselineOK = true
	}
	if now.Sub(cu.firstSeen) >= usualHoursMinAge {
		var seen [24]bool
		days := map[uint32]bool{}
		for _, sr := range cu.ops {
			if sr == nil {
				continue
			}
			for _, b := range sr.hours {
				if b.slot < hr && b.slot+HourBuckets > hr && b.uses+b.denials > 0 {
					seen[b.slot%24] = true
					days[b.slot/24] = true
				}
			}
		}
		h := hr % 24
		if len(days) >= 2 && !seen[h] && !seen[(h+23)%24] && !seen[(h+1)%24] {
			j.unusual = true
			var usual []string
			for i, ok := range seen {
				if ok {
					usual = append(usual, fmt.Sprintf("%02d:00", i))
				}
			}
			j.usual = strings.Join(usual, ", ")
		}
	}
	cu.judged = j
	return j
}

// actOn carries out anomaly a of caller's use of its key: the log line, the metric, the history event, and the
// action, stored. A failure to store is logged: the action holds in memory on this node meanwhile.
func (m *Manager) actOn(ctx context.Context, s logical.Storage, caller Actor, a Anomaly) {
	m.log.Warn("unusual use of a key", "key", a.Key, "caller", a.Caller, "anomaly", a.Kind, "operation", a.Operation,
		"details", a.Details, "action", a.Action)
	m.observer().Anomaly(a.Key, a.Kind)
	l := m.lock(a.Key)
	l.Lock()
	defer l.Unlock()
	if a.Until != nil {
		act := AnomalyAction{Caller: a.Caller, Action: a.Action, Kind: a.Kind, Since: a.Time, Until: *a.Until, Details: a.Details}
		if err := m.putActionLocked(ctx, s, a.Key, act); err != nil {
			m.log.Error("could not store an anomaly's action; it holds on this node only until it lapses", "key", a.Key,
				"caller", a.Caller, "action", a.Action, "error", err)
		}
	}
	if err := m.recordEventLocked(ctx, s, a.Key, caller, "anomaly", a.describe()); err != nil {
		m.log.Error("could not record an anomaly in the key's history", "key", a.Key, "caller", a.Caller, "error", err)
	}
}

// actionList is a key's actions as stored; replaced whole, never changed in place.
type actionList struct {
	Actions []AnomalyAction `json:"actions"`
}

// actionOn is the action in force on caller's use of key name at now, nil when none. The key's actions are read
// from storage once per process (and again after another node changed them).
func (m *Manager) actionOn(ctx context.Context, s logical.Storage, name, caller string, now time.Time) (*AnomalyAction, error) {
	v, ok := m.actions.Load(name)
	if !ok {
		l := m.lock(name)
		l.Lock()
		list, err := m.actionsLocked(ctx, s, name)
		l.Unlock()
		if err != nil {
			return nil, fmt.Errorf("read the anomaly actions of key %q: %w", name, err)
		}
		v = list
	}
	for _, a := range v.Actions {
		if a.Caller == caller && now.Before(a.Until) {
			return &a, nil
		}
	}
	return nil, nil
}

// actionsLocked reads the key's actions unless cached; the caller holds the key's lock.
func (m *Manager) actionsLocked(ctx context.Context, s logical.Storage, name string) (*actionList, error) {
	if v, ok := m.actions.Load(name); ok {
		return v, nil
	}
	e, err := s.Get(ctx, anomalyActionsPrefix+name)
	if err != nil {
		return nil, err
	}
	list := noActions // most keys have none: one list serves them all
	if e != nil {
		list = &actionList{}
		if err := e.DecodeJSON(list); err != nil {
			return nil, err
		}
	}
	m.actions.Store(name, list)
	return list, nil
}

// noActions is the list of a key that has none.
var noActions = &actionList{}

// putActionLocked puts act in force (in place of any other on its caller), dropping lapsed actions, and stores the
// key's actions; the caller holds the key's lock. The action holds in memory even if storing fails.
func (m *Manager) putActionLocked(ctx context.Context, s logical.Storage, name string, act AnomalyAction) error {
	cur, err := m.actionsLocked(ctx, s, name)
	if err != nil {
		cur = &actionList{}
	}
	next := &actionList{}
	for _, a := range cur.Actions {
		if a.Caller != act.Caller && act.Since.Before(a.Until) {
			next.Actions = append(next.Actions, a)
		}
	}
	next.Actions = append(next.Actions, act)
	m.actions.Store(name, next)
	if err != nil {
		return err
	}
	return storeActions(ctx, s, name, next)
}

func storeActions(ctx context.Context, s logical.Storage, name string, list *actionList) error {
	if len(list.Actions) == 0 {
		return s.Delete(ctx, anomalyActionsPrefix+name)
	}
	e, err := logical.StorageEntryJSON(anomalyActionsPrefix+name, list)
	if err != nil {
		return err
	}
	return s.Put(ctx, e)
}

// AnomalyActions returns the actions in force on key name's callers; a not-found CallerError when the key does
// not exist.
func (m *Manager) AnomalyActions(ctx context.Context, s logical.Storage, name string) ([]AnomalyAction, error) {
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	k, err := m.getLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return nil, notFound(name)
	}
	list, err := m.actionsLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	now := m.now()
	out := []AnomalyAction{}
	for _, a := range list.Actions {
		if now.Before(a.Until) {
			out = append(out, a)
		}
	}
	return out, nil
}

// LiftAnomalyAction ends the action in force on caller's use of key name before it lapses, recording who lifted
// it, and excuses the caller's current use (excuse); nil when none is in force.
func (m *Manager) LiftAnomalyAction(ctx context.Context, s logical.Storage, name, caller string, who Actor) (*AnomalyAction, error) {
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	k, err := m.getLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return nil, notFound(name)
	}
	cur, err := m.actionsLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	now := m.now()
	var lifted *AnomalyAction
	next := &actionList{}
	for _, a := range cur.Actions {
		switch {
		case a.Caller == caller && now.Before(a.Until):
			lifted = &a
		case now.Before(a.Until):
			next.Actions = append(next.Actions, a)
		}
	}
	if lifted == nil {
		return nil, nil
	}
	if err := storeActions(ctx, s, name, next); err != nil {
		return nil, err
	}
	m.actions.Store(name, next)
	m.excuse(ctx, s, name, caller)
	details := fmt.Sprintf("%s on caller %s (anomaly %s) lifted before %s", lifted.Action, caller, lifted.Kind, FormatTime(lifted.Until))
	if err := m.recordEventLocked(ctx, s, name, who, "anomaly_action_lifted", details); err != nil {
		m.log.Error("could not record the lifting of an anomaly's action in the key's history", "key", name, "error", err)
	}
	m.log.Info("anomaly action lifted", "key", name, "caller", caller, "action", lifted.Action)
	return lifted, nil
}

// excuse marks every kind of anomaly of caller on key name as just reported: an operator who lifts an action has
// judged the use benign, and the burst that caused it is not judged an anomaly again for anomalyRepeatPeriod.
func (m *Manager) excuse(ctx context.Context, s logical.Storage, name, caller string) {
	now := m.now()
	ku := m.lockLive(ctx, s, name, m.keyUsage(ctx, s, name))
	defer ku.mu.Unlock()
	for _, kind := range AnomalyKinds {
		if ku.reported == nil {
			ku.reported = map[string]time.Time{}
		}
		ku.reported[caller+"\x00"+kind] = now
	}
}

// AnomaliesOf returns key name's recent anomalies (at most 50), newest last: what memory holds on this node, with
// no storage or HSM call (see Anomalies for a key whose counts memory may not hold).
func (m *Manager) AnomaliesOf(name string) []Anomaly {
	ku, ok := m.analytics.keys.Load(name)
	if !ok {
		return []Anomaly{}
	}
	ku.mu.Lock()
	defer ku.mu.Unlock()
	return append([]Anomaly{}, ku.anomalies...)
}

// Anomalies is AnomaliesOf with the key's stored counts read first if memory does not hold them (never used since
// the process started, or released while idle), read from the entry so loaded.
func (m *Manager) Anomalies(ctx context.Context, s logical.Storage, name string) []Anomaly {
	ku := m.lockLive(ctx, s, name, m.keyUsage(ctx, s, name))
	defer ku.mu.Unlock()
	return append([]Anomaly{}, ku.anomalies...)
}

// forgetActions drops the cached actions of key name (deleted, or changed on another node); the caller holds the
// key's lock.
func (m *Manager) forgetActions(name string) { m.actions.Delete(name) }

// actionsKeyOf returns the key an anomaly_actions/ storage entry belongs to (for Vault's invalidations).
func actionsKeyOf(storageKey string) (string, bool) {
	return strings.CutPrefix(storageKey, anomalyActionsPrefix)
}
