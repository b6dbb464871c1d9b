package loadtest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/url"
	"os"
	"strings"
	"time"
)

// Duration is a time.Duration that reads and writes JSON as "30s" (or a
// number of seconds).
type Duration time.Duration

// MarshalJSON writes the duration as a string such as "1m30s".
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON reads "30s" or a number of seconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return err
		}
		*d = Duration(v)
		return nil
	}
	var secs float64
	if err := json.Unmarshal(b, &secs); err != nil {
		return fmt.Errorf("duration: want \"30s\" or seconds, got %s", b)
	}
	*d = Duration(secs * float64(time.Second))
	return nil
}

// Scenario is what the bots do. Its JSON form (for --scenario FILE) uses the
// names of the command's flags with underscores.
type Scenario struct {
	// Rooms is the number of room queues, named <Namespace>/room/<i>.
	Rooms int `json:"rooms"`
	// BotsPerRoom is the number of bots joined to each room.
	BotsPerRoom int `json:"bots_per_room"`
	// ChatRate is each bot's mean chat rate in messages per second (a
	// Poisson process); 0 means no chat.
	ChatRate float64 `json:"chat_rate"`
	// StateRate is each bot's mean rate of updates of its own key in the
	// scores mount, per second; 0 means only the updates that bound each
	// membership interval.
	StateRate float64 `json:"state_rate"`
	// ChurnRate is each bot's mean number of leave+rejoin cycles per
	// minute; 0 means bots stay joined.
	ChurnRate float64 `json:"churn_rate"`
	// MessageSize is the chat payload size in bytes, at least 8 (the
	// sender's timestamp).
	MessageSize int `json:"message_size"`
	// RampRate is how many bots connect per second; 0 means all at once.
	RampRate float64 `json:"ramp_rate"`
	// Duration is how long the load runs, ramp included.
	Duration Duration `json:"duration"`
	// Namespace prefixes every room queue name.
	Namespace string `json:"namespace"`
}

// Bots returns the total number of bots.
func (s Scenario) Bots() int { return s.Rooms * s.BotsPerRoom }

// Room returns the queue name of room i.
func (s Scenario) Room(i int) string { return fmt.Sprintf("%s/room/%d", s.Namespace, i) }

// DefaultScenario returns 10 rooms × 10 bots chatting at 1 msg/s for 30 s.
func DefaultScenario() Scenario {
	return Scenario{
		Rooms:       10,
		BotsPerRoom: 10,
		ChatRate:    1,
		StateRate:   0.2,
		ChurnRate:   1,
		MessageSize: 64,
		RampRate:    200,
		Duration:    Duration(30 * time.Second),
		Namespace:   "/dark",
	}
}

// ScenarioFile is a scenario file (--scenario FILE): the scenario's
// fields and, optionally, the target, all named as the command's flags
// with underscores.
type ScenarioFile struct {
	// URL, when set, is the gateway URL (or comma-separated URLs), as
	// --url.
	URL string `json:"url,omitempty"`
	Scenario
}

// LoadScenario reads a JSON scenario file on top of base: fields absent
// from the file keep base's values, and URL is empty unless the file sets
// it. Unknown fields are an error, to catch typos.
func LoadScenario(r io.Reader, base Scenario) (ScenarioFile, error) {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	f := ScenarioFile{Scenario: base}
	if err := dec.Decode(&f); err != nil {
		return ScenarioFile{Scenario: base}, fmt.Errorf("scenario: %w", err)
	}
	if dec.More() {
		return ScenarioFile{Scenario: base}, errors.New("scenario: more than one JSON value")
	}
	if f.URL != "" {
		for u := range strings.SplitSeq(f.URL, ",") {
			if err := CheckTarget(strings.TrimSpace(u), true); err != nil {
				return ScenarioFile{Scenario: base}, fmt.Errorf("scenario: %w", err)
			}
		}
	}
	return f, f.Scenario.validate()
}

func (s Scenario) validate() error {
	switch {
	case s.Rooms < 1:
		return fmt.Errorf("scenario: rooms %d: want at least 1", s.Rooms)
	case s.BotsPerRoom < 1:
		return fmt.Errorf("scenario: bots per room %d: want at least 1", s.BotsPerRoom)
	case s.BotsPerRoom > 1000:
		return fmt.Errorf("scenario: bots per room %d: at most 1000 (a state mount holds 1,024 keys)", s.BotsPerRoom)
	case s.ChatRate < 0 || s.ChatRate > 1000:
		return fmt.Errorf("scenario: chat rate %g msgs/s: want 0..1000", s.ChatRate)
	case s.StateRate < 0 || s.StateRate > 1000:
		return fmt.Errorf("scenario: state rate %g updates/s: want 0..1000", s.StateRate)
	case s.ChurnRate < 0 || s.ChurnRate > 600:
		return fmt.Errorf("scenario: churn rate %g per minute: want 0..600", s.ChurnRate)
	case s.MessageSize < 8 || s.MessageSize > 64<<10:
		return fmt.Errorf("scenario: message size %d: want 8..65536 bytes", s.MessageSize)
	case s.RampRate < 0:
		return fmt.Errorf("scenario: ramp rate %g bots/s: want >= 0", s.RampRate)
	case s.Duration <= 0 || time.Duration(s.Duration) > 24*time.Hour:
		return fmt.Errorf("scenario: duration %v: want > 0 and at most 24h", time.Duration(s.Duration))
	case !strings.HasPrefix(s.Namespace, "/") || strings.HasSuffix(s.Namespace, "/"):
		return fmt.Errorf("scenario: namespace %q: want /seg[/seg...]", s.Namespace)
	}
	return nil
}

// Config configures one load test run.
type Config struct {
	// URL is the gateway's WebSocket URL, ws://host:port/ws; several,
	// comma-separated, spread the bots over gateways (bot i uses URL i mod
	// n), as players spread over a cluster's gateways.
	URL string
	// Scenario is what the bots do.
	Scenario Scenario
	// Secret, when set, mints each bot an HS256 JWT with sub = its user id;
	// when empty the bots use development mode (?user=ID).
	Secret []byte
	// Audience, when set with Secret, is the aud claim of the minted
	// tokens, for a gateway configured to require one; empty mints tokens
	// without aud. Tokens always carry exp: the run's end plus an hour.
	Audience string
	// AllowRemote permits a target that is not a loopback address.
	AllowRemote bool
	// ConnectTimeout bounds each bot's connection (dial, WebSocket
	// handshake and connect, retried with backoff within it); a bot that
	// cannot connect in time counts as a failed connect.
	ConnectTimeout time.Duration
	// Workers is the number of worker processes; 0 or 1 runs the bots in
	// this process. Rooms are split among workers, so it is at most Rooms.
	Workers int
	// Executable is the binary re-executed as `<Executable> loadtest
	// --worker`; empty means this process's own (os.Executable).
	Executable string
	// SourceAddrs spreads bots over local source addresses 127.0.0.1 ..
	// 127.0.0.N (loopback IPv4 targets only): for more than ~28k
	// connections to one port, and because a gateway admits at most
	// --max-pending-per-ip (default 64) not-yet-authenticated connections
	// per source address, refusing more with 429. 0 sizes it from the
	// scenario (sourceAddrsFor): enough addresses that each carries at most
	// 200 bots/s of the ramp, at most 50 bots of a burst (RampRate 0), and
	// at most 20,000 bots, up to 254. 1 leaves the choice to the kernel.
	SourceAddrs int
	// AbortP99 stops the run when the publish→deliver p99 over the last
	// few seconds exceeds it; 0 disables.
	AbortP99 time.Duration
	// AbortErrors stops the run when failed requests / requests over the
	// last few seconds exceeds it, as a fraction (0.01 = 1%); 0 disables
	// that check. The run also fails (Report.Err) when that share over the
	// whole run exceeds it or, with 0, exceeds one half. It is also the fraction of bots that may fail to connect
	// before the run counts as failed (Report.Err): with 0, any bot that
	// could not connect fails the run. Connect failures are judged once
	// the first 20 bots (all, if fewer) have tried: a run in which no bot
	// could connect, or more than AbortErrors of them could not, stops then
	// rather than running its duration to fail at the end.
	AbortErrors float64
	// AbortGrace is how long after the start the abort thresholds are not
	// checked.
	AbortGrace time.Duration
	// TrackLimit caps the offsets each bot records for the exactly-once
	// check: its first TrackLimit publishes and received events (8 bytes
	// each). Later ones are still checked for order, duplicates and gaps as
	// they arrive. Zero means a budget of trackBudget offsets shared by all
	// the run's bots, at most 100,000 and at least 1,000 each.
	TrackLimit int
	// SettleTimeout bounds how long a bot that leaves its room during the
	// run (churn) waits for its own last update to come back, which
	// closes its membership interval.
	SettleTimeout time.Duration
	// Drain bounds each step of the end phase, after the load stops
	// (bots publish no more but keep receiving): waiting for a bot's own
	// last update to come back, then for the state mirrors to converge.
	// Each ends as soon as everything arrived. What has not arrived by
	// then is reported as in flight (late or lost: nothing later arrived
	// to tell), not as a violation.
	Drain time.Duration
	// RunID prefixes the bots' user ids (lt-<RunID>-r<room>-b<bot>); empty
	// means random, so that runs do not share state keys.
	RunID string
	// Out receives the progress lines and the summary; nil discards them.
	Out io.Writer
	// Terminal makes progress a single line updated with a carriage return.
	Terminal bool
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
}

// DefaultConfig returns a configuration that makes sense against `imq dev`
// on its default address.
func DefaultConfig() Config {
	return Config{
		URL:            "ws://127.0.0.1:8080/ws",
		Scenario:       DefaultScenario(),
		ConnectTimeout: 3 * time.Second,
		Workers:        1,
		AbortGrace:     3 * time.Second,
		TrackLimit:     0,
		SettleTimeout:  5 * time.Second,
		Drain:          5 * time.Second,
	}
}

// trackBudget is the offsets all bots of a run record together when
// TrackLimit is automatic: 32 Mi offsets, 256 MiB.
const trackBudget = 32 << 20

func (c *Config) validate() error {
	if err := c.Scenario.validate(); err != nil {
		return err
	}
	if c.TrackLimit == 0 && c.Scenario.Bots() > 0 {
		c.TrackLimit = min(100_000, max(1_000, trackBudget/c.Scenario.Bots()))
	}
	switch {
	case c.Workers < 0 || c.Workers > 64:
		return fmt.Errorf("workers %d: want 0..64", c.Workers)
	case c.Workers > c.Scenario.Rooms:
		return fmt.Errorf("workers %d: at most one per room (%d rooms), since each worker checks whole rooms", c.Workers, c.Scenario.Rooms)
	case c.SourceAddrs < 0 || c.SourceAddrs > 254:
		return fmt.Errorf("source addrs %d: want 0..254", c.SourceAddrs)
	case c.AbortP99 < 0:
		return fmt.Errorf("abort p99 %v: want >= 0", c.AbortP99)
	case c.AbortErrors < 0 || c.AbortErrors > 1:
		return fmt.Errorf("abort errors %g: want a fraction 0..1", c.AbortErrors)
	case c.AbortGrace < 0:
		return fmt.Errorf("abort grace %v: want >= 0", c.AbortGrace)
	case c.TrackLimit < 0:
		return fmt.Errorf("track limit %d: want >= 0 (0: automatic)", c.TrackLimit)
	case c.SettleTimeout <= 0:
		return fmt.Errorf("settle timeout %v: want > 0", c.SettleTimeout)
	case c.ConnectTimeout <= 0 || c.ConnectTimeout > 5*time.Minute:
		return fmt.Errorf("connect timeout %v: want > 0 and at most 5m", c.ConnectTimeout)
	case c.Drain <= 0 || c.Drain > time.Hour:
		return fmt.Errorf("drain %v: want > 0 and at most 1h", c.Drain)
	case c.Audience != "" && len(c.Secret) == 0:
		return errors.New("jwt audience: only with a secret to mint tokens")
	}
	for _, u := range c.URLs() {
		if err := CheckTarget(u, c.AllowRemote); err != nil {
			return err
		}
	}
	if c.Out == nil {
		c.Out = io.Discard
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Workers == 0 {
		c.Workers = 1
	}
	if c.SourceAddrs == 0 {
		c.SourceAddrs = sourceAddrsFor(c.Scenario.Bots(), c.Scenario.RampRate)
	}
	if c.RunID == "" {
		c.RunID = fmt.Sprintf("%x", time.Now().UnixNano()&0xffffffffff)
	}
	if c.Executable == "" && c.Workers > 1 {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("workers: cannot find own executable: %w", err)
		}
		c.Executable = exe
	}
	return nil
}

// Per source address, when SourceAddrs is automatic: the bots it connects
// per second of ramp, the bots of a burst (RampRate 0), and the bots in
// all. The first two keep an address's not-yet-authenticated connections
// under a gateway's default --max-pending-per-ip, 64, even when each
// connect takes a few hundred milliseconds (64 pending at 200/s: 320 ms);
// the last keeps it within the ~28k local ports to one gateway port.
const (
	addrRampRate = 200
	addrBurst    = 50
	addrBots     = 20_000
	maxAddrs     = 254 // 127.0.0.1 .. 127.0.0.254
)

// sourceAddrsFor returns how many source addresses bots bots connecting
// at ramp bots per second (0: all at once) spread over: the fewest that
// keep each address within addrRampRate (or addrBurst, for a burst, and
// never more than a burst would need) and addrBots, at most maxAddrs.
func sourceAddrsFor(bots int, ramp float64) int {
	burst := (bots + addrBurst - 1) / addrBurst // never more than a burst needs
	n := burst
	if ramp > 0 {
		n = min(burst, int(math.Ceil(ramp/addrRampRate)))
	}
	return min(maxAddrs, max(1, n, 1+bots/addrBots))
}

// URLs returns the gateway URLs in URL.
func (c *Config) URLs() []string {
	var out []string
	for _, u := range strings.Split(c.URL, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	if len(out) == 0 {
		out = []string{""} // CheckTarget explains
	}
	return out
}

// CheckTarget checks that rawURL is a ws:// or wss:// URL and, unless
// allowRemote, that its host is loopback.
func CheckTarget(rawURL string, allowRemote bool) error {
	u, err := url.Parse(rawURL)
	if err != nil {
		return fmt.Errorf("url %q: %w", rawURL, err)
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return fmt.Errorf("url %q: want ws:// or wss://", rawURL)
	}
	host := u.Hostname()
	if host == "" {
		return fmt.Errorf("url %q: no host", rawURL)
	}
	if allowRemote || isLoopback(host) {
		return nil
	}
	return fmt.Errorf("url %q: %w", rawURL, ErrRemoteTarget)
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// loopbackV4 reports whether rawURL's host is an IPv4 loopback address or
// localhost, so that binding to 127.0.0.N source addresses can reach it.
func loopbackV4(rawURL string) bool {
	u, err := url.Parse(rawURL)
	if err != nil {
		return false
	}
	ip := net.ParseIP(u.Hostname()) // not "localhost": it may resolve to ::1
	return ip != nil && ip.To4() != nil && ip.IsLoopback()
}
