# An application that may only encrypt with the key "app" on the cmk/ mount.
# It cannot decrypt, use any other key, create keys (no "create": upsert is refused) or read key settings.
path "cmk/encrypt/app" {
  capabilities = ["update"]
}
