// Package tests is the end-to-end suite: a real Vault server built from source, the plugin registered in its
// catalog by SHA-256, and a real SoftHSM token made for the run. It runs when CMK_E2E_VAULT and CMK_E2E_PLUGIN
// name the binaries (make e2e sets them).
package tests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
)

const pluginName = "vault-plugin-secrets-cmk"

var (
	vaultBin   string
	pluginBin  string
	softhsm    *softhsmtest.Env
	workDir    string
	dev        *vaultServer // one dev server shared by the tests that need no restart
	tokenCount atomic.Int32
)

func TestMain(m *testing.M) {
	vaultBin, pluginBin = os.Getenv("CMK_E2E_VAULT"), os.Getenv("CMK_E2E_PLUGIN")
	if vaultBin == "" || pluginBin == "" {
		fmt.Println("end-to-end suite skipped: set CMK_E2E_VAULT and CMK_E2E_PLUGIN (make e2e does)")
		os.Exit(0)
	}
	var err error
	workDir, err = os.MkdirTemp("", "cmk-e2e-")
	if err != nil {
		panic(err)
	}
	code := func() int {
		softhsm, err = softhsmtest.Setup(filepath.Join(workDir, "softhsm"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		dev, err = startDevServer(filepath.Join(workDir, "dev"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "start Vault dev server:", err)
			return 1
		}
		defer dev.stop()
		return m.Run()
	}()
	if code == 0 {
		os.RemoveAll(workDir)
	} else {
		fmt.Fprintln(os.Stderr, "kept for inspection:", workDir)
	}
	os.Exit(code)
}

// vaultServer is a Vault process this suite started, stopped by its own process id.
type vaultServer struct {
	dir       string
	addr      string
	rootToken string
	cmd       *exec.Cmd
	logPath   string
	pluginDir string
	client    *api.Client
	args      []string
	done      chan struct{}
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// preparePluginDir copies the plugin binary into a plugin directory of the server's own.
func preparePluginDir(dir string) (string, error) {
	pdir := filepath.Join(dir, "plugins")
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		return "", err
	}
	return pdir, copyFile(pluginBin, filepath.Join(pdir, pluginName))
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst+".tmp", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(dst+".tmp", dst)
}

func startDevServer(dir string) (*vaultServer, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	pdir, err := preparePluginDir(dir)
	if err != nil {
		return nil, err
	}
	s := &vaultServer{dir: dir, addr: addr, rootToken: "e2e-root", pluginDir: pdir, logPath: filepath.Join(dir, "vault.log")}
	s.args = []string{"server", "-dev", "-dev-root-token-id=" + s.rootToken, "-dev-listen-address=" + addr, "-dev-plugin-dir=" + pdir}
	if err := s.start(); err != nil {
		return nil, err
	}
	if err := s.registerPlugin(pluginBin, ""); err != nil {
		s.stop()
		return nil, err
	}
	return s, nil
}

// start runs the server and waits until it answers (sealed or not).
func (s *vaultServer) start() error {
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	s.cmd = exec.Command(vaultBin, s.args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.Env = append(os.Environ(), "VAULT_ADDR=", "VAULT_TOKEN=", "SOFTHSM2_CONF="+softhsm.Conf)
	if err := s.cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	s.done = make(chan struct{})
	go func() {
		_ = s.cmd.Wait()
		logf.Close()
		close(s.done)
	}()
	cfg := api.DefaultConfig()
	cfg.Address = "http://" + s.addr
	cfg.MaxRetries = 0
	client, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	client.SetToken(s.rootToken)
	s.client = client
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("vault exited early; log %s:\n%s", s.logPath, tail(s.logPath, 20))
		default:
		}
		if _, err := client.Sys().SealStatus(); err == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	s.stop()
	return fmt.Errorf("vault did not answer within 60s; log:\n%s", tail(s.logPath, 20))
}

// stop ends the server by the process id this suite started, and waits for it.
func (s *vaultServer) stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func fileSHA256(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// registerPlugin registers the binary at src (copied into the plugin directory under command) by its SHA-256,
// with the PKCS#11 module and SoftHSM configuration in its environment, as an operator would.
func (s *vaultServer) registerPlugin(src, version string) error {
	command := pluginName
	if version != "" {
		command = pluginName + "-" + version
		if err := copyFile(src, filepath.Join(s.pluginDir, command)); err != nil {
			return err
		}
	}
	sum, err := fileSHA256(filepath.Join(s.pluginDir, command))
	if err != nil {
		return err
	}
	return s.client.Sys().RegisterPluginWithContext(context.Background(), &api.RegisterPluginInput{
		Name:    pluginName,
		Type:    api.PluginTypeSecrets,
		Command: command,
		SHA256:  sum,
		Version: version,
		Env:     []string{"CMK_PKCS11_LIBRARY=" + softhsm.Library, "SOFTHSM2_CONF=" + softhsm.Conf},
	})
}

// mount is one mount of the engine on a token of its own.
type mount struct {
	path  string // without trailing slash
	label string
	pin   string
}

// newMount creates a token and mounts the engine configured on it at a fresh path.
func (s *vaultServer) newMount(t *testing.T) mount {
	t.Helper()
	n := tokenCount.Add(1)
	m := mount{path: fmt.Sprintf("cmk%d", n), label: fmt.Sprintf("e2e-%d", n), pin: fmt.Sprintf("e2e-pin-%d-7Qx", n)}
	if err := softhsm.CreateToken(m.label, m.pin); err != nil {
		t.Fatal(err)
	}
	s.mountOn(t, m)
	return m
}

// mountOn mounts the engine at m.path and configures it on m's token.
func (s *vaultServer) mountOn(t *testing.T, m mount) {
	t.Helper()
	if err := s.client.Sys().Mount(m.path, &api.MountInput{Type: pluginName}); err != nil {
		t.Fatalf("mount %s: %v", m.path, err)
	}
	if _, err := s.client.Logical().Write(m.path+"/config/hsm", map[string]interface{}{"token_label": m.label, "pin": m.pin}); err != nil {
		t.Fatalf("config/hsm on %s: %v", m.path, err)
	}
}

// vaultCLI runs the vault command against server s with token, as a user at a shell would.
func (s *vaultServer) vaultCLI(token string, args ...string) (string, error) {
	cmd := exec.Command(vaultBin, args...)
	cmd.Env = append(os.Environ(), "VAULT_ADDR=http://"+s.addr, "VAULT_TOKEN="+token, "VAULT_FORMAT=")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// statusOf returns the HTTP status of a failed API call, 0 for success.
func statusOf(err error) int {
	if err == nil {
		return 0
	}
	if re, ok := err.(*api.ResponseError); ok {
		return re.StatusCode
	}
	return -1
}

func mustWrite(t *testing.T, c *api.Client, path string, data map[string]interface{}) *api.Secret {
	t.Helper()
	s, err := c.Logical().Write(path, data)
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	return s
}

func encrypt(t *testing.T, c *api.Client, m mount, key, plaintext string) string {
	t.Helper()
	return mustWrite(t, c, m.path+"/encrypt/"+key, map[string]interface{}{"plaintext": b64(plaintext)}).Data["ciphertext"].(string)
}

func decrypt(t *testing.T, c *api.Client, m mount, key, ct string) string {
	t.Helper()
	s := mustWrite(t, c, m.path+"/decrypt/"+key, map[string]interface{}{"ciphertext": ct})
	pt, err := base64.StdEncoding.DecodeString(s.Data["plaintext"].(string))
	if err != nil {
		t.Fatal(err)
	}
	return string(pt)
}
