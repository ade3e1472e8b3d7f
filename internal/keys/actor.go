package keys

import (
	"context"
	"crypto/sha256"
	"strings"
	"sync"

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

// mountSalt is the mount's salt, read (or made) once and kept until another node's write invalidates it.
type mountSalt struct {
	mu   sync.Mutex
	salt *salt.Salt
}

func (m *mountSalt) get(ctx context.Context, s logical.Storage) (*salt.Salt, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.salt == nil {
		st, err := salt.NewSalt(ctx, s, &salt.Config{HashFunc: salt.SHA256Hash, HMAC: sha256.New, HMACType: "hmac-sha256", Location: saltLocation})
		if err != nil {
			return nil, err
		}
		m.salt = st
	}
	return m.salt, nil
}

func (m *mountSalt) forget() {
	m.mu.Lock()
	m.salt = nil
	m.mu.Unlock()
}

// AccessorHMAC is the form a token accessor is recorded in on this mount.
func (m *Manager) AccessorHMAC(ctx context.Context, s logical.Storage, accessor string) (string, error) {
	st, err := m.salt.get(ctx, s)
	if err != nil {
		return "", err
	}
	return st.GetIdentifiedHMAC(accessor), nil
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
