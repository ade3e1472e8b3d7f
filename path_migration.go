package cmk

import (
	"context"
	"sort"
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// The migration view (crypto-agility): per version and per algorithm, what a key's versions made and what still
// relies on them, so that an owner knows what must be rewrapped or re-signed before old versions are retired.
// It reads the key's usage analytics (internal/keys/versionuse.go) and no key material.

func (b *backend) pathMigration() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/migration",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
			OperationVerb:   "read",
			OperationSuffix: "key-migration",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Required: true, Description: "Name of the key."},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: handle(b.pathMigrationRead),
				Summary:  "Show, per version and per algorithm, what the key's versions made and what still relies on them.",
			},
		},
		HelpSynopsis: "What each version and algorithm of a key made and what still relies on it, before old versions are retired.",
		HelpDescription: "For each version: its type and state, whether it is within the decrypt window (it may still decrypt and verify), " +
			"how many encryptions, signatures and HMACs it made (made) and how many decryptions and verifications relied on it (opened, rewrap's decrypting half included), " +
			"when each last happened, and for AES versions the encryption count the nonce limit is kept by. counts_complete is false where the key's usage was " +
			"counted only after the version was made (usage analytics began later, or were off for a while). The same by algorithm, and pending_migration: " +
			"the versions below the latest, within the decrypt window or retired, that made something or whose counts are incomplete: what is rewrapped (rewrap) or signed again " +
			"before min_decryption_version is raised past them or they are destroyed. Counts come from the usage analytics (config/analytics): a restart loses at most one flush interval's; " +
			"with analytics off nothing is counted.",
	}
}

// migrationAlgorithm is one algorithm's line of the migration view.
type migrationAlgorithm struct {
	Versions        []int  `json:"versions"`
	InDecryptWindow []int  `json:"in_decrypt_window"`
	Made            uint64 `json:"made"`
	Opened          uint64 `json:"opened"`
	LastOpened      string `json:"last_opened"`
	DeprecatedSince string `json:"deprecated_since,omitempty"`
}

func (b *backend) pathMigrationRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil || k == nil {
		return nil, err
	}
	cfg, err := b.readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	uses, since := b.keys.VersionUses(ctx, req.Storage, k)
	now := time.Now()
	versions := map[string]interface{}{}
	algorithms := map[string]*migrationAlgorithm{}
	pending := []int{}
	numbers := make([]int, 0, len(k.Versions))
	for n := range k.Versions {
		numbers = append(numbers, n)
	}
	sort.Ints(numbers)
	for _, n := range numbers {
		v := k.Versions[n]
		u := uses[n]
		state := k.VersionState(n)
		inWindow := state == keys.StateActive || state == keys.StateDecryptOnly
		complete := k.Complete(n, since)
		info := map[string]interface{}{
			"type":              string(v.Type),
			"state":             state,
			"in_decrypt_window": inWindow,
			"made":              u.Made,
			"opened":            u.Opened,
			"last_made":         keys.FormatTime(u.LastMade),
			"last_opened":       keys.FormatTime(u.LastOpened),
			"counts_complete":   complete,
			"creation_time":     keys.FormatTime(v.CreatedAt),
		}
		if v.Type.IsAES() {
			if used, ok := b.keys.EncryptionCount(name, n); ok {
				info["encryptions"] = used
			}
		}
		a := algorithms[string(v.Type)]
		if a == nil {
			a = &migrationAlgorithm{Versions: []int{}, InDecryptWindow: []int{}}
			if at, ok := cfg.deprecatedSince(v.Type, now); ok {
				a.DeprecatedSince = formatDay(at)
			}
			algorithms[string(v.Type)] = a
		}
		if a.DeprecatedSince != "" {
			info["deprecated_since"] = a.DeprecatedSince
		}
		versions[strconv.Itoa(n)] = info
		a.Versions = append(a.Versions, n)
		a.Made += u.Made
		a.Opened += u.Opened
		if last := keys.FormatTime(u.LastOpened); last > a.LastOpened {
			a.LastOpened = last
		}
		if inWindow {
			a.InDecryptWindow = append(a.InDecryptWindow, n)
		}
		if (inWindow || state == keys.StateRetired) && n < k.LatestVersion && (u.Made > 0 || !complete) {
			pending = append(pending, n) // a retired version serves rewrap alone: what it protects is to be moved
		}
	}
	data := map[string]interface{}{
		"name":                   k.Name,
		"type":                   string(k.Type),
		"latest_version":         k.LatestVersion,
		"min_decryption_version": k.MinDecryptionVersion,
		"versions":               versions,
		"algorithms":             algorithms,
		"pending_migration":      pending,
		"analytics_enabled":      b.keys.AnalyticsOn(),
		"counted_since":          keys.FormatTime(since),
	}
	if k.NextType != "" {
		data["next_type"] = string(k.NextType)
	}
	return &logical.Response{Data: data}, nil
}
