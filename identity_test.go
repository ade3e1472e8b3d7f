package cmk

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// identityView is Vault's system view with an identity store the test changes, counting the calls made to it.
type identityView struct {
	logical.StaticSystemView
	mu       sync.Mutex
	entities map[string]*logical.Entity
	groups   map[string][]*logical.Group
	calls    int
}

func (v *identityView) EntityInfo(id string) (*logical.Entity, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	return v.entities[id], nil
}

func (v *identityView) GroupsForEntity(id string) ([]*logical.Group, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	return v.groups[id], nil
}

func (v *identityView) set(id string, metadata map[string]string, groups ...*logical.Group) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.entities[id] = &logical.Entity{ID: id, Name: "alice", Metadata: metadata}
	v.groups[id] = groups
}

func (v *identityView) callCount() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.calls
}

// A request's caller carries its actor, its source address and an identity that resolves its entity through the
// system view Vault gives the plugin, each entity's answer cached for at most identityTTL.
func TestCallerOfResolvesIdentityThroughTheSystemView(t *testing.T) {
	view := &identityView{entities: map[string]*logical.Entity{}, groups: map[string][]*logical.Group{}}
	conf := logical.TestBackendConfig()
	conf.System = view
	b := newBackend(conf)
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_800_000_000, 0)
	b.identity.now = func() time.Time { return now }
	view.set("e1", map[string]string{"team": "payments"}, &logical.Group{ID: "g1", Name: "ops"})

	req := &logical.Request{ID: "r1", EntityID: "e1", DisplayName: "userpass-alice", ClientTokenAccessor: "acc",
		Connection: &logical.Connection{RemoteAddr: "127.0.0.2"}}
	c := b.callerOf(req)
	if c.Actor != actorOf(req) || c.RemoteAddr != "127.0.0.2" || c.Identity == nil {
		t.Fatalf("caller %+v", c)
	}
	if got := b.callerOf(&logical.Request{}).RemoteAddr; got != "" {
		t.Fatalf("a request without a connection has source %q", got)
	}

	ctx := context.Background()
	info, err := c.Identity.Entity(ctx, "e1")
	want := &keys.EntityInfo{Name: "alice", Metadata: map[string]string{"team": "payments"}, Groups: []keys.GroupRef{{ID: "g1", Name: "ops"}}}
	if err != nil || info == nil || info.Name != want.Name || info.Metadata["team"] != "payments" || !slices.Equal(info.Groups, want.Groups) {
		t.Fatalf("entity e1: %+v %v", info, err)
	}
	calls := view.callCount()

	// Removed from the group: within the TTL the cached answer stands, without asking Vault; after it, the change
	// is seen.
	view.set("e1", nil)
	now = now.Add(identityTTL - time.Second)
	if info, _ := c.Identity.Entity(ctx, "e1"); len(info.Groups) != 1 || view.callCount() != calls {
		t.Fatalf("within the TTL: groups %v, %d calls to Vault after %d", info.Groups, view.callCount(), calls)
	}
	now = now.Add(time.Second)
	if info, _ := c.Identity.Entity(ctx, "e1"); info == nil || len(info.Groups) != 0 {
		t.Fatalf("after the TTL the entity's removal from its group is not seen: %+v", info)
	}

	// No entity (root and orphan tokens), or one the store does not know: nil.
	calls = view.callCount()
	if info, err := c.Identity.Entity(ctx, ""); info != nil || err != nil || view.callCount() != calls {
		t.Fatalf("empty entity id: %+v %v (%d calls)", info, err, view.callCount()-calls)
	}
	if info, err := c.Identity.Entity(ctx, "unknown"); info != nil || err != nil {
		t.Fatalf("unknown entity: %+v %v", info, err)
	}
}
