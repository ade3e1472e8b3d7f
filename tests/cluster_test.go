package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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

// cluster is a Vault cluster with integrated storage built by scripts/cluster.sh, as an operator builds one.
type cluster struct {
	dir       string
	rootToken string
	nodes     []*clusterNode
}

// startCluster starts n nodes with scripts/cluster.sh (stopped when the test ends) and returns them, each with a
// root-token client.
func startCluster(t *testing.T, n int) ([]*clusterNode, *cluster) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "cluster")
	script, err := filepath.Abs("../scripts/cluster.sh")
	if err != nil {
		t.Fatal(err)
	}
	runScript := func(args ...string) {
		cmd := exec.Command(script, args...)
		cmd.Env = append(os.Environ(), "CMK_E2E_VAULT="+vaultBin, "CMK_E2E_PLUGIN="+pluginBin, "VAULT_ADDR=", "VAULT_TOKEN=",
			"CMK_CLUSTER_NODES="+strconv.Itoa(n))
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
	c := &cluster{dir: dir, rootToken: init.RootToken}
	for _, line := range strings.Split(strings.TrimSpace(string(nodesFile)), "\n") {
		node := &clusterNode{}
		if _, err := fmt.Sscan(line, &node.name, &node.addr, &node.pid); err != nil {
			t.Fatalf("nodes line %q: %v", line, err)
		}
		cfg := api.DefaultConfig()
		cfg.Address, cfg.MaxRetries, cfg.Timeout = node.addr, 0, 20*time.Second
		if node.client, err = api.NewClient(cfg); err != nil {
			t.Fatal(err)
		}
		node.client.SetToken(init.RootToken)
		c.nodes = append(c.nodes, node)
	}
	if len(c.nodes) != n {
		t.Fatalf("%d nodes, want %d", len(c.nodes), n)
	}
	return c.nodes, c
}

// vault runs the vault CLI against addr with the cluster's root token, as an operator would.
func (c *cluster) vault(t *testing.T, addr string, args ...string) string {
	t.Helper()
	cmd := exec.Command(vaultBin, args...)
	cmd.Env = append(os.Environ(), "VAULT_ADDR="+addr, "VAULT_TOKEN="+c.rootToken)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vault %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// tokenObjects lists the cluster token's objects with OpenSC's pkcs11-tool, from outside Vault: one line per
// object, its class and label.
func (c *cluster) tokenObjects(t *testing.T) []string {
	t.Helper()
	cmd := exec.Command("pkcs11-tool", "--module", softhsm.Library, "--token-label", "cmk-cluster", "--login", "--pin", "1234", "--list-objects")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+filepath.Join(c.dir, "softhsm", "softhsm2.conf"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	var objects []string
	class := ""
	for _, line := range strings.Split(string(out), "\n") {
		switch {
		case strings.Contains(line, "Object;"):
			class = strings.TrimSpace(strings.SplitN(line, ";", 2)[0])
		case strings.HasPrefix(strings.TrimSpace(line), "label:"):
			objects = append(objects, class+" "+strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "label:")))
		}
	}
	return objects
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
