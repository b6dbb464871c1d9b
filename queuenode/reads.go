package queuenode

import (
	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// The admin RPC's reads (get_state, history, queue_info). Like every other
// operation they run under the queue's shard lock after the ownership check
// (MOVED otherwise), but they never create a queue or a mount: a missing one
// is NOT_FOUND. Their replies are encoded after the lock is released.

// readQueue runs read on queue under its shard lock, if the node serves the
// queue and holds it, and returns its result.
func readQueue[T any](s *Server, queue string, read func(q *Queue) (T, error)) (T, error) {
	var zero T
	if err := wire.ValidateQueueName(queue); err != nil {
		return zero, err
	}
	sh := s.shardFor(queue)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if err := s.checkOwnerLocked(queue); err != nil {
		return zero, err
	}
	q := sh.queues[queue]
	if q == nil {
		return zero, imqerr.New(imqpb.Code_NOT_FOUND, "queue %s does not exist on this node", queue)
	}
	defer s.settleLocked(q, 0) // reads age out old history
	return read(q)
}

func (s *Server) getState(l *link, req *imqpb.NodeRequest, g *imqpb.GetState) error {
	snap, err := readQueue(s, g.GetQueue(), func(q *Queue) (*imqpb.StateSnapshot, error) { return q.GetState(g.GetMount(), g.GetKeys()) })
	if err != nil {
		return err
	}
	l.reply(req.GetId(), func(r *imqpb.NodeReply) { r.Result = &imqpb.NodeReply_State{State: snap} })
	return nil
}

func (s *Server) history(l *link, req *imqpb.NodeRequest, h *imqpb.History) error {
	page, err := readQueue(s, h.GetQueue(), func(q *Queue) (*imqpb.HistoryPage, error) {
		return q.History(h.GetMount(), h.GetSinceOffset(), int(min(h.GetLimit(), MaxHistoryLimit)), s.cfg.Now())
	})
	if err != nil {
		return err
	}
	l.reply(req.GetId(), func(r *imqpb.NodeReply) { r.Result = &imqpb.NodeReply_History{History: page} })
	return nil
}

func (s *Server) queueInfo(l *link, req *imqpb.NodeRequest, qi *imqpb.QueueInfo) error {
	info, err := readQueue(s, qi.GetQueue(), func(q *Queue) (*imqpb.QueueInfoResult, error) { return q.Info(s.cfg.Now()), nil })
	if err != nil {
		return err
	}
	info.Node = s.cfg.NodeID
	for _, sub := range info.Subscribers {
		sub.Gateway = gatewayOfKey(sub.Gateway) // the gateway's id, not its link's key
	}
	l.reply(req.GetId(), func(r *imqpb.NodeReply) { r.Result = &imqpb.NodeReply_QueueInfo{QueueInfo: info} })
	return nil
}
