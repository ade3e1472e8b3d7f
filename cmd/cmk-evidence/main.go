// Command cmk-evidence checks an evidence bundle from the cmk secrets engine (keys/:name/evidence) with the audit
// public key alone, and writes a self-contained HTML report of it for an auditor. It needs no Vault, no HSM and no
// network: what it trusts is the audit public key it is given, never the keys the bundle lists.
//
//	cmk-evidence verify --audit-key audit.pem [--previous earlier.json] bundle.json
//	cmk-evidence report --audit-key audit.pem [--previous earlier.json] -o report.html bundle.json
//
// Exit status: 0 when the bundle verifies whole, 1 when it does not (report still writes the report), 2 on a
// usage error (a missing flag or file, an unreadable audit key).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

const (
	exitVerified = 0
	exitFailed   = 1
	exitUsage    = 2
)

// usageError is a mistake in how the tool was called: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, args ...interface{}) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

const usageText = `usage:
  cmk-evidence verify --audit-key KEY[,KEY...] [--previous EARLIER] BUNDLE
  cmk-evidence report --audit-key KEY[,KEY...] [--previous EARLIER] -o REPORT.html BUNDLE

BUNDLE is keys/:name/evidence as the engine returns it, bare or as "vault read -format=json" writes it; "-" reads
it from standard input. KEY is a PEM public key file ("N=file.pem" says it is audit key version N) or the JSON
"vault read -format=json cmk/audit_key" writes. EARLIER is a bundle of the same key kept from before: the history
must go on from it (a rollback of the engine's storage to an older signed head verifies alone, not against it).
Exit status: 0 verified, 1 not verified, 2 usage error.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run is the command without the process: its exit status for args.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	var err error
	var verified bool
	switch args[0] {
	case "verify":
		verified, err = verifyCommand(args[1:], stdin, stdout)
	case "report":
		verified, err = reportCommand(args[1:], stdin, stdout)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return exitVerified
	default:
		err = usageErrorf("unknown command %q", args[0])
	}
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "cmk-evidence: %v\n\n%s", err, usageText)
		return exitUsage
	case err != nil:
		fmt.Fprintf(stderr, "cmk-evidence: %v\n", err)
		return exitFailed
	case !verified:
		return exitFailed
	}
	return exitVerified
}

// commandFlags are the flags both commands take.
type commandFlags struct {
	auditKeys []string
	output    string
	bundle    string
	previous  string // an earlier bundle of the same key, that this one's history must go on from
}

type listFlag struct{ values *[]string }

func (l listFlag) String() string {
	if l.values == nil {
		return ""
	}
	return strings.Join(*l.values, ",")
}
func (l listFlag) Set(v string) error { *l.values = append(*l.values, v); return nil }

// parseFlags reads a command's flags, which may come before or after the bundle's path.
func parseFlags(name string, args []string, withOutput bool) (*commandFlags, error) {
	f := &commandFlags{}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Var(listFlag{&f.auditKeys}, "audit-key", "audit public key: PEM file (N=file.pem for version N) or audit_key's JSON; repeat or comma-separate")
	fs.StringVar(&f.previous, "previous", "", "an earlier bundle of the same key: the history must go on from it")
	if withOutput {
		fs.StringVar(&f.output, "o", "", "the HTML report to write")
	}
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, usageErrorf("%s: help requested", name)
			}
			return nil, usageErrorf("%s: %v", name, err)
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(positional) != 1 {
		return nil, usageErrorf("%s takes one bundle file, got %d", name, len(positional))
	}
	f.bundle = positional[0]
	if withOutput && f.output == "" {
		return nil, usageErrorf("%s: -o REPORT.html is required", name)
	}
	return f, nil
}

func readBundle(path string, stdin io.Reader) ([]byte, error) {
	var raw []byte
	var err error
	if path == "-" {
		raw, err = io.ReadAll(stdin)
	} else {
		raw, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, usageErrorf("bundle: %v", err)
	}
	return raw, nil
}

// readPrevious reads the earlier bundle --previous names; nil when none is named.
func readPrevious(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, usageErrorf("--previous: %v", err)
	}
	return raw, nil
}

func verifyCommand(args []string, stdin io.Reader, stdout io.Writer) (bool, error) {
	f, err := parseFlags("verify", args, false)
	if err != nil {
		return false, err
	}
	keys, err := loadAuditKeys(f.auditKeys)
	if err != nil {
		return false, err
	}
	raw, err := readBundle(f.bundle, stdin)
	if err != nil {
		return false, err
	}
	prev, err := readPrevious(f.previous)
	if err != nil {
		return false, err
	}
	r := checkBundle(raw, keys, prev)
	r.writeText(stdout)
	return r.OK, nil
}

func reportCommand(args []string, stdin io.Reader, stdout io.Writer) (bool, error) {
	f, err := parseFlags("report", args, true)
	if err != nil {
		return false, err
	}
	keys, err := loadAuditKeys(f.auditKeys)
	if err != nil {
		return false, err
	}
	raw, err := readBundle(f.bundle, stdin)
	if err != nil {
		return false, err
	}
	prev, err := readPrevious(f.previous)
	if err != nil {
		return false, err
	}
	r := checkBundle(raw, keys, prev)
	out, err := os.Create(f.output)
	if err != nil {
		return false, usageErrorf("-o: %v", err)
	}
	if err := writeReport(out, r); err != nil {
		out.Close()
		return false, fmt.Errorf("writing %s: %w", f.output, err)
	}
	if err := out.Close(); err != nil {
		return false, fmt.Errorf("writing %s: %w", f.output, err)
	}
	r.writeText(stdout)
	fmt.Fprintf(stdout, "report: %s\n", f.output)
	return r.OK, nil
}
