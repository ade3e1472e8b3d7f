package keys

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/hashicorp/vault/sdk/logical"
)

// Storage layout. Everything that grows with a key's life has entries of bounded size: versions in chunks of
// versionChunk, history in pages (history.go), usage reservations in one small entry per key (usage.go), grants
// in one entry each under grants/<name>/<id> (grants.go).
const (
	PolicyPrefix   = "policy/"   // policy/<name>: settings, no versions
	VersionsPrefix = "versions/" // versions/<name>/<chunk>: versions chunk*256+1 … (chunk+1)*256
	versionChunk   = 256
)

// NameOf returns the key a storage entry belongs to, if it is a key's entry (for Vault's invalidations).
func NameOf(storageKey string) (name string, usage, ok bool) {
	for _, prefix := range []string{PolicyPrefix, VersionsPrefix, usagePrefix} {
		if rest, found := strings.CutPrefix(storageKey, prefix); found {
			name, _, _ = strings.Cut(rest, "/")
			return name, prefix == usagePrefix, true
		}
	}
	return "", false, false
}

// VersionChunk is how many versions one storage entry holds.
const VersionChunk = versionChunk

// VersionsKey is the storage key of a key's chunk of versions.
func VersionsKey(name string, chunk int) string { return versionsKey(name, chunk) }

func versionsKey(name string, chunk int) string {
	return fmt.Sprintf("%s%s/%d", VersionsPrefix, name, chunk)
}

func chunkOf(v int) int { return (v - 1) / versionChunk }

// Load reads a key and its versions from storage, bypassing every cache: for audits, reconciliation and tests.
func Load(ctx context.Context, s logical.Storage, name string) (*Key, error) {
	return load(ctx, s, name)
}

// load reads a key and its versions, nil if it does not exist. Versions above LatestVersion are ignored: they
// belong to a rotation whose key entry was never written, and the WAL rollback destroys their objects.
func load(ctx context.Context, s logical.Storage, name string) (*Key, error) {
	e, err := s.Get(ctx, PolicyPrefix+name)
	if err != nil {
		return nil, fmt.Errorf("read key %q: %w", name, err)
	}
	if e == nil {
		return nil, nil
	}
	var k Key
	if err := e.DecodeJSON(&k); err != nil {
		return nil, fmt.Errorf("decode key %q: %w", name, err)
	}
	k.Versions = map[int]*Version{}
	for c := 0; k.LatestVersion > 0 && c <= chunkOf(k.LatestVersion); c++ {
		ce, err := s.Get(ctx, versionsKey(name, c))
		if err != nil {
			return nil, fmt.Errorf("read key %q versions: %w", name, err)
		}
		if ce == nil {
			continue
		}
		var chunk map[int]*Version
		if err := json.Unmarshal(ce.Value, &chunk); err != nil {
			return nil, fmt.Errorf("decode key %q versions: %w", name, err)
		}
		for n, v := range chunk {
			if n <= k.LatestVersion {
				k.Versions[n] = v
			}
		}
	}
	for n := 1; n <= k.LatestVersion; n++ {
		v := k.Versions[n]
		if v == nil && k.Deleting {
			continue // removed by a deletion cut short: the next attempt finishes it
		}
		if v == nil {
			return nil, fmt.Errorf("key %q: version %d is missing from storage", name, n)
		}
		k.typeLegacy(v)
		if v.PublicKey != "" {
			if v.pub, err = parsePublicKey(v.Type, v.PublicKey); err != nil {
				return nil, fmt.Errorf("key %q version %d: %w", name, n, err)
			}
		}
	}
	return &k, nil
}

// typeLegacy gives a version stored before versions kept their type the key's: until a rotation changed the type,
// every version had it (a rotation that changes it stores every version with its own).
func (k *Key) typeLegacy(v *Version) {
	if v.Type == "" {
		v.Type = k.Type
	}
	if v.Type == TypeHMAC && v.HMACKeySize == 0 {
		v.HMACKeySize = k.HMACKeyBytes()
	}
}

// store persists k, with the version chunks holding the versions listed in changed. Chunks are written before the
// key entry, so a crash in between leaves at most a version above LatestVersion, which load ignores.
func store(ctx context.Context, s logical.Storage, k *Key, changed []int) error {
	chunks := map[int]bool{}
	for _, v := range changed {
		chunks[chunkOf(v)] = true
	}
	for c := range chunks {
		part := map[int]*Version{}
		for n := c*versionChunk + 1; n <= (c+1)*versionChunk && n <= k.LatestVersion; n++ {
			part[n] = k.Versions[n]
		}
		e, err := logical.StorageEntryJSON(versionsKey(k.Name, c), part)
		if err != nil {
			return err
		}
		if err := s.Put(ctx, e); err != nil {
			return fmt.Errorf("store key %q versions: %w", k.Name, err)
		}
	}
	e, err := logical.StorageEntryJSON(PolicyPrefix+k.Name, k)
	if err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		return fmt.Errorf("store key %q: %w", k.Name, err)
	}
	return nil
}

// remove deletes a key's metadata, usage counts, analytics, anomaly actions and grants; its history stays, as evidence. The key entry, stored with
// Deleting set before anything was destroyed, goes last: a removal cut short leaves a key that serves nothing and
// loads without the versions already removed, and the next attempt (the scheduler's, or a second delete) finishes.
func remove(ctx context.Context, s logical.Storage, k *Key) error {
	if !k.Deleting {
		return fmt.Errorf("remove key %q: it is not marked as being deleted", k.Name)
	}
	if err := s.Delete(ctx, usagePrefix+k.Name); err != nil {
		return fmt.Errorf("remove key %q usage counts: %w", k.Name, err)
	}
	for _, entry := range []string{analyticsPrefix + k.Name, anomalyActionsPrefix + k.Name} {
		if err := s.Delete(ctx, entry); err != nil {
			return fmt.Errorf("remove key %q usage analytics: %w", k.Name, err)
		}
	}
	if err := removeGrants(ctx, s, k.Name); err != nil {
		return fmt.Errorf("remove key %q grants: %w", k.Name, err)
	}
	for c := 0; k.LatestVersion > 0 && c <= chunkOf(k.LatestVersion); c++ {
		if err := s.Delete(ctx, versionsKey(k.Name, c)); err != nil {
			return fmt.Errorf("remove key %q versions: %w", k.Name, err)
		}
	}
	if err := s.Delete(ctx, PolicyPrefix+k.Name); err != nil {
		return fmt.Errorf("remove key %q: %w", k.Name, err)
	}
	return nil
}

// List returns the names of the mount's keys.
func List(ctx context.Context, s logical.Storage) ([]string, error) {
	return s.List(ctx, PolicyPrefix)
}
