package cmk

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// Someone holding the token's PIN plants, with OpenSC's pkcs11-tool, a generic secret of a value they know under a
// version's HMAC secret CKA_ID and label before the version's first HMAC. The HMAC is refused with a 409 that names
// the object and says to remove it, no response carries the HMAC under the planted value, reconcile reports the
// object, and once an operator removes it the next HMAC makes the version's own secret. (Every token of the matrix
// that holds generic secrets: hsm's TestPlantedHMACSecretIsRefused.)
func TestPlantedHMACSecretIsRefusedThroughTheAPI(t *testing.T) {
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		t.Fatalf("pkcs11-tool (Debian's opensc, installed by make deps): %v", err)
	}
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	p, _ := e.b.keys.Get(context.Background(), e.storage, "k")
	secretID := p.Versions[1].HSMID + hex.EncodeToString([]byte("/hmac"))
	secretLabel := p.Versions[1].Label + "/hmac"

	known := make([]byte, 32)
	_, _ = rand.Read(known)
	plantSecret(t, e.label, secretID, secretLabel, known)

	mac := hmac.New(sha256.New, known)
	mac.Write([]byte("data"))
	planted := base64.StdEncoding.EncodeToString(mac.Sum(nil))

	resp, err := e.write("hmac/k", map[string]interface{}{"input": b64("data")})
	if strings.Contains(respText(resp)+fmt.Sprint(err), planted) {
		t.Fatalf("the response carries the HMAC under the planted value: %d %s", status(resp, err), respText(resp))
	}
	if status(resp, err) != 409 || !strings.Contains(fmt.Sprint(err), secretLabel) || !strings.Contains(fmt.Sprint(err), "removes it from the token") {
		t.Fatalf("first HMAC with a planted secret: %d %v %s", status(resp, err), err, respText(resp))
	}
	batch, err := e.write("hmac/k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"input": b64("data")}}})
	if strings.Contains(respText(batch)+fmt.Sprint(err), planted) || status(batch, err) == 200 {
		t.Fatalf("batch HMAC with a planted secret: %d %v %s", status(batch, err), err, respText(batch))
	}

	r := e.ok(e.read("keys/k/reconcile")).Data
	untrusted, _ := r["untrusted_objects"].([]interface{})
	if len(untrusted) != 1 || untrusted[0].(map[string]interface{})["label"] != secretLabel || untrusted[0].(map[string]interface{})["hsm_id"] != secretID {
		t.Fatalf("reconcile does not report the planted secret: %v", r)
	}

	cmd := exec.Command(tool, "--module", softhsm.Library, "--token-label", e.label, "--login", "--pin", testPIN,
		"--delete-object", "--type", "secrkey", "--id", secretID)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+softhsm.Conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pkcs11-tool --delete-object: %v: %s", err, out)
	}
	got := e.ok(e.write("hmac/k", map[string]interface{}{"input": b64("data")})).Data["hmac"]
	if got == "vault:v1:"+planted {
		t.Fatal("the HMAC is the planted value's")
	}
	if r := e.ok(e.read("keys/k/reconcile")).Data; len(r["untrusted_objects"].([]interface{})) != 0 {
		t.Fatalf("reconcile still reports an untrusted object: %v", r)
	}
}

// plantSecret creates on the SoftHSM token labelled tokenLabel, with C_CreateObject as anyone holding the PIN can
// (OpenSC's pkcs11-tool writes no generic secrets), a sensitive, non-extractable HMAC key of value known. It
// uses the module this process already has loaded (a second C_Initialize is refused as already done) and
// neither finalises it nor logs out, which would end the engine's sessions.
func plantSecret(t *testing.T, tokenLabel, idHex, label string, known []byte) {
	t.Helper()
	id, _ := hex.DecodeString(idHex)
	p := pkcs11.New(softhsm.Library)
	if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		t.Fatal(err)
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, slot := range slots {
		if info, err := p.GetTokenInfo(slot); err != nil || strings.TrimSpace(info.Label) != tokenLabel {
			continue
		}
		sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = p.CloseSession(sh) }()
		if err := p.Login(sh, pkcs11.CKU_USER, testPIN); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
			t.Fatal(err)
		}
		_, err = p.CreateObject(sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true), pkcs11.NewAttribute(pkcs11.CKA_VALUE, known),
		})
		if err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("no token labelled %q", tokenLabel)
}
