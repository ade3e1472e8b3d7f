// Package softhsmtest gives tests a SoftHSMv2 token directory of their own, so that they never touch a token
// they did not create. SoftHSM reads SOFTHSM2_CONF at C_Initialize, and the module is initialised once per
// process, so Setup belongs in TestMain, before anything opens the module.
package softhsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// DefaultLibrary is Debian's SoftHSMv2 module.
const DefaultLibrary = "/usr/lib/softhsm/libsofthsm2.so"

// Env is a SoftHSM configuration whose token directory belongs to the test run.
type Env struct {
	Dir     string // token directory
	Conf    string // softhsm2.conf path, exported as SOFTHSM2_CONF
	Library string // PKCS#11 module path
}

// Library is the module under test: CMK_PKCS11_LIBRARY when set, else Debian's SoftHSM.
func Library() string {
	if l := os.Getenv("CMK_PKCS11_LIBRARY"); l != "" {
		return l
	}
	return DefaultLibrary
}

// Setup writes a softhsm2.conf under root with its own token directory and points SOFTHSM2_CONF at it.
func Setup(root string) (*Env, error) {
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		return nil, fmt.Errorf("softhsm2-util not found (install Debian's softhsm2; 'make test' does): %w", err)
	}
	if _, err := os.Stat(Library()); err != nil {
		return nil, fmt.Errorf("PKCS#11 module: %w", err)
	}
	dir := filepath.Join(root, "tokens")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	conf := filepath.Join(root, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", dir)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		return nil, err
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return nil, err
	}
	return &Env{Dir: dir, Conf: conf, Library: Library()}, nil
}

// CreateToken initialises a new token with the given label and user PIN in the environment's directory.
func (e *Env) CreateToken(label, pin string) error {
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", pin+"-so")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+e.Conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("softhsm2-util --init-token %s: %v: %s", label, err, out)
	}
	return nil
}
