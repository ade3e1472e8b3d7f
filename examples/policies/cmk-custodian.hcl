# A key custodian: approves or rejects requests held for dual control (destroy a version, delete a key, trim,
# import_version, re-enable a disabled key, weaken a key's dual control, ...), and reads what they are about: the
# held request, the key's settings and versions, its history. It uses no key and changes no key itself: an
# approval executes the requester's request, never the custodian's.
#
# Give it to people, each logging in as their own Vault entity (userpass, OIDC, ...): an approval counts one per
# entity, never the requester's, and a token without an entity (root, orphan tokens) cannot approve. A key's
# approver_groups can narrow custodians further to members of some Vault groups. Put the custodians' auth method
# under Vault's login MFA so that no approval is given without a second factor.
path "cmk/approvals" {
  capabilities = ["list"]
}

path "cmk/approvals/+" {
  capabilities = ["read"]
}

path "cmk/approvals/+/approve" {
  capabilities = ["update"]
}

path "cmk/approvals/+/reject" {
  capabilities = ["update"]
}

# Context for the decision: the key's settings, versions (metadata, never material) and history. The same pattern as
# cmk-key-admin.hcl's, so that a person holding both keeps the key administrator's rights: Vault takes the most
# specific pattern that matches a path, and does not add up the capabilities of different patterns.
path "cmk/keys" {
  capabilities = ["list"]
}

path "cmk/keys/*" {
  capabilities = ["read"]
}
