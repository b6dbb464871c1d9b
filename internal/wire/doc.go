// Package wire encodes IMQ messages: the JSON form of the client protocol
// (subprotocol imq.v1.json), the length-prefixed framing of the gateway to
// queue node link, and the validation rules for names, keys and sizes that
// every entry point applies before anything reaches a queue.
//
// It imports proto/ and internal/imqerr only. Every function is safe for
// concurrent use; Reader and Writer are not (one goroutine each).
package wire
