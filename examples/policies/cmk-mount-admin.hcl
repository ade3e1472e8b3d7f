# A mount administrator: the mount's key defaults (deletion grace period, upsert, batch size, rotation default)
# and its HSM connection (token, PIN, pool). Neither uses nor manages keys. Give it to fewer people than the key
# administrator's policy: a grace period of 0 makes every key and version deletion immediate.
path "cmk/config/keys" {
  capabilities = ["read", "update"]
}

path "cmk/config/hsm" {
  capabilities = ["create", "read", "update"]
}
