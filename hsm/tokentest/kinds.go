package tokentest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
)

// SoftHSMv2: a token directory of the run's own, a new token per test.
func (p *Provider) setupSoftHSM() error {
	env, err := softhsmtest.Setup(p.dir)
	if err != nil {
		return err
	}
	p.make = func(label string) (Token, error) {
		pin := "1234-test"
		if err := env.CreateToken(label, pin); err != nil {
			return Token{}, err
		}
		return Token{Kind: SoftHSM, Library: env.Library, Label: label, PIN: pin, Env: []string{"SOFTHSM2_CONF=" + env.Conf}}, nil
	}
	return nil
}

// NSS softokn: a key database of the run's own, named by the module's C_Initialize parameters. The module is
// initialised once per process with one database, so the run has one token: "NSS Certificate DB", whose PIN is the
// database password.
func (p *Provider) setupNSS() error {
	if err := need("certutil"); err != nil {
		return err
	}
	lib, err := needFile("/usr/lib/x86_64-linux-gnu/libsoftokn3.so", "/usr/lib/x86_64-linux-gnu/nss/libsoftokn3.so", "/usr/lib64/libsoftokn3.so")
	if err != nil {
		return err
	}
	db := filepath.Join(p.dir, "nssdb")
	if err := os.MkdirAll(db, 0o700); err != nil {
		return err
	}
	pin := "nss-test-pin-1"
	pwfile := filepath.Join(p.dir, "password")
	if err := os.WriteFile(pwfile, []byte(pin+"\n"), 0o600); err != nil {
		return err
	}
	if _, err := run(nil, "", "certutil", "-N", "-d", "sql:"+db, "-f", pwfile); err != nil {
		return err
	}
	p.tok = Token{Kind: NSS, Library: lib, Label: "NSS Certificate DB", PIN: pin, Shared: true,
		InitParams: fmt.Sprintf("configdir='sql:%s' certPrefix='' keyPrefix='' secmod='' flags=", db)}
	return nil
}

// opencryptoki's software token. Its daemon (pkcsslotd) and its token are one per machine, at fixed places: the
// daemon is started here in the foreground and stopped by its pid, and the token is initialised only where no
// software token exists, marked as the run's, and removed when the run ends. A token left by an earlier run that
// died is recognised by the mark and removed first; any other is never touched.
const (
	ockDir    = "/var/lib/opencryptoki/swtok"
	ockSocket = "/var/run/pkcsslotd.socket"
	ockMark   = ".cmk-test-token"
)

func (p *Provider) setupOpenCryptoki() error {
	if err := need("pkcsslotd", "pkcsconf"); err != nil {
		return err
	}
	lib, err := needFile("/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so.0", "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so", "/usr/lib64/opencryptoki/libopencryptoki.so")
	if err != nil {
		return err
	}
	// A running daemon first: it may be another run's, alive, whose marked token must not be removed under it (a
	// second test process did that once, failing every opencryptoki test of a CI run in progress).
	if pid, running := slotDaemonRunning(); running {
		return fmt.Errorf("a pkcsslotd this run did not start is running (pid %d): stop it, or set CMK_TOKENS without opencryptoki", pid)
	}
	removeOpenCryptokiToken() // only a token an earlier run made, marked, and left when it died
	shmBefore, _ := filepath.Glob("/dev/shm/var.lib.opencryptoki.*")
	d, err := startDaemon(nil, filepath.Join(p.dir, "pkcsslotd.log"), "pkcsslotd", "-f")
	if err != nil {
		return err
	}
	p.stop = append(p.stop, func() { removeNewShm(shmBefore) }, d.stopIt) // the daemon stops first
	// Not a bare connection to its socket to see whether it is up: pkcsslotd 3.8 exits when a client connects and
	// goes without a word.
	if err := waitFor(d, "pkcsslotd", func() bool { _, err := os.Stat(ockSocket); return err == nil }); err != nil {
		return err
	}
	var slot string
	var initialized bool
	if err := waitFor(d, "pkcsslotd's slots", func() bool { // the socket is up before the slot table is
		slot, initialized, err = openCryptokiSoftSlot()
		return err == nil
	}); err != nil {
		return err
	}
	if initialized {
		return fmt.Errorf("%s holds an initialised software token this test run did not make: it is left alone (set CMK_TOKENS without opencryptoki to skip it)", ockDir)
	}
	if err := os.WriteFile(filepath.Join(ockDir, ockMark), []byte("made by a vault-plugin-secrets-cmk test run\n"), 0o600); err != nil {
		return err
	}
	p.stop = append(p.stop, removeOpenCryptokiToken) // runs after the daemon stops (reverse order)
	// PINs are 4 to 8 characters. The token starts with SO PIN 87654321 and must have both PINs changed.
	const so, user = "87654321", "pin-4711"
	steps := [][]string{
		{"-I", "-c", slot, "-S", so},
		{"-P", "-c", slot, "-S", so, "-n", "so-test1"},
		{"-u", "-c", slot, "-S", "so-test1", "-n", "12345678"},
		{"-p", "-c", slot, "-U", "12345678", "-n", user},
	}
	for i, args := range steps {
		stdin := ""
		if i == 0 {
			stdin = "cmk-ock-test\n" // the label, asked for on standard input
		}
		if _, err := run(nil, stdin, "pkcsconf", args...); err != nil {
			return err
		}
	}
	p.tok = Token{Kind: OpenCryptoki, Library: lib, Label: "cmk-ock-test", PIN: user, Shared: true}
	return nil
}

// slotDaemonRunning reports whether the pid in pkcsslotd's pid file is a live pkcsslotd.
func slotDaemonRunning() (int, bool) {
	b, err := os.ReadFile("/var/run/pkcsslotd.pid")
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false
	}
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return pid, err == nil && strings.TrimSpace(string(comm)) == "pkcsslotd"
}

// openCryptokiSoftSlot finds the slot of the software token ("IBM SoftTok") in pkcsconf's listing, and whether
// the token is initialised.
func openCryptokiSoftSlot() (slot string, initialized bool, err error) {
	out, err := run(nil, "", "pkcsconf", "-t")
	if err != nil {
		return "", false, err
	}
	soft := false
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "Token #"):
			if soft {
				return slot, initialized, nil
			}
			slot, initialized = strings.TrimSuffix(strings.TrimPrefix(line, "Token #"), " Info:"), false
		case strings.HasPrefix(line, "Model:") && strings.Contains(line, "SoftTok"):
			soft = true
		case strings.HasPrefix(line, "Flags:") && strings.Contains(line, "TOKEN_INITIALIZED"):
			initialized = true
		}
	}
	if soft {
		return slot, initialized, nil
	}
	return "", false, fmt.Errorf("no software token in pkcsconf -t:\n%s", out)
}

// removeNewShm removes the shared-memory segments opencryptoki made since before (the daemon's, per slot).
func removeNewShm(before []string) {
	now, _ := filepath.Glob("/dev/shm/var.lib.opencryptoki.*")
	for _, f := range now {
		old := false
		for _, b := range before {
			old = old || b == f
		}
		if !old {
			_ = os.Remove(f)
		}
	}
}

// removeOpenCryptokiToken removes the run's software token: its master keys, its token file and its objects.
func removeOpenCryptokiToken() {
	if _, err := os.Stat(filepath.Join(ockDir, ockMark)); err != nil {
		return
	}
	for _, f := range []string{"MK_SO", "MK_USER", "NVTOK.DAT"} {
		_ = os.Remove(filepath.Join(ockDir, f))
	}
	objs, _ := filepath.Glob(filepath.Join(ockDir, "TOK_OBJ", "*"))
	for _, o := range objs {
		_ = os.Remove(o)
	}
	_ = os.Remove(filepath.Join(ockDir, ockMark))
}

// tpm2-pkcs11 on swtpm: a software TPM on loopback, a D-Bus session bus of the run's own and tpm2-abrmd on it
// (without a resource manager the TPM runs out of object contexts at once), a token store in the run's directory.
func (p *Provider) setupTPM2() error {
	if err := need("swtpm", "dbus-daemon", "tpm2-abrmd", "tpm2_ptool"); err != nil {
		return err
	}
	lib, err := needFile("/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so.1", "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so")
	if err != nil {
		return err
	}
	if _, err := needFile("/usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0"); err != nil {
		return err
	}
	state, store := filepath.Join(p.dir, "tpm-state"), filepath.Join(p.dir, "tpm-store")
	for _, d := range []string{state, store} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	port, err := freePortPair()
	if err != nil {
		return err
	}
	swtpm, err := startDaemon(nil, filepath.Join(p.dir, "swtpm.log"), "swtpm", "socket", "--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
		"--tpmstate", "dir="+state, "--flags", "not-need-init,startup-clear")
	if err != nil {
		return err
	}
	p.stop = append(p.stop, swtpm.stopIt)
	if err := waitFor(swtpm, "swtpm", func() bool {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
		}
		return err == nil
	}); err != nil {
		return err
	}
	bus := filepath.Join(p.dir, "bus")
	dbus, err := startDaemon(nil, filepath.Join(p.dir, "dbus.log"), "dbus-daemon", "--session", "--nofork", "--nopidfile",
		"--address=unix:path="+bus)
	if err != nil {
		return err
	}
	p.stop = append(p.stop, dbus.stopIt)
	if err := waitFor(dbus, "dbus-daemon", func() bool { _, err := os.Stat(bus); return err == nil }); err != nil {
		return err
	}
	env := []string{"DBUS_SESSION_BUS_ADDRESS=unix:path=" + bus, "TPM2_PKCS11_TCTI=tabrmd:bus_type=session",
		"TPM2TOOLS_TCTI=tabrmd:bus_type=session", "TPM2_PKCS11_STORE=" + store}
	args := []string{"--session", fmt.Sprintf("--tcti=swtpm:host=127.0.0.1,port=%d", port)}
	if os.Geteuid() == 0 {
		args = append(args, "--allow-root")
	}
	abrmd, err := startDaemon(env, filepath.Join(p.dir, "abrmd.log"), "tpm2-abrmd", args...)
	if err != nil {
		return err
	}
	p.stop = append(p.stop, abrmd.stopIt)
	if err := waitFor(abrmd, "tpm2-abrmd", func() bool {
		_, err := run(env, "", "tpm2_ptool", "init", "--path="+store)
		return err == nil
	}); err != nil {
		return err
	}
	const so, user = "tpm-so-1234", "tpm-user-1234"
	if _, err := run(env, "", "tpm2_ptool", "addtoken", "--pid=1", "--sopin="+so, "--userpin="+user, "--label=cmk-tpm-test", "--path="+store); err != nil {
		return err
	}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if err := os.Setenv(k, v); err != nil {
			return err
		}
	}
	p.tok = Token{Kind: TPM2, Library: lib, Label: "cmk-tpm-test", PIN: user, Env: env, Shared: true}
	return nil
}

// freePortPair returns a port on 127.0.0.1 that is free, with the next one free too.
func freePortPair() (int, error) {
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1))
		l.Close()
		if err == nil {
			l2.Close()
			return port, nil
		}
	}
	return 0, fmt.Errorf("no two consecutive free ports on 127.0.0.1")
}
