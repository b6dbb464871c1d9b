package gateway

import (
	"github.com/prometheus/client_golang/prometheus"

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
}

func newMetrics(reg *prometheus.Registry, s *Server) *metrics {
	m := &metrics{
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imq_gateway_connections_total", Help: "WebSocket connection attempts, by result.",
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
	}
	reg.MustRegister(m.accepted, m.requests, m.errors, m.disconnects, m.deliveries, m.linkDelivers,
		m.slowConsumers, m.sendDrops,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_connections", Help: "Open client connections.",
		}, func() float64 { return float64(s.conns.count()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_connection_capacity", Help: "Client connections this gateway accepts at most.",
		}, func() float64 { return float64(s.maxConns) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_gateway_links_up", Help: "Queue node links currently up.",
		}, func() float64 { return float64(s.linksUp()) }),
	)
	for _, c := range imqpb.Code_name {
		if c != "OK" {
			m.errors.WithLabelValues(c)
		}
	}
	return m
}
