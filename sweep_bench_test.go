package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

// BenchmarkSweepUnderLoad stores 100,000 expired sessions, then lets four
// clients update live ones for a second without a sweep and then while the
// sweep deletes the expired ones, and reports the clients' update p99 in
// both: the sweep must not stall writers (issue 8: at most 2x).
func BenchmarkSweepUnderLoad(b *testing.B) {
	const expired, batch = 100000, 1000
	session := make([]byte, 2000)
	for range b.N {
		b.StopTimer()
		batchSize, _ := strconv.Atoi(params["tlsmgr_sweep_batch_size"].def)
		st, err := openStore(filepath.Join(b.TempDir(), "tlsmgr.sqlite"), allCaches(3600), batchSize)
		if err != nil {
			b.Fatal(err)
		}
		c := st.caches["smtpd"]
		for i := 0; i < expired; i += batch {
			err := st.write(func(tx *writeTx) error {
				for j := i; j < i+batch; j++ {
					id := fmt.Sprintf("expired%d", j)
					if err := tx.exec(c.updateStmt, append([]any{rowKey(id), id, session, 1, 2}, decodedValues(nil)...)...); err != nil {
						return err
					}
				}
				tx.add(&c.entries, batch)
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()

		var mu sync.Mutex
		var latencies []time.Duration
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for client := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					start := time.Now()
					st.update(c, fmt.Sprintf("live%d-%d", client, i%1000), session)
					mu.Lock()
					latencies = append(latencies, time.Since(start))
					mu.Unlock()
				}
			}()
		}
		window := func() []time.Duration {
			mu.Lock()
			defer mu.Unlock()
			w := latencies
			latencies = nil
			slices.Sort(w)
			return w
		}
		time.Sleep(time.Second)
		quiet := window()
		start := time.Now()
		n, err := st.sweepExpired(c, nil)
		swept := time.Since(start)
		during := window()
		close(stop)
		wg.Wait()
		st.close()
		if err != nil || n != expired {
			b.Fatalf("swept %d, %v", n, err)
		}
		p99 := func(w []time.Duration) float64 { return float64(w[len(w)*99/100].Microseconds()) }
		b.ReportMetric(p99(quiet), "quiet-update-p99-µs")
		b.ReportMetric(p99(during), "sweep-update-p99-µs")
		b.ReportMetric(float64(during[len(during)-1].Microseconds()), "sweep-update-max-µs")
		b.ReportMetric(p99(during)/p99(quiet), "p99-ratio")
		b.ReportMetric(swept.Seconds(), "sweep-s")
	}
}
