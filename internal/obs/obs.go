// Package obs holds the observability endpoints every IMQ process serves on
// its internal HTTP listener (the boss's API, a gateway's or a queue node's
// --internal-addr), never on a client-facing one: /metrics (Prometheus),
// /healthz and /varz (cheap JSON state, after nats-server's), which show
// internal addresses and load. Only /healthz may also be served to clients
// (HealthHandler), for load balancers. It imports no IMQ package.
package obs

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Register adds the Go runtime and process collectors to reg, once per
// registry; a registry that already has them is left as is.
func Register(reg *prometheus.Registry) {
	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		_ = reg.Register(c) // AlreadyRegisteredError: another service in this process did it
	}
}

// Handle adds /metrics, /healthz and /varz to mux. health returns nil when the
// process is ready to serve; varz returns a JSON-encodable snapshot.
func Handle(mux *http.ServeMux, reg *prometheus.Registry, health func() error, varz func() any) {
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", HealthHandler(health))
	mux.HandleFunc("GET /varz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(varz())
	})
}

// HealthHandler answers /healthz: 200 {"status": "ok"} when health returns
// nil, else 503 with its error.
func HealthHandler(health func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if err := health(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(map[string]string{"status": "unavailable", "error": err.Error()})
			return
		}
		json.NewEncoder(w).Encode(map[string]string{"status": "ok"})
	}
}

// HandleProfiling adds the runtime profiles (net/http/pprof) under
// /debug/pprof/, on a listener of its own that operators alone can reach: they
// expose internals and cost CPU while they run. The command line is left out,
// since it may carry secrets.
func HandleProfiling(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
}
