# A mount administrator: the mount's key defaults (deletion grace period, upsert, batch size, rotation default),
# its HSM connection (token, PIN, pool), and the mount-wide comparison of storage with the token after a restore
# (reconcile; with adopt=true it adopts versions a storage restore lost, which the key administrator can also do
# key by key). Neither uses nor manages keys. Give it to fewer people than the key
# administrator's policy: a grace period of 0 makes every key and version deletion immediate.
path "cmk/config/keys" {
  capabilities = ["read", "update"]
}

path "cmk/config/hsm" {
  capabilities = ["create", "read", "update"]
}

path "cmk/reconcile" {
  capabilities = ["read", "update"]
}
