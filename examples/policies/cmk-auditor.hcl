# An auditor: reads key settings, versions, history and HSM metadata, the HSM connection state, and how storage
# and the token differ (reconcile, read-only); verifies each key's history chain (keys/<name>/history/verify, under
# cmk/keys/*) and reads the audit key's public keys to verify it offline; changes and uses nothing.
path "cmk/keys" {
  capabilities = ["list"]
}

path "cmk/keys/*" {
  capabilities = ["read", "list"]
}

path "cmk/config/*" {
  capabilities = ["read"]
}

# config/hsm is a sudo path: Vault asks for sudo on every operation there, reads included. With read and no
# update, sudo lets the auditor read the connection state and nothing more.
path "cmk/config/hsm" {
  capabilities = ["read", "sudo"]
}

path "cmk/reconcile" {
  capabilities = ["read"]
}

path "cmk/audit_key" {
  capabilities = ["read"]
}
