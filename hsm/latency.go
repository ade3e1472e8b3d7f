//go:build cmkfaults

package hsm

import (
	"time"

	"github.com/miekg/pkcs11"
)

// latentCalls delays every PKCS#11 call by a fixed time before it reaches the module, as a network HSM's round
// trip would (Luna, nShield and CloudHSM answer in roughly 0.3–2 ms each, many sessions in parallel). SoftHSM
// answers in microseconds, so without it nothing shows whether the engine keeps enough calls in flight: a lock held
// across a call, one session per key or a lookup per request would cap it at one call per round trip. The delay is
// a sleep, not a spin: like a network wait it holds no CPU. Only builds with the cmkfaults tag have it (the
// benchmark's network-HSM model, the soak, the unit tests); a release never wraps its calls.
type latentCalls struct {
	pkcs11API
	delay time.Duration
	sleep func(time.Duration) // time.Sleep when nil; a test's counter otherwise
}

func (l latentCalls) wait() {
	if l.sleep != nil {
		l.sleep(l.delay)
		return
	}
	time.Sleep(l.delay)
}

func (l latentCalls) GetSlotList(present bool) ([]uint, error) {
	l.wait()
	return l.pkcs11API.GetSlotList(present)
}

func (l latentCalls) GetTokenInfo(slot uint) (pkcs11.TokenInfo, error) {
	l.wait()
	return l.pkcs11API.GetTokenInfo(slot)
}

func (l latentCalls) GetMechanismList(slot uint) ([]*pkcs11.Mechanism, error) {
	l.wait()
	return l.pkcs11API.GetMechanismList(slot)
}

func (l latentCalls) GetMechanismInfo(slot uint, m []*pkcs11.Mechanism) (pkcs11.MechanismInfo, error) {
	l.wait()
	return l.pkcs11API.GetMechanismInfo(slot, m)
}

func (l latentCalls) OpenSession(slot uint, flags uint) (pkcs11.SessionHandle, error) {
	l.wait()
	return l.pkcs11API.OpenSession(slot, flags)
}

func (l latentCalls) CloseSession(sh pkcs11.SessionHandle) error {
	l.wait()
	return l.pkcs11API.CloseSession(sh)
}

func (l latentCalls) GetSessionInfo(sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error) {
	l.wait()
	return l.pkcs11API.GetSessionInfo(sh)
}

func (l latentCalls) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	l.wait()
	return l.pkcs11API.Login(sh, userType, pin)
}

func (l latentCalls) FindObjectsInit(sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) error {
	l.wait()
	return l.pkcs11API.FindObjectsInit(sh, tmpl)
}

func (l latentCalls) FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error) {
	l.wait()
	return l.pkcs11API.FindObjects(sh, max)
}

func (l latentCalls) FindObjectsFinal(sh pkcs11.SessionHandle) error {
	l.wait()
	return l.pkcs11API.FindObjectsFinal(sh)
}

func (l latentCalls) GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	l.wait()
	return l.pkcs11API.GetAttributeValue(sh, o, a)
}

func (l latentCalls) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	l.wait()
	return l.pkcs11API.GenerateKey(sh, m, tmpl)
}

func (l latentCalls) GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	l.wait()
	return l.pkcs11API.GenerateKeyPair(sh, m, public, private)
}

func (l latentCalls) CreateObject(sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	l.wait()
	return l.pkcs11API.CreateObject(sh, tmpl)
}

func (l latentCalls) UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, unwrapping pkcs11.ObjectHandle, wrapped []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	l.wait()
	return l.pkcs11API.UnwrapKey(sh, m, unwrapping, wrapped, a)
}

func (l latentCalls) DestroyObject(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle) error {
	l.wait()
	return l.pkcs11API.DestroyObject(sh, o)
}

func (l latentCalls) CopyObject(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	l.wait()
	return l.pkcs11API.CopyObject(sh, o, tmpl)
}

func (l latentCalls) EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	l.wait()
	return l.pkcs11API.EncryptInit(sh, m, o)
}

func (l latentCalls) Encrypt(sh pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	l.wait()
	return l.pkcs11API.Encrypt(sh, msg)
}

func (l latentCalls) EncryptSized(sh pkcs11.SessionHandle, msg []byte, size int) ([]byte, error) {
	l.wait()
	return l.pkcs11API.EncryptSized(sh, msg, size)
}

func (l latentCalls) DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	l.wait()
	return l.pkcs11API.DecryptInit(sh, m, o)
}

func (l latentCalls) Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error) {
	l.wait()
	return l.pkcs11API.Decrypt(sh, cipher)
}

func (l latentCalls) SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	l.wait()
	return l.pkcs11API.SignInit(sh, m, o)
}

func (l latentCalls) Sign(sh pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	l.wait()
	return l.pkcs11API.Sign(sh, msg)
}

func (l latentCalls) GenerateRandom(sh pkcs11.SessionHandle, n int) ([]byte, error) {
	l.wait()
	return l.pkcs11API.GenerateRandom(sh, n)
}

var _ pkcs11API = latentCalls{}
