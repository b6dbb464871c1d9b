package loadtest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/imq-dev/imq/internal/sysx"
)

// engineResult is what an engine knows only at the end.
type engineResult struct {
	Bots        int          `json:"bots"` // bots started
	Verify      VerifyResult `json:"verify"`
	State       StateResult  `json:"state"`
	RampStopped string       `json:"ramp_stopped,omitempty"`
	FileLimit   uint64       `json:"file_limit"`
}

// engine runs the bots of some rooms in this process.
type engine struct {
	cfg        Config
	log        *slog.Logger
	st         *stats
	dialers    []*websocket.Dialer
	urls       []string // gateways; bot i uses urls[i mod len]
	fileLimit  uint64
	end        time.Time // the load stops here
	maxActions int
	rampStop   atomic.Pointer[string] // why the ramp stopped early, if it did

	// rooms holds each room's bots; filled by the ramp, read by bots only
	// after allSettled.
	rooms map[int][]*bot
	// lost marks rooms whose queue was lost (node lost, bucket moved): a new
	// epoch restarted their offsets, so verifyRoom cannot check them.
	lost map[int]*atomic.Bool

	settled, checked       sync.WaitGroup // bots past finish / past converge
	allSettled, allChecked chan struct{}
}

// runEngine runs the bots of rooms until the scenario's duration passes or
// ctx ends, calling emit with each second's Tick (from one goroutine), and
// returns once every bot has ended.
func runEngine(ctx context.Context, cfg Config, rooms []int, emit func(Tick)) engineResult {
	limit, err := sysx.RaiseFileLimit()
	if err != nil {
		cfg.Logger.Warn("cannot raise the open-file limit", "limit", limit, "err", err)
	}
	s := cfg.Scenario
	dur := time.Duration(s.Duration)
	e := &engine{
		cfg:        cfg,
		log:        cfg.Logger,
		st:         newStats(),
		fileLimit:  limit,
		end:        time.Now().Add(dur),
		maxActions: maxActions(s, dur),
		rooms:      map[int][]*bot{},
		lost:       make(map[int]*atomic.Bool, len(rooms)),
		allSettled: make(chan struct{}),
		allChecked: make(chan struct{}),
	}
	for _, r := range rooms {
		e.lost[r] = new(atomic.Bool)
	}
	e.urls = e.cfg.URLs()
	e.dialers = e.makeDialers()
	load, cancel := context.WithDeadline(ctx, e.end)
	defer cancel()

	tickDone := make(chan struct{})
	stopTicks := make(chan struct{})
	go func() {
		defer close(tickDone)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				emit(e.tick())
			case <-stopTicks:
				return
			}
		}
	}()

	var all sync.WaitGroup
	n := len(rooms) * s.BotsPerRoom
	start := time.Now()
	timer := time.NewTimer(0)
	<-timer.C
ramp:
	for i := range n {
		if s.RampRate > 0 {
			at := start.Add(time.Duration(float64(i) / s.RampRate * float64(time.Second)))
			if d := time.Until(at); d > 0 {
				timer.Reset(d)
				select {
				case <-timer.C:
				case <-load.Done():
					break ramp
				}
			}
		}
		if load.Err() != nil || e.rampStop.Load() != nil {
			break
		}
		room, idx := rooms[i%len(rooms)], i/len(rooms)
		id := room*s.BotsPerRoom + idx
		b := &bot{
			e:     e,
			id:    id,
			room:  room,
			user:  fmt.Sprintf("lt-%s-r%d-b%d", cfg.RunID, room, idx),
			queue: s.Room(room),
			rng:   rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano()))),
		}
		e.rooms[room] = append(e.rooms[room], b)
		e.settled.Add(1)
		e.checked.Add(1)
		all.Add(1)
		go func() {
			defer all.Done()
			b.run(load)
		}()
	}
	go func() { e.settled.Wait(); close(e.allSettled) }()
	go func() { e.checked.Wait(); close(e.allChecked) }()
	all.Wait()
	close(stopTicks)
	<-tickDone
	emit(e.tick())

	res := engineResult{FileLimit: limit}
	if p := e.rampStop.Load(); p != nil {
		res.RampStopped = *p
	}
	for _, room := range slices.Sorted(maps.Keys(e.rooms)) {
		bots := e.rooms[room]
		pubs := make([][]uint64, len(bots))
		members := make([][]interval, len(bots))
		for i, b := range bots {
			pubs[i], members[i] = b.pubs, b.intervals
			res.State.add(b.state)
		}
		res.Bots += len(bots)
		if e.lost[room].Load() {
			res.Verify.RoomsLost++
			res.Verify.LostRooms = append(res.Verify.LostRooms, cfg.Scenario.Room(room))
			continue
		}
		res.Verify.add(verifyRoom(pubs, members))
	}
	return res
}

func (e *engine) tick() Tick {
	t := e.st.tick()
	if p := e.rampStop.Load(); p != nil {
		t.RampStopped = *p
	}
	return t
}

// makeDialers returns one WebSocket dialer per source address. Each notes
// the first dial that fails for want of file descriptors or ports, which
// stops the ramp.
func (e *engine) makeDialers() []*websocket.Dialer {
	n := 1
	if e.cfg.SourceAddrs > 1 && !slices.ContainsFunc(e.urls, func(u string) bool { return !loopbackV4(u) }) {
		n = e.cfg.SourceAddrs
	}
	ds := make([]*websocket.Dialer, n)
	for i := range ds {
		nd := &net.Dialer{Timeout: e.cfg.ConnectTimeout}
		if n > 1 {
			nd.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i))}
		}
		ds[i] = &websocket.Dialer{
			HandshakeTimeout: e.cfg.ConnectTimeout,
			NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := nd.DialContext(ctx, network, addr)
				if err != nil {
					e.noteDialError(err)
				}
				return c, err
			},
		}
	}
	return ds
}

// noteDialError stops the ramp, saying which limit was hit, when a dial
// failed for want of file descriptors or ports.
func (e *engine) noteDialError(err error) {
	var why string
	connected := e.st.connected.Load()
	switch {
	case errors.Is(err, syscall.EMFILE):
		why = fmt.Sprintf("the per-process open-file limit (RLIMIT_NOFILE %d; raise the hard limit with ulimit -Hn, or use more --workers) stopped the ramp at %d connected bots: %v", e.fileLimit, connected, err)
	case errors.Is(err, syscall.ENFILE):
		why = fmt.Sprintf("the system-wide open-file limit (fs.file-max) stopped the ramp at %d connected bots: %v", connected, err)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		why = fmt.Sprintf("local ports ran out (net.ipv4.ip_local_port_range; use more --source-addrs) at %d connected bots: %v", connected, err)
	default:
		return
	}
	if e.rampStop.CompareAndSwap(nil, &why) {
		e.log.Warn("ramp stopped", "why", why)
	}
}
