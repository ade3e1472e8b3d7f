package cmk

// Dual control (M of N) for what cannot be undone.
//
// THE HOOK. A handler of a sensitive request calls, once it knows the request is valid and would change something:
//
//	if resp, err := b.holdForApproval(ctx, req, k, "what it does, in words"); resp != nil || err != nil {
//		return resp, err
//	}
//
// k is the key the request is about (nil for the mount's own settings, held under config/keys'
// min_approvals_required). holdForApproval returns nil, nil when the request may run now: the effective
// requirement, max(k's approvals_required, the mount's min_approvals_required), is 0, or the request is the
// approved execution of a held one. Otherwise it stores the request (operation, path, fields) as a pending
// approval whose id is the request's Vault request id, records "approval_requested" on the key's history, and
// returns the response to give: HTTP 202 with approval_id, the action, who asked, what is needed and expires_at.
// The request is then executed as it was sent (same operation, path and fields, on the requester's behalf, with
// request id "approval:<id>") once the M-th distinct other entity approves; its handler runs again from the start
// and the hook lets it through. Call it after the checks that would refuse the request (so that no one approves
// a request that fails anyway) and before anything is changed. Handlers that create something (a grant) should
// recognise the request id as Vault's retry, as import_version does with LastRequestID: an execution cut short by a
// crash is run again (see below).
//
// Held here: destroy a version, delete a key, trim, import_version, enable a disabled key or version (and
// cancel-deletion, a version's enable that cancels its destruction: both return to use what was taken out of
// it), lower deletion_grace_period (config/keys), lower approvals_required or change approver_groups. To be wired
// by their owners: keys/:name/access write and delete, and a grant's creation on a grants_required key. Never
// held: keys/:name/disable and a version's disable (an emergency stop never waits).
//
// EXACTLY ONCE. An approval is one storage entry (approvals/<id>), changed only under its lock, whose state goes
// pending → executing → executed | failed (or pending → rejected | expired). The M-th approval stores "executing"
// before the request runs; the result is stored with "executed" or "failed". Writes reach the active node only,
// so the lock and the stored state serialise two racing approvals. An approve call that finds "executing" (the
// process died during the execution, or its final write failed) runs the execution again: Vault's own retry of
// the approving request does so, or any approver's later call. Every held request is idempotent under its
// retry's request id (a destruction already scheduled, a trim already done, a key already deleted change
// nothing; import_version recognises its request id), so running it again completes it once. An approve call
// that finds "executed" or "failed" returns the recorded result and runs nothing.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// An approval is stored as two entries: what it is (approvals/<id>: small, read by list, read and the periodic
// function) and the held request's fields (approval-requests/<id>: as large as the request, read only to execute
// it, deleted once the approval ends).
const (
	approvalsPrefix        = "approvals/"
	approvalRequestsPrefix = "approval-requests/"
)

// An approval's states.
const (
	approvalPending   = "pending"
	approvalExecuting = "executing" // approved; stored before the request runs
	approvalExecuted  = "executed"
	approvalFailed    = "failed" // approved and run; the request answered an error
	approvalRejected  = "rejected"
	approvalExpired   = "expired"
)

// approvalParty is who asked, approved or rejected: entity, display name, and the token accessor's HMAC under
// the mount's salt (never the accessor).
type approvalParty struct {
	EntityID     string    `json:"entity_id,omitempty"`
	DisplayName  string    `json:"display_name,omitempty"`
	AccessorHMAC string    `json:"token_accessor_hmac,omitempty"`
	Time         time.Time `json:"time"`
}

func (p approvalParty) actor() keys.Actor {
	return keys.Actor{EntityID: p.EntityID, DisplayName: p.DisplayName, Accessor: p.AccessorHMAC}
}

func (p approvalParty) view() map[string]interface{} {
	m := map[string]interface{}{"time": keys.FormatTime(p.Time)}
	for k, v := range map[string]string{"entity_id": p.EntityID, "display_name": p.DisplayName, "token_accessor_hmac": p.AccessorHMAC} {
		if v != "" {
			m[k] = v
		}
	}
	return m
}

// approvalResult is what the executed request answered.
type approvalResult struct {
	Status   int                    `json:"status"`
	Data     map[string]interface{} `json:"data,omitempty"`
	Warnings []string               `json:"warnings,omitempty"`
	Error    string                 `json:"error,omitempty"`
}

// approval is a held request and what became of it.
type approval struct {
	ID        string            `json:"id"`
	Key       string            `json:"key,omitempty"` // empty for the mount's own settings
	Action    string            `json:"action"`
	Operation logical.Operation `json:"operation"`
	Path      string            `json:"path"`
	// Fields is what approvers are shown of the request's fields: the values of sensitive fields, and long
	// values, replaced by their hash and length. The fields as sent are stored apart (approvalRequestsPrefix).
	Fields         map[string]interface{} `json:"fields"`
	RequestedBy    approvalParty          `json:"requested_by"`
	ExpiresAt      time.Time              `json:"expires_at"`
	Required       int                    `json:"required"`
	ApproverGroups []string               `json:"approver_groups,omitempty"`
	Approvals      []approvalParty        `json:"approvals,omitempty"`
	State          string                 `json:"state"`
	RejectedBy     *approvalParty         `json:"rejected_by,omitempty"`
	Comment        string                 `json:"comment,omitempty"`
	EndedAt        time.Time              `json:"ended_at,omitempty"`
	Result         *approvalResult        `json:"result,omitempty"`
	// ExecutingSince is when the last approval stored "executing": an execution cut short is run again only
	// within executionRetryWindow of it (Vault's retry of the approving request comes at once), never later
	// against a key that has changed since.
	ExecutingSince time.Time `json:"executing_since,omitempty"`
}

// executionRetryWindow bounds how long after an approval was stored as executing an approve call runs it again.
const executionRetryWindow = 10 * time.Minute

func (a *approval) ended() bool {
	return a.State != approvalPending && a.State != approvalExecuting
}

// stateAt is the state as of now: a pending approval past its time is expired, stored so or not yet.
func (a *approval) stateAt(now time.Time) string {
	if a.State == approvalPending && !now.Before(a.ExpiresAt) {
		return approvalExpired
	}
	return a.State
}

func (a *approval) approvedBy(entityID string) bool {
	return slices.ContainsFunc(a.Approvals, func(p approvalParty) bool { return p.EntityID == entityID })
}

func (a *approval) view(now time.Time) map[string]interface{} {
	approvals := make([]map[string]interface{}, len(a.Approvals))
	for i, p := range a.Approvals {
		approvals[i] = p.view()
	}
	m := map[string]interface{}{
		"approval_id":        a.ID,
		"state":              a.stateAt(now),
		"key":                a.Key,
		"action":             a.Action,
		"operation":          string(a.Operation),
		"path":               a.Path,
		"fields":             a.Fields,
		"requested_by":       a.RequestedBy.view(),
		"requested_at":       keys.FormatTime(a.RequestedBy.Time),
		"expires_at":         keys.FormatTime(a.ExpiresAt),
		"approvals_required": a.Required,
		"approvals":          approvals,
		"approver_groups":    append([]string{}, a.ApproverGroups...),
	}
	if a.RejectedBy != nil {
		m["rejected_by"] = a.RejectedBy.view()
		m["comment"] = a.Comment
	}
	if !a.EndedAt.IsZero() {
		m["ended_at"] = keys.FormatTime(a.EndedAt)
	}
	if r := a.Result; r != nil {
		result := map[string]interface{}{"status": r.Status}
		if r.Data != nil {
			result["data"] = r.Data
		}
		if len(r.Warnings) > 0 {
			result["warnings"] = r.Warnings
		}
		if r.Error != "" {
			result["error"] = r.Error
		}
		m["result"] = result
	}
	return m
}

func readApproval(ctx context.Context, s logical.Storage, id string) (*approval, error) {
	e, err := s.Get(ctx, approvalsPrefix+id)
	if err != nil || e == nil {
		return nil, err
	}
	var a approval
	if err := e.DecodeJSON(&a); err != nil {
		return nil, fmt.Errorf("decode approval %s: %w", id, err)
	}
	return &a, nil
}

// storeApproval stores approval a and notes whether it is pending, for the count per key.
func (b *backend) storeApproval(ctx context.Context, s logical.Storage, a *approval) error {
	e, err := logical.StorageEntryJSON(approvalsPrefix+a.ID, a)
	if err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		b.approvals.forgetPending() // stored or not: the next count reads storage
		return err
	}
	b.approvals.notePending(a)
	return nil
}

// readApprovalRequest returns the fields of approval id's request as sent.
func readApprovalRequest(ctx context.Context, s logical.Storage, id string) (map[string]interface{}, error) {
	e, err := s.Get(ctx, approvalRequestsPrefix+id)
	if err != nil {
		return nil, err
	}
	if e == nil {
		return nil, fmt.Errorf("approval %s: the held request's fields are missing from storage", id)
	}
	var data map[string]interface{}
	if err := e.DecodeJSON(&data); err != nil {
		return nil, fmt.Errorf("decode approval %s's request: %w", id, err)
	}
	return data, nil
}

// endApproval stores approval a, which has ended, and deletes its request's fields: nothing runs it any more.
func (b *backend) endApproval(ctx context.Context, s logical.Storage, a *approval) error {
	if err := b.storeApproval(ctx, s, a); err != nil {
		return err
	}
	if err := s.Delete(ctx, approvalRequestsPrefix+a.ID); err != nil {
		b.logger.Warn("could not delete an ended approval's request; the periodic function removes it with the approval", "approval", a.ID, "error", err)
	}
	b.approvals.due(a.EndedAt)
	return nil
}

// approvedExecution marks the context of an approved request's execution, so that the hook lets exactly that
// request through. Only the approving handler makes it: no caller can.
type approvedExecution struct {
	id   string
	op   logical.Operation
	path string
}

type approvedExecutionKey struct{}

// approvals is the backend's state for dual control: a lock per approval, and when the periodic function next
// has something to do with them (expire a pending one, remove an ended one).
type approvals struct {
	locks []*locksutil.LockEntry

	mu        sync.Mutex
	dueKnown  bool      // false until a pass has listed them (or another node changed one)
	nextDueAt time.Time // zero: nothing due

	// pending holds the pending approvals per key ("" for the mount's own settings), so that inventory and
	// reports/compliance count them without a storage read per key: read from storage once (pendingKnown), kept
	// by storeApproval, read again after another node changed an approval. pendingChanges counts the notes, so
	// that a reading that raced one is not kept.
	pending        map[string]map[string]pendingApproval
	pendingKnown   bool
	pendingChanges uint64
}

// pendingApproval is what inventory and reports/compliance show of a pending approval.
type pendingApproval struct {
	Action    string
	ExpiresAt time.Time
}

func newApprovals() *approvals { return &approvals{locks: locksutil.CreateLocks()} }

func (x *approvals) lock(id string) *locksutil.LockEntry { return locksutil.LockForKey(x.locks, id) }

// due notes that something about the approvals is due at t.
func (x *approvals) due(t time.Time) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.dueKnown && (x.nextDueAt.IsZero() || t.Before(x.nextDueAt)) {
		x.nextDueAt = t
	}
}

func (x *approvals) forget() {
	x.mu.Lock()
	x.dueKnown = false
	x.pendingKnown, x.pending = false, nil
	x.pendingChanges++
	x.mu.Unlock()
}

func (x *approvals) forgetPending() {
	x.mu.Lock()
	x.pendingKnown, x.pending = false, nil
	x.pendingChanges++
	x.mu.Unlock()
}

// notePending records whether approval a, just stored, is pending.
func (x *approvals) notePending(a *approval) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.pendingChanges++
	if x.pendingKnown {
		x.pending = withPending(x.pending, a)
	}
}

// withPending adds approval a to pending when it is pending, else removes it.
func withPending(pending map[string]map[string]pendingApproval, a *approval) map[string]map[string]pendingApproval {
	if pending == nil {
		pending = map[string]map[string]pendingApproval{}
	}
	if a.State != approvalPending {
		delete(pending[a.Key], a.ID)
		if len(pending[a.Key]) == 0 {
			delete(pending, a.Key)
		}
		return pending
	}
	if pending[a.Key] == nil {
		pending[a.Key] = map[string]pendingApproval{}
	}
	pending[a.Key][a.ID] = pendingApproval{Action: a.Action, ExpiresAt: a.ExpiresAt}
	return pending
}

// pendingApprovals returns the approvals pending at now, by key and id: from memory once storage was read.
func (b *backend) pendingApprovals(ctx context.Context, s logical.Storage, now time.Time) (map[string]map[string]pendingApproval, error) {
	x := b.approvals
	x.mu.Lock()
	pending, known, changes := x.pending, x.pendingKnown, x.pendingChanges
	x.mu.Unlock()
	if !known {
		ids, err := s.List(ctx, approvalsPrefix)
		if err != nil {
			return nil, err
		}
		pending = nil
		for _, id := range ids {
			a, err := readApproval(ctx, s, id)
			if err != nil {
				return nil, err
			}
			if a != nil {
				pending = withPending(pending, a)
			}
		}
		x.mu.Lock()
		if x.pendingChanges == changes { // no approval was stored meanwhile: what was read is current
			x.pending, x.pendingKnown = pending, true
		}
		x.mu.Unlock()
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	out := map[string]map[string]pendingApproval{}
	for key, byID := range pending {
		for id, p := range byID {
			if now.Before(p.ExpiresAt) {
				if out[key] == nil {
					out[key] = map[string]pendingApproval{}
				}
				out[key][id] = p
			}
		}
	}
	return out, nil
}

// holdForApproval is the hook of dual control (see the top of this file): nil, nil when the request may run now,
// else the 202 response that holds it.
func (b *backend) holdForApproval(ctx context.Context, req *logical.Request, k *keys.Key, action string) (*logical.Response, error) {
	if isApprovedExecution(ctx, req) {
		return nil, nil
	}
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	required := cfg.approvalsRequired(k)
	if required == 0 {
		return nil, nil
	}
	// The approval's id is the request's: Vault's retry of a held request finds its approval instead of making a
	// second one, and the audit log's request id names the approval.
	id := req.ID
	if id == "" {
		raw := make([]byte, 16)
		if _, err := rand.Read(raw); err != nil {
			return nil, err
		}
		id = hex.EncodeToString(raw)
	}
	l := b.approvals.lock(id)
	l.Lock()
	defer l.Unlock()
	a, err := readApproval(ctx, req.Storage, id)
	if err != nil {
		return nil, err
	}
	if a == nil {
		if a, err = b.newApproval(ctx, req, id, k, action, required, cfg.approvalTTL()); err != nil {
			return nil, err
		}
	}
	resp := &logical.Response{Data: a.view(b.now())}
	resp.AddWarning(fmt.Sprintf("held for dual control, nothing was done: %d approval(s) by other Vault entities needed (%sapprovals/%s/approve) before %s",
		a.Required, req.MountPoint, a.ID, keys.FormatTime(a.ExpiresAt)))
	return logical.RespondWithStatusCode(resp, req, http.StatusAccepted)
}

// isApprovedExecution says whether req is the approved execution of a held request (only the approve handler puts
// the marker in the context, under a key type of this package's: no request can carry it).
func isApprovedExecution(ctx context.Context, req *logical.Request) bool {
	x, ok := ctx.Value(approvedExecutionKey{}).(approvedExecution)
	return ok && x.op == req.Operation && x.path == req.Path
}

// onJudged runs change only on the snapshot judged, which the request was judged on for dual control. The judgment
// reads the key outside its lock; a change that lands in between (deletion_allowed turned on, the key disabled,
// approvals_required raised) could make the request one that needs approval, so where dual control applies to the
// key before or after, the request is refused instead, to be sent again and judged anew. The approved execution of
// a held request runs as it is.
func (b *backend) onJudged(ctx context.Context, req *logical.Request, judged *keys.Key, change func(*keys.Tx) error) (func(*keys.Tx) error, error) {
	if isApprovedExecution(ctx, req) {
		return change, nil
	}
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return func(tx *keys.Tx) error {
		if tx.Cur != judged && (judged == nil || cfg.approvalsRequired(judged) > 0 || cfg.approvalsRequired(tx.Cur) > 0) {
			return keys.Callerf("key %q changed while this request was judged for dual control: send it again", tx.Key.Name)
		}
		return change(tx)
	}, nil
}

// newApproval stores request req as pending approval id and records it on the key's history.
func (b *backend) newApproval(ctx context.Context, req *logical.Request, id string, k *keys.Key, action string, required int, ttl time.Duration) (*approval, error) {
	who, err := b.party(ctx, req)
	if err != nil {
		return nil, err
	}
	a := &approval{
		ID: id, Action: action, Operation: req.Operation, Path: req.Path, Fields: b.shownFields(req), RequestedBy: who, ExpiresAt: who.Time.Add(ttl), Required: required, State: approvalPending,
	}
	if k != nil {
		a.Key, a.ApproverGroups = k.Name, k.ApproverGroups
	}
	e, err := logical.StorageEntryJSON(approvalRequestsPrefix+id, req.Data)
	if err == nil {
		err = req.Storage.Put(ctx, e) // first: an approval is never stored without its request
	}
	if err != nil {
		return nil, err
	}
	if err := b.storeApproval(ctx, req.Storage, a); err != nil {
		return nil, err
	}
	b.approvals.due(a.ExpiresAt)
	b.recordApproval(ctx, req.Storage, a, who.actor(), "approval_requested",
		fmt.Sprintf("approval %s: %s; %d approvals needed by %s", a.ID, a.Action, a.Required, keys.FormatTime(a.ExpiresAt)))
	return a, nil
}

// party is who makes req, as an approval records it.
func (b *backend) party(ctx context.Context, req *logical.Request) (approvalParty, error) {
	p := approvalParty{EntityID: req.EntityID, DisplayName: req.DisplayName, Time: b.now().UTC()}
	if req.ClientTokenAccessor != "" {
		h, err := b.keys.AccessorHMAC(ctx, req.Storage, req.ClientTokenAccessor)
		if err != nil {
			return p, err
		}
		p.AccessorHMAC = h
	}
	return p, nil
}

// shownFields is what approvers see of req's fields: the values of fields its path marks sensitive (an import's
// wrapped key material), and strings longer than maxShownValue, only as their SHA-256 and length, so that an
// approver can compare them with what they were sent; the rest as given.
func (b *backend) shownFields(req *logical.Request) map[string]interface{} {
	var schema map[string]*framework.FieldSchema
	if p := b.Route(req.Path); p != nil {
		schema = p.Fields
	}
	out := make(map[string]interface{}, len(req.Data))
	for name, v := range req.Data {
		str, isString := v.(string)
		if f := schema[name]; (f != nil && f.DisplayAttrs != nil && f.DisplayAttrs.Sensitive) || (isString && len(str) > maxShownValue) {
			s := fmt.Sprint(v)
			sum := sha256.Sum256([]byte(s))
			v = map[string]interface{}{"sha256": hex.EncodeToString(sum[:]), "length": len(s)}
		}
		out[name] = v
	}
	return out
}

// maxShownValue is the longest string value an approval shows as it is.
const maxShownValue = 1024

// recordApproval records a step of approval a on its key's history (the mount's own settings have none: the log
// has it, and Vault's audit devices have the requests).
func (b *backend) recordApproval(ctx context.Context, s logical.Storage, a *approval, who keys.Actor, kind, details string) {
	if a.Key == "" {
		b.logger.Info("dual control: "+strings.ReplaceAll(kind, "_", " "), "approval", a.ID, "action", a.Action, "by", who.String(), "details", details)
		return
	}
	if err := b.keys.RecordEvent(ctx, s, a.Key, who, kind, 0, details); err != nil {
		b.logger.Error("could not record an approval's step", "key", a.Key, "approval", a.ID, "event", kind, "error", err)
	}
}

func (b *backend) pathApprovals() []*framework.Path {
	id := framework.GenericNameRegex("id")
	idField := &framework.FieldSchema{Type: framework.TypeString, Required: true, Description: "The approval's id: the request id of the held request (its approval_id)."}
	return []*framework.Path{
		{
			Pattern:      "approvals/?$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "approvals"},
			Fields: map[string]*framework.FieldSchema{
				"after": {Type: framework.TypeString, Query: true, Description: "Pagination: only approvals whose id sorts after this one (the previous page's next_after)."},
				"limit": {Type: framework.TypeInt, Query: true, Default: defaultInventoryLimit, Description: fmt.Sprintf("Pagination: at most this many approvals with their summary (1 to %d, default %d).", maxInventoryLimit, defaultInventoryLimit)},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: handle(b.pathApprovalsList), Summary: "List the approvals, a page at a time: pending ones, and ended ones until they are removed."},
			},
			HelpSynopsis:    "List the requests held for dual control.",
			HelpDescription: approvalsHelp,
		},
		{
			Pattern:      "approvals/" + id,
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "approval"},
			Fields:       map[string]*framework.FieldSchema{"id": idField},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: b.pathApprovalRead, Summary: "Who asked for what, the approvals so far, when it expires, and its result once run."},
			},
			HelpSynopsis:    "Read a request held for dual control.",
			HelpDescription: approvalsHelp,
		},
		{
			Pattern:      "approvals/" + id + "/approve",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "approve", OperationSuffix: "request"},
			Fields:       map[string]*framework.FieldSchema{"id": idField},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathApprovalApprove), Summary: "Approve a held request; the last approval needed executes it and returns its result."},
			},
			HelpSynopsis:    "Approve a request held for dual control.",
			HelpDescription: approveHelp,
		},
		{
			Pattern:      "approvals/" + id + "/reject",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "reject", OperationSuffix: "request"},
			Fields: map[string]*framework.FieldSchema{
				"id":      idField,
				"comment": {Type: framework.TypeString, Description: "Why, for the key's history and whoever reads the approval."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathApprovalReject), Summary: "Reject a held request: it ends unexecuted."},
			},
			HelpSynopsis:    "Reject a request held for dual control.",
			HelpDescription: rejectHelp,
		},
	}
}

func (b *backend) pathApprovalsList(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	limit := d.Get("limit").(int)
	if limit < 1 || limit > maxInventoryLimit {
		return nil, callerf("limit must be between 1 and %d", maxInventoryLimit)
	}
	all, err := req.Storage.List(ctx, approvalsPrefix)
	if err != nil {
		return nil, err
	}
	// A page at a time: each listed approval is a storage read, and held requests can be many.
	sort.Strings(all)
	after := d.Get("after").(string)
	ids := all[sort.SearchStrings(all, after):]
	if len(ids) > 0 && ids[0] == after {
		ids = ids[1:]
	}
	more := len(ids) > limit
	ids = ids[:min(len(ids), limit)]
	now := b.now()
	info := make(map[string]interface{}, len(ids))
	for _, id := range ids {
		a, err := readApproval(ctx, req.Storage, id)
		if err != nil {
			return nil, err
		}
		if a == nil {
			continue
		}
		info[id] = map[string]interface{}{
			"key": a.Key, "action": a.Action, "state": a.stateAt(now), "expires_at": keys.FormatTime(a.ExpiresAt),
			"approvals": len(a.Approvals), "approvals_required": a.Required, "requested_by": a.RequestedBy.view(),
		}
	}
	resp := logical.ListResponseWithInfo(ids, info)
	if more {
		resp.Data["next_after"] = ids[len(ids)-1]
	}
	return resp, nil
}

func (b *backend) pathApprovalRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	a, err := readApproval(ctx, req.Storage, d.Get("id").(string))
	if err != nil || a == nil {
		return nil, err
	}
	return &logical.Response{Data: a.view(b.now())}, nil
}

// decided loads approval id for a decision by req's caller; the caller holds its lock. It refuses an approval
// that does not exist (404) or has ended (expiring it first when its time has passed), and a caller who may not
// decide it. An approve call on an executed or failed approval gets it back, to return its result.
func (b *backend) decided(ctx context.Context, req *logical.Request, id string, approving bool) (*approval, error) {
	a, err := readApproval(ctx, req.Storage, id)
	switch {
	case err != nil:
		return nil, err
	case a == nil:
		return nil, logical.CodedError(http.StatusNotFound, fmt.Sprintf("no approval %s: it does not exist, or it ended more than approval_ttl ago (the key's history keeps its steps)", id))
	case a.stateAt(b.now()) == approvalExpired && a.State == approvalPending:
		if err := b.expire(ctx, req.Storage, a, keys.SchedulerActor); err != nil {
			return nil, err
		}
	}
	switch {
	case approving && (a.State == approvalExecuted || a.State == approvalFailed):
		return a, nil
	case a.ended():
		return nil, callerf("approval %s has ended: it was %s at %s", a.ID, a.State, keys.FormatTime(a.EndedAt))
	}
	return a, b.mayDecide(req, a, approving)
}

// mayDecide refuses a caller who may not approve (approving) or reject a: a token without an entity, the
// requester's own entity (who may withdraw, not approve), an entity outside the key's approver_groups. Vault's
// ACL on approvals/* has already admitted the call.
func (b *backend) mayDecide(req *logical.Request, a *approval, approving bool) error {
	verb := "reject"
	if approving {
		verb = "approve"
	}
	switch {
	case req.EntityID == "":
		return logical.CodedError(http.StatusForbidden, fmt.Sprintf("permission denied: to %s, a token needs a Vault identity entity (a root token or an orphan token without one cannot): dual control counts people, as entities", verb))
	case req.EntityID == a.RequestedBy.EntityID && approving:
		return logical.CodedError(http.StatusForbidden, "permission denied: the requester's own entity cannot approve its request: approvals come from other entities")
	case req.EntityID == a.RequestedBy.EntityID:
		return nil // the requester withdraws the request
	case len(a.ApproverGroups) == 0:
		return nil
	}
	groups, err := b.System().GroupsForEntity(req.EntityID)
	if err != nil {
		return fmt.Errorf("look up the groups of entity %s: %w", req.EntityID, err)
	}
	for _, g := range groups {
		if slices.Contains(a.ApproverGroups, g.ID) || slices.Contains(a.ApproverGroups, g.Name) {
			return nil
		}
	}
	return logical.CodedError(http.StatusForbidden, fmt.Sprintf("permission denied: entity %s is in none of the approver groups of key %q (%s)",
		req.EntityID, a.Key, strings.Join(a.ApproverGroups, ", ")))
}

func (b *backend) pathApprovalApprove(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	id := d.Get("id").(string)
	l := b.approvals.lock(id)
	l.Lock()
	defer l.Unlock()
	a, err := b.decided(ctx, req, id, true)
	switch {
	case err != nil:
		return nil, err
	case a.ended():
		resp := &logical.Response{Data: a.view(b.now())}
		resp.AddWarning(fmt.Sprintf("approval %s was %s at %s: its recorded result is returned and nothing was run again", a.ID, a.State, keys.FormatTime(a.EndedAt)))
		return resp, nil
	}
	if a.State == approvalPending {
		approver, err := b.party(ctx, req)
		if err != nil {
			return nil, err
		}
		if a.approvedBy(req.EntityID) {
			resp := &logical.Response{Data: a.view(b.now())}
			resp.AddWarning(fmt.Sprintf("entity %s has approved already: each entity counts once; %d of %d approvals", req.EntityID, len(a.Approvals), a.Required))
			return resp, nil
		}
		a.Approvals = append(a.Approvals, approver)
		if len(a.Approvals) >= a.Required {
			a.State = approvalExecuting // stored before the request runs: a crash from here on runs it again, never loses it
			a.ExecutingSince = b.now().UTC()
		}
		if err := b.storeApproval(ctx, req.Storage, a); err != nil {
			return nil, err
		}
		b.recordApproval(ctx, req.Storage, a, approver.actor(), "approval_granted",
			fmt.Sprintf("approval %s: %s; %d of %d approvals", a.ID, a.Action, len(a.Approvals), a.Required))
		if a.State == approvalPending {
			return &logical.Response{Data: a.view(b.now())}, nil
		}
	} else if a.State == approvalExecuting && b.now().Sub(a.ExecutingSince) > executionRetryWindow {
		// Cut short long ago: what it would change may have changed since (a key disabled again in an
		// emergency); it ends failed, and the requester asks again.
		a.State, a.EndedAt = approvalFailed, b.now().UTC()
		a.Result = &approvalResult{Error: fmt.Sprintf("the execution was interrupted at %s and is not run again more than %s later: send the request again", keys.FormatTime(a.ExecutingSince), executionRetryWindow)}
		if err := b.endApproval(ctx, req.Storage, a); err != nil {
			return nil, err
		}
		b.recordApproval(ctx, req.Storage, a, keys.Actor{DisplayName: "cmk approvals"}, "approval_failed", fmt.Sprintf("approval %s: %s; %s", a.ID, a.Action, a.Result.Error))
		return &logical.Response{Data: a.view(b.now())}, nil
	}
	return b.execute(ctx, req, a)
}

// execute runs approved request a as its requester sent it, on the requester's behalf, through the backend's own
// router, and records the result. The caller holds a's lock and has stored it as executing.
func (b *backend) execute(ctx context.Context, req *logical.Request, a *approval) (*logical.Response, error) {
	data, err := readApprovalRequest(ctx, req.Storage, a.ID)
	if err != nil {
		return nil, err
	}
	inner := &logical.Request{
		ID:        "approval:" + a.ID, // the same on every run: the handlers recognise their retry by it
		Operation: a.Operation, Path: a.Path, Data: data, Storage: req.Storage,
		MountPoint: req.MountPoint, MountType: req.MountType, MountAccessor: req.MountAccessor,
		EntityID: a.RequestedBy.EntityID, DisplayName: a.RequestedBy.DisplayName,
		ClientTokenAccessor: a.RequestedBy.AccessorHMAC, // as recorded: keys.SealedAccessorPrefix
	}
	if inner.ClientTokenAccessor != "" && !strings.HasPrefix(inner.ClientTokenAccessor, keys.SealedAccessorPrefix) {
		return nil, fmt.Errorf("approval %s: the requester's accessor is not in its recorded form", a.ID)
	}
	run := context.WithValue(ctx, approvedExecutionKey{}, approvedExecution{id: a.ID, op: a.Operation, path: a.Path})
	resp, err := b.Backend.HandleRequest(run, inner)
	a.Result = resultOf(inner, resp, err)
	a.State, a.EndedAt = approvalExecuted, b.now().UTC()
	if a.Result.Error != "" {
		a.State = approvalFailed
	}
	if err := b.endApproval(ctx, req.Storage, a); err != nil {
		// Still stored as executing: the next approve call runs it again, which changes nothing more.
		return nil, fmt.Errorf("approval %s ran; recording its result failed, and approving again records it: %w", a.ID, err)
	}
	approver := a.Approvals[len(a.Approvals)-1]
	names := make([]string, len(a.Approvals))
	for i, p := range a.Approvals {
		names[i] = p.actor().String()
	}
	details := fmt.Sprintf("approval %s: %s; approved by %s", a.ID, a.Action, strings.Join(names, ", "))
	if a.State == approvalFailed {
		details += "; the request failed: " + a.Result.Error
	}
	b.recordApproval(ctx, req.Storage, a, approver.actor(), "approval_"+a.State, details)
	b.logger.Info("approved request executed", "approval", a.ID, "path", a.Path, "state", a.State)
	out := &logical.Response{Data: a.view(b.now())}
	if a.State == approvalFailed {
		out.AddWarning(fmt.Sprintf("the approved request ran and failed (HTTP %d): %s", a.Result.Status, a.Result.Error))
	}
	return out, nil
}

// resultOf records what a request answered: its data and warnings, or its error and the status Vault would give.
func resultOf(req *logical.Request, resp *logical.Response, err error) *approvalResult {
	r := &approvalResult{Status: statusOf(req, resp, err)} // the one outcome→status mapping
	switch {
	case err != nil || (resp != nil && resp.IsError()):
		_, cerr := logical.RespondErrorCommon(req, resp, err)
		r.Error = "request failed"
		if cerr != nil {
			r.Error = cerr.Error()
		}
	case resp == nil:
	case resp.Data[logical.HTTPStatusCode] != nil: // a raw response: its body is Vault's JSON
		var body struct {
			Data     map[string]interface{} `json:"data"`
			Warnings []string               `json:"warnings"`
		}
		_ = json.Unmarshal([]byte(fmt.Sprint(resp.Data[logical.HTTPRawBody])), &body)
		r.Data, r.Warnings = body.Data, body.Warnings
	default:
		r.Data, r.Warnings = resp.Data, resp.Warnings
	}
	return r
}

func (b *backend) pathApprovalReject(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	id := d.Get("id").(string)
	l := b.approvals.lock(id)
	l.Lock()
	defer l.Unlock()
	a, err := b.decided(ctx, req, id, false)
	switch {
	case err != nil:
		return nil, err
	case a.State == approvalExecuting:
		return nil, callerf("approval %s is approved and being executed: it can no longer be rejected", a.ID)
	}
	who, err := b.party(ctx, req)
	if err != nil {
		return nil, err
	}
	a.State, a.RejectedBy, a.Comment, a.EndedAt = approvalRejected, &who, d.Get("comment").(string), who.Time
	if err := b.endApproval(ctx, req.Storage, a); err != nil {
		return nil, err
	}
	details := fmt.Sprintf("approval %s: %s", a.ID, a.Action)
	if a.Comment != "" {
		details += "; comment: " + a.Comment
	}
	b.recordApproval(ctx, req.Storage, a, who.actor(), "approval_rejected", details)
	return &logical.Response{Data: a.view(b.now())}, nil
}

// expire ends pending approval a, whose time has passed, unexecuted. The caller holds its lock.
func (b *backend) expire(ctx context.Context, s logical.Storage, a *approval, who keys.Actor) error {
	a.State, a.EndedAt = approvalExpired, a.ExpiresAt
	if err := b.endApproval(ctx, s, a); err != nil {
		return err
	}
	b.recordApproval(ctx, s, a, who, "approval_expired",
		fmt.Sprintf("approval %s: %s; %d of %d approvals when it expired unexecuted", a.ID, a.Action, len(a.Approvals), a.Required))
	return nil
}

// tickApprovals is the periodic function's part: pending approvals past their time expire, and ended approvals are
// removed approval_ttl after they ended (the key's history keeps every step). It lists storage only when something
// is due, or once after a start or another node's change.
func (b *backend) tickApprovals(ctx context.Context, s logical.Storage) error {
	now := b.now()
	b.approvals.mu.Lock()
	skip := b.approvals.dueKnown && (b.approvals.nextDueAt.IsZero() || now.Before(b.approvals.nextDueAt))
	b.approvals.mu.Unlock()
	if skip {
		return nil
	}
	cfg, err := b.readKeysConfig(ctx, s)
	if err != nil {
		return err
	}
	ids, err := s.List(ctx, approvalsPrefix)
	if err != nil {
		return err
	}
	var next time.Time
	consider := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	for _, id := range ids {
		at, err := b.tickApproval(ctx, s, id, now, cfg.approvalTTL())
		if err != nil {
			return err
		}
		if !at.IsZero() {
			consider(at)
		}
	}
	b.approvals.mu.Lock()
	b.approvals.dueKnown, b.approvals.nextDueAt = true, next
	b.approvals.mu.Unlock()
	return nil
}

// tickApproval expires or removes approval id if that is due, and returns when it is next due (zero: never).
func (b *backend) tickApproval(ctx context.Context, s logical.Storage, id string, now time.Time, keep time.Duration) (time.Time, error) {
	l := b.approvals.lock(id)
	l.Lock()
	defer l.Unlock()
	a, err := readApproval(ctx, s, id)
	if err != nil || a == nil {
		return time.Time{}, err
	}
	if a.stateAt(now) == approvalExpired && a.State == approvalPending {
		if err := b.expire(ctx, s, a, keys.SchedulerActor); err != nil {
			return time.Time{}, err
		}
	}
	switch {
	case a.State == approvalPending:
		return a.ExpiresAt, nil
	case a.State == approvalExecuting:
		return time.Time{}, nil // the next approve call runs it (see the top of this file)
	case now.Before(a.EndedAt.Add(keep)):
		return a.EndedAt.Add(keep), nil
	}
	if err := s.Delete(ctx, approvalRequestsPrefix+id); err != nil {
		return time.Time{}, err
	}
	return time.Time{}, s.Delete(ctx, approvalsPrefix+id)
}

const approvalsHelp = `
Dual control (M of N) for what cannot be undone. On a key whose approvals_required (keys/<name>/config), or the
mount's floor min_approvals_required (config/keys), is 1 or more, these requests do not execute: they answer
HTTP 202 with an approval_id, and wait for approval_ttl (config/keys, default 24h) for that many approvals by
other Vault entities: destroy a version, delete a key, trim, import_version, enable a disabled key or version
(and cancel-deletion, and a version's enable that cancels its destruction), lower approvals_required or change
approver_groups, change or remove access conditions, create a grant on a grants_required key; and, under the
mount's floor, lowering config/keys' deletion_grace_period. Disabling a key or a version is never held: an
emergency stop never waits.

Reading an approval shows who asked (entity, display name, the HMAC of the token's accessor), what (action,
operation, path and the request's fields; sensitive values such as an import's wrapped key only as their SHA-256
and length), the approvals so far, expires_at, the state (pending, executing, executed, failed, rejected,
expired) and, once run, the result. Ended approvals are removed approval_ttl after they end; the key's history
keeps every step (approval_requested, approval_granted, approval_rejected, approval_executed, approval_failed,
approval_expired).
`

const approveHelp = `
Approves a held request. Approvers are Vault entities other than the requester's: a token without an entity
(root, orphan tokens) cannot approve, and one entity counts once whatever its tokens. Who may approve is decided
by Vault's ACL on approvals/* (a custodian policy: examples/policies/cmk-custodian.hcl) and, when the key has
approver_groups, by membership of one of those Vault groups.

The approval that completes the count executes the request exactly once, as its requester sent it (same
operation, path and fields, on the requester's behalf), and returns the approval with the result (state executed)
or the request's error (state failed). The execution is recorded as executing before it runs; an approve call that
finds it executing (the plugin died during the execution) runs it again, which completes it once: every held
request is idempotent under its retry. Approving an executed or failed approval returns its recorded result and
runs nothing.
`

const rejectHelp = `
Rejects a held request: it ends unexecuted, recorded with who rejected it and why (comment) on the approval and the
key's history. Anyone who may approve it may reject it, and the requester may withdraw it; a token without an
entity may not. An approval being executed can no longer be rejected.
`
