package keys

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/helper/salt"
	"github.com/hashicorp/vault/sdk/logical"
)

// Token accessors are recorded only as an HMAC under a salt of the mount's own (storage entry "salt", made on
// first need by Vault's salt helper), as Vault's audit devices record them: whoever reads history or storage can
// tell that two events came from one token, and cannot use or look up the token. The HMAC is Vault's identified
// form, "hmac-sha256:<hex>". It cannot match an audit device's HMAC of the same accessor: each audit device has a
// salt of its own, in storage no plugin can read; an auditor correlates with the mount's own (keys/:name/history
// and created_by only ever show this form).

// saltLocation is the mount's storage entry holding the salt.
const saltLocation = salt.DefaultLocation

// mountSalt is the mount's salt, read (or made) once and kept until another node's write invalidates it, with
// the HMACs of the accessors it last served. Read without a lock once known: every use by a token without an
// entity names it by its accessor's HMAC (CallerLabel).
type mountSalt struct {
	mu    sync.Mutex // taken to read or make it, and to forget it
	known atomic.Pointer[saltedAccessors]
}

// saltedAccessors is a salt and the HMACs it gave, for at most maxCachedAccessorHMACs accessors (the cache starts
// again when full): a token's every use would otherwise compute its HMAC again.
type saltedAccessors struct {
	salt   *salt.Salt
	hmacs  sync.Map // accessor → its identified HMAC
	cached atomic.Int64
}

const maxCachedAccessorHMACs = 1024

func (m *mountSalt) get(ctx context.Context, s logical.Storage) (*saltedAccessors, error) {
	if st := m.known.Load(); st != nil {
		return st, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if st := m.known.Load(); st != nil {
		return st, nil
	}
	st, err := salt.NewSalt(ctx, s, &salt.Config{HashFunc: salt.SHA256Hash, HMAC: sha256.New, HMACType: "hmac-sha256", Location: saltLocation})
	if err != nil {
		return nil, err
	}
	known := &saltedAccessors{salt: st}
	m.known.Store(known)
	return known, nil
}

func (m *mountSalt) forget() {
	m.mu.Lock()
	m.known.Store(nil)
	m.mu.Unlock()
}

// AccessorHMAC is the form a token accessor is recorded in on this mount.
func (m *Manager) AccessorHMAC(ctx context.Context, s logical.Storage, accessor string) (string, error) {
	st, err := m.salt.get(ctx, s)
	if err != nil {
		return "", err
	}
	if h, ok := st.hmacs.Load(accessor); ok {
		return h.(string), nil
	}
	h := st.salt.GetIdentifiedHMAC(accessor)
	if st.cached.Add(1) > maxCachedAccessorHMACs {
		st.hmacs.Clear()
		st.cached.Store(1)
	}
	st.hmacs.Store(accessor, h)
	return h, nil
}

// withAccessorHMAC is a with its accessor's HMAC beside it when it has no entity, for CallerLabel: the salt is read
// once per process and a token's HMAC kept, so that naming a caller costs no storage read and mostly no HMAC.
func (m *Manager) withAccessorHMAC(ctx context.Context, s logical.Storage, a Actor) (Actor, error) {
	if a.EntityID != "" || a.AccessorHMAC != "" || a.Accessor == "" {
		return a, nil
	}
	if strings.HasPrefix(a.Accessor, SealedAccessorPrefix) {
		a.AccessorHMAC = a.Accessor
		return a, nil
	}
	h, err := m.AccessorHMAC(ctx, s, a.Accessor)
	if err != nil {
		return a, fmt.Errorf("name the caller by its token accessor's HMAC: %w", err)
	}
	a.AccessorHMAC = h
	return a, nil
}

// SealedAccessorPrefix begins an accessor already in its recorded form. A request the engine makes itself on
// someone's behalf (the execution of an approved request, on its requester's behalf) carries the requester's
// accessor so, as recorded when the request was held; Vault's accessors never begin so.
const SealedAccessorPrefix = "hmac-sha256:"

// sealed is who with its accessor replaced by its HMAC: what a change records and logs.
func (m *Manager) sealed(ctx context.Context, s logical.Storage, who Actor) (Actor, error) {
	if who.Accessor == "" {
		return who, nil
	}
	if strings.HasPrefix(who.Accessor, SealedAccessorPrefix) {
		who.Accessor, who.AccessorHMAC = "", who.Accessor
		return who, nil
	}
	h, err := m.AccessorHMAC(ctx, s, who.Accessor)
	if err != nil {
		return who, err
	}
	who.Accessor, who.AccessorHMAC = "", h
	return who, nil
}

// legacyAccessor matches what engines before the HMAC recorded in created_by: "<name> (token accessor <clear>)".
const legacyAccessorMark = " (token accessor "

// sealCreatedBy replaces a clear accessor in created_by values of k, written by engines before the HMAC, by its
// HMAC: no response shows it. Storage keeps the old value until the version is written again.
func (m *Manager) sealCreatedBy(ctx context.Context, s logical.Storage, k *Key) error {
	for n, v := range k.Versions {
		i := strings.LastIndex(v.CreatedBy, legacyAccessorMark)
		if i < 0 || !strings.HasSuffix(v.CreatedBy, ")") {
			continue
		}
		accessor := v.CreatedBy[i+len(legacyAccessorMark) : len(v.CreatedBy)-1]
		if strings.HasPrefix(accessor, "hmac-") {
			continue
		}
		h, err := m.AccessorHMAC(ctx, s, accessor)
		if err != nil {
			return err
		}
		k.withVersion(n, func(x *Version) { x.CreatedBy = v.CreatedBy[:i] + legacyAccessorMark + h + ")" })
	}
	return nil
}
