# cmk-xks-proxy: the token of the AWS External Key Store front end (cmd/cmk-xks-proxy). It forwards AWS KMS's
# signed requests and looks itself up for /healthz, nothing else: the engine verifies each request's SigV4 signature with the key store's
# credentials, which this token can neither read nor change, and serves it through the keys' own conditions.
path "cmk/xks/request" {
  capabilities = ["update"]
}

# /healthz checks that the token is still good (Vault's default policy allows this too).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
