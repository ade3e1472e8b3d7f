package hsm

import (
	"context"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// DestroyKeys destroys every object of version id (its main key, its HMAC secret, its usage witness, under every
// CKA_ID they may carry) and returns how many there were. Destroying what is already gone is not an error, so the call can be
// repeated safely.
func (t *Token) DestroyKeys(ctx context.Context, id []byte) (int, error) {
	if len(id) == 0 {
		return 0, fmt.Errorf("%w: empty CKA_ID", ErrInvalidArgument)
	}
	// Barred for good: a copy being made from the object while it is destroyed is never kept (CKA_IDs are never
	// reused, and a destroyed version's tombstone stays in its key's snapshot anyway).
	t.barCopies(id)
	n := 0
	err := t.doObjects(ctx, "C_DestroyObject", func(c pkcs11API, s session) error {
		var err error
		n, err = destroyAllCounted(c, s, id)
		return err
	})
	t.handles.forget(id)
	return n, err
}

// DestroyUnlessLabelled destroys the objects of version id (as DestroyKeys) that do not carry the label
// versionLabel (or its HMAC secret's or usage witness's, which begin with it), and keeps those that do: those
// may be the version's material. Each object's label is read in the session that destroys it, so an object a
// search misses is never destroyed, and one that may be a version's never is. kept reports whether any was kept.
// A search that finds nothing at all is believed only while the session is still logged in.
func (t *Token) DestroyUnlessLabelled(ctx context.Context, id []byte, versionLabel string) (kept bool, destroyed int, err error) {
	if len(id) == 0 || versionLabel == "" {
		return false, 0, fmt.Errorf("%w: empty CKA_ID or label", ErrInvalidArgument)
	}
	t.barCopies(id)
	err = t.doObjects(ctx, "C_DestroyObject unless labelled", func(c pkcs11API, s session) error {
		kept, destroyed = false, 0
		seen := 0
		for _, oid := range [][]byte{id, hmacSecretID(id), witnessID(id)} {
			hs, err := findObjects(c, s.h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_ID, oid), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
			if err != nil {
				return err
			}
			seen += len(hs)
			for _, h := range hs {
				a, err := c.GetAttributeValue(s.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
				if err != nil {
					return err
				}
				if l := string(a[0].Value); l == versionLabel || strings.HasPrefix(l, versionLabel+"/") {
					kept = true
					continue
				}
				if err := c.DestroyObject(s.h, h); err != nil {
					if rv, ok := rvOf(err); ok && (rv == pkcs11.CKR_OBJECT_HANDLE_INVALID || rv == pkcs11.CKR_KEY_HANDLE_INVALID) {
						continue
					}
					return err
				}
				destroyed++
			}
		}
		if seen == 0 {
			return nothingFoundBelieved(c, s)
		}
		return nil
	})
	if destroyed > 0 {
		t.handles.forget(id)
	}
	if err == nil && kept {
		t.unbarCopies(id) // what is kept may be a version's material: the model bars it if it does not serve
	}
	return kept, destroyed, err
}

// destroyAll destroys the token objects of version id.
func destroyAll(c pkcs11API, s session, id []byte) error {
	_, err := destroyAllCounted(c, s, id)
	return err
}

func destroyAllCounted(c pkcs11API, s session, id []byte) (int, error) {
	n := 0
	for _, oid := range [][]byte{id, hmacSecretID(id), witnessID(id)} {
		hs, err := findObjects(c, s.h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_ID, oid), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
		if err != nil {
			return n, err
		}
		for _, h := range hs {
			if err := c.DestroyObject(s.h, h); err != nil {
				if rv, ok := rvOf(err); ok && (rv == pkcs11.CKR_OBJECT_HANDLE_INVALID || rv == pkcs11.CKR_KEY_HANDLE_INVALID) {
					continue
				}
				return n, err
			}
			n++
		}
	}
	return n, nil
}

// ObjectInfo describes a key object as the token reports it. It never holds key material.
type ObjectInfo struct {
	ID               []byte
	Label            string
	Class            string
	KeyType          string
	Token            bool
	Private          bool
	Sensitive        bool
	AlwaysSensitive  bool
	Extractable      bool
	NeverExtractable bool
	Modifiable       bool
	Usage            []string // the CKA_ usage flags that are true: encrypt, decrypt, sign, verify, wrap, unwrap, derive
}

var usageAttrs = []struct {
	attr uint
	name string
}{
	{pkcs11.CKA_ENCRYPT, "encrypt"}, {pkcs11.CKA_DECRYPT, "decrypt"}, {pkcs11.CKA_SIGN, "sign"},
	{pkcs11.CKA_VERIFY, "verify"}, {pkcs11.CKA_WRAP, "wrap"}, {pkcs11.CKA_UNWRAP, "unwrap"},
	{pkcs11.CKA_DERIVE, "derive"},
}

// ListObjects reads the attributes of every token object whose label starts with labelPrefix. It visits every
// object on the token, on a session of its own outside the pool (doAside), so it is for audits, recovery passes
// and tests, never for a request's hot path; one key's objects are found with ObjectsLabelled.
func (t *Token) ListObjects(ctx context.Context, labelPrefix string) ([]ObjectInfo, error) {
	return t.scanObjects(ctx, "list objects", func(label string) bool { return strings.HasPrefix(label, labelPrefix) })
}

// ObjectsLabelled reads the attributes of the token objects labelled exactly one of labels. Where the token
// matches CKA_LABEL in searches (probed, see labelSearch) it searches once per label, visiting none of the
// token's other objects; elsewhere it reads every object's label, as ListObjects does. A search that finds
// nothing is believed only while the session is still logged in (see FindVersion).
func (t *Token) ObjectsLabelled(ctx context.Context, labels []string) ([]ObjectInfo, error) {
	bySearch, err := t.labelSearch(ctx)
	if err != nil {
		return nil, err
	}
	if !bySearch {
		want := map[string]bool{}
		for _, l := range labels {
			want[l] = true
		}
		return t.scanObjects(ctx, "list objects by label", func(label string) bool { return want[label] })
	}
	var out []ObjectInfo
	err = t.do(ctx, "find objects by label", func(c pkcs11API, s session) error {
		out = out[:0]
		for _, l := range labels {
			hs, err := findObjects(c, s.h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, l), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
			if err != nil {
				return err
			}
			for _, h := range hs {
				info, err := objectInfo(c, s.h, h)
				if err != nil {
					return err
				}
				out = append(out, info)
			}
		}
		if len(out) == 0 {
			return nothingFoundBelieved(c, s)
		}
		return nil
	})
	return out, err
}

// scanObjects reads the attributes of every token object whose label match accepts, visiting them all.
func (t *Token) scanObjects(ctx context.Context, op string, match func(label string) bool) ([]ObjectInfo, error) {
	var out []ObjectInfo
	err := t.doAside(ctx, op, func(c pkcs11API, s session) error {
		out = out[:0]
		hs, err := findObjects(c, s.h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
		if err != nil {
			return err
		}
		for _, h := range hs {
			// The label first: most of a shared token's objects are not asked for.
			a, err := c.GetAttributeValue(s.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return err
			}
			if !match(string(a[0].Value)) {
				continue
			}
			info, err := objectInfo(c, s.h, h)
			if err != nil {
				return err
			}
			out = append(out, info)
		}
		return nil
	})
	return out, err
}

func objectInfo(p pkcs11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) (ObjectInfo, error) {
	// Attributes every storage object has; CKA_ID only keys (and certificates) have: a data object, such as a
	// usage witness, refuses it.
	basic, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil), pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil), pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, nil),
	})
	if err != nil {
		return ObjectInfo{}, err
	}
	info := ObjectInfo{
		Class: className(ulong(basic[0].Value)), Label: string(basic[1].Value),
		Token: boolean(basic[2].Value), Private: boolean(basic[3].Value), Modifiable: boolean(basic[4].Value),
	}
	if info.Class != "secret_key" && info.Class != "private_key" && info.Class != "public_key" {
		return info, nil
	}
	id, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil)})
	if err != nil {
		return ObjectInfo{}, err
	}
	info.ID = id[0].Value
	key, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)})
	if err == nil {
		info.KeyType = keyTypeName(ulong(key[0].Value))
	}
	if info.Class != "public_key" {
		flags, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil), pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil), pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
		})
		if err != nil {
			return ObjectInfo{}, err
		}
		info.Sensitive, info.AlwaysSensitive = boolean(flags[0].Value), boolean(flags[1].Value)
		info.Extractable, info.NeverExtractable = boolean(flags[2].Value), boolean(flags[3].Value)
	}
	for _, u := range usageAttrs {
		a, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(u.attr, nil)})
		if err == nil && boolean(a[0].Value) {
			info.Usage = append(info.Usage, u.name)
		}
	}
	return info, nil
}

func boolean(b []byte) bool { return len(b) > 0 && b[0] != 0 }

func ulong(b []byte) uint {
	var v uint
	for i := len(b) - 1; i >= 0; i-- { // little-endian native unsigned long
		v = v<<8 | uint(b[i])
	}
	return v
}

func className(c uint) string {
	switch c {
	case pkcs11.CKO_SECRET_KEY:
		return "secret_key"
	case pkcs11.CKO_PRIVATE_KEY:
		return "private_key"
	case pkcs11.CKO_PUBLIC_KEY:
		return "public_key"
	case pkcs11.CKO_DATA:
		return "data"
	case pkcs11.CKO_CERTIFICATE:
		return "certificate"
	}
	return fmt.Sprintf("class 0x%x", c)
}

func keyTypeName(k uint) string {
	switch k {
	case pkcs11.CKK_AES:
		return "aes"
	case pkcs11.CKK_GENERIC_SECRET:
		return "generic_secret"
	case pkcs11.CKK_RSA:
		return "rsa"
	case pkcs11.CKK_EC:
		return "ec"
	case 0x40: // CKK_EC_EDWARDS (PKCS#11 3.0)
		return "ec_edwards"
	}
	return fmt.Sprintf("key type 0x%x", k)
}
