# An auditor: reads key settings, versions, history and HSM metadata, the HSM connection state, and how storage
# and the token differ (reconcile, read-only); changes and uses nothing.
path "cmk/keys" {
  capabilities = ["list"]
}

path "cmk/keys/*" {
  capabilities = ["read", "list"]
}

path "cmk/config/*" {
  capabilities = ["read"]
}

path "cmk/reconcile" {
  capabilities = ["read"]
}
