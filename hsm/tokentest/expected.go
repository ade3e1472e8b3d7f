package tokentest

// Capabilities is what an implementation of the matrix is known to serve, from running the engine against it
// (HSM-NOTES.md, docs/HSMS.md). Tests hold the engine's own probe to it: a probe that wrongly said "unsupported"
// would otherwise pass as a refusal.
type Capabilities struct {
	// Serves names the algorithms (hsm.Algorithm values) whose versions the token makes and uses.
	Serves []string
	// ListedButRefused names algorithms whose mechanisms the token lists, and whose first generation then fails
	// (the engine refuses them from then on): served by the probe until that generation only.
	ListedButRefused []string
	// AllowedMechanisms: CKA_ALLOWED_MECHANISMS is stored on token objects.
	AllowedMechanisms bool
	// OAEPSHA256: CKM_RSA_PKCS_OAEP takes SHA-256.
	OAEPSHA256 bool
	// KeyWrap is the mechanism that unwraps RFC 5649 (0: none, no BYOK).
	KeyWrap uint
	// PSS: CKM_RSA_PKCS_PSS is offered.
	PSS bool
}

var rsaAll = []string{"rsa2048", "rsa3072", "rsa4096"}

// Expected is the known capability table, per implementation.
var Expected = map[Kind]Capabilities{
	SoftHSM: {
		Serves:            append(append([]string{"aes128", "aes256", "hmac"}, rsaAll...), "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519"),
		AllowedMechanisms: true,
		OAEPSHA256:        false, // SoftHSM 2.6's OAEP takes SHA-1 only
		KeyWrap:           0x210A,
		PSS:               true,
	},
	NSS: { // no Ed25519; CKA_ALLOWED_MECHANISMS fails on token objects
		Serves:     append(append([]string{"aes128", "aes256", "hmac"}, rsaAll...), "ecdsa-p256", "ecdsa-p384", "ecdsa-p521"),
		OAEPSHA256: true,
		KeyWrap:    0x210B,
		PSS:        true,
	},
	OpenCryptoki: { // the soft token: no AES-GCM, no EC, no key wrap
		Serves:     append([]string{"hmac"}, rsaAll...),
		OAEPSHA256: true,
		PSS:        true,
	},
	TPM2: { // no secret keys (no C_GenerateKey), RSA up to 3072 bits, P-521 listed but unusable
		Serves:           []string{"rsa2048", "rsa3072", "ecdsa-p256", "ecdsa-p384"},
		ListedButRefused: []string{"ecdsa-p521"},
		OAEPSHA256:       true,
		PSS:              true,
	},
}

// ServesAlgorithm reports whether c says the token serves alg; listed reports it as the probe sees it before any
// generation (ListedButRefused included).
func (c Capabilities) ServesAlgorithm(alg string, listed bool) bool {
	for _, a := range c.Serves {
		if a == alg {
			return true
		}
	}
	if listed {
		for _, a := range c.ListedButRefused {
			if a == alg {
				return true
			}
		}
	}
	return false
}
