package gateway_test

import (
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	imqpb "github.com/imq-dev/imq/proto"
)

// BenchmarkFanout1000 measures one gateway fanning one event out to 1,000
// local subscribers on real WebSocket connections, up to the point where every
// client has read it. The readers run in this process and allocate one
// gorilla messageReader per frame, which allocs/op includes.
func BenchmarkFanout1000(b *testing.B) {
	const subs = 1000
	d := startDev(b, nil)
	const queue = "/room/fanout"
	var received atomic.Int64
	var wg sync.WaitGroup
	clients := make([]*rawClient, subs)
	for i := range clients {
		c := mustDial(b, d, "u"+strconv.Itoa(i), false)
		expectCode(b, c.join(queue, chat()), imqpb.Code_OK)
		clients[i] = c
	}
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.ws.SetReadDeadline(time.Time{})
			for {
				_, r, err := c.ws.NextReader()
				if err != nil {
					return
				}
				io.Copy(io.Discard, r)
				received.Add(1)
			}
		}()
	}
	frame, _ := proto.Marshal(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{
		Queue: queue, Mount: "chat", Offset: 1, Sender: "bench", TimeMs: time.Now().UnixMilli(), Payload: make([]byte, 64),
	}}})
	deliver := &imqpb.Deliver{Queue: queue, Mount: "chat", Frame: frame}

	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d.Gateway.Fanout(deliver)
		// Keep at most a few events in flight so no send queue overflows.
		for received.Load() < int64(i-4)*subs {
			time.Sleep(10 * time.Microsecond)
		}
	}
	for received.Load() < int64(b.N)*subs {
		time.Sleep(10 * time.Microsecond)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N*subs)/b.Elapsed().Seconds(), "deliveries/s")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*subs), "ns/delivery")
	for _, c := range clients {
		c.ws.Close()
	}
	wg.Wait()
}
