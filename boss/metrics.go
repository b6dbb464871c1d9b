package boss

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imq-dev/imq/internal/member"
)

type metrics struct {
	publishes     prometheus.Counter
	moved         prometheus.Counter
	adoptions     prometheus.Counter
	persistErrors prometheus.Counter
	fetchErrors   prometheus.Counter
	members       *prometheus.GaugeVec
	reconcile     prometheus.Histogram

	movesCompleted prometheus.Counter
	movesGivenUp   prometheus.Counter
	reportsRefused prometheus.Counter
	// actionsRefused counts refused operator and member actions, by
	// credential and reason (handoff.go).
	actionsRefused *prometheus.CounterVec
}

func newMetrics(reg *prometheus.Registry, b *Boss) *metrics {
	m := &metrics{
		publishes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_table_publishes_total", Help: "Bucket table versions published (adopted ones included).",
		}),
		moved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_buckets_moved_total", Help: "Buckets that changed owner in published versions.",
		}),
		adoptions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_table_adoptions_total", Help: "Newer tables adopted from members (the boss had lost versions).",
		}),
		persistErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_persist_errors_total", Help: "Failed writes of the boss state file.",
		}),
		fetchErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_table_fetch_errors_total", Help: "Failed fetches of a newer table from a member.",
		}),
		members: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "imq_boss_members", Help: "Live cluster members (alive or suspect) as the boss sees them, by role.",
		}, []string{"role"}),
		reconcile: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "imq_boss_reconcile_seconds", Help: "Time one reconcile of the table with membership took.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		movesCompleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_moves_completed_total", Help: "Bucket moves completed by a reported hand-off.",
		}),
		movesGivenUp: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_moves_given_up_total", Help: "Bucket moves given up: not reported within the move timeout.",
		}),
		reportsRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imq_boss_handoff_reports_refused_total", Help: "Hand-off reports refused for a missing, bad, stale or replayed signature.",
		}),
	}
	m.actionsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imq_boss_actions_refused_total", Help: "Actions (hand-off reports, drain and undrain) refused for their credential, by credential (operator: the bearer operator key; cluster: a member's cluster-key signature) and reason: no_key (the boss has none of that kind), missing, invalid (a wrong key or bad signature), stale, replay, busy.",
	}, []string{"credential", "reason"})
	for _, c := range []string{credOperator, credCluster} {
		for _, r := range []string{refusedNoKey, refusedMissing, refusedInvalid, refusedStale, refusedReplay, refusedBusy} {
			if c == credCluster || r == refusedNoKey || r == refusedMissing || r == refusedInvalid {
				m.actionsRefused.WithLabelValues(c, r)
			}
		}
	}
	reg.MustRegister(m.movesCompleted, m.movesGivenUp, m.reportsRefused, m.actionsRefused,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_boss_buckets_moving", Help: "Buckets marked moving in the table the boss serves.",
		}, func() float64 { return float64(b.Table().MovingCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_boss_draining_nodes", Help: "Queue nodes draining (by an operator, or by themselves as they shut down).",
		}, func() float64 { return float64(len(*b.drainingView.Load())) }),
	)
	reg.MustRegister(m.publishes, m.moved, m.adoptions, m.persistErrors, m.fetchErrors, m.members, m.reconcile,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_boss_table_version", Help: "Version of the bucket table the boss serves.",
		}, func() float64 { return float64(b.Table().Version()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_boss_table_buckets", Help: "Buckets in the table the boss serves.",
		}, func() float64 { return float64(b.Table().Buckets()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_boss_table_nodes", Help: "Queue nodes in the table the boss serves.",
		}, func() float64 { return float64(len(b.Table().Nodes())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imq_boss_table_waiters", Help: "Long polls of /v1/table waiting for a newer version.",
		}, func() float64 { return float64(b.waiters.Load()) }),
	)
	for _, r := range []member.Role{member.RoleBoss, member.RoleQueueNode, member.RoleGateway} {
		m.members.WithLabelValues(string(r))
	}
	return m
}
