// Package tokentest makes PKCS#11 tokens for tests, of each implementation in the engine's matrix: SoftHSMv2,
// NSS softokn, opencryptoki's software token and tpm2-pkcs11 on swtpm. Tokens are made by the test run, in its own
// directory where the implementation allows (opencryptoki keeps its one software token under
// /var/lib/opencryptoki: it is made only where none exists, and removed again); every daemon a token needs is
// started here and stopped by the process id started, never by name.
//
// Module parameters are per process (SOFTHSM2_CONF, TPM2_PKCS11_STORE…, C_Initialize's arguments), so Setup sets
// the environment and belongs in TestMain, before anything loads a module.
package tokentest

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Kind names a PKCS#11 implementation of the matrix.
type Kind string

const (
	SoftHSM      Kind = "softhsm"
	NSS          Kind = "nss"
	OpenCryptoki Kind = "opencryptoki"
	TPM2         Kind = "tpm2"
)

// Kinds is the whole matrix, in the order tests run it.
var Kinds = []Kind{SoftHSM, NSS, OpenCryptoki, TPM2}

// Token is a token a test may use: what the engine needs to log in, and what the plugin process needs in its
// environment to load the module the same way.
type Token struct {
	Kind       Kind
	Library    string
	InitParams string // the module's C_Initialize parameters (CMK_PKCS11_INIT_PARAMS)
	Label      string
	PIN        string
	// Env is the environment the module reads (SOFTHSM2_CONF, TPM2_PKCS11_*), as NAME=value.
	Env []string
	// Shared: every test of the run gets this one token (the implementation has one per process or machine);
	// tests keep apart by their own CKA_IDs and never count the token's objects.
	Shared bool
}

// Provider makes tokens of one kind for a test run.
type Provider struct {
	Kind Kind
	dir  string
	tok  Token // the run's token, for kinds with one
	make func(label string) (Token, error)
	stop []func()
	n    atomic.Int32
}

// Selected is the matrix a run covers: CMK_TOKENS (a comma-separated list of kinds) when set, else every kind.
func Selected() []Kind {
	v := strings.TrimSpace(os.Getenv("CMK_TOKENS"))
	if v == "" {
		return Kinds
	}
	var out []Kind
	for _, k := range strings.Split(v, ",") {
		out = append(out, Kind(strings.TrimSpace(k)))
	}
	return out
}

// Setup prepares kind's tokens under dir: configuration, daemons, and for kinds with one token per run, that token.
func Setup(kind Kind, dir string) (*Provider, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &Provider{Kind: kind, dir: dir}
	var err error
	switch kind {
	case SoftHSM:
		err = p.setupSoftHSM()
	case NSS:
		err = p.setupNSS()
	case OpenCryptoki:
		err = p.setupOpenCryptoki()
	case TPM2:
		err = p.setupTPM2()
	default:
		err = fmt.Errorf("unknown token kind %q (known: %v)", kind, Kinds)
	}
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("%s: %w", kind, err)
	}
	return p, nil
}

// Token returns a token for one test: a new one where the implementation can make many, else the run's token.
func (p *Provider) Token(prefix string) (Token, error) {
	if p.make == nil {
		return p.tok, nil
	}
	return p.make(fmt.Sprintf("%s-%d-%d", prefix, os.Getpid()%100000, p.n.Add(1)))
}

// Close stops what Setup started, in reverse order, and removes what it made outside dir.
func (p *Provider) Close() {
	for i := len(p.stop) - 1; i >= 0; i-- {
		p.stop[i]()
	}
	p.stop = nil
}

// run runs a command and returns its combined output, with the command in the error.
func run(env []string, stdin string, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// daemon is a process started here, stopped by its pid.
type daemon struct {
	cmd  *exec.Cmd
	done chan struct{}
	once sync.Once
}

func startDaemon(env []string, logPath string, name string, args ...string) (*daemon, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// The daemon dies with the test process, even one that crashes before it can stop it (SIGKILL: pkcsslotd
	// ignores SIGTERM).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(d.done)
	}()
	return d, nil
}

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop ends the process by the pid started: SIGTERM, then SIGKILL after 10 s.
func (d *daemon) stopIt() {
	d.once.Do(func() {
		_ = d.cmd.Process.Signal(os.Interrupt)
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
			_ = d.cmd.Process.Kill()
			<-d.done
		}
	})
}

// waitFor polls ready until it reports true, the daemon exits, or 15 s pass.
func waitFor(d *daemon, what string, ready func() bool) error {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if ready() {
			return nil
		}
		if d != nil && d.exited() {
			return fmt.Errorf("%s exited before it was ready", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after 15 s", what)
}

func need(cmds ...string) error {
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			return fmt.Errorf("%s not found (make deps installs it): %w", c, err)
		}
	}
	return nil
}

func needFile(paths ...string) (string, error) {
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("none of %v exists (make deps installs it)", paths)
}
