package keys

import (
	"bytes"
	"strings"
	"testing"
)

func TestParseCiphertext(t *testing.T) {
	nonce := bytes.Repeat([]byte{1}, 12)
	sealed := bytes.Repeat([]byte{2}, 20)
	ct := formatCiphertext(7, nonce, sealed)
	v, n, s, err := parseCiphertext(ct)
	if err != nil || v != 7 || !bytes.Equal(n, nonce) || !bytes.Equal(s, sealed) {
		t.Fatalf("round trip: %d %x %x %v", v, n, s, err)
	}
	for _, bad := range []string{"", "vault:", "vault:v", "vault:v:", "vault:vx:AAAA", "vault:v0:AAAA", "vault:v-1:AAAA",
		"vault:v+1:AAAA", "vault:v01:AAAA", "vault:v1:", "vault:v1:AAAA", "vault:v99999999999999999999:AAAA",
		"vault:v1:" + strings.Repeat("A", 35) + "*", "transit:v1:AAAA"} {
		if _, _, _, err := parseCiphertext(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// FuzzParseCiphertext: any input either parses into parts that format back to the same text, or fails with
// an error; never a panic.
func FuzzParseCiphertext(f *testing.F) {
	f.Add(formatCiphertext(1, make([]byte, 12), make([]byte, 16)))
	f.Add("vault:v2:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
	f.Add("vault:v1:")
	f.Add("vault:v0:AAAA")
	f.Fuzz(func(t *testing.T, s string) {
		v, nonce, sealed, err := parseCiphertext(s)
		if err != nil {
			return
		}
		if v < 1 || len(nonce) != 12 || len(sealed) < 16 {
			t.Fatalf("accepted malformed parts from %q", s)
		}
		if back := formatCiphertext(v, nonce, sealed); back != s {
			t.Fatalf("%q parsed but formats back as %q", s, back)
		}
	})
}
