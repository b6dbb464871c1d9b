package gateway

import imqpb "github.com/imq-dev/imq/proto"

// Fanout exposes the fan-out to benchmarks in package gateway_test.
func (s *Server) Fanout(d *imqpb.Deliver) { s.fanout(d) }
