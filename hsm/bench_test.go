package hsm

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkRawGCM is the token's AES-GCM ceiling for 64-byte messages (go test -bench RawGCM ./hsm).
func BenchmarkRawGCM(b *testing.B) {
	for _, sessions := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("sessions=%d", sessions), func(b *testing.B) {
			tok, _ := newToken(b, sessions)
			id := make([]byte, 16)
			if err := tok.GenerateVersionKeys(context.Background(), id[:], "bench", 256); err != nil {
				b.Fatal(err)
			}
			n := max(b.N, sessions)
			b.ResetTimer()
			opsPerSec, err := tok.MeasureRawGCM(context.Background(), id, make([]byte, 64), n, sessions)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(opsPerSec, "ops/s")
		})
	}
}

func TestMeasureRawGCM(t *testing.T) {
	tok, _ := newToken(t, 1)
	id := newVersion(t, tok, 256)
	ops, err := tok.MeasureRawGCM(context.Background(), id, make([]byte, 64), 200, 2)
	if err != nil || ops <= 0 {
		t.Fatalf("%v ops/s, %v", ops, err)
	}
	if _, err := tok.MeasureRawGCM(context.Background(), id, nil, 1, 2); err == nil {
		t.Fatal("fewer operations than sessions accepted")
	}
}
