package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// trustedKey is one audit public key the auditor gave, with where it came from. Version is 0 when the file did
// not say (a bare PEM file): the bundle then tells which version it is (auditKeysFor).
type trustedKey struct {
	Source  string
	Version int
	Key     *ecdsa.PublicKey
}

// Fingerprint is the hex SHA-256 of the key's PKIX encoding, for a person to compare with what audit_key shows.
func (k trustedKey) Fingerprint() string {
	der, _ := x509.MarshalPKIXPublicKey(k.Key)
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// loadAuditKeys reads --audit-key values: comma-separated files, each a PEM public key ("N=file.pem" names its
// version) or the JSON that `vault read -format=json cmk/audit_key` writes.
func loadAuditKeys(specs []string) ([]trustedKey, error) {
	var keys []trustedKey
	for _, spec := range specs {
		for _, item := range strings.Split(spec, ",") {
			item = strings.TrimSpace(item)
			if item == "" {
				continue
			}
			version, path := 0, item
			if v, p, ok := strings.Cut(item, "="); ok {
				n, err := strconv.Atoi(v)
				if err != nil || n < 1 {
					return nil, usageErrorf("--audit-key %q: the version before '=' must be a number from 1", item)
				}
				version, path = n, p
			}
			raw, err := os.ReadFile(path)
			if err != nil {
				return nil, usageErrorf("--audit-key: %v", err)
			}
			got, err := parseAuditKeyFile(path, version, raw)
			if err != nil {
				return nil, usageErrorf("--audit-key %s: %v", path, err)
			}
			keys = append(keys, got...)
		}
	}
	if len(keys) == 0 {
		return nil, usageErrorf("--audit-key is required: the audit public key (PEM, or vault read -format=json cmk/audit_key)")
	}
	return keys, nil
}

func parseAuditKeyFile(path string, version int, raw []byte) ([]trustedKey, error) {
	trimmed := bytes.TrimSpace(raw)
	if len(trimmed) > 0 && trimmed[0] == '{' {
		if version != 0 {
			return nil, fmt.Errorf("a JSON audit key file names its versions itself: give it without \"N=\"")
		}
		return parseAuditKeyJSON(path, trimmed)
	}
	pub, err := evidence.ParseAuditKey(string(raw))
	if err != nil {
		return nil, err
	}
	return []trustedKey{{Source: path, Version: version, Key: pub}}, nil
}

// parseAuditKeyJSON reads audit_key as Vault returns it, with or without the response's "data" envelope: its
// versions under "keys" (or "versions"), either a map from version to a PEM string or to an object with
// "public_key", or a list of objects with "version" and "public_key".
func parseAuditKeyJSON(path string, raw []byte) ([]trustedKey, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(raw, &top); err != nil {
		return nil, fmt.Errorf("not JSON: %w", err)
	}
	if data, ok := top["data"]; ok {
		top = nil
		if err := json.Unmarshal(data, &top); err != nil {
			return nil, fmt.Errorf("\"data\" is not an object: %w", err)
		}
	}
	list := top["keys"]
	if list == nil {
		list = top["versions"]
	}
	if list == nil {
		return nil, fmt.Errorf("no \"keys\" or \"versions\" in the audit key JSON")
	}
	pems := map[int]string{}
	var byVersion map[string]json.RawMessage
	if json.Unmarshal(list, &byVersion) == nil {
		for v, entry := range byVersion {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return nil, fmt.Errorf("audit key version %q is not a number from 1", v)
			}
			var pemText string
			if json.Unmarshal(entry, &pemText) != nil {
				var obj struct {
					PublicKey string `json:"public_key"`
				}
				if err := json.Unmarshal(entry, &obj); err != nil || obj.PublicKey == "" {
					return nil, fmt.Errorf("audit key version %d has no public_key", n)
				}
				pemText = obj.PublicKey
			}
			pems[n] = pemText
		}
	} else {
		var entries []struct {
			Version   int    `json:"version"`
			PublicKey string `json:"public_key"`
		}
		if err := json.Unmarshal(list, &entries); err != nil {
			return nil, fmt.Errorf("audit key versions are neither a map nor a list: %w", err)
		}
		for _, e := range entries {
			if e.Version < 1 || e.PublicKey == "" {
				return nil, fmt.Errorf("an audit key entry lacks its version or public_key")
			}
			pems[e.Version] = e.PublicKey
		}
	}
	if len(pems) == 0 {
		return nil, fmt.Errorf("the audit key JSON lists no versions")
	}
	var keys []trustedKey
	for v, p := range pems {
		pub, err := evidence.ParseAuditKey(p)
		if err != nil {
			return nil, fmt.Errorf("version %d: %w", v, err)
		}
		keys = append(keys, trustedKey{Source: fmt.Sprintf("%s (version %d)", path, v), Version: v, Key: pub})
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].Version < keys[j].Version })
	return keys, nil
}

// auditKeysFor maps the audit key versions a bundle names to the keys given. Every key given is trusted, so a
// version label only picks which key checks which signature: a key whose file named its version takes that
// version; an unversioned key takes the version the document lists for that same key, or, when it is the only
// unversioned key, every version the bundle names that nothing else took. A version no key takes stays missing,
// and the signature it made does not verify.
func auditKeysFor(given []trustedKey, listed map[int]string, named []int) evidence.AuditKeys {
	keys := evidence.AuditKeys{}
	var unversioned []trustedKey
	for _, k := range given {
		if k.Version != 0 {
			keys[k.Version] = k.Key
		} else {
			unversioned = append(unversioned, k)
		}
	}
	for _, k := range unversioned {
		for v, p := range listed {
			if pub, err := evidence.ParseAuditKey(p); err == nil && pub.Equal(k.Key) && keys[v] == nil {
				keys[v] = k.Key
			}
		}
	}
	if len(unversioned) == 1 {
		for _, v := range named {
			if keys[v] == nil {
				keys[v] = unversioned[0].Key
			}
		}
	}
	return keys
}
