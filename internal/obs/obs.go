// Package obs holds the observability endpoints every IMQ process serves on
// its internal HTTP listener (the boss's API, a gateway's or a queue node's
// --internal-addr), never on a client-facing one: /metrics (Prometheus),
// /healthz and /varz (cheap JSON state, after nats-server's), which show
// internal addresses and load. Only /healthz may also be served to clients
// (HealthHandler), for load balancers. It imports no IMQ package.
package obs

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Limits of every internal listener (NewInternalServer). Its callers are
// scrapers, the boss and peers, but it is still a network listener: a
// stalled or hostile connection must not hold a goroutine or memory forever.
const (
	// InternalReadHeaderTimeout bounds reading a request's headers.
	InternalReadHeaderTimeout = 10 * time.Second
	// InternalReadTimeout bounds reading a whole request, body included
	// (a kick passed on by a gateway is the largest, a few hundred bytes).
	InternalReadTimeout = 10 * time.Second
	// InternalWriteTimeout bounds a request from the end of its headers to
	// the end of its answer. It exceeds the longest long poll, the boss's
	// GET /v1/table?wait= (at most 60 s, boss.MaxWait, checked by a boss
	// test), with room to write the table.
	InternalWriteTimeout = 90 * time.Second
	// InternalIdleTimeout closes keep-alive connections (scrapers, the
	// boss, peers) idle this long.
	InternalIdleTimeout = 2 * time.Minute
	// InternalMaxHeaderBytes bounds a request's headers; larger is
	// answered 431.
	InternalMaxHeaderBytes = 32 << 10
)

// NewInternalServer returns the HTTP server of an internal listener (the
// boss's API, a gateway's or a queue node's --internal-addr) serving
// handler, with the limits above. Its own errors (a bad request, a TLS
// probe) are logged at debug level: a scanner must not flood the log.
func NewInternalServer(handler http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: InternalReadHeaderTimeout,
		ReadTimeout:       InternalReadTimeout,
		WriteTimeout:      InternalWriteTimeout,
		IdleTimeout:       InternalIdleTimeout,
		MaxHeaderBytes:    InternalMaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
}

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
