// Package wire encodes IMQ messages: the JSON form of the client protocol
// (subprotocol imq.v1.json), and the validation rules for names, keys and
// sizes that every entry point applies before anything reaches a queue. The
// link's framing is internal/link's.
//
// It imports proto/ and internal/imqerr only. Every function is safe for
// concurrent use.
package wire
