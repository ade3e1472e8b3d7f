# A mount administrator: the mount's key defaults (deletion grace period, upsert, batch size, rotation default),
# its HSM connection (token, PIN, pool), and the mount-wide comparison of storage with the token after a restore
# (reconcile; with adopt=true it adopts versions a storage restore lost, which the key administrator can also do
# key by key), and adoption on an operator's word of material whose origin the token cannot show
# (reconcile/adopt-unverified), and the rotation of the audit key that signs the keys' history (audit_key/rotate;
# who rotated is the new version's created_by). config/hsm and reconcile/adopt-unverified are sudo paths: Vault refuses them
# without sudo, whatever the other capabilities. Neither uses nor manages keys. Give it to fewer people than the key
# administrator's policy: a grace period of 0 makes every key and version deletion immediate (unless purge protection,
# one-way, is on: then nothing is destroyed before its floor).
path "cmk/config/keys" {
  capabilities = ["read", "update"]
}

path "cmk/config/hsm" {
  capabilities = ["create", "read", "update", "sudo"]
}

path "cmk/reconcile" {
  capabilities = ["read", "update"]
}

path "cmk/reconcile/adopt-unverified" {
  capabilities = ["update", "sudo"]
}

path "cmk/reconcile/adopt-unverified/*" {
  capabilities = ["update", "sudo"]
}

path "cmk/audit_key" {
  capabilities = ["read"]
}

path "cmk/audit_key/rotate" {
  capabilities = ["update"]
}
