package hsm

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// MeasureRawGCM is the token's AES-GCM ceiling, the reference the engine's throughput is measured against: n
// bare C_EncryptInit + C_Encrypt calls of msg with the AES key of id, spread over the given number of sessions,
// with nothing around them (no pool, no recovery, one handle lookup). It returns operations per second.
func (t *Token) MeasureRawGCM(ctx context.Context, id, msg []byte, n, sessions int) (float64, error) {
	if sessions < 1 || n < sessions {
		return 0, fmt.Errorf("%w: %d operations over %d sessions", ErrInvalidArgument, n, sessions)
	}
	var key pkcs11.ObjectHandle
	err := t.do(ctx, "find key", func(p pkcs11API, s pooledSession) error {
		h, err := t.findKey(p, s, kindAES, id)
		key = h
		return err
	})
	if err != nil {
		return 0, err
	}
	t.mu.Lock()
	slot := t.slot
	t.mu.Unlock()
	p := t.mod.ctx
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	handles := make([]pkcs11.SessionHandle, sessions)
	for i := range handles {
		if handles[i], err = p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION); err != nil {
			return 0, err
		}
		defer func(h pkcs11.SessionHandle) { _ = p.CloseSession(h) }(handles[i])
	}
	iv := make([]byte, GCMNonceSize)
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
				params := pkcs11.NewGCMParams(iv, nil, GCMTagSize*8)
				err := p.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, key)
				if err == nil {
					_, err = p.Encrypt(sh, msg)
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
