package tests

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
)

// TestRaftFailover runs a three-node Vault cluster with integrated storage, built by scripts/cluster.sh (as an
// operator would), every node's plugin on one shared SoftHSM token. Under encryption and rotation load the active
// node is stopped: a standby takes over and serves, every ciphertext a client received decrypts, versions stay
// contiguous, and a rotation scheduled for after the failover happens exactly once. A grant in use and a request
// held for dual control cross the failover: the grant never gives more uses than granted, and the request,
// approved on the new active node, runs once.
func TestRaftFailover(t *testing.T) {
	t.Parallel()
	nodes, _ := startCluster(t, 3)
	active := activeNode(t, nodes, nil)
	c := active.client
	gov := governanceBeforeFailover(t, c)
	mustWrite(t, c, "cmk/keys/k", nil)
	mustWrite(t, c, "cmk/keys/sched", map[string]interface{}{"auto_rotate_period": "1h"})
	due := time.Now().Add(40 * time.Second).UTC()
	mustWrite(t, c, "cmk/keys/sched/config", map[string]interface{}{"next_rotation_time": due.Format(time.RFC3339)})

	var mu sync.Mutex
	issued := map[string]string{}
	failed := map[string]int{} // node name → requests that got no answer
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ { // clients spread over every node: standbys forward to the active one
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				node := nodes[rand.Intn(len(nodes))]
				pt := fmt.Sprintf("w%d-%d", w, n)
				s, err := node.client.Logical().Write("cmk/encrypt/k", map[string]interface{}{"plaintext": b64(pt)})
				mu.Lock()
				if err != nil {
					failed[node.name]++ // the stopped node, or the election: the client got nothing
				} else {
					issued[s.Data["ciphertext"].(string)] = pt
				}
				mu.Unlock()
			}
		}(w)
	}
	wg.Add(1)
	go func() { // rotations through whichever node answers
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(300 * time.Millisecond):
			}
			_, _ = nodes[rand.Intn(len(nodes))].client.Logical().Write("cmk/keys/k/rotate", nil)
		}
	}()

	time.Sleep(5 * time.Second)
	t.Logf("stopping the active node %s (pid %d)", active.name, active.pid)
	if err := syscall.Kill(active.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitExit(t, active.pid)
	stopped := active
	active = activeNode(t, nodes, stopped)
	t.Logf("%s took over", active.name)
	time.Sleep(8 * time.Second) // load on the new active node
	close(stop)
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	c = active.client
	before := len(issued)
	for ct, pt := range issued {
		if got := decrypt(t, c, mount{Path: "cmk"}, "k", ct); got != pt {
			t.Fatalf("%s decrypts to %q, want %q", ct, got, pt)
		}
	}
	k := mustWrite(t, c, "cmk/encrypt/k", map[string]interface{}{"plaintext": b64("after")})
	if k == nil {
		t.Fatal("no encryption after failover")
	}
	kr, err := c.Logical().Read("cmk/keys/k")
	if err != nil {
		t.Fatal(err)
	}
	latest := int(mustNumber(t, kr.Data["latest_version"]))
	versions := kr.Data["versions"].(map[string]interface{})
	for v := 1; v <= latest; v++ {
		if versions[fmt.Sprint(v)] == nil {
			t.Fatalf("version %d of %d missing", v, latest)
		}
	}
	if len(versions) != latest {
		t.Fatalf("%d versions for latest_version %d", len(versions), latest)
	}
	t.Logf("%d ciphertexts issued across the failover all decrypt; %d versions, contiguous; requests that got no answer, by node: %v (%s was stopped)",
		before, latest, failed, stopped.name)
	gov.checkAfterFailover(t, c)

	// The scheduled rotation falls after the failover: the new active node makes it, once.
	deadline := due.Add(3 * time.Minute)
	for {
		s, err := c.Logical().Read("cmk/keys/sched")
		if err == nil && mustNumber(t, s.Data["latest_version"]) >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotation due at %s did not happen on the new active node (%v)", due, err)
		}
		time.Sleep(2 * time.Second)
	}
	time.Sleep(70 * time.Second) // another periodic pass: it must not rotate again
	s, err := c.Logical().Read("cmk/keys/sched")
	if err != nil {
		t.Fatal(err)
	}
	if v := mustNumber(t, s.Data["latest_version"]); v != 2 {
		t.Fatalf("scheduled rotation made %v versions, want 2", v)
	}
	h, err := c.Logical().ReadWithData("cmk/keys/sched/history", nil)
	if err != nil {
		t.Fatal(err)
	}
	scheduled := 0
	for _, e := range h.Data["events"].([]interface{}) {
		ev := e.(map[string]interface{})
		if ev["event"] == "rotated" && ev["cause"] == "scheduled" {
			scheduled++
		}
	}
	if scheduled != 1 {
		t.Fatalf("%d scheduled rotations in the history, want 1: %v", scheduled, h.Data["events"])
	}
}

// governance is what TestRaftFailover sets up of zero-trust governance before the failover: a contractor's grant
// in use, and a destruction held for a custodian.
type governance struct {
	carol, dave string // tokens: the grantee, the custodian
	carolID     string
	ct          string // a ciphertext of key "vendor"
	used        int    // uses of the grant made before the failover
	approval    string
}

const failoverGrantUses = 20

func governanceBeforeFailover(t *testing.T, c *api.Client) *governance {
	t.Helper()
	g := &governance{}
	custodian, err := os.ReadFile(filepath.Join("..", "examples", "policies", "cmk-custodian.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Sys().PutPolicy("custodian", string(custodian)); err != nil {
		t.Fatal(err)
	}
	if err := c.Sys().PutPolicy("vendor-app", `path "cmk/decrypt/vendor" { capabilities = ["update"] }`); err != nil {
		t.Fatal(err)
	}
	if err := c.Sys().EnableAuthWithOptions("people", &api.EnableAuthOptions{Type: "userpass"}); err != nil {
		t.Fatal(err)
	}
	login := func(user, policy string) (string, string) {
		mustWrite(t, c, "auth/people/users/"+user, map[string]interface{}{"password": "pw-" + user, "token_policies": policy})
		s := mustWrite(t, c, "auth/people/login/"+user, map[string]interface{}{"password": "pw-" + user})
		return s.Auth.ClientToken, s.Auth.EntityID
	}
	g.carol, g.carolID = login("carol", "vendor-app")
	g.dave, _ = login("dave", "custodian")

	mustWrite(t, c, "cmk/keys/vendor", nil)
	g.ct = encrypt(t, c, mount{Path: "cmk"}, "vendor", "vendor data")
	mustWrite(t, c, "cmk/keys/vendor/access", map[string]interface{}{"grants_required": true})
	mustWrite(t, c, "cmk/keys/vendor/grants", map[string]interface{}{"entity_id": g.carolID, "operations": "decrypt", "ttl": "1h", "max_uses": failoverGrantUses})
	carol := withToken(t, c, g.carol)
	for ; g.used < 5; g.used++ {
		decrypt(t, carol, mount{Path: "cmk"}, "vendor", g.ct)
	}
	mustWrite(t, c, "cmk/keys/payroll", map[string]interface{}{"approvals_required": 1})
	mustWrite(t, c, "cmk/keys/payroll/rotate", nil)
	g.approval = heldRequest(t, c, "cmk/keys/payroll/versions/1/destroy")
	return g
}

// checkAfterFailover, on the new active node's client c: the grant goes on without giving more than it granted
// (a reserved block may be lost), and the held destruction, approved, runs once.
func (g *governance) checkAfterFailover(t *testing.T, c *api.Client) {
	t.Helper()
	// Usage counts cross the failover: the stopped node's plugin wrote them to storage as Vault unmounted it.
	if uses, _ := usesOf(t, c, mount{Path: "cmk"}, "vendor", "decrypt", g.carolID); uses != fmt.Sprint(g.used) {
		t.Fatalf("carol's decryptions counted after the failover: %s, want %d", uses, g.used)
	}
	carol := withToken(t, c, g.carol)
	for {
		_, err := carol.Logical().Write("cmk/decrypt/vendor", map[string]interface{}{"ciphertext": g.ct})
		if statusOf(err) == 403 {
			break
		}
		if err != nil {
			t.Fatalf("carol's decrypt after the failover: %v", err)
		}
		if g.used++; g.used > failoverGrantUses {
			t.Fatalf("more than %d uses of a %d-use grant across the failover", failoverGrantUses, failoverGrantUses)
		}
	}
	if g.used < failoverGrantUses-2 { // one reserved block of 2 at most
		t.Fatalf("only %d uses of %d across the failover", g.used, failoverGrantUses)
	}
	if st := mustRead(t, c, "cmk/approvals/"+g.approval).Data["state"]; st != "pending" {
		t.Fatalf("the held destruction after the failover: %v", st)
	}
	mustWrite(t, withToken(t, c, g.dave), "cmk/approvals/"+g.approval+"/approve", nil)
	if st := mustRead(t, c, "cmk/keys/payroll/versions/1").Data["state"]; st != "destroy_scheduled" {
		t.Fatalf("version 1 after the approval: %v", st)
	}
	if n := historyCount(t, c, "cmk/keys/payroll/history", "approval_executed"); n != 1 {
		t.Fatalf("%d executions recorded, want 1", n)
	}
	// The history chain goes on across nodes: heads signed before and after the failover by the one audit key.
	if v := mustRead(t, c, "cmk/keys/payroll/history/verify").Data; v["verified"] != true {
		t.Fatalf("payroll's history after the failover: %v", v)
	}
	t.Logf("across the failover: %d of %d grant uses served; the held destruction approved on the new active node ran once", g.used, failoverGrantUses)
}

func withToken(t *testing.T, c *api.Client, token string) *api.Client {
	t.Helper()
	out, err := c.Clone()
	if err != nil {
		t.Fatal(err)
	}
	out.SetToken(token)
	return out
}
