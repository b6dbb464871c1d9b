package launch

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ClusterConfig describes a local cluster of separate imq processes: the
// talk's "start X queue nodes, Y gateway nodes" test runner. `imq cluster`
// and the end-to-end tests use it.
type ClusterConfig struct {
	// Binary is the imq executable. Default: this process's executable.
	Binary string
	// QueueNodes and Gateways count the processes (at least 1 each).
	QueueNodes, Gateways int
	// Dir holds each process's log (<name>.log) and the boss's data
	// (boss/). Default: a new temporary directory.
	Dir string
	// Dev puts the gateways in development mode (?user= accepted).
	Dev bool
	// JWTSecret, if set, is given to every gateway, in its environment
	// (IMQ_JWT_SECRET): a command line is visible to every user.
	JWTSecret string
	// APIKeys, if set, are the gateways' admin RPC keys (--api-key specs),
	// given in their environment (IMQ_API_KEYS).
	APIKeys []string
	// AllowedOrigins, if set, go to every gateway's --allowed-origins.
	AllowedOrigins []string
	// Host is the address every process listens on. Default 127.0.0.1.
	Host string
	// ClusterArgs go to every process (membership timing flags such as
	// --probe-interval); BossArgs, NodeArgs and GatewayArgs to those only.
	ClusterArgs, BossArgs, NodeArgs, GatewayArgs []string
	// Output, if set, receives every log line, prefixed by process name.
	Output io.Writer
	// ClusterKeys are the processes' cluster keys, primary first
	// (--cluster-key, given in their environment, IMQ_CLUSTER_KEY).
	// Default: a new random key per cluster (NewClusterKey).
	ClusterKeys [][]byte
	// OperatorKey, if set, is the boss's operator key (imq drain), given
	// in its environment (IMQ_OPERATOR_KEY); no other process sees it.
	// Empty: the boss takes no operator actions.
	OperatorKey string
}

// Cluster is a running local cluster.
type Cluster struct {
	cfg      ClusterConfig
	outMu    sync.Mutex
	Boss     *Process
	Nodes    []*Process
	Gateways []*Process
}

// StartCluster starts a boss, then the queue nodes and gateways joined to
// it, and waits until every gateway routes by a table holding every node
// with a link up to each. On error it stops what it started.
func StartCluster(ctx context.Context, cfg ClusterConfig) (*Cluster, error) {
	if cfg.QueueNodes < 1 || cfg.Gateways < 1 {
		return nil, fmt.Errorf("launch: a cluster needs at least one queue node and one gateway, got %d and %d", cfg.QueueNodes, cfg.Gateways)
	}
	if cfg.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("launch: find the imq binary: %w", err)
		}
		cfg.Binary = exe
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.Dir == "" {
		dir, err := os.MkdirTemp("", "imq-cluster-")
		if err != nil {
			return nil, err
		}
		cfg.Dir = dir
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "boss"), 0o755); err != nil {
		return nil, err
	}
	if len(cfg.ClusterKeys) == 0 {
		cfg.ClusterKeys = [][]byte{NewClusterKey()}
	}
	c := &Cluster{cfg: cfg}
	err := c.start(ctx)
	if err != nil {
		c.Stop(5 * time.Second)
		return nil, err
	}
	return c, nil
}

func (c *Cluster) start(ctx context.Context) error {
	any0 := c.cfg.Host + ":0"
	c.Boss = c.process("boss", "boss", append([]string{"boss", "--id", "boss", "--addr", any0, "--gossip-addr", any0,
		"--data-dir", filepath.Join(c.cfg.Dir, "boss")}, c.cfg.BossArgs...))
	if c.cfg.OperatorKey != "" {
		c.Boss.env = append(c.Boss.env, "IMQ_OPERATOR_KEY="+c.cfg.OperatorKey)
	}
	if err := c.startProcess(ctx, c.Boss); err != nil {
		return err
	}
	for range c.cfg.QueueNodes {
		if _, err := c.AddQueueNode(ctx); err != nil {
			return err
		}
	}
	for range c.cfg.Gateways {
		if _, err := c.AddGateway(ctx); err != nil {
			return err
		}
	}
	return c.WaitRouting(ctx)
}

// AddQueueNode starts one more queue node (qn-N+1). It returns once the node
// serves links; the boss then gives it buckets (see WaitRouting).
func (c *Cluster) AddQueueNode(ctx context.Context) (*Process, error) {
	any0 := c.cfg.Host + ":0"
	name := fmt.Sprintf("qn-%d", len(c.Nodes)+1)
	p := c.process(name, "queuenode", append([]string{"queuenode", "--id", name, "--link-addr", any0, "--internal-addr", any0,
		"--gossip-addr", any0, "--join", c.Boss.Addr("gossip")}, c.cfg.NodeArgs...))
	if err := c.startProcess(ctx, p); err != nil {
		return nil, err
	}
	c.Nodes = append(c.Nodes, p)
	return p, nil
}

// AddGateway starts one more gateway (gw-N+1) with extra flags besides the
// cluster's, and returns once it serves.
func (c *Cluster) AddGateway(ctx context.Context, extra ...string) (*Process, error) {
	any0 := c.cfg.Host + ":0"
	name := fmt.Sprintf("gw-%d", len(c.Gateways)+1)
	args := []string{"gateway", "--id", name, "--addr", any0, "--internal-addr", any0, "--gossip-addr", any0, "--join", c.Boss.Addr("gossip")}
	if c.cfg.Dev {
		args = append(args, "--dev")
	}
	if len(c.cfg.AllowedOrigins) > 0 {
		args = append(args, "--allowed-origins", strings.Join(c.cfg.AllowedOrigins, ","))
	}
	p := c.process(name, "gateway", append(append(args, c.cfg.GatewayArgs...), extra...))
	if c.cfg.JWTSecret != "" {
		p.env = append(p.env, "IMQ_JWT_SECRET="+c.cfg.JWTSecret)
	}
	if len(c.cfg.APIKeys) > 0 {
		p.env = append(p.env, "IMQ_API_KEYS="+strings.Join(c.cfg.APIKeys, "\n"))
	}
	if err := c.startProcess(ctx, p); err != nil {
		return nil, err
	}
	c.Gateways = append(c.Gateways, p)
	return p, nil
}

// NewClusterKey returns a new random 32-byte cluster key, for a cluster
// that lives as long as one run (imq dev, imq cluster).
func NewClusterKey() []byte {
	k := make([]byte, 32)
	rand.Read(k) // never fails (crypto/rand)
	return k
}

// NewOperatorKey returns a new random operator key (32 bytes, base64url),
// for a cluster that lives as long as one run (imq dev, imq cluster).
func NewOperatorKey() string {
	return base64.RawURLEncoding.EncodeToString(NewClusterKey())
}

// encodeKeys is keys as --cluster-key reads them: base64, comma-separated.
func encodeKeys(keys [][]byte) string {
	enc := make([]string, len(keys))
	for i, k := range keys {
		enc[i] = base64.StdEncoding.EncodeToString(k)
	}
	return strings.Join(enc, ",")
}

func (c *Cluster) process(name, role string, args []string) *Process {
	p := &Process{
		Name: name, Role: role, binary: c.cfg.Binary,
		args:      append(args, c.cfg.ClusterArgs...),
		logPath:   filepath.Join(c.cfg.Dir, name+".log"),
		readyPath: filepath.Join(c.cfg.Dir, name+".ready"),
		env:       []string{"IMQ_CLUSTER_KEY=" + encodeKeys(c.cfg.ClusterKeys)},
		// The cluster's key is the one: an inherited key under the old name,
		// or --insecure, would contradict it and the process refuse to start.
		// The operator key goes to the boss alone (OperatorKey).
		unset: []string{"IMQ_GOSSIP_KEY", "IMQ_INSECURE", "IMQ_OPERATOR_KEY"},
		out:   c.cfg.Output, outMu: &c.outMu,
	}
	return p
}

// startProcess starts p (see Process.run).
func (c *Cluster) startProcess(ctx context.Context, p *Process) error { return p.run(ctx) }

// Restart starts p again with the same flags and addresses (after it was
// stopped or killed).
func (c *Cluster) Restart(ctx context.Context, p *Process) error { return p.Restart(ctx) }

// BossTable fetches the boss's current table as its JSON fields.
func (c *Cluster) BossTable(ctx context.Context) (TableInfo, error) {
	var t TableInfo
	err := getJSON(ctx, "http://"+c.Boss.Addr("http")+"/v1/table", &t)
	return t, err
}

// TableInfo is the JSON form of a bucket table, as the boss serves it.
type TableInfo struct {
	Version uint64 `json:"version"`
	Nodes   []struct {
		ID       string `json:"id"`
		LinkAddr string `json:"link_addr"`
	} `json:"nodes"`
	Owners []int `json:"owners"`
}

// OwnerIDs returns each bucket's owner id.
func (t TableInfo) OwnerIDs() []string {
	out := make([]string, len(t.Owners))
	for b, o := range t.Owners {
		out[b] = t.Nodes[o].ID
	}
	return out
}

// WaitRouting waits until the boss's table holds exactly the running queue
// nodes and every running gateway routes by it with every link up.
func (c *Cluster) WaitRouting(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var last error
	for {
		last = c.routing(ctx)
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("launch: cluster not routing: %w", last)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (c *Cluster) routing(ctx context.Context) error {
	t, err := c.BossTable(ctx)
	if err != nil {
		return err
	}
	var want []string
	for _, n := range c.Nodes {
		if running(n) {
			want = append(want, n.Name)
		}
	}
	var have []string
	for _, n := range t.Nodes {
		have = append(have, n.ID)
	}
	slices.Sort(want)
	if !slices.Equal(want, have) {
		return fmt.Errorf("boss table v%d has nodes %v, want %v", t.Version, have, want)
	}
	for _, g := range c.Gateways {
		if !running(g) {
			continue
		}
		var v struct {
			TableVersion uint64 `json:"table_version"`
			LinksUp      int    `json:"links_up"`
		}
		if err := getJSON(ctx, "http://"+g.Addr("internal")+"/varz", &v); err != nil {
			return err
		}
		if v.TableVersion != t.Version || v.LinksUp != len(want) {
			return fmt.Errorf("%s routes by table v%d with %d links up; want v%d with %d", g.Name, v.TableVersion, v.LinksUp, t.Version, len(want))
		}
	}
	return nil
}

func running(p *Process) bool {
	select {
	case <-p.Done():
		return false
	default:
		return true
	}
}

// URLs returns the gateways' WebSocket URLs.
func (c *Cluster) URLs() []string {
	var out []string
	for _, g := range c.Gateways {
		out = append(out, "ws://"+g.Addr("http")+"/ws")
	}
	return out
}

// Dir returns the directory of logs and boss data.
func (c *Cluster) Dir() string { return c.cfg.Dir }

// Stop stops the gateways (clients are told to reconnect), then the queue
// nodes, then the boss, each with a signal and, after timeout, SIGKILL.
// The queue nodes get SIGINT, which stops them without a drain: the whole
// cluster is stopping, so there is nowhere to move their buckets (SIGTERM,
// as Process.Stop of one node sends it, drains it first).
func (c *Cluster) Stop(timeout time.Duration) {
	for _, group := range [][]*Process{c.Gateways, c.Nodes, {c.Boss}} {
		var wg sync.WaitGroup
		for _, p := range group {
			if p == nil || !p.started() {
				continue
			}
			sig := syscall.SIGTERM
			if p.Role == "queuenode" {
				sig = syscall.SIGINT
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.Stop(sig, timeout)
			}()
		}
		wg.Wait()
	}
}

// get fetches url and returns nil if it answers 200.
func get(ctx context.Context, url string) error {
	return getJSON(ctx, url, nil)
}

// getJSON fetches url and, unless v is nil, decodes its JSON into v.
func getJSON(ctx context.Context, url string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, b)
	}
	if v == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(v); err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	return nil
}
