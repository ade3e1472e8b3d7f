# A key administrator: creates, configures, rotates, imports and deletes keys, and reads their settings.
# It cannot encrypt, decrypt or produce data keys (managing a key is not using it), and it cannot change the
# mount's settings: config/keys holds the deletion grace period, which a key administrator must not be able to
# set to 0 to destroy keys at once (that is cmk-mount-admin.hcl's).
path "cmk/keys" {
  capabilities = ["list"]
}

path "cmk/keys/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}

# The public half of the mount's import key, which vault transit import reads before wrapping.
path "cmk/wrapping_key" {
  capabilities = ["read"]
}

path "cmk/config/keys" {
  capabilities = ["read"]
}
