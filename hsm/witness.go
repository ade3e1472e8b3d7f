package hsm

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"
)

// A usage witness is a small object beside a version on the token whose label holds the highest count of
// encryptions ever reserved for the version. Vault's storage can be restored from an older snapshot and forget the
// reservations made since; the token is not restored with it. The engine takes the higher of the two counts, so
// no version encrypts beyond its limit (the configured one, and AES-GCM's 2^32 with random nonces) after a restore.
//
// The witness is a secret key the token generates, sensitive, never extractable and good for nothing (every usage
// flag false): what it witnesses is in its label, which every token keeps, and its CKA_ID is the version's with
// witnessSuffix, so that it is found by CKA_ID and destroyed with the version. A data object would be the natural
// holder, but NSS's softoken refuses data objects (CKR_ATTRIBUTE_VALUE_INVALID), and a readable secret would look,
// to an HSM audit, like key material left extractable. A witness is raised by generating one with the higher count
// before destroying the lower ones: a crash in between leaves two, and the higher counts.

const witnessSuffix = "/uses"

// witnessID is the CKA_ID of version id's usage witness.
func witnessID(id []byte) []byte {
	return append(append(make([]byte, 0, len(id)+len(witnessSuffix)), id...), witnessSuffix...)
}

// witnessLabel is the CKA_LABEL of a witness of the version labelled versionLabel that holds count n.
func witnessLabel(versionLabel string, n uint64) string {
	return versionLabel + witnessSuffix + "/" + strconv.FormatUint(n, 10)
}

// witnessCount reads the count from a witness's label.
func witnessCount(label string) (uint64, bool) {
	i := strings.LastIndex(label, witnessSuffix+"/")
	if i < 0 {
		return 0, false
	}
	n, err := strconv.ParseUint(label[i+len(witnessSuffix)+1:], 10, 64)
	return n, err == nil
}

func witnessSearch(id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_ID, witnessID(id)),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	}
}

func witnessTemplate(id []byte, label string) []*pkcs11.Attribute {
	t := append(witnessSearch(id),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 16),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
	)
	for _, a := range []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY,
		pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE} {
		t = append(t, pkcs11.NewAttribute(a, false))
	}
	return t
}

// readWitnesses returns version id's witnesses with their counts, and the highest count.
func readWitnesses(c pkcs11API, sh pkcs11.SessionHandle, id []byte) (map[pkcs11.ObjectHandle]uint64, uint64, error) {
	hs, err := findObjects(c, sh, witnessSearch(id), 0)
	if err != nil {
		return nil, 0, err
	}
	out := map[pkcs11.ObjectHandle]uint64{}
	var high uint64
	for _, h := range hs {
		a, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
		if err != nil {
			return nil, 0, err
		}
		n, ok := witnessCount(string(a[0].Value))
		if !ok {
			return nil, 0, fmt.Errorf("the object with the CKA_ID of a usage witness is labelled %q, not as one", a[0].Value)
		}
		out[h] = n
		high = max(high, n)
	}
	return out, high, nil
}

// UsageWitness returns the count version id's witness holds on the token, and whether there is one. A search
// that finds nothing is believed only while the session is still logged in.
func (t *Token) UsageWitness(ctx context.Context, id []byte) (uint64, bool, error) {
	if len(id) == 0 {
		return 0, false, fmt.Errorf("%w: empty CKA_ID", ErrInvalidArgument)
	}
	// A version that never reserved an encryption has no witness: the object index answers that without a search.
	if held, err := t.holdsID(ctx, witnessID(id)); err != nil || !held {
		return 0, false, err
	}
	var n uint64
	var found bool
	err := t.do(ctx, "read usage witness", func(c pkcs11API, s session) error {
		ws, high, err := readWitnesses(c, s.h, id)
		if err != nil {
			return err
		}
		n, found = high, len(ws) > 0
		if !found {
			return nothingFoundBelieved(c, s)
		}
		return nil
	})
	return n, found, err
}

// RaiseUsageWitness records on the token that version id (labelled versionLabel) has reserved n encryptions, and
// returns the count the token held before (0 when none). It never lowers a witness: one already at n or above is
// left as it is, so repeating it is safe; a caller whose own count is below what it returns is behind the token.
func (t *Token) RaiseUsageWitness(ctx context.Context, id []byte, versionLabel string, n uint64) (uint64, error) {
	if len(id) == 0 || versionLabel == "" {
		return 0, fmt.Errorf("%w: empty CKA_ID or label", ErrInvalidArgument)
	}
	held, err := t.holdsID(ctx, witnessID(id))
	if err != nil {
		return 0, err
	}
	var before uint64
	attempts := 0
	err = t.doObjects(ctx, "raise usage witness", func(c pkcs11API, s session) error {
		var ws map[pkcs11.ObjectHandle]uint64
		var high uint64
		var err error
		// Where the object index knows of no witness, the first is written without a search; a repeated attempt
		// looks, since the one before may have written it.
		if attempts++; held || attempts > 1 {
			if ws, high, err = readWitnesses(c, s.h, id); err != nil {
				return err
			}
		}
		before = high
		if len(ws) > 0 && high >= n {
			return nil
		}
		if _, err := c.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)},
			witnessTemplate(id, witnessLabel(versionLabel, n))); err != nil {
			return err
		}
		if len(ws) == 0 {
			return nil // no lower witness to destroy
		}
		// Read again rather than trust the old handles: a token that keeps one key per CKA_ID (NSS) has replaced
		// the old witness with the new one.
		if ws, _, err = readWitnesses(c, s.h, id); err != nil {
			return err
		}
		for h, count := range ws {
			if count >= n {
				continue
			}
			if err := c.DestroyObject(s.h, h); err != nil {
				if rv, ok := rvOf(err); ok && (rv == pkcs11.CKR_OBJECT_HANDLE_INVALID || rv == pkcs11.CKR_KEY_HANDLE_INVALID) {
					continue
				}
				return err // the higher one is written: a lower one left over changes nothing
			}
		}
		return nil
	})
	return before, err
}
