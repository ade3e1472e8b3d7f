# An auditor: reads key settings, versions and HSM metadata and the HSM connection state; changes and uses nothing.
path "cmk/keys" {
  capabilities = ["list"]
}

path "cmk/keys/*" {
  capabilities = ["read", "list"]
}

path "cmk/config/*" {
  capabilities = ["read"]
}
