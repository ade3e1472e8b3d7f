# cmk-xks-proxy: the token of the AWS External Key Store front end (cmd/cmk-xks-proxy). It forwards AWS KMS's
# signed requests and can do nothing else: the engine verifies each request's SigV4 signature with the key store's
# credentials, which this token can neither read nor change, and serves it through the keys' own conditions.
path "cmk/xks/request" {
  capabilities = ["update"]
}
