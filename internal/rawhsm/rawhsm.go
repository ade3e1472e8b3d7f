// Package rawhsm measures a token's bare AES-GCM ceiling, the reference the engine's throughput is compared with
// in the benchmark: C_EncryptInit + C_Encrypt on the same token, with nothing around them (no pool, no recovery,
// no Vault). It loads the PKCS#11 module on its own, so it belongs in a process of its own (the benchmark's), never
// in the plugin.
package rawhsm

import (
	"crypto/rand"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// Token is a logged-in module with one AES-256 token key made for the measurement.
type Token struct {
	ctx  *pkcs11.Ctx
	slot uint
	sh   pkcs11.SessionHandle
	key  pkcs11.ObjectHandle
	// Delay is waited before every call MeasureGCM makes, as the plugin's network-HSM model waits (a build with
	// -tags cmkfaults and CMK_HSM_LATENCY): the same token seen through the same round trip.
	Delay time.Duration
}

// Open loads the module, logs in to the token labelled label and makes a throwaway AES-256 token key. One Token
// at a time per process: the module is initialised by Open and finalised by Close (SoftHSM sees tokens made
// since only at its next initialisation).
func Open(library, label, pin string) (*Token, error) {
	ctx := pkcs11.New(library)
	if ctx == nil {
		return nil, fmt.Errorf("cannot load %s", library)
	}
	if err := ctx.Initialize(); err != nil {
		ctx.Destroy()
		return nil, err
	}
	t := &Token{ctx: ctx}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		t.Close()
		return nil, err
	}
	found := false
	for _, s := range slots {
		if ti, err := ctx.GetTokenInfo(s); err == nil && strings.TrimSpace(ti.Label) == label {
			t.slot, found = s, true
		}
	}
	if !found {
		t.Close()
		return nil, fmt.Errorf("no token labelled %q", label)
	}
	if t.sh, err = ctx.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
		t.Close()
		return nil, err
	}
	if err := ctx.Login(t.sh, pkcs11.CKU_USER, pin); err != nil {
		t.Close()
		return nil, err
	}
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	t.key, err = ctx.GenerateKey(t.sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "bench/raw"), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false), pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
	})
	if err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// MeasureGCM runs n encryptions of msg spread over the given number of sessions and returns operations per
// second.
func (t *Token) MeasureGCM(msg []byte, n, sessions int) (float64, error) {
	return t.measureGCM(t.key, msg, n, sessions)
}

// MeasureGCMSessionObject is MeasureGCM on a session-object copy of the key (C_CopyObject, CKA_TOKEN false): the
// ceiling of a token that re-reads token objects per use (SoftHSM's file store) when nothing is read from its store.
func (t *Token) MeasureGCMSessionObject(msg []byte, n, sessions int) (float64, error) {
	cp, err := t.ctx.CopyObject(t.sh, t.key, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)})
	if err != nil {
		return 0, fmt.Errorf("C_CopyObject: %w", err)
	}
	defer func() { _ = t.ctx.DestroyObject(t.sh, cp) }()
	return t.measureGCM(cp, msg, n, sessions)
}

func (t *Token) measureGCM(key pkcs11.ObjectHandle, msg []byte, n, sessions int) (float64, error) {
	if sessions < 1 || n < sessions {
		return 0, fmt.Errorf("%d operations over %d sessions", n, sessions)
	}
	handles := make([]pkcs11.SessionHandle, sessions)
	for i := range handles {
		h, err := t.ctx.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION)
		if err != nil {
			return 0, err
		}
		handles[i] = h
		defer func() { _ = t.ctx.CloseSession(h) }()
	}
	iv := make([]byte, 12)
	errs := make(chan error, sessions)
	var wg sync.WaitGroup
	start := time.Now()
	for i, sh := range handles {
		count := n / sessions
		if i == 0 {
			count += n % sessions
		}
		wg.Add(1)
		go func(sh pkcs11.SessionHandle, count int) {
			defer wg.Done()
			for j := 0; j < count; j++ {
				params := pkcs11.NewGCMParams(iv, nil, 128)
				time.Sleep(t.Delay)
				err := t.ctx.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, key)
				if err == nil {
					time.Sleep(t.Delay)
					_, err = t.ctx.Encrypt(sh, msg)
				}
				params.Free()
				if err != nil {
					errs <- err
					return
				}
			}
		}(sh, count)
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(n) / elapsed.Seconds(), nil
}

// MeasureCreation generates n AES-256 token keys one after another, each under a label and CKA_ID of its own as
// the engine makes a key version's (no search before or after: the bare token's cost of making a key), and returns
// the time they took. The keys are destroyed afterwards, outside the measurement.
func (t *Token) MeasureCreation(n int) (time.Duration, error) {
	made := make([]pkcs11.ObjectHandle, 0, n)
	defer func() {
		for _, h := range made {
			_ = t.ctx.DestroyObject(t.sh, h)
		}
	}()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	start := time.Now()
	for i := 0; i < n; i++ {
		id := make([]byte, 16)
		_, _ = rand.Read(id)
		h, err := t.ctx.GenerateKey(t.sh, mech, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, fmt.Sprintf("bench/created/k%05d:v1", i)), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false), pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		})
		if err != nil {
			return 0, err
		}
		made = append(made, h)
	}
	return time.Since(start), nil
}

// Close destroys the throwaway key and unloads the module.
func (t *Token) Close() {
	if t.key != 0 {
		_ = t.ctx.DestroyObject(t.sh, t.key)
	}
	if t.sh != 0 {
		_ = t.ctx.CloseSession(t.sh)
	}
	_ = t.ctx.Finalize()
	t.ctx.Destroy()
}
