package main

import (
	"context"
	"fmt"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// chromiumPath is Debian's chromium, which scripts/install-deps.sh installs. The test fails without it: a report
// no browser has opened is not tested.
const chromiumPath = "/usr/bin/chromium"

// renderedReport is what a person sees of a report in the browser, read from its DOM after rendering.
type renderedReport struct {
	Verdict string   `json:"verdict"`
	Title   string   `json:"title"`
	Checks  []string `json:"checks"`
	Charts  []struct {
		Width, Height float64
		Paths, Texts  int
	} `json:"charts"`
	Marks          []string `json:"marks"`
	Broken         string   `json:"broken"`
	Scripts        int      `json:"scripts"`
	DetailAsText   bool     `json:"detailAsText"`
	CallerAsText   bool     `json:"callerAsText"`
	InjectedImages int      `json:"injectedImages"`
}

const readReport = `(() => ({
  verdict: document.getElementById('verdict-word').textContent.trim(),
  title: document.title,
  checks: Array.from(document.querySelectorAll('#verdict li')).map(e => e.textContent.trim()),
  charts: Array.from(document.querySelectorAll('.chart svg')).map(s => {
    const r = s.getBoundingClientRect();
    return {Width: r.width, Height: r.height, Paths: s.querySelectorAll('path').length, Texts: s.querySelectorAll('text').length};
  }),
  marks: Array.from(document.querySelectorAll('#history-table tr[data-mark]')).map(r => r.dataset.mark),
  broken: Array.from(document.querySelectorAll('#history-table tr.broken td')).map(td => td.textContent.trim()).join(' | '),
  scripts: document.scripts.length,
  detailAsText: document.body.textContent.includes('<script>document.title="pwned"'),
  callerAsText: Array.from(document.querySelectorAll('.chart svg text')).some(t => t.textContent.includes('<b>evil</b>')),
  injectedImages: document.images.length,
}))()`

// browser starts headless Chromium on a user data directory of its own, for the test only.
func browser(t *testing.T) context.Context {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Fatalf("headless Chromium is needed to test the report (make deps installs Debian's chromium): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath),
		chromedp.Flag("headless", true),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.NoFirstRun,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1200, 900),
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	t.Cleanup(cancelAlloc)
	browserCtx, cancelBrowser := chromedp.NewContext(allocCtx)
	t.Cleanup(cancelBrowser)
	if err := chromedp.Do(browserCtx); err != nil { // starts the browser
		t.Fatalf("starting %s: %v", chromiumPath, err)
	}
	return browserCtx
}

// open renders the report at path in a new tab. It fails the test on any console error, uncaught exception,
// error log entry, or request for anything but the report itself.
func open(t *testing.T, browserCtx context.Context, path string) renderedReport {
	t.Helper()
	tab, cancel := chromedp.NewContext(browserCtx)
	defer cancel()
	url := "file://" + path
	var mu sync.Mutex
	var problems []string
	listening := chromedp.Listen(tab, func(ev any) { // fast, no commands: it runs on the tab's reader
		mu.Lock()
		defer mu.Unlock()
		switch e := ev.(type) {
		case *runtime.EventConsoleAPICalled:
			if e.Type == runtime.ConsoleAPICalledTypeError || e.Type == runtime.ConsoleAPICalledTypeAssert {
				var args []string
				for _, a := range e.Args {
					args = append(args, string(a.Value))
				}
				problems = append(problems, fmt.Sprintf("console %s: %s", e.Type, strings.Join(args, " ")))
			}
		case *runtime.EventExceptionThrown:
			problems = append(problems, fmt.Sprintf("exception: %s line %d: %s", e.ExceptionDetails.URL, e.ExceptionDetails.LineNumber, e.ExceptionDetails.Text))
		case *log.EventEntryAdded:
			if e.Entry.Level == log.EntryLevelError {
				problems = append(problems, fmt.Sprintf("log %s: %s %s", e.Entry.Source, e.Entry.Text, e.Entry.URL))
			}
		case *network.EventRequestWillBeSent:
			if e.Request.URL != url {
				problems = append(problems, "request for "+e.Request.URL)
			}
		}
	})
	if listening != nil {
		t.Fatalf("opening a tab: %v", listening)
	}
	if err := chromedp.Do(tab, chromedp.Navigate(url), chromedp.WaitVisible(chromedp.ID("verdict-word"))); err != nil {
		t.Fatalf("rendering %s: %v", path, err)
	}
	got, err := chromedp.Run(tab, chromedp.Evaluate[renderedReport](readReport))
	if err != nil {
		t.Fatalf("reading the rendered %s: %v", path, err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, p := range problems {
		t.Errorf("%s: %s", path, p)
	}
	return got
}

func TestReportRendersInChromium(t *testing.T) {
	f := newFixture(t)
	report := func(name, bundle string, wantExit int) string {
		out := f.dir + "/" + name + ".html"
		if code, stdout, stderr := runTool("report", "--audit-key", f.pemKey, "-o", out, bundle); code != wantExit {
			t.Fatalf("%s: exit %d, want %d\n%s%s", name, code, wantExit, stdout, stderr)
		}
		return out
	}
	ctx := browser(t)

	good := open(t, ctx, report("good", f.bundle("good.json", f.document(f.events)), exitVerified))
	if good.Verdict != "VERIFIED" || !strings.HasPrefix(good.Title, "VERIFIED") {
		t.Errorf("an intact bundle's report says %q (title %q)", good.Verdict, good.Title)
	}
	if len(good.Charts) != 6 {
		t.Errorf("%d charts rendered, want 6", len(good.Charts))
	}
	for i, c := range good.Charts {
		if c.Width < 100 || c.Height < 50 || c.Paths < 3 || c.Texts < 3 {
			t.Errorf("chart %d did not render: %+v", i, c)
		}
	}
	if want := []string{"verified", "verified", "verified", "verified", "verified"}; !reflect.DeepEqual(good.Marks, want) {
		t.Errorf("marks %v, want %v", good.Marks, want)
	}
	// markup from the bundle is shown as text, never run or drawn
	if good.Scripts != 0 || good.InjectedImages != 0 || good.Title == "pwned" || !good.DetailAsText || !good.CallerAsText {
		t.Errorf("markup from the bundle was not shown as text: %+v", good)
	}

	tampered := tampered(t, f)
	for name, c := range map[string]struct {
		check  string // what the verdict must say
		marks  []string
		broken string
	}{
		"altered event": {"FAILED history: first broken event: index 2 (seq 3)",
			[]string{"unverified", "unverified", "broken", "verified", "verified"}, "2 | ✗ FIRST BROKEN | 3 |"},
		"deleted event": {"FAILED history: first broken event: index 2 (seq 4)",
			[]string{"unverified", "unverified", "broken", "verified"}, "2 | ✗ FIRST BROKEN | 4 |"},
		"reordered event": {"FAILED history: first broken event: index 2 (seq 4)",
			[]string{"unverified", "unverified", "broken", "unverified", "verified"}, "2 | ✗ FIRST BROKEN | 4 |"},
		"altered document": {"FAILED signature: the document's signature does not verify",
			[]string{"verified", "verified", "verified", "verified", "verified"}, ""},
	} {
		got := open(t, ctx, report(strings.ReplaceAll(name, " ", "-"), tampered[name].path, exitFailed))
		if got.Verdict != "FAILED" || !strings.HasPrefix(got.Title, "FAILED") {
			t.Errorf("%s: the report says %q (title %q)", name, got.Verdict, got.Title)
		}
		if !strings.Contains(strings.Join(got.Checks, "\n"), c.check) {
			t.Errorf("%s: the verdict does not say %q:\n%s", name, c.check, strings.Join(got.Checks, "\n"))
		}
		if !reflect.DeepEqual(got.Marks, c.marks) {
			t.Errorf("%s: marks %v, want %v", name, got.Marks, c.marks)
		}
		if !strings.HasPrefix(got.Broken, c.broken) || (c.broken == "") != (got.Broken == "") {
			t.Errorf("%s: the broken row reads %q, want it to start %q", name, got.Broken, c.broken)
		}
		if len(got.Charts) != 6 {
			t.Errorf("%s: %d charts", name, len(got.Charts))
		}
	}
}
