# Vault Agent for cmk-xks-proxy: auto-auth with AppRole, the token written to a file the proxy reads
# (-token-file /run/cmk-xks-proxy/token) and reads again whenever the agent renews or replaces it.
# The role's token policy is examples/policies/cmk-xks-proxy.hcl.
vault {
  address = "https://vault.example.internal:8200"
}

auto_auth {
  method "approle" {
    config = {
      role_id_file_path                   = "/etc/cmk-xks-proxy/role-id"
      secret_id_file_path                 = "/etc/cmk-xks-proxy/secret-id"
      remove_secret_id_file_after_reading = false
    }
  }

  sink "file" {
    config = {
      path = "/run/cmk-xks-proxy/token"
      mode = 0600
    }
  }
}
