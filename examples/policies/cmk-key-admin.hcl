# A key administrator: creates, configures, rotates and deletes keys, and reads their settings.
# It cannot encrypt, decrypt or produce data keys: managing a key is not using it.
path "cmk/keys" {
  capabilities = ["list"]
}

path "cmk/keys/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}

path "cmk/config/keys" {
  capabilities = ["read", "update"]
}
