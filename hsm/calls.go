package hsm

import (
	"context"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
	"golang.org/x/sync/semaphore"
)

// pkcs11API is every PKCS#11 function this package calls on a loaded module, other than the module's own
// lifetime (C_Initialize, C_Finalize). moduleCalls (miekg/pkcs11's Ctx and one call of our own) is the
// implementation; tests wrap it to inject the errors a real HSM returns, so that every recovery rule is exercised
// against the real token. Calls are made only through module.enter.
type pkcs11API interface {
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error)
	GetMechanismList(slotID uint) ([]*pkcs11.Mechanism, error)
	GetMechanismInfo(slotID uint, m []*pkcs11.Mechanism) (pkcs11.MechanismInfo, error)
	OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(sh pkcs11.SessionHandle) error
	GetSessionInfo(sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error)
	Login(sh pkcs11.SessionHandle, userType uint, pin string) error

	FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error
	FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error)
	FindObjectsFinal(sh pkcs11.SessionHandle) error
	GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error)

	GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error)
	CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, unwrappingKey pkcs11.ObjectHandle, wrappedKey []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error
	CopyObject(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)

	EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	EncryptSized(sh pkcs11.SessionHandle, message []byte, size int) ([]byte, error)
	DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error)
	SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	GenerateRandom(sh pkcs11.SessionHandle, length int) ([]byte, error)
}

var _ pkcs11API = moduleCalls{}

// storeGuard keeps searches and attribute reads on a token out of the library while an object is created or
// destroyed on the same token, on modules whose object store is not safe otherwise. SoftHSM 2.6.1 (what Debian 12
// ships) re-reads a token's file store on every C_FindObjectsInit, and a re-read racing an object's creation in
// another session (SoftHSMv2 issue 573, fixed upstream after 2.6.1) fails the creation with CKR_GENERAL_ERROR or
// CKR_TEMPLATE_INCONSISTENT, hides objects from searches, and in 10-minute soaks left a version's key unusable:
// refused as of another key type, or gone from the token for good while storage referenced it. The store is one
// directory per token (OSToken: its object files and its index, re-read per search), so the guard is per token:
// a slow generation on one token holds up nothing on another. Cryptographic calls are not held up: they name an
// object by handle and read no store. The guard is taken inside the connection's calls lock (pool.run), around one
// call only, waits for nothing else, and gives up when the request's context ends.
type storeGuard struct {
	pkcs11API
	ctx  context.Context
	lock *semaphore.Weighted // storeReaders places: a search takes one, an object write all of them
}

// storeReaders bounds the searches one token's guard lets in at once; an object write takes every place.
const storeReaders = 1 << 16

func newStoreLock() *semaphore.Weighted { return semaphore.NewWeighted(storeReaders) }

// storeRaces says whether the module's object store needs a storeGuard.
func storeRaces(lib pkcs11.Info) bool {
	return strings.HasPrefix(strings.TrimSpace(lib.ManufacturerID), "SoftHSM")
}

func (g storeGuard) enter(places int64) (func(), error) {
	if err := g.lock.Acquire(g.ctx, places); err != nil {
		return nil, fmt.Errorf("%w: waiting for an object write on the token: %v", ErrUnavailable, err)
	}
	return func() { g.lock.Release(places) }, nil
}

func (g storeGuard) FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error {
	leave, err := g.enter(1)
	if err != nil {
		return err
	}
	defer leave()
	return g.pkcs11API.FindObjectsInit(sh, temp)
}

func (g storeGuard) GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	leave, err := g.enter(1)
	if err != nil {
		return nil, err
	}
	defer leave()
	return g.pkcs11API.GetAttributeValue(sh, o, a)
}

// CopyObject makes a session object (a working copy): it reads the original from the store, as an attribute
// read does, and writes nothing there.
func (g storeGuard) CopyObject(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	leave, err := g.enter(1)
	if err != nil {
		return 0, err
	}
	defer leave()
	return g.pkcs11API.CopyObject(sh, o, temp)
}

func (g storeGuard) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	leave, err := g.enter(storeReaders)
	if err != nil {
		return 0, err
	}
	defer leave()
	return g.pkcs11API.GenerateKey(sh, m, temp)
}

func (g storeGuard) GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	leave, err := g.enter(storeReaders)
	if err != nil {
		return 0, 0, err
	}
	defer leave()
	return g.pkcs11API.GenerateKeyPair(sh, m, public, private)
}

func (g storeGuard) CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	leave, err := g.enter(storeReaders)
	if err != nil {
		return 0, err
	}
	defer leave()
	return g.pkcs11API.CreateObject(sh, temp)
}

func (g storeGuard) UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, unwrappingKey pkcs11.ObjectHandle, wrappedKey []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	leave, err := g.enter(storeReaders)
	if err != nil {
		return 0, err
	}
	defer leave()
	return g.pkcs11API.UnwrapKey(sh, m, unwrappingKey, wrappedKey, a)
}

func (g storeGuard) DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error {
	leave, err := g.enter(storeReaders)
	if err != nil {
		return err
	}
	defer leave()
	return g.pkcs11API.DestroyObject(sh, oh)
}
