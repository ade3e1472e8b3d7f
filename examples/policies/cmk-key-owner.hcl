# A key owner: decides who may use the key "app" and under which conditions, and gives just-in-time grants on it.
# Its access conditions (keys/app/access: source networks, hours, groups, entities, entity metadata,
# grants_required) and its grants (keys/app/grants: an entity or group, some operations, a ttl, a number of uses)
# are the second gate every use of the key passes after Vault's ACL. The owner uses no key and manages none of its
# versions: encrypting, rotating and destroying are other roles' (cmk-encrypt-app.hcl, cmk-key-admin.hcl). Where
# the key needs approvals, changing or removing its conditions and granting on a grants_required key are held
# for custodians (cmk-custodian.hcl) like any request that weakens a key's protection.
path "cmk/keys/app" {
  capabilities = ["read"]
}

path "cmk/keys/app/access" {
  capabilities = ["read", "update", "delete"]
}

# Create a grant (a write to keys/app/grants), list them, read or revoke one.
path "cmk/keys/app/grants" {
  capabilities = ["update"]
}

path "cmk/keys/app/grants/" {
  capabilities = ["list"]
}

path "cmk/keys/app/grants/*" {
  capabilities = ["read", "delete"]
}

path "cmk/keys/app/history" {
  capabilities = ["read"]
}
