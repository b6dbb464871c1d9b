package gateway

import (
	"context"
	"time"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// callNode sends req, an admin RPC (backend) request on queue, to the node
// that owns the queue by the bucket table, through the same routing as
// client requests: a MOVED answer is sent again to the new owner (route.go),
// within ctx's deadline. It waits for the final reply or ctx. A reply
// other than OK comes back as its *imqerr.Error, with the reply. The node
// is the id of the node that answered (empty when none did).
func (s *Server) callNode(ctx context.Context, queue string, req *imqpb.NodeRequest) (reply *imqpb.NodeReply, node string, err error) {
	if ctx.Err() != nil {
		// Send nothing past the call's end: the caller would be told the
		// outcome is unknown of a request that then runs anyway (the tail
		// of a broadcast, say).
		return nil, "", ctxErr(ctx, s.cfg.RPCTimeout)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(s.cfg.RequestTimeout)
	}
	req.Backend = true
	type answer struct {
		r    *imqpb.NodeReply
		node string
	}
	ch := make(chan answer, 1) // done runs once; nobody may be waiting by then
	rt := &routed{
		s: s, queue: queue, req: req, deadline: deadline,
		done: func(r *imqpb.NodeReply, l *nodeLink) {
			a := answer{r: r}
			if l != nil {
				a.node = l.node.ID
			}
			ch <- a
		},
	}
	if err := rt.send(); err != nil {
		rt.finish(err)
	}
	select {
	case a := <-ch:
		if a.r.GetCode() != imqpb.Code_OK {
			return a.r, a.node, &imqerr.Error{Code: a.r.GetCode(), Message: a.r.GetMessage()}
		}
		return a.r, a.node, nil
	case <-ctx.Done():
		return nil, "", ctxErr(ctx, s.cfg.RPCTimeout)
	}
}
