package gateway

import (
	"encoding/base64"
	"net/http"
	"strings"

	"github.com/gorilla/websocket"

	imqpb "github.com/imq-dev/imq/proto"
)

// The WebSocket handshake's refusals (RFC 6455 section 4.2). Every one is
// answered with a 4xx status and the JSON error body of httpError, never
// with an empty 200: a client library then shows why.

// checkHandshake answers a request that cannot be a WebSocket opening
// handshake and reports false; gorilla/websocket's Upgrade checks again, and
// upgradeError answers what it still finds wrong.
func (s *Server) checkHandshake(w http.ResponseWriter, r *http.Request) bool {
	switch {
	case r.Method != http.MethodGet:
		w.Header().Set("Allow", http.MethodGet)
		s.httpError(w, http.StatusMethodNotAllowed, imqpb.Code_BAD_REQUEST, "the WebSocket handshake is a GET request")
	case r.ProtoMajor != 1 || r.ProtoMinor < 1:
		// RFC 6455 4.1: the handshake is HTTP/1.1 or later.
		s.httpError(w, http.StatusHTTPVersionNotSupported, imqpb.Code_BAD_REQUEST, "the WebSocket handshake needs HTTP/1.1")
	case r.ContentLength != 0 || len(r.TransferEncoding) > 0:
		// A body would be read as WebSocket frames after the upgrade. A
		// first frame sent right after the handshake is no HTTP body and
		// passes (gorilla/websocket keeps what was read ahead).
		s.httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, "the WebSocket handshake carries no body (Content-Length or Transfer-Encoding)")
	case !websocket.IsWebSocketUpgrade(r):
		s.httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, "this endpoint speaks WebSocket (subprotocol imq.v1 or imq.v1.json)")
	case !headerHasToken(r.Header, "Sec-Websocket-Version", "13"):
		// RFC 6455 4.2.2: name the versions this server speaks.
		w.Header().Set("Sec-WebSocket-Version", "13")
		s.httpError(w, http.StatusUpgradeRequired, imqpb.Code_BAD_REQUEST, "unsupported WebSocket version: this server speaks version 13 (Sec-WebSocket-Version)")
	case !validChallengeKey(r.Header.Get("Sec-Websocket-Key")):
		s.httpError(w, http.StatusBadRequest, imqpb.Code_BAD_REQUEST, "the Sec-WebSocket-Key header must be 16 bytes in base64")
	default:
		return true
	}
	return false
}

// upgradeError is the upgrader's Error: whatever Upgrade refuses after
// checkHandshake gets the same JSON answer.
func (s *Server) upgradeError(w http.ResponseWriter, _ *http.Request, status int, reason error) {
	code := imqpb.Code_BAD_REQUEST
	switch {
	case status == http.StatusForbidden:
		code = imqpb.Code_FORBIDDEN
	case status >= 500:
		code = imqpb.Code_INTERNAL
	}
	s.httpError(w, status, code, reason.Error())
}

// headerHasToken reports whether a comma-separated header holds token,
// ignoring case.
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h[http.CanonicalHeaderKey(name)] {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// validChallengeKey reports whether key is the base64 of 16 bytes.
func validChallengeKey(key string) bool {
	if len(key) != 24 {
		return false
	}
	b, err := base64.StdEncoding.DecodeString(key)
	return err == nil && len(b) == 16
}
