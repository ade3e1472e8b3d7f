// Package vaulttest runs real Vault servers for the end-to-end suite and the benchmark: a server built from
// source, on a free loopback port, with the plugin registered by SHA-256 and a SoftHSM token directory of the
// run's own. Servers are stopped by the process id this package started, never by name.
package vaulttest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
)

// PluginName is the name the plugin is registered under.
const PluginName = "vault-plugin-secrets-cmk"

// Server is a Vault process started here.
type Server struct {
	VaultBin  string
	PluginBin string
	SoftHSM   *softhsmtest.Env
	Dir       string
	Addr      string // host:port on 127.0.0.1
	RootToken string
	LogPath   string
	PluginDir string
	Args      []string
	Client    *api.Client
	PluginEnv []string // more environment for the plugin, given at registration (the soak's fault rate)
	// LogLevel is Vault's -log-level when set. At debug, Vault's log keeps the plugin's stderr, and so its crash
	// traces.
	LogLevel string
	// RawStorage starts the dev server with raw_storage_endpoint = true: sys/raw reads and writes its storage as
	// someone with access to Vault's storage could (the tamper tests of history).
	RawStorage bool

	cmd  *exec.Cmd
	done chan struct{}
}

// mounts numbers mounts and their tokens across every server of the process: token labels must be unique in
// the token directory, which all servers of a run share.
var mounts atomic.Int32

// FreeAddr returns a loopback address nothing listens on.
func FreeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// NewServer prepares a server in dir (not started): its own plugin directory holding the plugin binary.
func NewServer(dir, vaultBin, pluginBin string, env *softhsmtest.Env) (*Server, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	addr, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	s := &Server{VaultBin: vaultBin, PluginBin: pluginBin, SoftHSM: env, Dir: dir, Addr: addr,
		PluginDir: filepath.Join(dir, "plugins"), LogPath: filepath.Join(dir, "vault.log")}
	if err := os.MkdirAll(s.PluginDir, 0o755); err != nil {
		return nil, err
	}
	return s, CopyFile(pluginBin, filepath.Join(s.PluginDir, PluginName))
}

// StartDev starts `vault server -dev` in dir with the plugin registered.
func StartDev(dir, vaultBin, pluginBin string, env *softhsmtest.Env) (*Server, error) {
	s, err := NewServer(dir, vaultBin, pluginBin, env)
	if err != nil {
		return nil, err
	}
	if err := s.StartDevMode("e2e-root"); err != nil {
		return nil, err
	}
	if err := s.RegisterPlugin(pluginBin, "", ""); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// StartDevMode starts the prepared server as `vault server -dev` with the given root token, the plugin not yet
// registered (callers that register it with more environment do so themselves).
func (s *Server) StartDevMode(rootToken string) error {
	s.RootToken = rootToken
	// -dev-no-store-token: a dev server otherwise writes its root token through ~/.vault-token.tmp, a name every
	// server of a parallel run shares; one server's rename then loses to another's and Vault exits at start.
	s.Args = []string{"server", "-dev", "-dev-no-store-token", "-dev-root-token-id=" + s.RootToken, "-dev-listen-address=" + s.Addr, "-dev-plugin-dir=" + s.PluginDir}
	if s.RawStorage {
		// Vault merges a -config file into the dev server's configuration.
		conf := filepath.Join(s.Dir, "raw-storage.hcl")
		if err := os.WriteFile(conf, []byte("raw_storage_endpoint = true\n"), 0o600); err != nil {
			return err
		}
		s.Args = append(s.Args, "-config="+conf)
	}
	if s.LogLevel != "" {
		s.Args = append(s.Args, "-log-level="+s.LogLevel)
	}
	return s.Start()
}

// StopOnInterrupt stops the server and exits when the process is interrupted (Ctrl-C in make bench or soak).
func (s *Server) StopOnInterrupt() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-signals
		s.Stop()
		os.Exit(130)
	}()
}

// CopyFile copies src to dst (executable), replacing dst atomically.
func CopyFile(src, dst string) error {
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

// Start runs the server and waits until it answers (sealed or not).
func (s *Server) Start() error {
	logf, err := os.OpenFile(s.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	s.cmd = exec.Command(s.VaultBin, s.Args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.Env = append(os.Environ(), "VAULT_ADDR=", "VAULT_TOKEN=", "SOFTHSM2_CONF="+s.SoftHSM.Conf)
	// The server dies with the process that started it, even if that one is killed or exits without Stop.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := s.cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	done := make(chan struct{})
	s.done = done
	cmd := s.cmd
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	cfg := api.DefaultConfig()
	cfg.Address = "http://" + s.Addr
	cfg.MaxRetries = 0
	client, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	client.SetToken(s.RootToken)
	s.Client = client
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("vault exited early; log %s:\n%s", s.LogPath, Tail(s.LogPath, 20))
		default:
		}
		if _, err := client.Sys().SealStatus(); err == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	s.Stop()
	return fmt.Errorf("vault did not answer within 60s; log:\n%s", Tail(s.LogPath, 20))
}

// Stop ends the server by the process id this package started, and waits for it.
func (s *Server) Stop() {
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

// PID is the server's process id, 0 before it starts.
func (s *Server) PID() int {
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// PluginPIDs lists the running processes of this server's plugins (children whose binary is in its plugin
// directory), for memory figures.
func (s *Server) PluginPIDs() []int {
	if s.cmd == nil || s.cmd.Process == nil {
		return nil
	}
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(fields) < 2 || fields[1] != strconv.Itoa(s.cmd.Process.Pid) {
			continue
		}
		exe, _ := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if strings.HasPrefix(exe, s.PluginDir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// CMKPluginPIDs are the server's processes of this engine's plugin, not of the other plugins a run mounts.
func (s *Server) CMKPluginPIDs() []int {
	var pids []int
	for _, pid := range s.PluginPIDs() {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); strings.HasSuffix(exe, PluginName) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// PluginRSSMB is the resident memory of this server's cmk plugin processes, in MB.
func (s *Server) PluginRSSMB() float64 {
	var total float64
	for _, pid := range s.CMKPluginPIDs() {
		total += ProcessRSSMB(pid)
	}
	return total
}

// ProcessRSSMB is a process's resident memory (VmRSS) in MB, 0 if it cannot be read.
func ProcessRSSMB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// Tail returns the last n lines of a file.
func Tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// FileSHA256 is the hex SHA-256 of a file.
func FileSHA256(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// RegisterPlugin registers the binary at src (copied into the plugin directory, under a versioned command when
// version is set) by its SHA-256, with the PKCS#11 module and SoftHSM configuration in its environment, as an
// operator would. name defaults to PluginName.
func (s *Server) RegisterPlugin(src, version, name string) error {
	if name == "" {
		name = PluginName
	}
	command := name
	if version != "" {
		command = name + "-" + version
	}
	if src != filepath.Join(s.PluginDir, command) {
		if err := CopyFile(src, filepath.Join(s.PluginDir, command)); err != nil {
			return err
		}
	}
	sum, err := FileSHA256(filepath.Join(s.PluginDir, command))
	if err != nil {
		return err
	}
	return s.Client.Sys().RegisterPluginWithContext(context.Background(), &api.RegisterPluginInput{
		Name:    name,
		Type:    api.PluginTypeSecrets,
		Command: command,
		SHA256:  sum,
		Version: version,
		Env:     append([]string{"CMK_PKCS11_LIBRARY=" + s.SoftHSM.Library, "SOFTHSM2_CONF=" + s.SoftHSM.Conf}, s.PluginEnv...),
	})
}

// RegisterPluginOn registers the plugin binary at src once more under name, with env as its whole module
// environment (CMK_PKCS11_LIBRARY and what that module reads): one plugin process per PKCS#11 implementation, as
// an operator with two HSMs would register it twice.
func (s *Server) RegisterPluginOn(src, name string, env []string) error {
	if err := CopyFile(src, filepath.Join(s.PluginDir, name)); err != nil {
		return err
	}
	sum, err := FileSHA256(filepath.Join(s.PluginDir, name))
	if err != nil {
		return err
	}
	return s.Client.Sys().RegisterPluginWithContext(context.Background(), &api.RegisterPluginInput{
		Name: name, Type: api.PluginTypeSecrets, Command: name, SHA256: sum, Env: env,
	})
}

// Mount is one mount of the engine and the token it is configured on.
type Mount struct {
	Path  string // without trailing slash
	Label string
	PIN   string
}

// NewMount creates a token and mounts the engine, configured on it, at a fresh path starting with prefix.
func (s *Server) NewMount(prefix string) (Mount, error) {
	n := mounts.Add(1)
	m := Mount{Path: fmt.Sprintf("%s%d", prefix, n), Label: fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), n), PIN: fmt.Sprintf("pin-%d-7Qx", n)}
	if err := s.SoftHSM.CreateToken(m.Label, m.PIN); err != nil {
		return m, err
	}
	return m, s.MountOn(m)
}

// MountOn mounts the engine at m.Path and configures it on m's token.
func (s *Server) MountOn(m Mount) error {
	if err := s.Client.Sys().Mount(m.Path, &api.MountInput{Type: PluginName}); err != nil {
		return fmt.Errorf("mount %s: %w", m.Path, err)
	}
	if _, err := s.Client.Logical().Write(m.Path+"/config/hsm", map[string]interface{}{"token_label": m.Label, "pin": m.PIN}); err != nil {
		return fmt.Errorf("config/hsm on %s: %w", m.Path, err)
	}
	return nil
}

// CLI runs the vault command against the server with token, as a user at a shell would.
func (s *Server) CLI(token string, args ...string) (string, error) {
	cmd := exec.Command(s.VaultBin, args...)
	cmd.Env = append(os.Environ(), "VAULT_ADDR=http://"+s.Addr, "VAULT_TOKEN="+token, "VAULT_FORMAT=")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}
