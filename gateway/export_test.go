package gateway

import (
	"net"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/imq-dev/imq/internal/bucket"
	imqpb "github.com/imq-dev/imq/proto"
)

// Fanout exposes the fan-out to benchmarks in package gateway_test.
func (s *Server) Fanout(d *imqpb.Deliver) { s.fanout(nil, d) }

// InstallTable routes by t as if the cluster runtime had just fetched it
// from the boss (cluster mode, without a boss).
func (s *Server) InstallTable(t *bucket.Table) { s.cluster.Install(t) }

// SetMovedWait bounds each wait for a newer table after MOVED; call it
// before Run.
func (s *Server) SetMovedWait(d time.Duration) { s.movedWait = d }

// SetRebindWait bounds a hand-off's wait for the new owner's link; call it
// before Run.
func (s *Server) SetRebindWait(d time.Duration) { s.rebindWait = d }

// TableVersion returns the version of the table the gateway routes by.
func (s *Server) TableVersion() uint64 { return s.table().Version() }

// Links returns the gateway's links, by node id: whether each is up.
func (s *Server) Links() map[string]bool {
	out := map[string]bool{}
	for id, l := range s.routes.Load().links {
		out[id] = l.isUp()
	}
	return out
}

// RPCMethods returns the admin RPC's method names, sorted.
func RPCMethods() []string { return rpcMethodNames() }

// SignKick signs body as a gateway passing on a kick with secret does.
func SignKick(secret string, body []byte, now time.Time) string {
	keys := newAPIKeys([]APIKey{{Secret: secret}})
	return signKick(&keys[0], body, now)
}

// Refused returns imq_gateway_connections_refused_total{reason}.
func (s *Server) Refused(reason string) float64 {
	var m dto.Metric
	s.m.refused.WithLabelValues(reason).Write(&m)
	return m.GetCounter().GetValue()
}

// SetClientTimeouts shortens the client listener's read and write timeouts
// of the gateway cfg configures.
func SetClientTimeouts(cfg *Config, read, write time.Duration) {
	cfg.clientRead, cfg.clientWrite = read, write
}

// Pending returns the size of the pending pool.
func (s *Server) Pending() int { return s.ln.pending.count() }

// Drains returns how many refused connections are being drained.
func (s *Server) Drains() int { return len(s.ln.drains) }

// PendingFrom returns how many pending connections come from ip's source
// (its IPv4 address or IPv6 /64).
func (s *Server) PendingFrom(ip string) int {
	src := sourceKey(&net.TCPAddr{IP: net.ParseIP(ip)})
	p := s.ln.pending
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bySrc[src]
}

// KickReads returns how many passed-on kicks are having their body read.
func (s *Server) KickReads() int { return int(s.kickReads.Load()) }

// Accepted returns imq_gateway_connections_total{result}.
func (s *Server) Accepted(result string) float64 {
	var m dto.Metric
	s.m.accepted.WithLabelValues(result).Write(&m)
	return m.GetCounter().GetValue()
}
