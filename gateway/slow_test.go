package gateway_test

import (
	"bufio"
	"encoding/binary"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
	imqpb "github.com/imq-dev/imq/proto"
)

// metricValue scrapes one metric from the gateway's internal listener at addr.
func metricValue(t *testing.T, addr, name string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return v
		}
	}
	return ""
}

func TestSlowConsumerIsCutOff(t *testing.T) {
	if testing.Short() {
		t.Skip("publishes 12 MiB through the gateway")
	}
	d := startDev(t, func(c *gateway.Config) {
		c.SendQueueBytes = 256 << 10
		c.WriteTimeout = 2 * time.Second
	})
	const queue = "/room/slow"
	slow := mustDial(t, d, "slow", false)
	expectCode(t, slow.join(queue, chat()), imqpb.Code_OK)
	fast := []*rawClient{mustDial(t, d, "fast1", false), mustDial(t, d, "fast2", true)}
	for _, c := range fast {
		expectCode(t, c.join(queue, chat()), imqpb.Code_OK)
	}
	pub := mustDial(t, d, "publisher", false)

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	// The slow client never reads. Publish 3,000 events of 4 KiB (12 MiB in
	// all); the fast ones read everything and time each delivery.
	const n = 3000
	payload := make([]byte, 4096)
	var lat []time.Duration
	for i := 0; i < n; i++ {
		binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
		r := pub.publish(queue, "chat", payload)
		expectCode(t, r, imqpb.Code_OK)
		for _, c := range fast {
			ev := nextEvent(t, c)
			if ev.GetOffset() != r.GetPublished().GetOffset() {
				t.Fatalf("fast client got offset %d, want %d", ev.GetOffset(), r.GetPublished().GetOffset())
			}
			lat = append(lat, time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(ev.GetPayload())))))
		}
	}
	slices.Sort(lat)
	p99 := lat[len(lat)*99/100]
	t.Logf("fast clients: p50 %s, p99 %s over %d deliveries", lat[len(lat)/2], p99, len(lat))
	if p99 > 250*time.Millisecond { // generous: the race detector is on
		t.Errorf("fast clients' p99 latency %s while a slow consumer lagged", p99)
	}

	testutil.WaitFor(t, 10*time.Second, "the slow consumer counted", func() bool {
		return metricValue(t, d.Gateway.InternalAddr(), "imq_gateway_slow_consumers_total") == "1"
	})
	testutil.WaitFor(t, 10*time.Second, "three connections counted", func() bool { return metricValue(t, d.Gateway.InternalAddr(), "imq_gateway_connections") == "3" })

	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	growth := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap growth while publishing 12 MiB past a stalled reader: %d KiB", growth/1024)
	if growth > 6<<20 {
		t.Errorf("heap grew %d MiB: the slow consumer's backlog was not bounded", growth>>20)
	}

	if v := metricValue(t, d.Gateway.InternalAddr(), `imq_gateway_disconnects_total{reason="slow_consumer"}`); v != "1" {
		t.Errorf("slow_consumer disconnects = %q, want 1", v)
	}

	// Reading again, the slow client finds in-order events (what fit in the
	// socket buffers) and then the end: the goodbye when the socket had room
	// for it, or the closed connection when its writes had timed out.
	var last uint64
	for {
		m, err := slow.read()
		if err != nil {
			break
		}
		if ev := m.GetEvent(); ev != nil {
			if ev.GetOffset() <= last {
				t.Fatalf("slow client got offset %d after %d", ev.GetOffset(), last)
			}
			last = ev.GetOffset()
		}
		if g := m.GetGoodbye(); g != nil && g.GetReason() != imqpb.Reason_REASON_SLOW_CONSUMER {
			t.Fatalf("goodbye %v", g)
		}
	}
	if last == 0 || last >= n {
		t.Fatalf("slow client received up to offset %d of %d", last, n)
	}
}

func nextEvent(t *testing.T, c *rawClient) *imqpb.Event {
	t.Helper()
	for {
		m := c.next()
		if ev := m.GetEvent(); ev != nil {
			return ev
		}
		if m.GetGoodbye() != nil {
			t.Fatalf("goodbye: %v", m.GetGoodbye())
		}
	}
}
