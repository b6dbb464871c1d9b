package gateway

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"sync"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// Bounds of the admin RPC methods (docs/openapi.json documents them).
const (
	// maxBroadcastQueues bounds the queues of one broadcast.
	maxBroadcastQueues = 1000
	// broadcastParallel bounds the publishes of one broadcast in flight.
	broadcastParallel = 64
	// maxBatchCalls bounds the calls of one batch.
	maxBatchCalls = 100
	// maxGetStateKeys bounds the keys one get_state names.
	maxGetStateKeys = 1024
	// defaultHistoryLimit and maxHistoryLimit bound one history page.
	defaultHistoryLimit = 100
	maxHistoryLimit     = 1000
	// maxKickReason bounds the reason a kick shows the user, in bytes.
	maxKickReason = 1024
)

// checkQueue validates a queue name and the key's right to act on it.
func checkQueue(rc *rpcCall, queue string) error {
	if err := wire.ValidateQueueName(queue); err != nil {
		return err
	}
	if !rc.key.allowsQueue(queue) {
		return imqerr.New(imqpb.Code_FORBIDDEN, "this API key may not act on queue %s (it is limited to queues starting with %s)",
			queue, strings.Join(rc.key.prefixes, ", "))
	}
	return nil
}

type publishParams struct {
	Queue      string          `json:"queue" rpc:"required"`
	Mount      string          `json:"mount" rpc:"required"`
	Data       json.RawMessage `json:"data"`
	DataBase64 string          `json:"data_base64"`
}

// publishResult is publish's result, and one queue's success in broadcast.
type publishResult struct {
	Offset  uint64 `json:"offset"`
	Created bool   `json:"created"`
}

func (s *Server) rpcPublish(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p publishParams
	present, err := decodeParams(params, &p, "")
	if err != nil {
		return nil, err
	}
	payload, err := s.publishPayload(rc, present, p.Data, p.DataBase64, p.Mount, p.Queue)
	if err != nil {
		return nil, err
	}
	return s.publishTo(ctx, p.Queue, p.Mount, payload)
}

// publishPayload checks a publish's mount and data (and queues) before
// anything is sent.
func (s *Server) publishPayload(rc *rpcCall, present map[string]bool, data json.RawMessage, b64, mount string, queues ...string) ([]byte, error) {
	for _, q := range queues {
		if err := checkQueue(rc, q); err != nil {
			return nil, err
		}
	}
	if err := wire.ValidateMountName(mount); err != nil {
		return nil, err
	}
	payload, err := payloadOf(present, "data", data, b64)
	if err != nil {
		return nil, err
	}
	if len(payload) > s.cfg.MaxPayload {
		return nil, imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "data is %d bytes; the limit is %d", len(payload), s.cfg.MaxPayload)
	}
	return payload, nil
}

func (s *Server) publishTo(ctx context.Context, queue, mount string, payload []byte) (*publishResult, error) {
	r, _, err := s.callNode(ctx, queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{
		Queue: queue, Mount: mount, Payload: payload,
	}}})
	if err != nil {
		return nil, err
	}
	return &publishResult{Offset: r.GetPublished().GetOffset(), Created: r.GetCreated()}, nil
}

type setStateParams struct {
	Queue       string          `json:"queue" rpc:"required"`
	Mount       string          `json:"mount" rpc:"required"`
	Key         string          `json:"key" rpc:"required"`
	Value       json.RawMessage `json:"value"`
	ValueBase64 string          `json:"value_base64"`
}

type setStateResult struct {
	Version uint64 `json:"version"`
	Created bool   `json:"created"`
}

func (s *Server) rpcSetState(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p setStateParams
	present, err := decodeParams(params, &p, "")
	if err != nil {
		return nil, err
	}
	if err := checkStateTarget(rc, p.Queue, p.Mount, p.Key); err != nil {
		return nil, err
	}
	value, err := payloadOf(present, "value", p.Value, p.ValueBase64)
	if err != nil {
		return nil, err
	}
	if len(value) > s.cfg.MaxPayload {
		return nil, imqerr.New(imqpb.Code_PAYLOAD_TOO_LARGE, "value is %d bytes; the limit is %d", len(value), s.cfg.MaxPayload)
	}
	r, _, err := s.callNode(ctx, p.Queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_SetState{SetState: &imqpb.SetState{
		Queue: p.Queue, Mount: p.Mount, Key: p.Key, Value: value,
	}}})
	if err != nil {
		return nil, err
	}
	return &setStateResult{Version: r.GetStateSet().GetVersion(), Created: r.GetCreated()}, nil
}

func checkStateTarget(rc *rpcCall, queue, mount, key string) error {
	if err := checkQueue(rc, queue); err != nil {
		return err
	}
	if err := wire.ValidateMountName(mount); err != nil {
		return err
	}
	return wire.ValidateStateKey(key)
}

type deleteStateParams struct {
	Queue string `json:"queue" rpc:"required"`
	Mount string `json:"mount" rpc:"required"`
	Key   string `json:"key" rpc:"required"`
}

type deleteStateResult struct {
	Version uint64 `json:"version"`
}

func (s *Server) rpcDeleteState(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p deleteStateParams
	if _, err := decodeParams(params, &p, ""); err != nil {
		return nil, err
	}
	if err := checkStateTarget(rc, p.Queue, p.Mount, p.Key); err != nil {
		return nil, err
	}
	r, _, err := s.callNode(ctx, p.Queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_SetState{SetState: &imqpb.SetState{
		Queue: p.Queue, Mount: p.Mount, Key: p.Key, Delete: true,
	}}})
	if err != nil {
		return nil, err
	}
	return &deleteStateResult{Version: r.GetStateSet().GetVersion()}, nil
}

type getStateParams struct {
	Queue string   `json:"queue" rpc:"required"`
	Mount string   `json:"mount" rpc:"required"`
	Keys  []string `json:"keys"`
}

type getStateResult struct {
	Epoch uint64                 `json:"epoch"`
	Head  uint64                 `json:"head"`
	State map[string]*stateValue `json:"state"`
}

type stateValue struct {
	Value       json.RawMessage `json:"value,omitempty"`
	ValueBase64 *string         `json:"value_base64,omitempty"`
	Version     uint64          `json:"version"`
}

func (s *Server) rpcGetState(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p getStateParams
	if _, err := decodeParams(params, &p, ""); err != nil {
		return nil, err
	}
	if err := checkQueue(rc, p.Queue); err != nil {
		return nil, err
	}
	if err := wire.ValidateMountName(p.Mount); err != nil {
		return nil, err
	}
	if len(p.Keys) > maxGetStateKeys {
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"keys\" names %d keys; at most %d (omit it for every key)", len(p.Keys), maxGetStateKeys)
	}
	for _, k := range p.Keys {
		if err := wire.ValidateStateKey(k); err != nil {
			return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"keys\": %s", imqerr.From(err).Message)
		}
	}
	r, _, err := s.callNode(ctx, p.Queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_GetState{GetState: &imqpb.GetState{
		Queue: p.Queue, Mount: p.Mount, Keys: p.Keys,
	}}})
	if err != nil {
		return nil, err
	}
	st := r.GetState()
	out := &getStateResult{Epoch: st.GetEpoch(), Head: st.GetHead(), State: make(map[string]*stateValue, len(st.GetEntries()))}
	for _, e := range st.GetEntries() {
		v := &stateValue{Version: e.GetVersion()}
		v.Value, v.ValueBase64 = dataOut(e.GetValue())
		out.State[e.GetKey()] = v
	}
	return out, nil
}

type historyParams struct {
	Queue       string `json:"queue" rpc:"required"`
	Mount       string `json:"mount" rpc:"required"`
	SinceOffset uint64 `json:"since_offset"`
	Limit       int    `json:"limit"`
}

type historyResult struct {
	Epoch  uint64          `json:"epoch"`
	Head   uint64          `json:"head"`
	Events []*historyEvent `json:"events"`
	Missed bool            `json:"missed"`
	More   bool            `json:"more"`
}

type historyEvent struct {
	Offset     uint64          `json:"offset"`
	Sender     string          `json:"sender"`
	TimeMs     int64           `json:"time_ms"`
	Data       json.RawMessage `json:"data,omitempty"`
	DataBase64 *string         `json:"data_base64,omitempty"`
}

func (s *Server) rpcHistory(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p historyParams
	present, err := decodeParams(params, &p, "")
	if err != nil {
		return nil, err
	}
	if err := checkQueue(rc, p.Queue); err != nil {
		return nil, err
	}
	if err := wire.ValidateMountName(p.Mount); err != nil {
		return nil, err
	}
	if !present["limit"] {
		p.Limit = defaultHistoryLimit
	}
	if p.Limit < 1 || p.Limit > maxHistoryLimit {
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"limit\" must be 1 to %d, got %d", maxHistoryLimit, p.Limit)
	}
	r, _, err := s.callNode(ctx, p.Queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_History{History: &imqpb.History{
		Queue: p.Queue, Mount: p.Mount, SinceOffset: p.SinceOffset, Limit: uint32(p.Limit),
	}}})
	if err != nil {
		return nil, err
	}
	h := r.GetHistory()
	out := &historyResult{Epoch: h.GetEpoch(), Head: h.GetHead(), Events: make([]*historyEvent, len(h.GetEvents())), Missed: h.GetMissed(), More: h.GetMore()}
	for i, ev := range h.GetEvents() {
		e := &historyEvent{Offset: ev.GetOffset(), Sender: ev.GetSender(), TimeMs: ev.GetTimeMs()}
		e.Data, e.DataBase64 = dataOut(ev.GetPayload())
		out.Events[i] = e
	}
	return out, nil
}

type queueInfoParams struct {
	Queue string `json:"queue" rpc:"required"`
}

type queueInfoResult struct {
	Queue       string            `json:"queue"`
	Epoch       uint64            `json:"epoch"`
	Head        uint64            `json:"head"`
	Node        string            `json:"node"`
	CreatedMs   int64             `json:"created_ms"`
	Mounts      []*mountInfo      `json:"mounts"`
	Subscribers []*subscriberInfo `json:"subscribers"`
	// SubscribersTotal counts all subscribers; Subscribers holds the first
	// of them by session, as many as fit the node's reply bound.
	SubscribersTotal uint32 `json:"subscribers_total"`
}

type mountInfo struct {
	Name         string `json:"name"`
	Kind         string `json:"kind"`
	Retained     uint32 `json:"retained"`
	OldestOffset uint64 `json:"oldest_offset"`
	Keys         uint32 `json:"keys"`
	Bytes        uint64 `json:"bytes"`
}

type subscriberInfo struct {
	User    string   `json:"user"`
	Session string   `json:"session"`
	Gateway string   `json:"gateway"`
	Mounts  []string `json:"mounts"`
}

func (s *Server) rpcQueueInfo(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p queueInfoParams
	if _, err := decodeParams(params, &p, ""); err != nil {
		return nil, err
	}
	if err := checkQueue(rc, p.Queue); err != nil {
		return nil, err
	}
	r, node, err := s.callNode(ctx, p.Queue, &imqpb.NodeRequest{Op: &imqpb.NodeRequest_QueueInfo{QueueInfo: &imqpb.QueueInfo{Queue: p.Queue}}})
	if err != nil {
		return nil, err
	}
	qi := r.GetQueueInfo()
	out := &queueInfoResult{
		Queue: qi.GetQueue(), Epoch: qi.GetEpoch(), Head: qi.GetHead(), Node: qi.GetNode(), CreatedMs: qi.GetCreatedMs(),
		SubscribersTotal: qi.GetSubscribersTotal(),
		Mounts:           make([]*mountInfo, len(qi.GetMounts())), Subscribers: make([]*subscriberInfo, len(qi.GetSubscribers())),
	}
	if out.Queue == "" {
		out.Queue = p.Queue
	}
	if out.Node == "" {
		out.Node = node // the routing table's name for it
	}
	for i, m := range qi.GetMounts() {
		out.Mounts[i] = &mountInfo{
			Name: m.GetName(), Kind: m.GetKind().String(), Retained: m.GetRetained(), OldestOffset: m.GetOldestOffset(),
			Keys: m.GetKeys(), Bytes: m.GetBytes(),
		}
	}
	for i, sub := range qi.GetSubscribers() {
		mounts := sub.GetMounts()
		if mounts == nil {
			mounts = []string{}
		}
		out.Subscribers[i] = &subscriberInfo{User: sub.GetUser(), Session: sub.GetSession(), Gateway: sub.GetGateway(), Mounts: mounts}
	}
	return out, nil
}

type broadcastParams struct {
	Queues     []string        `json:"queues" rpc:"required"`
	Mount      string          `json:"mount" rpc:"required"`
	Data       json.RawMessage `json:"data"`
	DataBase64 string          `json:"data_base64"`
}

type broadcastResult struct {
	Results []*broadcastItem `json:"results"`
}

type broadcastItem struct {
	Queue   string     `json:"queue"`
	Offset  *uint64    `json:"offset,omitempty"`
	Created *bool      `json:"created,omitempty"`
	Error   *errorBody `json:"error,omitempty"`
}

// rpcBroadcast publishes one payload to many queues, broadcastParallel at a
// time. Every queue is checked before anything is sent; past that, each
// queue's outcome is its own (200 even if some fail).
func (s *Server) rpcBroadcast(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p broadcastParams
	present, err := decodeParams(params, &p, "")
	if err != nil {
		return nil, err
	}
	if len(p.Queues) == 0 || len(p.Queues) > maxBroadcastQueues {
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"queues\" must name 1 to %d queues, got %d", maxBroadcastQueues, len(p.Queues))
	}
	seen := make(map[string]bool, len(p.Queues))
	for _, q := range p.Queues {
		if seen[q] {
			return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"queues\" names %s twice", q)
		}
		seen[q] = true
	}
	payload, err := s.publishPayload(rc, present, p.Data, p.DataBase64, p.Mount, p.Queues...)
	if err != nil {
		return nil, err
	}
	out := &broadcastResult{Results: make([]*broadcastItem, len(p.Queues))}
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(broadcastParallel, len(p.Queues)) {
		wg.Go(func() { // ends when next closes
			for i := range next {
				item := &broadcastItem{Queue: p.Queues[i]}
				if r, err := s.publishTo(ctx, p.Queues[i], p.Mount, payload); err != nil {
					item.Error = errorBodyOf(err)
				} else {
					item.Offset, item.Created = &r.Offset, &r.Created
				}
				out.Results[i] = item
			}
		})
	}
	for i := range p.Queues {
		next <- i
	}
	close(next)
	wg.Wait()
	return out, nil
}

type batchParams struct {
	Calls []json.RawMessage `json:"calls" rpc:"required"`
}

type batchCall struct {
	Method string          `json:"method" rpc:"required"`
	Params json.RawMessage `json:"params" rpc:"required"`
}

type batchResult struct {
	Results []*batchItem `json:"results"`
}

type batchItem struct {
	Result any        `json:"result,omitempty"`
	Error  *errorBody `json:"error,omitempty"`
}

// rpcBatch runs calls one after another, in order, each as if called alone
// (the key is checked for each): a later call sees what an earlier one did,
// and one call's failure does not stop the others. The batch's shape is
// checked first: a malformed batch runs nothing.
func (s *Server) rpcBatch(ctx context.Context, rc *rpcCall, params []byte) (any, error) {
	var p batchParams
	if _, err := decodeParams(params, &p, ""); err != nil {
		return nil, err
	}
	if len(p.Calls) == 0 || len(p.Calls) > maxBatchCalls {
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field \"calls\" must hold 1 to %d calls, got %d", maxBatchCalls, len(p.Calls))
	}
	calls := make([]batchCall, len(p.Calls))
	for i, raw := range p.Calls {
		if _, err := decodeParams(raw, &calls[i], "calls["+strconv.Itoa(i)+"]: "); err != nil {
			return nil, err
		}
		if calls[i].Method == "batch" {
			return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "calls[%d]: a batch cannot hold a batch", i)
		}
	}
	out := &batchResult{Results: make([]*batchItem, len(calls))}
	for i, c := range calls {
		var item batchItem
		run := rpcMethods[c.Method]
		switch {
		case ctx.Err() != nil:
			item.Error = errorBodyOf(ctxErr(ctx, s.cfg.RPCTimeout))
		case run == nil:
			item.Error = errorBodyOf(imqerr.New(imqpb.Code_UNKNOWN_MESSAGE, "unknown method %q", c.Method))
		case !rc.key.allowsMethod(c.Method):
			item.Error = errorBodyOf(imqerr.New(imqpb.Code_FORBIDDEN, "this API key may not call %s", c.Method))
		default:
			res, err := run(s, ctx, rc, c.Params)
			if err != nil {
				item.Error = errorBodyOf(err)
			} else {
				item.Result = res
			}
		}
		out.Results[i] = &item
	}
	return out, nil
}
