package hsm

import (
	"context"
	"fmt"
	"math/big"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// Capabilities is what a token can do and how it must be asked, learnt from the token once per process: its
// mechanism list (with key sizes), and probes of what the list does not tell. Nothing here is assumed from
// SoftHSM; quirks of a known module are named as such.
type Capabilities struct {
	mechanisms map[uint]pkcs11.MechanismInfo

	// AllowedMechanisms: the token stores CKA_ALLOWED_MECHANISMS on token objects (NSS fails with
	// CKR_GENERAL_ERROR, opencryptoki refuses the attribute type).
	AllowedMechanisms bool
	// OAEPSHA256: CKM_RSA_PKCS_OAEP takes SHA-256 (SoftHSM 2.6's takes SHA-1 only). Without it, Transit's RSA
	// decryption needs raw RSA on the key (CKM_RSA_X_509) and the padding checked in the plugin.
	OAEPSHA256 bool
	// KeyWrap is the mechanism that unwraps RFC 5649 (AES key wrap with padding), 0 if none.
	KeyWrap uint

	quirks quirks

	// labelSearch: whether C_FindObjects matches CKA_LABEL here (labelSearchWorks or labelSearchFails; 0 until
	// probed, see Token.labelSearch).
	labelSearch atomic.Int32

	// importRefused: algorithms the token serves but cannot import (Imports), with why; set by the probe.
	importRefused map[Algorithm]string

	// refused records algorithms the token listed mechanisms for but failed to make a usable key of (tpm2-pkcs11
	// lists EC key sizes up to 638 bits and answers P-521 with an unusable point): Algorithm → reason.
	refused sync.Map
}

// quirks are behaviours of a known module that the standard does not let a client discover.
type quirks struct {
	// serialObjectWrites: creating objects from several sessions at once fails now and then (SoftHSM's file
	// object store, CKR_GENERAL_ERROR); such calls go one at a time per token and are repeated.
	serialObjectWrites bool
	retryGeneralError  bool
	// pad210A: 0x210A (CKM_AES_KEY_WRAP_PAD) is RFC 5649 on this module, as on SoftHSM 2.6; on NSS it is AES key
	// wrap with PKCS#7 padding, and on modules that follow PKCS#11 3.0, RFC 5649 is 0x210B.
	pad210A bool
	// reinitAfterDestroy: after C_DestroyObject the module gives new objects numbers that live objects still have
	// (tpm2-pkcs11 1.9: a new pair came back as public 3 and private 3 while another key's public half was 3, and
	// the next signature put the TPM into its failure mode). After a destruction the module is re-initialised,
	// which numbers every object afresh, before anything else is made on the token.
	reinitAfterDestroy bool
	// reinitAfterRefusal: an operation the module refuses (a bad ciphertext, a salt it does not take) leaves the
	// key unable to be destroyed (tpm2-pkcs11 1.9: CKR_FUNCTION_FAILED) until the module is re-initialised.
	reinitAfterRefusal bool
	// oneSession: concurrent sessions interfere (tpm2-pkcs11 1.9 answers CKR_OPERATION_NOT_INITIALIZED to a C_Sign
	// right after its C_SignInit when other sessions work meanwhile): operations use one session at a time.
	oneSession bool
	// nssDBOnUnwrappedEC: an EC private key unwrapped onto the token needs CKA_NSS_DB in the template (NSS softokn
	// 3.87 answers CKR_TEMPLATE_INCOMPLETE without it, whatever the PKCS#8 holds). softokn keeps the public value of
	// a private key there; it does not check it, and nothing here reads it (the public key is recovered from
	// signatures, see importedCurvePublicKey), so the version's CKA_ID stands in for the point, which the
	// plugin cannot know before the key is unwrapped.
	nssDBOnUnwrappedEC bool
}

func quirksOf(lib pkcs11.Info, info TokenInfo) quirks {
	switch {
	case strings.HasPrefix(info.ManufacturerID, "SoftHSM"):
		return quirks{serialObjectWrites: true, retryGeneralError: true, pad210A: true}
	case strings.HasPrefix(info.ManufacturerID, "Mozilla"):
		return quirks{nssDBOnUnwrappedEC: true}
	case strings.Contains(lib.ManufacturerID, "tpm2-software"):
		return quirks{serialObjectWrites: true, reinitAfterDestroy: true, reinitAfterRefusal: true, oneSession: true}
	}
	return quirks{}
}

// Mechanisms of PKCS#11 3.0 that miekg/pkcs11 does not name.
const (
	ckmEdwardsKeyPairGen = 0x1055
	ckmEdDSA             = 0x1057
	MechAESKeyWrapPad    = 0x210A     // CKM_AES_KEY_WRAP_PAD
	MechAESKeyWrapKWP    = 0x210B     // CKM_AES_KEY_WRAP_KWP
	ckaNSSDB             = 0xD5A0DB00 // CKA_NSS_DB (CKA_NETSCAPE_DB): NSS's vendor attribute
)

// mechanismNames are the mechanisms the engine uses, by the names operators know from PKCS#11.
var mechanismNames = map[uint]string{
	pkcs11.CKM_AES_KEY_GEN:            "CKM_AES_KEY_GEN",
	pkcs11.CKM_AES_GCM:                "CKM_AES_GCM",
	pkcs11.CKM_GENERIC_SECRET_KEY_GEN: "CKM_GENERIC_SECRET_KEY_GEN",
	pkcs11.CKM_SHA224_HMAC:            "CKM_SHA224_HMAC",
	pkcs11.CKM_SHA256_HMAC:            "CKM_SHA256_HMAC",
	pkcs11.CKM_SHA384_HMAC:            "CKM_SHA384_HMAC",
	pkcs11.CKM_SHA512_HMAC:            "CKM_SHA512_HMAC",
	pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN:  "CKM_RSA_PKCS_KEY_PAIR_GEN",
	pkcs11.CKM_RSA_PKCS_OAEP:          "CKM_RSA_PKCS_OAEP",
	pkcs11.CKM_RSA_PKCS_PSS:           "CKM_RSA_PKCS_PSS",
	pkcs11.CKM_RSA_PKCS:               "CKM_RSA_PKCS",
	pkcs11.CKM_RSA_X_509:              "CKM_RSA_X_509",
	pkcs11.CKM_EC_KEY_PAIR_GEN:        "CKM_EC_KEY_PAIR_GEN",
	pkcs11.CKM_ECDSA:                  "CKM_ECDSA",
	ckmEdwardsKeyPairGen:              "CKM_EC_EDWARDS_KEY_PAIR_GEN",
	ckmEdDSA:                          "CKM_EDDSA",
	MechAESKeyWrapPad:                 "CKM_AES_KEY_WRAP_PAD",
	MechAESKeyWrapKWP:                 "CKM_AES_KEY_WRAP_KWP",
}

func mechanismName(m uint) string {
	if n, ok := mechanismNames[m]; ok {
		return n
	}
	return fmt.Sprintf("mechanism 0x%x", m)
}

// requirement is a mechanism an algorithm needs, with the key size it needs it for (bits; 0: any).
type requirement struct {
	mech uint
	bits uint
}

// requirements are the mechanisms without which a version of the algorithm cannot be made or used.
func (a Algorithm) requirements() []requirement {
	switch a {
	case AES128, AES256:
		return []requirement{{mech: pkcs11.CKM_AES_KEY_GEN}, {mech: pkcs11.CKM_AES_GCM}}
	case HMACOnly:
		return []requirement{{mech: pkcs11.CKM_GENERIC_SECRET_KEY_GEN}, {mech: pkcs11.CKM_SHA256_HMAC}}
	case RSA2048, RSA3072, RSA4096:
		bits := uint(a.rsaBits())
		return []requirement{{pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, bits}, {mech: pkcs11.CKM_RSA_PKCS}}
	case ECDSAP256, ECDSAP384, ECDSAP521:
		c, _ := a.curve()
		bits := uint(c.Params().BitSize)
		return []requirement{{pkcs11.CKM_EC_KEY_PAIR_GEN, bits}, {pkcs11.CKM_ECDSA, bits}}
	case Ed25519:
		return []requirement{{mech: ckmEdwardsKeyPairGen}, {mech: ckmEdDSA}}
	}
	return nil
}

// Algorithms are every kind of version material the engine makes.
var Algorithms = []Algorithm{AES128, AES256, HMACOnly, RSA2048, RSA3072, RSA4096, ECDSAP256, ECDSAP384, ECDSAP521, Ed25519}

// Serves reports whether the token can make and use versions of alg; if not, what it lacks.
func (c *Capabilities) Serves(alg Algorithm) (bool, []string) {
	if why, ok := c.refused.Load(alg); ok {
		return false, []string{why.(string)}
	}
	var missing []string
	for _, r := range alg.requirements() {
		info, ok := c.mechanisms[r.mech]
		switch {
		case !ok:
			missing = append(missing, mechanismName(r.mech))
		case r.bits > 0 && info.MaxKeySize > 0 && (r.bits < info.MinKeySize || r.bits > info.MaxKeySize):
			missing = append(missing, fmt.Sprintf("%s for %d-bit keys (the token offers %d to %d)",
				mechanismName(r.mech), r.bits, info.MinKeySize, info.MaxKeySize))
		}
	}
	return len(missing) == 0, missing
}

// passwordKeyGen reports whether the token generates keys from a password (the PBE and PBKDF mechanisms,
// CKM_PBE_MD2_DES_CBC 0x3A0 to CKM_PBA_SHA1_WITH_SHA1_HMAC 0x3C0, listed with CKF_GENERATE): such a key's value is
// known to whoever chose the password, though the token reads it back as generated (NSS softokn offers them).
func (c *Capabilities) passwordKeyGen() bool {
	for m, info := range c.mechanisms {
		if m >= 0x3A0 && m <= 0x3C0 && info.Flags&pkcs11.CKF_GENERATE != 0 {
			return true
		}
	}
	return false
}

// Offers reports whether the token lists mechanism m.
func (c *Capabilities) Offers(m uint) bool {
	_, ok := c.mechanisms[m]
	return ok
}

// MechanismNames lists, of the mechanisms the engine knows, those the token offers.
func (c *Capabilities) MechanismNames() []string {
	var out []string
	for m := range c.mechanisms {
		if n, ok := mechanismNames[m]; ok {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// errUnsupported is a key type or operation the token cannot serve: the caller's choice, refused with a 400.
func unsupported(what string, missing []string) error {
	return fmt.Errorf("%w: this token cannot serve %s: it lacks %s", ErrMechanismUnsupported, what, strings.Join(missing, ", "))
}

// Capabilities returns what the token can do, probing it on first use (once per token and process).
func (t *Token) Capabilities(ctx context.Context) (*Capabilities, error) {
	if err := t.pool.ensure(); err != nil {
		return nil, err
	}
	state := t.pool.tokenState()
	state.capsMu.Lock()
	defer state.capsMu.Unlock()
	if state.caps == nil {
		caps, err := t.probe(ctx)
		if err != nil {
			return nil, err // asked again next time: the device may have gone away for a moment
		}
		state.caps = caps
	}
	return state.caps, nil
}

// quirks returns the token's quirks, from its description alone (no probe needed).
func (t *Token) quirks() quirks { return quirksOf(t.mod.info, t.Info()) }

func (t *Token) probe(ctx context.Context) (*Capabilities, error) {
	c := &Capabilities{mechanisms: map[uint]pkcs11.MechanismInfo{}, quirks: t.quirks()}
	slot := t.Info().Slot
	err := t.do(ctx, "C_GetMechanismList", func(p pkcs11API, s session) error {
		ms, err := p.GetMechanismList(slot)
		if err != nil {
			return err
		}
		for _, m := range ms {
			info, err := p.GetMechanismInfo(slot, []*pkcs11.Mechanism{m})
			if err != nil {
				info = pkcs11.MechanismInfo{}
			}
			c.mechanisms[m.Mechanism] = info
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	switch {
	case c.Offers(MechAESKeyWrapKWP):
		c.KeyWrap = MechAESKeyWrapKWP
	case c.Offers(MechAESKeyWrapPad) && c.quirks.pad210A:
		c.KeyWrap = MechAESKeyWrapPad
	}
	if c.AllowedMechanisms, err = t.probeAllowedMechanisms(ctx, c); err != nil {
		return nil, err
	}
	// Whether OAEP takes SHA-256 decides whether RSA keys need raw RSA among their allowed mechanisms: it is asked
	// only of tokens that store allowed mechanisms. Elsewhere it is taken as yes, and a decryption that finds
	// otherwise falls back by itself (DecryptRSA).
	c.OAEPSHA256 = true
	if c.AllowedMechanisms && c.Offers(pkcs11.CKM_RSA_PKCS_OAEP) {
		if c.OAEPSHA256, err = t.probeOAEPSHA256(ctx); err != nil {
			return nil, err
		}
	}
	c.importRefused = map[Algorithm]string{}
	if ok, _ := c.Serves(Ed25519); ok && c.KeyWrap != 0 && !c.quirks.reinitAfterRefusal {
		why, err := t.probeEd25519Import(ctx, c)
		if err != nil {
			return nil, err
		}
		if why != "" {
			c.importRefused[Ed25519] = why
		}
	}
	wrap := "none"
	if c.KeyWrap != 0 {
		wrap = mechanismName(c.KeyWrap)
	}
	t.log.Info("HSM token capabilities", "token", t.Info().Label, "allowed_mechanisms", c.AllowedMechanisms,
		"oaep_sha256", c.OAEPSHA256, "key_wrap", wrap)
	return c, nil
}

// probeAllowedMechanisms makes a throwaway token object with CKA_ALLOWED_MECHANISMS and destroys it. Tokens that
// cannot store the attribute refuse the object; a token with no secret-key generation at all is asked with an EC
// key pair, and one with neither is taken not to have it (nothing made there could use it).
func (t *Token) probeAllowedMechanisms(ctx context.Context, c *Capabilities) (bool, error) {
	id := []byte("cmk-capability-probe")
	var mech uint
	var tmpl, pubT []*pkcs11.Attribute
	allowed := pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, mechanismList([]uint{pkcs11.CKM_SHA256_HMAC}))
	base := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, "cmk-capability-probe"),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
	}
	switch {
	case c.Offers(pkcs11.CKM_GENERIC_SECRET_KEY_GEN):
		mech = pkcs11.CKM_GENERIC_SECRET_KEY_GEN
		tmpl = append(base, pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET), pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32))
	case c.Offers(pkcs11.CKM_AES_KEY_GEN):
		mech = pkcs11.CKM_AES_KEY_GEN
		tmpl = append(base, pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32))
		allowed = pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, mechanismList([]uint{pkcs11.CKM_AES_GCM}))
		tmpl[len(base)-1] = pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true)
	case c.Offers(pkcs11.CKM_EC_KEY_PAIR_GEN):
		mech = pkcs11.CKM_EC_KEY_PAIR_GEN
		tmpl = append(base, pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC))
		allowed = pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, mechanismList([]uint{pkcs11.CKM_ECDSA}))
		pubT = []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC), pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oidP256DER),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true)}
	default:
		return false, nil
	}
	supported := false
	err := t.doObjects(ctx, "probe CKA_ALLOWED_MECHANISMS", func(p pkcs11API, s session) error {
		var made []pkcs11.ObjectHandle
		var err error
		if pubT == nil {
			var h pkcs11.ObjectHandle
			h, err = p.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, append(tmpl, allowed))
			made = append(made, h)
		} else {
			var pub, priv pkcs11.ObjectHandle
			pub, priv, err = p.GenerateKeyPair(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pubT, append(tmpl, allowed))
			made = append(made, pub, priv)
		}
		if err == nil {
			supported = true
			for _, h := range made {
				_ = p.DestroyObject(s.h, h)
			}
			return nil
		}
		if classify(err) != classOther {
			return err // a fault: recover and ask again
		}
		supported = false
		return nil
	})
	return supported, err
}

// rsaProbeModulus is the modulus of an RSA-2048 key made for this purpose, whose private half was never kept: a
// real public key to ask the token whether its OAEP takes SHA-256, without generating anything. (Not a number of
// the right size merely: a TPM given a modulus that is no product of primes enters its failure mode.)
var rsaProbeModulus, _ = new(big.Int).SetString(
	"e13db1c8f87845ef0da3fe09387b29586f2da8f664b24e28d1c1329c2b49e22fd16a842d56371412f41b0a5efb0b9529"+
		"0b368d015c1b94a66f3648373273933f24d294c7274701d73d21ba04a340c82cbfecd289dc20b6f0715fe77c1e6da2ed"+
		"624fb55110617140800dfc3f7e2da1beefb46fbe661b664762dcef2c44566b75bde105c33bb61e67f4fd0e378c857a7e"+
		"5d988f40647fd61730c452d3e8c4ab7ffc160cc284d3c8da8c2d18f78c78afc908b8564062916829bf8e9413fcdc7111"+
		"efe3ba82327e37552e6a87a490b16acd5b19f977fac3f5b9d17094b1fb3502273d1c6736c96c7ec8de06a5210745df2b"+
		"7426d6d18dfa3b1d129ce70d7181d95f", 16)

// probeOAEPSHA256 asks the token to start an OAEP-SHA-256 encryption with a public session object.
func (t *Token) probeOAEPSHA256(ctx context.Context) (bool, error) {
	ok := false
	err := t.do(ctx, "probe OAEP with SHA-256", func(p pkcs11API, s session) error {
		h, err := p.CreateObject(s.h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, rsaProbeModulus.Bytes()), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
		})
		if err != nil {
			if classify(err) != classOther {
				return err
			}
			return nil // cannot ask: take OAEP-SHA-256 as missing
		}
		defer func() { _ = p.DestroyObject(s.h, h) }()
		params := pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil)
		err = p.EncryptInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params)}, h)
		if err != nil {
			if classify(err) != classOther {
				return err
			}
			return nil
		}
		ok = true
		_, _ = p.Encrypt(s.h, []byte("probe")) // ends the operation
		return nil
	})
	return ok, err
}
