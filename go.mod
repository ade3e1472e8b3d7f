module github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk

go 1.25.0

require (
	github.com/hashicorp/go-hclog v1.6.3
	github.com/miekg/pkcs11 v1.1.2
)

require (
	github.com/davecgh/go-spew v1.1.2-0.20180830191138-d8f796af33cc // indirect
	github.com/fatih/color v1.18.0 // indirect
	github.com/mattn/go-colorable v0.1.14 // indirect
	github.com/mattn/go-isatty v0.0.20 // indirect
	github.com/pmezard/go-difflib v1.0.1-0.20181226105442-5d4384ee4fb2 // indirect
	github.com/stretchr/testify v1.10.0 // indirect
	golang.org/x/sys v0.34.0 // indirect
)
