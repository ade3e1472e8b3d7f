package cmk

import (
	"context"
	"maps"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// identityTTL bounds how long an entity's groups and metadata are taken from the cache: a change in Vault's
// identity store (a user removed from a group) reaches the keys' conditions within it.
const identityTTL = 5 * time.Second

// identityStore is keys.Identity backed by Vault's identity store, which the plugin's system view offers
// (EntityInfo, GroupsForEntity). Each entity's answer is cached for identityTTL, so that the conditions of a busy
// caller's requests do not each cost two calls to Vault.
type identityStore struct {
	system func() logical.SystemView
	now    func() time.Time // injected by tests

	mu      sync.Mutex
	entries map[string]identityEntry
}

type identityEntry struct {
	info    *keys.EntityInfo // nil: the store does not know the entity
	fetched time.Time
}

func newIdentityStore(system func() logical.SystemView) *identityStore {
	return &identityStore{system: system, now: time.Now, entries: map[string]identityEntry{}}
}

// Entity implements keys.Identity. An empty entity id (root and orphan tokens have none) resolves to nil.
func (s *identityStore) Entity(_ context.Context, entityID string) (*keys.EntityInfo, error) {
	if entityID == "" {
		return nil, nil
	}
	now := s.now()
	s.mu.Lock()
	e, ok := s.entries[entityID]
	s.mu.Unlock()
	if ok && now.Sub(e.fetched) < identityTTL {
		return e.info, nil
	}
	info, err := s.fetch(entityID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.entries) >= identityCacheSweep { // only entities seen within the TTL are worth keeping
		maps.DeleteFunc(s.entries, func(_ string, e identityEntry) bool { return now.Sub(e.fetched) >= identityTTL })
	}
	s.entries[entityID] = identityEntry{info: info, fetched: now}
	return info, nil
}

// identityCacheSweep is the cache size from which an insertion first drops the expired entries.
const identityCacheSweep = 1024

// fetch asks Vault's identity store for the entity's name, metadata and groups (direct and inherited).
func (s *identityStore) fetch(entityID string) (*keys.EntityInfo, error) {
	sys := s.system()
	entity, err := sys.EntityInfo(entityID)
	if err != nil || entity == nil {
		return nil, err
	}
	groups, err := sys.GroupsForEntity(entityID)
	if err != nil {
		return nil, err
	}
	info := &keys.EntityInfo{Name: entity.Name, Metadata: maps.Clone(entity.Metadata)}
	for _, g := range groups {
		info.Groups = append(info.Groups, keys.GroupRef{ID: g.ID, Name: g.Name})
	}
	return info, nil
}
