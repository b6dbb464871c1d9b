package gateway_test

import (
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
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

// BenchmarkClientPublish measures a client's publishes through the gateway
// to a node and back, over a real WebSocket: one at a time (serial: each
// waits for its reply) and pipelined (up to 64 in flight, as a game client
// sending moves does). allocs/op counts the client's side too.
func BenchmarkClientPublish(b *testing.B) {
	d := startDev(b, nil)
	const queue = "/room/bench-publish"
	frame := func(id uint64) []byte {
		f, _ := proto.Marshal(&imqpb.ClientMessage{Id: id, Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{
			Queue: queue, Mount: "chat", Payload: make([]byte, 64),
		}}})
		return f
	}
	b.Run("serial", func(b *testing.B) {
		c := mustDial(b, d, "serial", false)
		b.ReportAllocs()
		for b.Loop() {
			c.id++
			c.sendRaw(websocket.BinaryMessage, frame(c.id))
			if r := c.reply(c.id); r.GetCode() != imqpb.Code_OK {
				b.Fatalf("reply %v", r)
			}
		}
	})
	b.Run("pipelined", func(b *testing.B) {
		const window = 64
		c := mustDial(b, d, "pipelined", false)
		var answered atomic.Int64
		done := make(chan error, 1)
		go func() {
			c.ws.SetReadDeadline(time.Time{})
			for {
				_, data, err := c.ws.ReadMessage()
				if err != nil {
					done <- err
					return
				}
				var m imqpb.ServerMessage
				if err := proto.Unmarshal(data, &m); err != nil || m.GetReply().GetCode() != imqpb.Code_OK {
					done <- fmt.Errorf("reply %v (%v)", &m, err)
					return
				}
				answered.Add(1)
			}
		}()
		b.ReportAllocs()
		var sent int64
		for b.Loop() {
			for sent-answered.Load() >= window {
				time.Sleep(5 * time.Microsecond)
			}
			sent++
			c.sendRaw(websocket.BinaryMessage, frame(uint64(sent)))
		}
		for answered.Load() < sent {
			select {
			case err := <-done:
				b.Fatal(err)
			default:
				time.Sleep(5 * time.Microsecond)
			}
		}
		b.StopTimer()
		b.ReportMetric(float64(sent)/b.Elapsed().Seconds(), "msgs/s")
		c.ws.Close()
		<-done
	})
}
