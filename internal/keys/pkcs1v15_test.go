package keys

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"math"
	"testing"
)

// The synthetic message's length follows a random valid block's, so that whether rewrap to OAEP can carry it (at
// most k-66 bytes) says nothing of the padding: its mean, and how often it is too long for OAEP, match those of
// the messages of random blocks with valid PKCS#1 v1.5 padding, within far more than sampling noise.
func TestSyntheticMessageLengths(t *testing.T) {
	const modulus, n = 256, 4000
	oaepMax := modulus - 2*sha256.Size - 2
	stats := func(lengths []int) (mean, tooLong float64) {
		for _, l := range lengths {
			mean += float64(l)
			if l > oaepMax {
				tooLong++
			}
		}
		return mean / float64(len(lengths)), tooLong / float64(len(lengths))
	}
	var synthetic, valid []int
	for i := 0; i < n; i++ {
		kdk := sha256.Sum256([]byte(fmt.Sprint(i)))
		m := syntheticMessage(kdk[:], modulus)
		if len(m) > modulus-11 {
			t.Fatalf("a %d-byte message from a %d-byte block", len(m), modulus)
		}
		synthetic = append(synthetic, len(m))
	}
	block := make([]byte, modulus-2) // after 00 02
	for len(valid) < n {
		rand.Read(block)
		if bytes.IndexByte(block[:8], 0) >= 0 {
			continue
		}
		if j := bytes.IndexByte(block[8:], 0); j >= 0 {
			valid = append(valid, len(block)-8-j-1)
		}
	}
	sMean, sLong := stats(synthetic)
	vMean, vLong := stats(valid)
	if math.Abs(sMean-vMean) > 10 || math.Abs(sLong-vLong) > 0.05 {
		t.Fatalf("synthetic lengths: mean %.1f, %.3f too long for OAEP; valid blocks' messages: mean %.1f, %.3f", sMean, sLong, vMean, vLong)
	}
}
