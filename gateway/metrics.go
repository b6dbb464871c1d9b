package gateway

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/internal/link"
	"github.com/imq-dev/imq/internal/reasons"
	imqpb "github.com/imq-dev/imq/proto"
)

type metrics struct {
	accepted      *prometheus.CounterVec
	requests      *prometheus.CounterVec
	errors        *prometheus.CounterVec
	disconnects   *prometheus.CounterVec
	deliveries    prometheus.Counter
	linkDelivers  prometheus.Counter
	slowConsumers prometheus.Counter
	sendDrops     prometheus.Counter
	unsubscribed  *prometheus.CounterVec
	movedRetries  prometheus.Counter
	movedFailures *prometheus.CounterVec
	tableChanges  prometheus.Counter
	rebinds       *prometheus.CounterVec
	subsRebound   prometheus.Counter
	rpcRequests   *prometheus.CounterVec
	rpcSeconds    *prometheus.HistogramVec
	authCallouts  *prometheus.CounterVec
	authSeconds   prometheus.Histogram
	jwksFetches   *prometheus.CounterVec
	refused       *prometheus.CounterVec

	linkHandshakeFailures *prometheus.CounterVec
}

func newMetrics(reg *prometheus.Registry, s *Server) *metrics {
	m := &metrics{
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_connections_total", Help: "WebSocket connection attempts, by result: ok, upgrade_failed, or the error code of a refused handshake (bad_request, unauthorized, forbidden, unavailable); fd_exhausted: an accept that failed for want of file descriptors. Refusals for capacity or abuse count in imq_gateway_connections_refused_total only.",
		}, []string{"result"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_requests_total", Help: "Client requests received (messages in), by type.",
		}, []string{"type"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_errors_total", Help: "Error replies sent to clients, by code.",
		}, []string{"code"}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_disconnects_total", Help: "Connections closed, by reason.",
		}, []string{"reason"}),
		deliveries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_gateway_deliveries_total", Help: "Events and state changes queued to clients (messages out).",
		}),
		linkDelivers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_gateway_link_delivers_total", Help: "Events and state changes received from queue nodes.",
		}),
		slowConsumers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_gateway_slow_consumers_total", Help: "Clients disconnected because their send queue overflowed.",
		}),
		sendDrops: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_gateway_send_queue_dropped_frames_total", Help: "Frames dropped from send queues of slow consumers.",
		}),
		unsubscribed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_unsubscribed_total", Help: "Subscriptions the gateway ended without a leave (clients told Unsubscribed), by reason.",
		}, []string{"reason"}),
		movedRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_gateway_moved_retries_total", Help: "Requests sent again after a queue node answered MOVED.",
		}),
		movedFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_moved_failures_total", Help: "Requests answered MOVED that the client was answered UNAVAILABLE for, by why: attempts (used up), deadline (request time used up), superseded (a later join or leave of the queue), shutdown.",
		}, []string{"reason"}),
		tableChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_gateway_table_changes_total", Help: "Bucket tables the gateway switched its routing to.",
		}),
		rebinds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_rebinds_total", Help: "Bucket hand-off marks (BucketMoving) handled, by result: ok (the subscriptions moved to the new owner's link and it was told BucketAdopted), error (its link could not be had in time: the subscriptions ended, MOVED).",
		}, []string{"result"}),
		subsRebound: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_gateway_subscriptions_rebound_total", Help: "Subscriptions moved to a bucket's new owner's link during hand-offs (on its old owner's BucketMoving).",
		}),
		rpcRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_rpc_requests_total", Help: "Admin RPC calls answered, by method (\"unknown\" for names that are not methods) and code (OK or the error code).",
		}, []string{"method", "code"}),
		rpcSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "imq_gateway_rpc_seconds", Help: "Admin RPC call duration, from the request's headers to its answer written, by method.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"method"}),
		authCallouts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_auth_callouts_total", Help: "Connect tokens asked of the auth backend, by outcome: accepted, refused (the backend said no), failed (no usable answer; the token was refused).",
		}, []string{"outcome"}),
		authSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "imq_gateway_auth_callout_seconds", Help: "Auth call-out duration, the wait for a slot included.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		jwksFetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_jwks_fetches_total", Help: "JWKS fetches (--jwks-url), by result: ok, error (the keys fetched before stay in use).",
		}, []string{"result"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_connections_refused_total", Help: "Connections refused or closed for capacity or abuse, by reason: full (--max-connections authenticated), listener_full (the open-file capacity), pending (--max-pending, nothing to evict), pending_ip (--max-pending-per-ip), pending_evicted (a pending connection closed for a newer one past --max-pending), auth_failures (--auth-failures-per-ip spent).",
		}, []string{"reason"}),
		linkHandshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_link_handshake_failures_total", Help: "Queue node links whose handshake failed, by reason: timeout, closed, malformed, version (no common protocol), mode (one end without a cluster key), auth (the node's MAC did not verify), peer (role or id), refused (the node refused this gateway's hello: see its log).",
		}, []string{"reason"}),
	}
	for _, r := range link.Reasons {
		m.linkHandshakeFailures.WithLabelValues(string(r))
	}
	reg.MustRegister(m.linkHandshakeFailures, m.accepted, m.requests, m.errors, m.disconnects, m.deliveries, m.linkDelivers,
		m.slowConsumers, m.sendDrops, m.unsubscribed, m.movedRetries, m.movedFailures, m.tableChanges, m.rebinds, m.subsRebound,
		m.rpcRequests, m.rpcSeconds, m.authCallouts, m.authSeconds, m.jwksFetches, m.refused,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_rpc_inflight", Help: "Admin RPC calls in progress.",
		}, func() float64 { return float64(len(s.rpcSlots)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_connections", Help: "Open client connections.",
		}, func() float64 { return float64(s.conns.count()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_connections_pending", Help: "Connections not yet authenticated (idle HTTP keep-alive ones included).",
		}, func() float64 { return float64(s.ln.pending.count()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_connections_pending_capacity", Help: "Connections not yet authenticated this gateway admits at most (--max-pending).",
		}, func() float64 { return float64(s.maxPending) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_connection_capacity", Help: "Authenticated client connections this gateway accepts at most (--max-connections).",
		}, func() float64 { return float64(s.maxConns) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_links_up", Help: "Queue node links currently up.",
		}, func() float64 { return float64(s.linksUp()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_links", Help: "Queue node links: one per node of the bucket table.",
		}, func() float64 { return float64(len(s.routes.Load().links)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_table_version", Help: "Version of the bucket table the gateway routes by (0: none yet).",
		}, func() float64 { return float64(s.table().Version()) }),
	)
	for _, r := range []string{"attempts", "deadline", "superseded", "shutdown"} {
		m.movedFailures.WithLabelValues(r)
	}
	for _, r := range []imqpb.Reason{imqpb.Reason_REASON_NODE_LOST, imqpb.Reason_REASON_MOVED, imqpb.Reason_REASON_TIMEOUT} {
		m.unsubscribed.WithLabelValues(reasons.Of(r).Label)
	}
	for r := range refusals {
		m.refused.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "error"} {
		m.jwksFetches.WithLabelValues(r)
		m.rebinds.WithLabelValues(r)
	}
	for _, o := range []string{"accepted", "refused", "failed"} {
		m.authCallouts.WithLabelValues(o)
	}
	for _, c := range imqpb.Code_name {
		if c != "OK" {
			m.errors.WithLabelValues(c)
		}
	}
	return m
}

func okLabel(ok bool) string {
	if ok {
		return "ok"
	}
	return "error"
}
