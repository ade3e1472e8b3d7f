package tests

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
)

// clusterNode is one line of the nodes file scripts/cluster.sh writes.
type clusterNode struct {
	name, addr string
	pid        int
	client     *api.Client
}

// TestRaftFailover runs a three-node Vault cluster with integrated storage, built by scripts/cluster.sh (as an
// operator would), every node's plugin on one shared SoftHSM token. Under encryption and rotation load the active
// node is stopped: a standby takes over and serves, every ciphertext a client received decrypts, versions stay
// contiguous, and a rotation scheduled for after the failover happens exactly once.
func TestRaftFailover(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "cluster")
	script, err := filepath.Abs("../scripts/cluster.sh")
	if err != nil {
		t.Fatal(err)
	}
	runScript := func(args ...string) {
		cmd := exec.Command(script, args...)
		cmd.Env = append(os.Environ(), "CMK_E2E_VAULT="+vaultBin, "CMK_E2E_PLUGIN="+pluginBin, "VAULT_ADDR=", "VAULT_TOKEN=")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("cluster.sh %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	runScript("start", dir)
	t.Cleanup(func() { runScript("stop", dir) })

	var init struct {
		RootToken string `json:"root_token"`
	}
	raw, err := os.ReadFile(filepath.Join(dir, "init.json"))
	if err != nil || json.Unmarshal(raw, &init) != nil {
		t.Fatalf("init.json: %v", err)
	}
	nodesFile, err := os.ReadFile(filepath.Join(dir, "nodes"))
	if err != nil {
		t.Fatal(err)
	}
	var nodes []*clusterNode
	for _, line := range strings.Split(strings.TrimSpace(string(nodesFile)), "\n") {
		n := &clusterNode{}
		if _, err := fmt.Sscan(line, &n.name, &n.addr, &n.pid); err != nil {
			t.Fatalf("nodes line %q: %v", line, err)
		}
		cfg := api.DefaultConfig()
		cfg.Address, cfg.MaxRetries, cfg.Timeout = n.addr, 0, 20*time.Second
		if n.client, err = api.NewClient(cfg); err != nil {
			t.Fatal(err)
		}
		n.client.SetToken(init.RootToken)
		nodes = append(nodes, n)
	}
	if len(nodes) != 3 {
		t.Fatalf("%d nodes", len(nodes))
	}
	active := activeNode(t, nodes, nil)
	c := active.client
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

// activeNode waits (up to a minute) for a node other than skip to report itself the active one.
func activeNode(t *testing.T, nodes []*clusterNode, skip *clusterNode) *clusterNode {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		for _, n := range nodes {
			if n == skip {
				continue
			}
			if l, err := n.client.Sys().Leader(); err == nil && l.IsSelf {
				if h, err := n.client.Sys().Health(); err == nil && !h.Sealed && !h.Standby {
					return n
				}
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatal("no active node within a minute")
	return nil
}

// waitExit waits for a process this test signalled to end.
func waitExit(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still running a minute after SIGTERM", pid)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
