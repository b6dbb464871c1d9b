package queuenode

import (
	"github.com/prometheus/client_golang/prometheus"

	imqlink "github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

type metrics struct {
	requests      *prometheus.CounterVec
	errors        *prometheus.CounterVec
	published     prometheus.Counter
	stateChanges  prometheus.Counter
	deliveries    prometheus.Counter
	linkOverflows prometheus.Counter
	// linkHandshakeFailures counts links whose handshake failed, by
	// imqlink.Reason.
	linkHandshakeFailures *prometheus.CounterVec
	// linkHandshakesShed counts connections the handshake gate closed, by
	// imqlink.Shed.
	linkHandshakesShed *prometheus.CounterVec
	queuesCreated      prometheus.Counter
	queuesExpired      prometheus.Counter

	callouts       *prometheus.CounterVec
	calloutSeconds *prometheus.HistogramVec
	chainedRefused *prometheus.CounterVec

	evictedEvents *prometheus.CounterVec
	evictedBytes  *prometheus.CounterVec
	evictionRuns  prometheus.Counter
	refused       *prometheus.CounterVec
	seedsSkipped  *prometheus.CounterVec

	// Resolved once, for the hot path.
	evictedEventsBy  [numEvictReasons]prometheus.Counter
	evictedBytesBy   [numEvictReasons]prometheus.Counter
	evictionsFutile  prometheus.Counter
	refusedNodeBytes prometheus.Counter

	movedReplies     prometheus.Counter
	queuesMoved      prometheus.Counter
	deadGatewayLinks prometheus.Counter

	// Hand-off (handoff_*.go).
	handoffQueues  *prometheus.CounterVec // by direction: out, in
	handoffBytes   *prometheus.CounterVec // by direction
	handoffSeconds prometheus.Histogram
	handoffsFailed *prometheus.CounterVec // by reason
	heldRequests   prometheus.Gauge
	heldBytes      prometheus.Gauge
	heldRefused    prometheus.Counter
	forwarded      prometheus.Counter
	holdBytes      prometheus.Gauge
	holdOverflows  *prometheus.CounterVec // by reason: bytes, time
	fenced         prometheus.Counter
}

func newMetrics(reg *prometheus.Registry, s *Server) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_requests_total", Help: "Requests received from gateways, by operation.",
		}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_errors_total", Help: "Requests answered with an error, by code.",
		}, []string{"code"}),
		published: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_messages_published_total", Help: "Events appended to message mounts.",
		}),
		stateChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_state_changes_total", Help: "Changes applied to state mounts.",
		}),
		deliveries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_link_deliveries_total", Help: "Events and state changes sent to gateways (one per gateway, not per user).",
		}),
		linkOverflows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_link_overflows_total", Help: "Gateway links closed because their send buffer was full.",
		}),
		queuesCreated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_queues_created_total", Help: "Queues created.",
		}),
		queuesExpired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_queues_dropped_total", Help: "Queues dropped: idle past the idle TTL, or empty when their last subscriber left.",
		}),
		callouts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_callouts_total",
			Help: "Call-outs to backends, by hook and outcome (allowed, denied, rewritten, failed_allowed, failed_denied; leave notifications: allowed when delivered, failed_allowed when not, dropped when their queue was full).",
		}, []string{"hook", "outcome"}),
		calloutSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "imq_queuenode_callout_seconds", Help: "Duration of call-outs to backends, waiting for a connection slot included, by hook.",
			Buckets: prometheus.DefBuckets,
		}, []string{"hook"}),
		chainedRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_chained_refused_total",
			Help: "Client requests on queues with call-outs answered without running, by reason: link (LIMIT_EXCEEDED: the link's requests waiting for call-outs at their bound), chain (LIMIT_EXCEEDED: the session's on the queue at theirs), expired (TIMEOUT: past the gateway's deadline when their turn came).",
		}, []string{"reason"}),
		evictedEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_evicted_events_total",
			Help: "Events evicted from message mount histories, by reason: count (--history-len), age (--history-age), bytes (--history-bytes), node (the node's memory budget, --max-node-bytes).",
		}, []string{"reason"}),
		evictedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_evicted_bytes_total", Help: "Bytes (as the memory budget counts them) of the events evicted, by reason as imq_queuenode_evicted_events_total.",
		}, []string{"reason"}),
		evictionRuns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_budget_evictions_total", Help: "Times the node walked its queues to evict the oldest history because a write did not fit its memory budget.",
		}),
		evictionsFutile: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_budget_evictions_futile_total", Help: "Budget evictions after which the write still did not fit; writes needing eviction are then refused for a second.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_refused_total",
			Help: "Writes and queue creations refused with LIMIT_EXCEEDED, by reason: node_bytes (the memory budget is full and the history left cannot make room), queue_creates (the user's --max-queue-creates), creators (the per-user creation limiter tracks as many users as it may), max_queues (--max-queues).",
		}, []string{"reason"}),
		seedsSkipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_join_seeds_skipped_total",
			Help: "State seeds from join call-outs not applied, by reason: node_bytes (the memory budget had no room; seeds never evict), refused (the queue's limits or the key's mount kind refused it).",
		}, []string{"reason"}),
		movedReplies: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_moved_replies_total", Help: "Requests answered MOVED: the queue's bucket belongs to another node by this node's table.",
		}),
		queuesMoved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_queues_moved_total", Help: "Queues closed because a new bucket table gave their bucket to another node.",
		}),
		deadGatewayLinks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_queuenode_dead_gateway_links_closed_total", Help: "Links closed because their gateway died or left the cluster membership.",
		}),
		linkHandshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_link_handshake_failures_total", Help: "Incoming links closed because their handshake failed, by reason: timeout (no hello within the link handshake timeout), closed, malformed (not a hello, or a frame over 4 KiB), version (no common protocol), mode (one end without a cluster key), auth (the hello's MAC did not verify: a wrong key or a replay), peer (role or id refused).",
		}, []string{"reason"}),
		linkHandshakesShed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_queuenode_link_handshakes_shed_total", Help: "Incoming connections closed before their handshake finished because too many were in flight, by which bound: address (the peer's IP address had its most handshakes in flight, 16 by default; the new one was closed), oldest (all slots, 256 by default, were taken; the oldest was closed to admit the new one).",
		}, []string{"shed"}),
	}
	for _, r := range imqlink.Reasons {
		m.linkHandshakeFailures.WithLabelValues(string(r))
	}
	for _, sh := range []imqlink.Shed{imqlink.ShedAddr, imqlink.ShedOldest} {
		m.linkHandshakesShed.WithLabelValues(string(sh))
	}
	m.handoffQueues = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imq_queuenode_handoff_queues_total", Help: "Queues streamed in bucket hand-offs that completed, by direction: out (handed off), in (adopted).",
	}, []string{"direction"})
	m.handoffBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imq_queuenode_handoff_bytes_total", Help: "Bytes of queue snapshots in bucket hand-offs that completed, by direction: out, in.",
	}, []string{"direction"})
	m.handoffSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "imq_queuenode_handoff_seconds", Help: "Duration of completed outgoing bucket hand-offs, from dialling the new owner to its ack (the freeze is inside it).",
		Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
	})
	m.handoffsFailed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imq_queuenode_handoffs_failed_total", Help: "Outgoing bucket hand-offs that failed (the node kept the bucket), by reason: dial, stream (the link broke), timeout (no ack in time), refused (by the new owner).",
	}, []string{"reason"})
	m.heldRequests = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "imq_queuenode_handoff_held_requests", Help: "Requests for buckets being handed off, held or waiting to be answered MOVED or forwarded.",
	})
	m.heldBytes = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "imq_queuenode_handoff_held_bytes", Help: "Bytes of imq_queuenode_handoff_held_requests.",
	})
	m.heldRefused = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "imq_queuenode_handoff_held_refused_total", Help: "Requests answered UNAVAILABLE because their bucket's held requests were at their bound.",
	})
	m.forwarded = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "imq_queuenode_handoff_forwarded_total", Help: "Leaves without a reply forwarded to the new owner of a bucket this node handed off.",
	})
	m.holdBytes = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "imq_queuenode_adopt_held_event_bytes", Help: "Bytes of events of adopted buckets held for gateways that have not confirmed the hand-off.",
	})
	m.holdOverflows = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imq_queuenode_adopt_hold_overflows_total", Help: "Gateways whose subscriptions to an adopted bucket were ended (QueueClosed MOVED) because they did not confirm the hand-off within the hold's bound, by reason: bytes, time.",
	}, []string{"reason"})
	m.fenced = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "imq_queuenode_fenced_total", Help: "Requests answered UNAVAILABLE because they were routed by a newer bucket table than the node could fetch in time.",
	})
	for _, d := range []string{"out", "in"} {
		m.handoffQueues.WithLabelValues(d)
		m.handoffBytes.WithLabelValues(d)
	}
	for _, r := range []string{failDial, failStream, failTimeout, failRefused} {
		m.handoffsFailed.WithLabelValues(r)
	}
	for _, r := range []string{"bytes", "time"} {
		m.holdOverflows.WithLabelValues(r)
	}
	reg.MustRegister(m.handoffQueues, m.handoffBytes, m.handoffSeconds, m.handoffsFailed, m.heldRequests, m.heldBytes,
		m.heldRefused, m.forwarded, m.holdBytes, m.holdOverflows, m.fenced,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_handoff_buckets_out", Help: "Buckets this node is handing off (frozen, or handed off and answering MOVED, forwarding leaves to their new owner).",
		}, func() float64 { out, _ := s.ho.counts(); return float64(out) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_handoff_buckets_in", Help: "Buckets this node adopted that its table does not give it yet, or is receiving.",
		}, func() float64 { _, in := s.ho.counts(); return float64(in) }),
	)
	reg.MustRegister(m.requests, m.errors, m.published, m.stateChanges, m.deliveries,
		m.linkOverflows, m.queuesCreated, m.queuesExpired, m.callouts, m.calloutSeconds, m.chainedRefused,
		m.evictedEvents, m.evictedBytes, m.evictionRuns, m.evictionsFutile, m.refused, m.seedsSkipped,
		m.movedReplies, m.queuesMoved, m.deadGatewayLinks, m.linkHandshakeFailures, m.linkHandshakesShed,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_link_handshakes_in_flight", Help: "Incoming link connections whose handshake is running: accepted, their peer not yet authenticated.",
		}, func() float64 { return float64(s.gate.InFlight()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_budget_used_bytes", Help: "Bytes the node's queues hold as its memory budget counts them (history, state, overheads), writes in flight included.",
		}, func() float64 { return float64(s.nodeBytes.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_budget_bytes", Help: "The node's memory budget (--max-node-bytes).",
		}, func() float64 { return float64(s.cfg.MaxNodeBytes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_table_version", Help: "Version of the bucket table the node holds (0: none, or standalone).",
		}, func() float64 { return float64(s.currentTable().Version()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_queues", Help: "Queues held in RAM.",
		}, func() float64 { return float64(s.queueCount.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_queuenode_links", Help: "Connected gateway links.",
		}, func() float64 { return float64(s.linkCount()) }),
	)
	for _, op := range []string{"join", "leave", "publish", "set_state", "get_state", "history", "queue_info"} {
		m.requests.WithLabelValues(op)
	}
	for _, hn := range hookNames {
		m.calloutSeconds.WithLabelValues(hn.name)
		outcomes := []string{outcomeAllowed, outcomeFailedAllowed, outcomeDropped}
		if hn.hook != HookLeave {
			outcomes = []string{outcomeAllowed, outcomeDenied, outcomeFailedAllowed, outcomeFailedDenied}
			if hn.hook == HookPublish {
				outcomes = append(outcomes, outcomeRewritten)
			}
		}
		for _, o := range outcomes {
			m.callouts.WithLabelValues(hn.name, o)
		}
	}
	for r := range numEvictReasons {
		m.evictedEventsBy[r] = m.evictedEvents.WithLabelValues(r.String())
		m.evictedBytesBy[r] = m.evictedBytes.WithLabelValues(r.String())
	}
	for _, r := range []string{refusedNodeBytes, refusedQueueCreates, refusedCreators, refusedMaxQueues} {
		m.refused.WithLabelValues(r)
	}
	m.refusedNodeBytes = m.refused.WithLabelValues(refusedNodeBytes)
	for _, r := range []string{seedSkippedBytes, seedSkippedRefused} {
		m.seedsSkipped.WithLabelValues(r)
	}
	for _, r := range []string{refusedLink, refusedChain, refusedExpired} {
		m.chainedRefused.WithLabelValues(r)
	}
	for _, c := range imqpb.Code_name {
		if c != "OK" {
			m.errors.WithLabelValues(c)
		}
	}
	return m
}
