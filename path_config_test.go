package cmk

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

func TestConfigHSM(t *testing.T) {
	e := newUnconfiguredBackend(t)
	label := "config-test"
	if err := softhsm.CreateToken(label, testPIN); err != nil {
		t.Fatal(err)
	}

	// Before configuration, key operations say what to do.
	resp, err := e.write("keys/k", nil)
	if got := status(resp, err); got != 503 || !strings.Contains(err.Error(), "config/hsm") {
		t.Fatalf("unconfigured: status %d, err %v", got, err)
	}

	cases := []struct {
		name   string
		data   map[string]interface{}
		status int
		want   string
	}{
		{"no token", map[string]interface{}{"pin": testPIN}, 400, "token_label"},
		{"no pin", map[string]interface{}{"token_label": label}, 400, "pin is required"},
		{"wrong pin", map[string]interface{}{"token_label": label, "pin": "bad-pin-0000"}, 400, "PIN incorrect"},
		{"unknown token", map[string]interface{}{"token_label": "nope", "pin": testPIN}, 400, "no initialised token"},
		{"bad pool", map[string]interface{}{"token_label": label, "pin": testPIN, "pool_size": 0}, 400, "pool_size"},
		{"bad iv source", map[string]interface{}{"token_label": label, "pin": testPIN, "iv_source": "dice"}, 400, "iv_source"},
		{"good", map[string]interface{}{"token_label": label, "pin": testPIN, "pool_size": 3}, 204, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, err := e.write("config/hsm", c.data)
			if got := status(resp, err); got != c.status {
				t.Fatalf("status %d, want %d (%v %s)", got, c.status, err, respText(resp))
			}
			text := respText(resp)
			if err != nil {
				text += err.Error()
			}
			if !strings.Contains(text, c.want) {
				t.Fatalf("response %q does not mention %q", text, c.want)
			}
			if strings.Contains(text, testPIN) || strings.Contains(text, "bad-pin-0000") {
				t.Fatalf("response carries a PIN: %s", text)
			}
		})
	}

	resp = e.ok(e.read("config/hsm"))
	for k, v := range resp.Data {
		if strings.Contains(fmt.Sprint(v), testPIN) {
			t.Fatalf("config read reveals the PIN in %s", k)
		}
	}
	if _, has := resp.Data["pin"]; has {
		t.Fatal("config read has a pin field")
	}
	if resp.Data["connected"] != true || resp.Data["pin_set"] != true || resp.Data["token_label"] != label {
		t.Fatalf("config read: %v", resp.Data)
	}
	token := resp.Data["token"].(map[string]interface{})
	if token["manufacturer_id"] != "SoftHSM project" {
		t.Fatalf("token info: %v", token)
	}
	if !strings.Contains(strings.Join(resp.Data["mechanisms"].([]string), " "), "CKM_AES_GCM") {
		t.Fatalf("mechanisms: %v", resp.Data["mechanisms"])
	}

	// A later write may omit the PIN: it is kept.
	e.ok(e.write("config/hsm", map[string]interface{}{"pool_size": 2}))
	e.ok(e.write("keys/k", nil))
}

func TestConfigHSMNeedsLibraryFromEnvironment(t *testing.T) {
	old := os.Getenv(LibraryEnv)
	os.Unsetenv(LibraryEnv)
	e := newUnconfiguredBackend(t)
	os.Setenv(LibraryEnv, old)
	resp, err := e.write("config/hsm", map[string]interface{}{"token_label": "x", "pin": "y", "library": "/tmp/evil.so"})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), LibraryEnv) {
		t.Fatalf("without %s: %v %s", LibraryEnv, err, respText(resp))
	}
	// No request field can name a library.
	if _, ok := e.b.Route("config/hsm").Fields["library"]; ok {
		t.Fatal("config/hsm accepts a library field")
	}
}

func TestConfigKeys(t *testing.T) {
	e := newTestBackend(t)
	resp := e.ok(e.read("config/keys"))
	if resp.Data["max_batch_size"] != defaultMaxBatchSize || resp.Data["disable_upsert"] != false {
		t.Fatalf("defaults: %v", resp.Data)
	}
	if got := status(e.write("config/keys", map[string]interface{}{"max_batch_size": 0})); got != 400 {
		t.Fatalf("max_batch_size 0: %d", got)
	}
	resp = e.ok(e.write("config/keys", map[string]interface{}{"disable_upsert": true, "max_batch_size": 5}))
	if resp.Data["max_batch_size"] != 5 || resp.Data["disable_upsert"] != true {
		t.Fatalf("after write: %v", resp.Data)
	}
	// Invalidate (another node wrote it) reloads from storage.
	e.b.invalidate(context.Background(), configKeysPath)
	if c, _ := e.b.readKeysConfig(t.Context(), e.storage); c.MaxBatchSize != 5 {
		t.Fatalf("reloaded: %+v", c)
	}
}

// Vault sends a write to a path with an existence check as "create" when the thing does not exist yet: every
// such path must handle both.
func TestExistenceCheckedPathsHandleCreate(t *testing.T) {
	e := newUnconfiguredBackend(t)
	for _, p := range e.b.Paths {
		if p.ExistenceCheck == nil {
			continue
		}
		_, create := p.Operations[logical.CreateOperation]
		_, update := p.Operations[logical.UpdateOperation]
		if !create || !update {
			t.Errorf("%s: existence check without both create (%v) and update (%v)", p.Pattern, create, update)
		}
	}
}

// Issue 19 item 23: a max_batch_size above Vault's listener cap on JSON arrays (10,000 elements) could never be
// used: the listener answers such a batch with a 500 before the plugin sees it. Refused, naming the cap.
func TestMaxBatchSizeAboveListenerCapRefused(t *testing.T) {
	e := newTestBackend(t)
	resp, err := e.write("config/keys", map[string]interface{}{"max_batch_size": 20000})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "10000") || !strings.Contains(respText(resp), "max_json_array_element_count") {
		t.Fatalf("max_batch_size 20000: %d %s", status(resp, err), respText(resp))
	}
	if c := e.ok(e.read("config/keys")).Data["max_batch_size"]; c != defaultMaxBatchSize {
		t.Fatalf("a refused write changed max_batch_size to %v", c)
	}
	e.ok(e.write("config/keys", map[string]interface{}{"max_batch_size": 10000}))
}

// Issue 19 item 24: object labels carry the mount's backend UUID, which `vault secrets list -detailed` does not
// show: config/hsm shows the label prefix, and every object of the mount on the token is under it.
func TestConfigHSMShowsLabelPrefix(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	prefix, _ := e.ok(e.read("config/hsm")).Data["label_prefix"].(string)
	if prefix != "cmk/"+e.b.mountID+"/" {
		t.Fatalf("label_prefix %q", prefix)
	}
	objects := e.tokenObjects()
	if len(objects) == 0 {
		t.Fatal("no objects")
	}
	for _, o := range objects {
		if !strings.HasPrefix(o.Label, prefix) {
			t.Fatalf("object %q is not under %q", o.Label, prefix)
		}
	}
}

// Issue 19 (6): a mount's config/hsm writes with wrong PINs start a wait, and during it the right PIN was accepted
// (204) while wrong ones were refused: whoever could write config/hsm learnt the PIN at HTTP speed. The right PIN
// given during the wait now gets the wrong one's answer, while the mount already connected with the PIN keeps its
// configuration writes and its keys.
func TestConfigHSMWaitTellsNothing(t *testing.T) {
	owner := newTestBackend(t)
	owner.ok(owner.write("keys/k", nil))
	guesser := newUnconfiguredBackend(t)
	guess := func(pin string) (int, string) {
		resp, err := guesser.write("config/hsm", map[string]interface{}{"token_label": owner.label, "pin": pin})
		text := respText(resp)
		if err != nil {
			text += err.Error()
		}
		return status(resp, err), text
	}
	for i := 0; ; i++ {
		code, text := guess(fmt.Sprintf("guess-%d", i))
		if code != 400 || !strings.Contains(text, "PIN incorrect") {
			t.Fatalf("wrong PIN %d: %d %s", i, code, text)
		}
		if strings.Contains(text, "login attempts delayed") {
			break
		}
		if i > 10 {
			t.Fatal("no wait after 10 wrong PINs")
		}
	}
	wrongCode, wrongText := guess("guess-x")
	rightCode, rightText := guess(testPIN)
	if rightCode != wrongCode || rightText != wrongText {
		t.Fatalf("during the wait the right PIN is answered %d %q, a wrong one %d %q", rightCode, rightText, wrongCode, wrongText)
	}
	owner.ok(owner.write("config/hsm", map[string]interface{}{"pool_size": 3}))
	owner.ok(owner.write("encrypt/k", map[string]interface{}{"plaintext": "aGk="}))
}

// Issue 20, item 5: purge protection is one-way, its floor only goes up and is at least 7 days, the floor needs
// purge protection, and with it on no deletion_grace_period below the floor (0 included) is accepted.
func TestPurgeProtectionConfig(t *testing.T) {
	e := newTestBackend(t)
	refused := func(data map[string]interface{}, want string) {
		t.Helper()
		resp, err := e.write("config/keys", data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), want) {
			t.Fatalf("%v: %d %s, want a 400 naming %q", data, status(resp, err), respText(resp), want)
		}
	}
	resp := e.ok(e.read("config/keys"))
	if resp.Data["purge_protection"] != false || resp.Data["min_deletion_grace_period"] != int64(0) {
		t.Fatalf("defaults: %v", resp.Data)
	}
	refused(map[string]interface{}{"min_deletion_grace_period": "720h"}, "purge_protection=true")
	refused(map[string]interface{}{"purge_protection": true, "min_deletion_grace_period": "24h"}, "at least 168h")
	// Turned on without a floor: the floor is 7 days.
	resp = e.ok(e.write("config/keys", map[string]interface{}{"purge_protection": true}))
	if resp.Data["purge_protection"] != true || resp.Data["min_deletion_grace_period"] != int64(7*24*3600) {
		t.Fatalf("after turning purge protection on: %v", resp.Data)
	}
	refused(map[string]interface{}{"purge_protection": false}, "one-way")
	refused(map[string]interface{}{"deletion_grace_period": 0}, "min_deletion_grace_period 168h")
	refused(map[string]interface{}{"deletion_grace_period": "1h"}, "min_deletion_grace_period 168h")
	e.ok(e.write("config/keys", map[string]interface{}{"min_deletion_grace_period": "720h", "deletion_grace_period": "720h"}))
	refused(map[string]interface{}{"min_deletion_grace_period": "168h"}, "can only be raised")
	refused(map[string]interface{}{"deletion_grace_period": "168h"}, "min_deletion_grace_period 720h")
	// Writing it true again, or other fields, changes nothing; a restart (invalidate) keeps all of it.
	e.ok(e.write("config/keys", map[string]interface{}{"purge_protection": true, "max_batch_size": 7}))
	e.b.invalidate(context.Background(), configKeysPath)
	resp = e.ok(e.read("config/keys"))
	if resp.Data["purge_protection"] != true || resp.Data["min_deletion_grace_period"] != int64(720*3600) || resp.Data["deletion_grace_period"] != int64(720*3600) {
		t.Fatalf("after a reload: %v", resp.Data)
	}
	refused(map[string]interface{}{"purge_protection": false}, "one-way")
}
