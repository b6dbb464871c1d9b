package queuenode

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	imqpb "github.com/imq-dev/imq/proto"
)

// BenchmarkPublishRoundTrip is one client publish over a real link, sent and
// answered, without and with a publish call-out to a local backend that
// allows it: the call-out's cost on the publish path (loopback HTTP with
// keep-alive, JSON both ways, the session's chain).
func BenchmarkPublishRoundTrip(b *testing.B) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"allow":true}`)
	}))
	b.Cleanup(backend.Close)
	for _, c := range []struct {
		name     string
		callouts []Callout
	}{
		{"no-callout", nil},
		{"callout", []Callout{{Prefix: "/room/", URL: backend.URL + "/imq/room"}}},
	} {
		b.Run(c.name, func(b *testing.B) {
			cfg := DefaultConfig()
			cfg.LinkAddr = "127.0.0.1:0"
			cfg.Callouts = c.callouts
			s := startNode(b, cfg)
			l := dialLink(b, s.LinkAddr(), "gw-bench")
			req := publishReq("/room/bench", "chat")
			b.ReportAllocs()
			for b.Loop() {
				if r := l.do(req); r.GetCode() != imqpb.Code_OK {
					b.Fatalf("publish: %v %s", r.GetCode(), r.GetMessage())
				}
			}
		})
	}
}
