# A service that may only decrypt (and rewrap to the latest version) with the key "app".
path "cmk/decrypt/app" {
  capabilities = ["update"]
}

path "cmk/rewrap/app" {
  capabilities = ["update"]
}
