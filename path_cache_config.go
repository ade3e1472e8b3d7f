package cmk

import (
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// configCachePath holds the size of the cache of key snapshots (Transit's cache-config).
const configCachePath = "config/cache"

type cacheConfig struct {
	Size int `json:"size"`
}

func (b *backend) pathCacheConfig() *framework.Path {
	return &framework.Path{
		Pattern: "cache-config",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
		},
		Fields: map[string]*framework.FieldSchema{
			"size": {
				Type:        framework.TypeInt,
				Default:     0,
				Description: "How many key snapshots to keep in memory: 0 (default) keeps every key's; otherwise at least 10, the least recently used dropped and read from storage again when next used.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.pathCacheConfigRead,
				Summary:      "Read the size of the key cache.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read", OperationSuffix: "cache-configuration"},
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     handle(b.pathCacheConfigWrite),
				Summary:      "Set the size of the key cache; it applies at once.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "configure", OperationSuffix: "cache"},
			},
		},
		HelpSynopsis: "Size of the in-memory cache of key metadata (Transit's cache-config).",
		HelpDescription: `Key metadata (versions, CKA_IDs, settings) is cached per key, so that a request on a cached key reads no
storage. With very many keys an operator may bound the cache: size 0 (default) caches every key used; a size of
10 or more keeps that many, dropping the least recently used. Unlike Transit, a new size applies at once, without
reloading the plugin. Key material is never cached here: it stays in the HSM.`,
	}
}

func (b *backend) readCacheConfig(ctx context.Context, s logical.Storage) (cacheConfig, error) {
	var c cacheConfig
	e, err := s.Get(ctx, configCachePath)
	if err != nil || e == nil {
		return c, err
	}
	return c, e.DecodeJSON(&c)
}

func (b *backend) pathCacheConfigRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	c, err := b.readCacheConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{"size": c.Size, "cached_keys": b.keys.CachedKeys()}}, nil
}

func (b *backend) pathCacheConfigWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	size := d.Get("size").(int)
	if size != 0 && size < 10 {
		return respond(callerf("size must be 0 (unbounded) or at least 10, not %d", size))
	}
	e, err := logical.StorageEntryJSON(configCachePath, cacheConfig{Size: size})
	if err != nil {
		return nil, err
	}
	if err := req.Storage.Put(ctx, e); err != nil {
		return nil, err
	}
	if err := b.keys.SetCacheSize(size); err != nil {
		return nil, err
	}
	return b.pathCacheConfigRead(ctx, req, d)
}

// applyCacheConfig sizes the key cache from storage: when the mount is set up, and when another node changed it.
func (b *backend) applyCacheConfig(ctx context.Context, s logical.Storage) error {
	c, err := b.readCacheConfig(ctx, s)
	if err != nil {
		return err
	}
	return b.keys.SetCacheSize(c.Size)
}
