// Package client is the Go SDK for IMQ: game clients, bots and tests use it
// to connect to a gateway, join queues, publish events, set state and
// receive updates. It reconnects and resumes by itself.
//
//	c, err := client.Dial(ctx, "ws://127.0.0.1:8080/ws", client.WithToken(jwt))
//	if err != nil {
//		return err // an *Error with code UNAUTHORIZED if the token was refused
//	}
//	defer c.Close()
//
//	sub, err := c.Join(ctx, "/room/123", client.Messages("chat").WithRecent(20), client.State("seats"))
//	if err != nil {
//		return err
//	}
//	go func() {
//		for u := range sub.Updates() {
//			switch u.Kind {
//			case client.KindEvent:
//				show(u.Sender, u.Payload)
//			case client.KindStateSet, client.KindStateDeleted:
//				redraw(sub.State("seats"))
//			case client.KindGap:
//				refetch() // events were lost while away: u.Message says why
//			case client.KindClosed:
//				log.Print(u.Message) // the server ended the subscription
//			}
//		}
//	}()
//	_, err = c.Publish(ctx, "/room/123", "chat", []byte(`{"text":"gl hf"}`))
//
// # Delivery
//
// Each subscription delivers, on one channel and in the queue's total order,
// its events, its state changes (the snapshot's keys as KindStateSet, each at
// the offset of its last change), and KindGap when events were lost for good.
// Your own publishes come back too, often before Publish returns: match them
// by Offset. No update is delivered twice:
// after a reconnect, or after the server unsubscribed the client with
// permission to rejoin, the client rejoins from the last offset delivered;
// the server replays what was missed, and the client drops what it had
// already delivered. A state mount is brought level by the differences
// between the client's mirror and the new snapshot. If the queue was
// recreated (a new epoch) or the history window passed, a KindGap comes
// first.
//
// The channel is the only buffer (WithBufferSize). When it is full, the
// connection's reader waits, and so do every subscription and every reply on
// that connection; the server eventually cuts off a client that does not
// read as a slow consumer, and the client reconnects and resumes. Drain
// every subscription, and do not make requests (Publish, Join, ...) from the
// goroutine that drains Updates: under a burst it would wait for itself.
//
// # Requests
//
// Every request is bounded by its context, or by the request timeout when
// the context has no deadline. While reconnecting, requests wait for the
// next connection. A request whose connection breaks before its reply fails
// with ErrConnectionLost: its outcome is unknown, and the client never
// resends it by itself. Refusals are *Error values with a code from the
// protocol's enum (imqpb.Code) and whether to retry.
//
// # Concurrency
//
// A Client and its Subscriptions are safe for concurrent use. A Client runs
// one supervising goroutine from Dial until Close (or until it closes for
// good: refused credentials, or a server goodbye whose reason says not to
// reconnect; see GoodbyeError), and per
// connection one reader, which decodes frames and delivers updates, and one
// writer, which owns every write and sends pings; both end with their
// connection, and the supervisor waits for them before reconnecting. A
// rejoin retried after a refusal runs briefly on a timer's goroutine. Close
// unblocks everything, including a reader waiting for the application, and
// returns after all of them have ended.
//
// The package imports proto/ (the wire types, part of this API) and
// internal/wire (the JSON form); nothing else of IMQ.
package client
