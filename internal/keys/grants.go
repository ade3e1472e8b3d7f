package keys

import (
	"context"

	"github.com/hashicorp/vault/sdk/logical"
)

// admitByGrant admits caller's use of k for op on items items by a live grant of the caller's entity or one of its
// groups (info, nil for a caller without an entity), counting the uses. admitted is false when no live grant covers
// the use.
func (m *Manager) admitByGrant(ctx context.Context, s logical.Storage, k *Key, c Caller, info *EntityInfo, op Operation, items int) (admitted bool, err error) {
	return false, nil
}
