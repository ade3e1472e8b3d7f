package tests

import (
	"bytes"
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
)

// TestHostileInputThroughTheListener sends what a hostile or broken client would, through Vault's own HTTP
// listener to the plugin: 10 MB plaintexts, malformed JSON, wrong types, hostile key names, a batch one item over
// max_batch_size. Nothing is answered with a 500, the plugin keeps serving, and its memory stays bounded.
func TestHostileInputThroughTheListener(t *testing.T) {
	c := dev.Client
	m := newMount(t, dev)
	mustWrite(t, c, m.Path+"/keys/h", nil)
	mustWrite(t, c, m.Path+"/config/keys", map[string]interface{}{"max_batch_size": 100})
	// Built-in Transit on the same server is the reference for what Vault's own HTTP layer does with a request
	// before any engine sees it.
	transit := "transit-" + m.Path
	if err := c.Sys().Mount(transit, &api.MountInput{Type: "transit"}); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, c, transit+"/keys/h", nil)
	send := func(method, path, body string) (int, string) {
		req, err := http.NewRequest(method, "http://"+dev.Addr+"/v1/"+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("X-Vault-Token", dev.RootToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return resp.StatusCode, string(out)
	}
	big := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte("A"), 10<<20))
	nearCap := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte("B"), 700<<10)) // under the 1 MiB string cap
	items := func(n int) string {
		parts := make([]string, n)
		for i := range parts {
			parts[i] = `{"plaintext":"` + b64("x") + `"}`
		}
		return `{"batch_input":[` + strings.Join(parts, ",") + `]}`
	}
	cases := []struct {
		name, method, path, body string
	}{
		{"10 MB plaintext", "POST", m.Path + "/encrypt/h", `{"plaintext":"` + big + `"}`},
		{"10 MB plaintext in a batch", "POST", m.Path + "/encrypt/h", `{"batch_input":[{"plaintext":"` + big + `"}]}`},
		{"10 MB ciphertext", "POST", m.Path + "/decrypt/h", `{"ciphertext":"vault:v1:` + big + `"}`},
		{"10 MB hmac input", "POST", m.Path + "/hmac/h", `{"input":"` + big + `"}`},
		{"malformed JSON", "POST", m.Path + "/encrypt/h", `{"plaintext":`},
		{"JSON array body", "POST", m.Path + "/encrypt/h", `[1,2,3]`},
		{"plaintext of the wrong type", "POST", m.Path + "/encrypt/h", `{"plaintext":{"a":1}}`},
		{"batch of the wrong type", "POST", m.Path + "/encrypt/h", `{"batch_input":"nope"}`},
		{"batch items of the wrong type", "POST", m.Path + "/encrypt/h", `{"batch_input":[1,"x",null]}`},
		{"key_version of the wrong type", "POST", m.Path + "/encrypt/h", `{"plaintext":"eA==","key_version":"latest"}`},
		{"batch over max_batch_size", "POST", m.Path + "/encrypt/h", items(101)},
		{"empty body", "POST", m.Path + "/encrypt/h", ``},
		{"traversal key name", "POST", m.Path + "/keys/..%2Fx", `{}`},
		{"traversal key name (raw)", "POST", m.Path + "/keys/../x", `{}`},
		{"slash in key name", "POST", m.Path + "/encrypt/a/b", `{"plaintext":"eA=="}`},
		{"1,000-character key name", "POST", m.Path + "/keys/" + strings.Repeat("k", 1000), `{}`},
		{"unicode key name", "POST", m.Path + "/keys/" + "%E2%80%AE%F0%9F%94%91", `{}`},
		{"control characters in a key name", "POST", m.Path + "/keys/a%00b%0Ac", `{}`},
		{"config/hsm with a huge PIN", "POST", m.Path + "/config/hsm", `{"token_label":"` + m.Label + `","pin":"` + nearCap + `"}`},
	}
	for _, tc := range cases {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			code, body := send(tc.method, tc.path, tc.body)
			if code >= 500 {
				// Vault 1.21's listener answers 500 to some input (a JSON string over its 1 MiB cap, an
				// unterminated document) before routing it: the same answer Transit gets is Vault's, not ours.
				refCode, refBody := send(tc.method, strings.Replace(tc.path, m.Path+"/", transit+"/", 1), tc.body)
				if refCode != code || refBody != body {
					t.Fatalf("%d: %s (Transit: %d %s)", code, body, refCode, refBody)
				}
				t.Logf("refused by Vault's listener before any engine, as for Transit: %d %s", code, strings.TrimSpace(body))
				return
			}
			if code < 400 && tc.name != "1,000-character key name" && tc.name != "unicode key name" {
				t.Fatalf("accepted with %d: %s", code, body)
			}
		})
	}
	// Just under Vault's string cap, a large plaintext is served and comes back whole.
	code, body := send("POST", m.Path+"/encrypt/h", `{"plaintext":"`+nearCap+`"}`)
	if code != 200 {
		t.Fatalf("700 KiB plaintext: %d %s", code, body[:min(len(body), 300)])
	}
	// A 28 MiB request (under the listener's 32 MiB cap) that does reach the plugin: 30 items of 700 KiB.
	parts := make([]string, 30)
	for i := range parts {
		parts[i] = `{"plaintext":"` + nearCap + `"}`
	}
	code, body = send("POST", m.Path+"/encrypt/h", `{"batch_input":[`+strings.Join(parts, ",")+`]}`)
	if code != 200 {
		t.Fatalf("batch of 30 × 700 KiB: %d %s", code, body[:min(len(body), 300)])
	}
	// The plugin still serves, with the PIN it had, and its memory is bounded after all of it.
	if decrypt(t, c, m, "h", encrypt(t, c, m, "h", "still here")) != "still here" {
		t.Fatal("round trip after hostile input")
	}
	if rss := dev.PluginRSSMB(); rss == 0 || rss > 512 {
		t.Fatalf("plugin resident memory after hostile input: %.0f MB", rss)
	} else {
		t.Logf("plugin resident memory after hostile input: %.0f MB", rss)
	}
}
