// Package link is the transport of the link protocol (proto/link.proto),
// the TCP connections between IMQ processes: a gateway's to each queue node,
// and a queue node's to another for a bucket hand-off. It owns what every
// link needs and nothing about what travels on it: the length-prefixed
// framing with its bounds, the handshake (version negotiation and mutual
// authentication with the cluster key), the liveness read deadline, and a
// write loop with a bounded send buffer and a named overflow policy.
// Requests, replies and deliveries are the gateway's and the queue node's.
//
// A connection has two ends: the dialer (Dial, Client) and the acceptor
// (Server, on a connection the caller's listener accepted). The acceptor
// speaks first, a Challenge with a fresh nonce; the dialer answers a Hello
// with its role, id, protocol range, nonce and, with cluster keys, a MAC
// over the exchange; the acceptor verifies it before it reads anything else
// and answers a HelloAck with its own MAC, which the dialer verifies before
// it sends anything else. Until then frames are bounded to
// MaxHandshakeFrame, read without a read buffer, and the whole exchange to
// Config.HandshakeTimeout; an acceptor bounds the handshakes it runs at
// once with a Gate.
//
// Only the handshake is authenticated: the frames after it carry no MAC
// and no encryption, so whoever can write into an established TCP
// connection (on the path between the ends) can inject frames. The
// cluster network must be private, or the links carried over one that
// protects them (WireGuard, IPsec).
//
// It imports proto/ only. A Conn's Next is for one reader goroutine and
// WriteLoop runs on one writer goroutine; Send, TrySend, SendAlways and
// Close are safe for concurrent use.
package link
