// Command imqbench is the fixed-rate fan-out benchmark behind BENCHMARKS.md:
// R rooms × S subscribers on raw WebSockets, 64-byte events published at
// fixed delivery rates, reporting delivered/s, end-to-end latency percentiles
// and the server's CPU time per delivery read from /proc; then the server's
// RSS per idle connection and join+leave pairs per second on fresh queues.
//
// It is deliberately lean (no SDK, no protobuf decoding beyond the payload)
// so that it costs less than the server it measures; it reports its own CPU
// per delivery beside the server's so the reader can check. `imq loadtest`
// measures with real SDK bots; this measures the server's ceiling.
//
// Usage: imqbench --url ws://127.0.0.1:8080/ws --server-pid PID [flags]
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	"github.com/gorilla/websocket"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/sysx"
	imqpb "github.com/imq-dev/imq/proto"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "imqbench:", err)
		os.Exit(1)
	}
}

type config struct {
	url        string
	metricsURL string
	pid        int
	rooms      int
	subs       int
	rates      []int
	warmup     time.Duration
	duration   time.Duration
	payload    int
	churnConns int
	churnTime  time.Duration
	settle     time.Duration
}

func run() error {
	var cfg config
	var rates string
	flag.StringVar(&cfg.url, "url", "ws://127.0.0.1:8080/ws", "gateway WebSocket URL (a development-mode gateway: bots use ?user=)")
	flag.StringVar(&cfg.metricsURL, "metrics-url", "http://127.0.0.1:8081/metrics", "the server's /metrics, on the gateway's internal listener (imq dev --internal-addr)")
	flag.IntVar(&cfg.pid, "server-pid", 0, "PID of the server process, for CPU and RSS from /proc (required)")
	flag.IntVar(&cfg.rooms, "rooms", 100, "rooms")
	flag.IntVar(&cfg.subs, "subs", 100, "subscribers per room")
	flag.StringVar(&rates, "rates", "3000,10000,30000,60000,100000", "delivery rates to step through, per second (deliveries = publishes × subscribers per room)")
	flag.DurationVar(&cfg.warmup, "warmup", 2*time.Second, "time at each rate before measuring")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "measured time at each rate")
	flag.IntVar(&cfg.payload, "payload", 64, "payload bytes (at least 8: the send time)")
	flag.IntVar(&cfg.churnConns, "churn-conns", 50, "connections doing join+leave pairs in the churn test (0 skips it)")
	flag.DurationVar(&cfg.churnTime, "churn-time", 10*time.Second, "length of the churn test")
	flag.DurationVar(&cfg.settle, "settle", 10*time.Second, "wait after connecting before reading the server's memory")
	flag.Parse()
	for _, r := range strings.Split(rates, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(r))
		if err != nil || n <= 0 {
			return fmt.Errorf("--rates: %q is not a positive number", r)
		}
		cfg.rates = append(cfg.rates, n)
	}
	if cfg.pid == 0 {
		return errors.New("--server-pid is required")
	}
	if cfg.payload < 8 {
		return errors.New("--payload must be at least 8")
	}
	u, err := url.Parse(cfg.url)
	if err != nil || !(strings.HasPrefix(u.Host, "127.") || strings.HasPrefix(u.Host, "localhost")) {
		return fmt.Errorf("--url %q: this benchmark only targets loopback", cfg.url)
	}
	if _, err := sysx.RaiseFileLimit(); err != nil {
		return err
	}

	rssBase, err := rssKiB(cfg.pid)
	if err != nil {
		return err
	}
	b := &bench{cfg: cfg}
	fmt.Printf("connecting %d subscribers in %d rooms and %d publishers...\n", cfg.rooms*cfg.subs, cfg.rooms, cfg.rooms)
	start := time.Now()
	if err := b.connect(); err != nil {
		return err
	}
	fmt.Printf("connected and joined in %s\n", time.Since(start).Round(time.Millisecond))
	time.Sleep(cfg.settle) // let the server settle and return freed memory
	rss, _ := rssKiB(cfg.pid)
	n := cfg.rooms * (cfg.subs + 1)
	fmt.Printf("\nserver RSS: %d KiB before, %d KiB with %d idle joined connections, %s after the last joined: %.2f KiB per connection\n",
		rssBase, rss, n, cfg.settle, float64(rss-rssBase)/float64(n))
	if heap, stack, err := goMemory(cfg.metricsURL); err == nil {
		fmt.Printf("of which Go heap in use %.2f KiB and goroutine stacks %.2f KiB per connection (from /metrics)\n\n",
			heap/1024/float64(n), stack/1024/float64(n))
	}

	fmt.Println("| target deliveries/s | delivered/s | p50 | p99 | max | server CPU µs/delivery | bench CPU µs/delivery |")
	fmt.Println("|---:|---:|---:|---:|---:|---:|---:|")
	best := 0
	for _, rate := range cfg.rates {
		r, err := b.step(rate)
		if err != nil {
			return err
		}
		fmt.Printf("| %d | %.0f | %s | %s | %s | %.2f | %.2f |\n", rate, r.delivered, ms(r.p50), ms(r.p99), ms(r.max), r.serverCPU, r.benchCPU)
		if r.p99 < 100*time.Millisecond && r.delivered >= 0.95*float64(rate) {
			best = rate
		}
		if r.p99 > time.Second {
			break // saturated; higher rates only pile up
		}
	}
	fmt.Printf("\nhighest rate with p99 < 100 ms: %d deliveries/s\n", best)
	b.close()

	if cfg.churnConns > 0 {
		fmt.Printf("\n| join+leave on fresh queues | connections | pairs/s | server CPU µs/pair | bench CPU µs/pair |\n|---|---:|---:|---:|---:|\n")
		for _, w := range []int{1, 32} {
			r, err := churn(cfg, w)
			if err != nil {
				return err
			}
			mode := "each waits for its reply"
			if w > 1 {
				mode = fmt.Sprintf("%d pairs in flight each", w)
			}
			fmt.Printf("| %s | %d | %.0f | %.2f | %.2f |\n", mode, cfg.churnConns, r.pairs, r.serverCPU, r.benchCPU)
		}
	}
	return nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }

type bench struct {
	cfg        config
	subs       []*websocket.Conn
	pubs       []*websocket.Conn
	pubMu      []sync.Mutex
	delivered  atomic.Int64
	recording  atomic.Bool
	histMu     [32]sync.Mutex
	hists      [32]*hdrhistogram.Histogram
	readers    sync.WaitGroup
	closing    atomic.Bool
	readErrors atomic.Int64
}

func dial(rawURL, user string) (*websocket.Conn, error) {
	d := websocket.Dialer{Subprotocols: []string{"imq.v1"}, HandshakeTimeout: 10 * time.Second, ReadBufferSize: 1024, WriteBufferSize: 1024}
	sep := "?"
	if strings.Contains(rawURL, "?") {
		sep = "&"
	}
	ws, _, err := d.Dial(rawURL+sep+"user="+url.QueryEscape(user), nil)
	return ws, err
}

// call sends m and waits for its reply; only for setup, before readers run.
func call(ws *websocket.Conn, m *imqpb.ClientMessage) error {
	b, _ := proto.Marshal(m)
	if err := ws.WriteMessage(websocket.BinaryMessage, b); err != nil {
		return err
	}
	ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer ws.SetReadDeadline(time.Time{})
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			return err
		}
		var sm imqpb.ServerMessage
		if err := proto.Unmarshal(data, &sm); err != nil {
			return err
		}
		if r := sm.GetReply(); r != nil && r.GetId() == m.GetId() {
			if r.GetCode() != imqpb.Code_OK {
				return fmt.Errorf("%s: %s", r.GetCode(), r.GetMessage())
			}
			return nil
		}
	}
}

func roomName(i int) string { return "/bench/room/" + strconv.Itoa(i) }

func (b *bench) connect() error {
	for i := range b.hists {
		b.hists[i] = hdrhistogram.New(1, int64(60*time.Second/time.Microsecond), 3)
	}
	total := b.cfg.rooms * b.cfg.subs
	b.subs = make([]*websocket.Conn, total)
	b.pubs = make([]*websocket.Conn, b.cfg.rooms)
	b.pubMu = make([]sync.Mutex, b.cfg.rooms)
	jobs := make(chan int)
	errc := make(chan error, 64)
	var wg sync.WaitGroup
	for w := 0; w < 64; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				room := i % b.cfg.rooms
				ws, err := dial(b.cfg.url, "sub"+strconv.Itoa(i))
				if err == nil {
					err = call(ws, &imqpb.ClientMessage{Id: 1, Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{
						Queue: roomName(room), Mounts: []*imqpb.MountSpec{{Name: "chat", Kind: imqpb.MountKind_MESSAGE}},
					}}})
				}
				if err != nil {
					select {
					case errc <- fmt.Errorf("subscriber %d: %w", i, err):
					default:
					}
					continue
				}
				b.subs[i] = ws
			}
		}()
	}
	for i := 0; i < total; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
	}
	for i := range b.pubs {
		ws, err := dial(b.cfg.url, "pub"+strconv.Itoa(i))
		if err != nil {
			return err
		}
		b.pubs[i] = ws
		b.readers.Add(1)
		go func() { // discards replies until the connection closes
			defer b.readers.Done()
			for {
				if _, _, err := ws.NextReader(); err != nil {
					return
				}
			}
		}()
	}
	for i, ws := range b.subs {
		b.readers.Add(1)
		go b.readLoop(i, ws)
	}
	return nil
}

// readLoop reads events, taking only the payload's send time out of each.
func (b *bench) readLoop(i int, ws *websocket.Conn) {
	defer b.readers.Done()
	buf := make([]byte, 0, 256)
	h := i % len(b.hists)
	for {
		_, r, err := ws.NextReader()
		if err == nil {
			buf = buf[:0]
			var n int
			for err == nil {
				if len(buf) == cap(buf) {
					buf = append(buf, 0)[:len(buf)]
				}
				n, err = r.Read(buf[len(buf):cap(buf)])
				buf = buf[:len(buf)+n]
			}
			if err == io.EOF {
				err = nil
			}
		}
		if err != nil {
			if !b.closing.Load() {
				b.readErrors.Add(1)
			}
			return
		}
		sent, ok := eventSendTime(buf)
		if !ok {
			continue
		}
		b.delivered.Add(1)
		if b.recording.Load() {
			lat := time.Now().UnixNano() - sent
			b.histMu[h].Lock()
			b.hists[h].RecordValue(lat / 1000)
			b.histMu[h].Unlock()
		}
	}
}

// eventSendTime finds ServerMessage.event.payload and reads its first 8 bytes.
func eventSendTime(b []byte) (int64, bool) {
	ev, ok := field(b, 2)
	if !ok {
		return 0, false
	}
	payload, ok := field(ev, 6)
	if !ok || len(payload) < 8 {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(payload)), true
}

// field returns the bytes of length-delimited field num of message b.
func field(b []byte, num protowire.Number) ([]byte, bool) {
	for len(b) > 0 {
		n, typ, l := protowire.ConsumeTag(b)
		if l < 0 {
			return nil, false
		}
		b = b[l:]
		if n == num && typ == protowire.BytesType {
			v, l := protowire.ConsumeBytes(b)
			return v, l >= 0
		}
		l = protowire.ConsumeFieldValue(n, typ, b)
		if l < 0 {
			return nil, false
		}
		b = b[l:]
	}
	return nil, false
}

type result struct {
	delivered           float64
	p50, p99, max       time.Duration
	serverCPU, benchCPU float64
}

// step publishes at rate deliveries/s for warmup+duration and measures the
// last duration.
func (b *bench) step(rate int) (result, error) {
	pubRate := float64(rate) / float64(b.cfg.subs)
	ctx, cancel := context.WithTimeout(context.Background(), b.cfg.warmup+b.cfg.duration)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- b.publish(ctx, pubRate) }()

	time.Sleep(b.cfg.warmup)
	for i := range b.hists {
		b.histMu[i].Lock()
		b.hists[i].Reset()
		b.histMu[i].Unlock()
	}
	srv0, err := cpuTime(strconv.Itoa(b.cfg.pid))
	if err != nil {
		return result{}, err
	}
	self0, _ := cpuTime("self")
	d0 := b.delivered.Load()
	t0 := time.Now()
	b.recording.Store(true)
	if err := <-done; err != nil {
		return result{}, err
	}
	b.recording.Store(false)
	elapsed := time.Since(t0)
	srv1, _ := cpuTime(strconv.Itoa(b.cfg.pid))
	self1, _ := cpuTime("self")
	delivered := b.delivered.Load() - d0
	merged := hdrhistogram.New(1, int64(60*time.Second/time.Microsecond), 3)
	for i := range b.hists {
		b.histMu[i].Lock()
		merged.Merge(b.hists[i])
		b.histMu[i].Unlock()
	}
	// Let the tail drain before the next step.
	time.Sleep(500 * time.Millisecond)
	per := func(d time.Duration) float64 {
		if delivered == 0 {
			return 0
		}
		return float64(d.Microseconds()) / float64(delivered)
	}
	return result{
		delivered: float64(delivered) / elapsed.Seconds(),
		p50:       time.Duration(merged.ValueAtQuantile(50)) * time.Microsecond,
		p99:       time.Duration(merged.ValueAtQuantile(99)) * time.Microsecond,
		max:       time.Duration(merged.Max()) * time.Microsecond,
		serverCPU: per(srv1 - srv0),
		benchCPU:  per(self1 - self0),
	}, nil
}

// publish sends events at pubRate per second, round-robin over the rooms,
// each from its room's publisher, without waiting for replies.
func (b *bench) publish(ctx context.Context, pubRate float64) error {
	interval := time.Duration(float64(time.Second) / pubRate)
	payload := make([]byte, b.cfg.payload)
	msg := &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Mount: "chat"}}}
	pub := msg.GetPublish()
	start := time.Now()
	var sent int64
	var id uint64
	for ctx.Err() == nil {
		due := int64(time.Since(start) / interval)
		for ; sent < due; sent++ {
			room := int(sent % int64(b.cfg.rooms))
			id++
			binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
			msg.Id = id
			pub.Queue = roomName(room)
			pub.Payload = payload
			frame, _ := proto.Marshal(msg)
			if err := b.pubs[room].WriteMessage(websocket.BinaryMessage, frame); err != nil {
				return fmt.Errorf("publish: %w", err)
			}
		}
		time.Sleep(200 * time.Microsecond)
	}
	return nil
}

func (b *bench) close() {
	b.closing.Store(true)
	for _, ws := range b.subs {
		ws.Close()
	}
	for _, ws := range b.pubs {
		ws.Close()
	}
	b.readers.Wait()
	if n := b.readErrors.Load(); n > 0 {
		fmt.Printf("warning: %d subscriber connections failed during the run\n", n)
	}
}

// churnResult is one churn measurement.
type churnResult struct {
	pairs               float64 // join+leave pairs per second
	serverCPU, benchCPU float64 // µs per pair
}

// churn measures join+leave pairs per second on fresh queue names. With
// window 1 each connection waits for every reply (latency-bound); with a
// larger window it keeps that many pairs in flight (throughput-bound).
func churn(cfg config, window int) (churnResult, error) {
	var pairs atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), cfg.churnTime)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 2*cfg.churnConns)
	conns := make([]*websocket.Conn, cfg.churnConns)
	for c := range conns {
		ws, err := dial(cfg.url, "churn"+strconv.Itoa(c))
		if err != nil {
			return churnResult{}, err
		}
		defer ws.Close()
		conns[c] = ws
	}
	srv0, err := cpuTime(strconv.Itoa(cfg.pid))
	if err != nil {
		return churnResult{}, err
	}
	self0, _ := cpuTime("self")
	start := time.Now()
	for c, ws := range conns {
		slots := make(chan struct{}, window)
		wg.Add(2)
		go func() { // reads replies; a leave's reply completes a pair
			defer wg.Done()
			for {
				_, data, err := ws.ReadMessage()
				if err != nil {
					return
				}
				var m imqpb.ServerMessage
				if err := proto.Unmarshal(data, &m); err != nil {
					errc <- err
					return
				}
				r := m.GetReply()
				if r == nil {
					continue
				}
				if r.GetCode() != imqpb.Code_OK {
					errc <- fmt.Errorf("churn: %s: %s", r.GetCode(), r.GetMessage())
					return
				}
				if r.GetId()%2 == 0 {
					pairs.Add(1)
					<-slots
				}
			}
		}()
		go func() { // sends join+leave pairs on fresh queues, window at a time
			defer wg.Done()
			msg := func(id uint64, q string, join bool) []byte {
				m := &imqpb.ClientMessage{Id: id}
				if join {
					m.Msg = &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: q, Mounts: []*imqpb.MountSpec{{Name: "chat", Kind: imqpb.MountKind_MESSAGE}}}}
				} else {
					m.Msg = &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: q}}
				}
				b, _ := proto.Marshal(m)
				return b
			}
			for i := 0; ; i++ {
				select {
				case slots <- struct{}{}:
				case <-ctx.Done():
					for len(slots) > 0 { // wait for what is in flight
						time.Sleep(time.Millisecond)
					}
					ws.Close()
					return
				}
				q := "/bench/churn/" + strconv.Itoa(c) + "/" + strconv.Itoa(i)
				if ws.WriteMessage(websocket.BinaryMessage, msg(uint64(2*i+1), q, true)) != nil ||
					ws.WriteMessage(websocket.BinaryMessage, msg(uint64(2*i+2), q, false)) != nil {
					errc <- errors.New("churn: write failed")
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	select {
	case err := <-errc:
		return churnResult{}, err
	default:
	}
	srv1, _ := cpuTime(strconv.Itoa(cfg.pid))
	self1, _ := cpuTime("self")
	n := float64(pairs.Load())
	return churnResult{
		pairs:     n / elapsed.Seconds(),
		serverCPU: float64((srv1 - srv0).Microseconds()) / n,
		benchCPU:  float64((self1 - self0).Microseconds()) / n,
	}, nil
}

// cpuTime returns the user+system CPU time of a process from /proc.
func cpuTime(pid string) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	const hz = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / hz, nil
}

// goMemory reads the server's heap and stack bytes in use from its /metrics
// (on the gateway's internal listener, as imq dev serves it).
func goMemory(metricsURL string) (heap, stack float64, err error) {
	resp, err := http.Get(metricsURL)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_inuse_bytes "); ok {
			heap, _ = strconv.ParseFloat(v, 64)
		}
		if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_stack_inuse_bytes "); ok {
			stack, _ = strconv.ParseFloat(v, 64)
		}
	}
	return heap, stack, sc.Err()
}

func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}
