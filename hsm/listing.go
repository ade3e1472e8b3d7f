package hsm

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/miekg/pkcs11"
)

// Some modules (SoftHSM among them) fix their slot list at C_Initialize, so a token created since is found only
// by re-initialising, which disturbs every mount using the module. Whether the token exists at all is first asked
// of a fresh copy of the library in a child process: this process's own binary, started with listTokensEnv set,
// lists the initialised tokens it sees and exits before anything else of the program runs.
const (
	listTokensEnv       = "CMK_HSM_LIST_TOKENS_OF" // the library's path
	listTokensParamsEnv = "CMK_HSM_LIST_TOKENS_PARAMS"
	listTokensTimeout   = 20 * time.Second
)

// listedToken is one initialised token of the child's listing.
type listedToken struct {
	Slot  uint   `json:"slot"`
	Label string `json:"label"`
}

func init() {
	if lib := os.Getenv(listTokensEnv); lib != "" {
		os.Exit(listTokens(lib, os.Getenv(listTokensParamsEnv)))
	}
}

// listTokens is the child: it writes the library's initialised tokens to standard output as JSON.
func listTokens(lib, params string) int {
	ctx := pkcs11.New(lib)
	if ctx == nil {
		fmt.Fprintf(os.Stderr, "cannot load PKCS#11 library %q\n", lib)
		return 2
	}
	m := &module{ctx: ctx, params: params}
	if err := m.initialize(); err != nil {
		fmt.Fprintf(os.Stderr, "C_Initialize: %v\n", err)
		return 2
	}
	defer ctx.Finalize()
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		fmt.Fprintf(os.Stderr, "C_GetSlotList: %v\n", err)
		return 2
	}
	tokens := []listedToken{}
	for _, s := range slots {
		if ti, err := ctx.GetTokenInfo(s); err == nil && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			tokens = append(tokens, listedToken{Slot: s, Label: strings.TrimSpace(ti.Label)})
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(tokens); err != nil {
		return 2
	}
	return 0
}

// listedByFreshLibrary reports whether a fresh copy of the library at path lists the token cfg names.
func listedByFreshLibrary(path, params string, cfg Config) (bool, error) {
	exe, err := os.Executable()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), listTokensTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(), listTokensEnv+"="+path, listTokensParamsEnv+"="+params)
	out, err := cmd.Output()
	if err != nil {
		return false, fmt.Errorf("listing the tokens with a fresh copy of the library: %w", err)
	}
	var tokens []listedToken
	if err := json.Unmarshal(out, &tokens); err != nil {
		return false, fmt.Errorf("listing the tokens with a fresh copy of the library: %w", err)
	}
	for _, t := range tokens {
		if (cfg.TokenLabel != "" && t.Label == cfg.TokenLabel) || (cfg.TokenLabel == "" && t.Slot == cfg.Slot) {
			return true, nil
		}
	}
	return false, nil
}
