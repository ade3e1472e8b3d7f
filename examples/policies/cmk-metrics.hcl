# A Prometheus scraper of the cmk mount: reads its metrics, nothing else (no key, no setting).
# The health path needs no policy: it takes no token.
path "cmk/metrics" {
  capabilities = ["read"]
}
