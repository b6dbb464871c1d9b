package wire_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

func publishMsg(payload []byte) *imqpb.ClientMessage {
	return &imqpb.ClientMessage{Id: 7, Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{
		Queue: "/room/1", Mount: "chat", Payload: payload,
	}}}
}

func eventMsg(payload []byte) *imqpb.ServerMessage {
	return &imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{
		Queue: "/room/1", Mount: "chat", Offset: 42, Sender: "alice", TimeMs: 1700000000123, Payload: payload,
	}}}
}

func stateChangeMsg(value []byte) *imqpb.ServerMessage {
	return &imqpb.ServerMessage{Msg: &imqpb.ServerMessage_State{State: &imqpb.StateChange{
		Queue: "/room/1", Mount: "score", Key: "alice", Value: value, Version: 43, Sender: "bob", TimeMs: 1700000000124,
	}}}
}

// marshalJSON encodes m and checks that the result is a valid JSON text
// (UTF-8, as a WebSocket text frame must be).
func marshalJSON(t *testing.T, m proto.Message) string {
	t.Helper()
	b, err := wire.MarshalJSON(m)
	if err != nil {
		t.Fatalf("MarshalJSON(%v): %v", m, err)
	}
	if !json.Valid(b) {
		t.Fatalf("MarshalJSON(%v) = %s: not valid JSON", m, b)
	}
	if !utf8.Valid(b) {
		t.Fatalf("MarshalJSON(%v) = %q: not valid UTF-8, so not a valid text frame", m, b)
	}
	return string(b)
}

// roundTrip decodes text into a new message of m's type and checks that it
// equals m.
func roundTrip(t *testing.T, m proto.Message, text string) {
	t.Helper()
	back := m.ProtoReflect().New().Interface()
	if err := wire.UnmarshalJSON([]byte(text), back); err != nil {
		t.Fatalf("UnmarshalJSON(%s): %v", text, err)
	}
	if !proto.Equal(m, back) {
		t.Fatalf("round trip through %s:\n got %v\nwant %v", text, back, m)
	}
}

func TestMarshalJSONPayloadTravelsAsJSON(t *testing.T) {
	for _, payload := range []string{
		`{"text":"hi"}`,
		`{}`,
		`[1,"two",{"three":3},null]`,
		`[]`,
		`"hi"`,
		`""`,
		`"h\u00e9llo \"quoted\" \\ /"`,
		`"héllo ✓ 🎲"`,
		`42`,
		`-1.5e+300`,
		`0`,
		`true`,
		`false`,
		`{"a":{"b":[1,2,{"c":null}],"d":"e"}}`,
	} {
		t.Run(payload, func(t *testing.T) {
			for _, m := range []proto.Message{publishMsg([]byte(payload)), eventMsg([]byte(payload))} {
				text := marshalJSON(t, m)
				if want := `"payload":` + payload; !strings.Contains(text, want) {
					t.Errorf("MarshalJSON = %s; want it to contain %s", text, want)
				}
				if strings.Contains(text, "Base64") {
					t.Errorf("MarshalJSON = %s; a JSON payload must not travel as base64", text)
				}
				roundTrip(t, m, text)
			}
			m := &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{
				Queue: "/room/1", Mount: "score", Key: "k", Value: []byte(payload),
			}}}
			text := marshalJSON(t, m)
			if want := `"value":` + payload; !strings.Contains(text, want) {
				t.Errorf("MarshalJSON = %s; want it to contain %s", text, want)
			}
			roundTrip(t, m, text)
			sc := stateChangeMsg([]byte(payload))
			text = marshalJSON(t, sc)
			if want := `"value":` + payload; !strings.Contains(text, want) {
				t.Errorf("MarshalJSON = %s; want it to contain %s", text, want)
			}
			roundTrip(t, sc, text)
		})
	}
}

func TestMarshalJSONBinaryPayloadTravelsAsBase64(t *testing.T) {
	for _, payload := range [][]byte{
		{0xff, 0x00, 0x01},
		{0x00},
		[]byte("hello"),    // a bare word is not JSON
		[]byte(`{"a":`),    // truncated JSON
		[]byte(`{"a":1}x`), // trailing garbage
		[]byte("1 2"),      // two values
		[]byte(" "),        // whitespace only
		[]byte("'single'"), // not JSON quoting
		[]byte("{a:1}"),    // unquoted key
		[]byte("NaN"),      // not a JSON number
		bytes.Repeat([]byte{0xab}, 1000),
	} {
		t.Run(fmt.Sprintf("%q", payload), func(t *testing.T) {
			for _, m := range []proto.Message{publishMsg(payload), eventMsg(payload)} {
				text := marshalJSON(t, m)
				if want := `"payloadBase64":"` + base64.StdEncoding.EncodeToString(payload) + `"`; !strings.Contains(text, want) {
					t.Errorf("MarshalJSON = %s; want it to contain %s", text, want)
				}
				if strings.Contains(text, `"payload":`) {
					t.Errorf("MarshalJSON = %s; non-JSON bytes must not travel under \"payload\"", text)
				}
				roundTrip(t, m, text)
			}
			sc := stateChangeMsg(payload)
			text := marshalJSON(t, sc)
			if want := `"valueBase64":"` + base64.StdEncoding.EncodeToString(payload) + `"`; !strings.Contains(text, want) {
				t.Errorf("MarshalJSON = %s; want it to contain %s", text, want)
			}
			roundTrip(t, sc, text)
		})
	}
}

func TestMarshalJSONEmptyPayload(t *testing.T) {
	for _, m := range []proto.Message{publishMsg(nil), eventMsg(nil), stateChangeMsg(nil)} {
		text := marshalJSON(t, m)
		if strings.Contains(text, "payload") || strings.Contains(text, "value") {
			t.Errorf("MarshalJSON = %s; an empty bytes field is omitted", text)
		}
		roundTrip(t, m, text)
	}
}

func TestMarshalJSONNestedRepeated(t *testing.T) {
	m := &imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Reply{Reply: &imqpb.Reply{
		Id: 9, Code: imqpb.Code_OK,
		Result: &imqpb.Reply_Joined{Joined: &imqpb.Joined{
			Queue: "/room/1", Epoch: 3, Head: 12,
			Mounts: []*imqpb.MountState{
				{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Missed: true, History: []*imqpb.Event{
					{Queue: "/room/1", Mount: "chat", Offset: 10, Payload: []byte(`{"x":1}`)},
					{Queue: "/room/1", Mount: "chat", Offset: 11, Payload: []byte{0xff, 0xfe}},
					{Queue: "/room/1", Mount: "chat", Offset: 12},
				}},
				{Name: "score", Kind: imqpb.MountKind_STATE, State: []*imqpb.StateEntry{
					{Key: "a", Value: []byte(`[1,2]`), Version: 4},
					{Key: "b", Value: []byte{0x00, 0x01}, Version: 5},
					{Key: "c", Value: []byte(`"str"`), Version: 6},
				}},
			},
		}},
	}}}
	text := marshalJSON(t, m)
	for _, want := range []string{
		`"payload":{"x":1}`,
		`"payloadBase64":"//4="`,
		`"value":[1,2]`,
		`"valueBase64":"AAE="`,
		`"value":"str"`,
		`"kind":"STATE"`,
		`"missed":true`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("MarshalJSON = %s; want it to contain %s", text, want)
		}
	}
	roundTrip(t, m, text)

	// The same through a link reply is not JSON, but a Join request is, with
	// its own nesting.
	join := &imqpb.ClientMessage{Id: 1, Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: "/room/1", Mounts: []*imqpb.MountSpec{
		{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Resume: &imqpb.Position{Epoch: 3, Offset: 9}},
		{Name: "score", Kind: imqpb.MountKind_STATE},
		{Name: "input", Kind: imqpb.MountKind_MESSAGE, Recent: 5},
	}}}}
	roundTrip(t, join, marshalJSON(t, join))
}

func TestMarshalJSONOtherMessages(t *testing.T) {
	for _, m := range []proto.Message{
		&imqpb.ClientMessage{Id: 1, Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}},
		&imqpb.ClientMessage{Id: 2, Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: "a.b.c", Client: "imq-go/0.1"}}},
		&imqpb.ClientMessage{Id: 3, Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: "/room/1"}}},
		&imqpb.ClientMessage{Id: 4, Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: "/q", Mount: "s", Key: "k", Delete: true}}},
		&imqpb.ClientMessage{},
		&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Pong{Pong: &imqpb.Pong{Id: 1, TimeMs: 5}}},
		&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Goodbye{Goodbye: &imqpb.Goodbye{Reason: imqpb.Reason_REASON_SHUTDOWN, Message: "bye <&>", Reconnect: true}}},
		&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Unsubscribed{Unsubscribed: &imqpb.Unsubscribed{Queue: "/q", Reason: imqpb.Reason_REASON_MOVED, Rejoin: true}}},
		&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Reply{Reply: &imqpb.Reply{Id: 5, Code: imqpb.Code_LIMIT_EXCEEDED, Message: "too many", Retryable: true}}},
		&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Reply{Reply: &imqpb.Reply{Id: 6, Result: &imqpb.Reply_Published{Published: &imqpb.Published{Offset: 1 << 60}}}}},
		&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Reply{Reply: &imqpb.Reply{Id: 7, Result: &imqpb.Reply_Connected{Connected: &imqpb.Connected{User: "u", Session: "s", PingIntervalMs: 25000, TimeoutMs: 60000}}}}},
	} {
		roundTrip(t, m, marshalJSON(t, m))
	}
}

func TestUnmarshalJSONExample(t *testing.T) {
	var m imqpb.ClientMessage
	if err := wire.UnmarshalJSON([]byte(`{"id":"7","publish":{"queue":"/room/1","mount":"chat","payload":{"a":1}}}`), &m); err != nil {
		t.Fatal(err)
	}
	p := m.GetPublish()
	if m.GetId() != 7 || p.GetQueue() != "/room/1" || p.GetMount() != "chat" || string(p.GetPayload()) != `{"a":1}` {
		t.Fatalf("decoded %v; want id 7, /room/1, chat, payload {\"a\":1}", &m)
	}
}

func TestUnmarshalJSONForms(t *testing.T) {
	pub := func(payload string) *imqpb.ClientMessage {
		return &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: "/q", Mount: "m", Payload: []byte(payload)}}}
	}
	for _, c := range []struct {
		name string
		in   string
		want *imqpb.ClientMessage
	}{
		{"number id", `{"id":7,"ping":{}}`, &imqpb.ClientMessage{Id: 7, Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}}},
		{"whitespace around the message", " \n{ \"id\" : \"8\" , \"ping\" : { } }\t", &imqpb.ClientMessage{Id: 8, Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}}},
		{"payload object is compacted", `{"publish":{"queue":"/q","mount":"m","payload":{ "a" : 1 , "b" : [ 1, 2 ] }}}`, pub(`{"a":1,"b":[1,2]}`)},
		{"payload string keeps its quotes", `{"publish":{"queue":"/q","mount":"m","payload":"hi"}}`, pub(`"hi"`)},
		{"payload number", `{"publish":{"queue":"/q","mount":"m","payload":12.50}}`, pub(`12.50`)},
		{"payload false", `{"publish":{"queue":"/q","mount":"m","payload":false}}`, pub(`false`)},
		{"payload base64", `{"publish":{"queue":"/q","mount":"m","payloadBase64":"AAEC"}}`, pub("\x00\x01\x02")},
		{"payload base64 unpadded", `{"publish":{"queue":"/q","mount":"m","payloadBase64":"/w"}}`, pub("\xff")},
		{"payload base64 of JSON text", `{"publish":{"queue":"/q","mount":"m","payloadBase64":"eyJhIjoxfQ=="}}`, pub(`{"a":1}`)},
		{"payload null is no payload", `{"publish":{"queue":"/q","mount":"m","payload":null}}`, pub("")},
		{"proto field names", `{"set_state":{"queue":"/q","mount":"s","key":"k","valueBase64":"/w=="}}`,
			&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: "/q", Mount: "s", Key: "k", Value: []byte{0xff}}}}},
		{"state value JSON and delete", `{"setState":{"queue":"/q","mount":"s","key":"k","value":{"hp":10},"delete":true}}`,
			&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: "/q", Mount: "s", Key: "k", Value: []byte(`{"hp":10}`), Delete: true}}}},
		{"join", `{"id":"3","join":{"queue":"/q","mounts":[{"name":"chat","kind":"MESSAGE","resume":{"epoch":"3","offset":"9"}},{"name":"score","kind":2},{"name":"in","kind":"MESSAGE","recent":4}]}}`,
			&imqpb.ClientMessage{Id: 3, Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: "/q", Mounts: []*imqpb.MountSpec{
				{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Resume: &imqpb.Position{Epoch: 3, Offset: 9}},
				{Name: "score", Kind: imqpb.MountKind_STATE},
				{Name: "in", Kind: imqpb.MountKind_MESSAGE, Recent: 4},
			}}}}},
		{"join with null mounts", `{"join":{"queue":"/q","mounts":null}}`, &imqpb.ClientMessage{Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: "/q"}}}},
		{"connect", `{"id":"1","connect":{"token":"t","client":"c"}}`, &imqpb.ClientMessage{Id: 1, Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: "t", Client: "c"}}}},
		{"empty object", `{}`, &imqpb.ClientMessage{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var m imqpb.ClientMessage
			if err := wire.UnmarshalJSON([]byte(c.in), &m); err != nil {
				t.Fatalf("UnmarshalJSON(%s): %v", c.in, err)
			}
			if !proto.Equal(&m, c.want) {
				t.Fatalf("UnmarshalJSON(%s) = %v, want %v", c.in, &m, c.want)
			}
		})
	}
}

func TestUnmarshalJSONMalformed(t *testing.T) {
	for _, in := range []string{
		``,
		` `,
		`not json`,
		`{`,
		`{"id":"1"`,
		`{"id":"1"}}`,
		`[]`,
		`[{"id":"1","ping":{}}]`,
		`"publish"`,
		`42`,
		`true`,
		`null`,
		`{"id":{}}`,
		`{"id":"x"}`,
		`{"id":-1}`,
		`{"publish":[]}`,
		`{"publish":"x"}`,
		`{"publish":5}`,
		`{"publish":{"queue":5}}`,
		`{"publish":{"payloadBase64":5}}`,
		`{"publish":{"payloadBase64":true}}`,
		`{"publish":{"payloadBase64":{"a":1}}}`,
		`{"publish":{"payloadBase64":["AAEC"]}}`,
		`{"publish":{"payloadBase64":"!!!"}}`,
		`{"publish":{"payloadBase64":"A"}}`,
		`{"publish":{"payloadBase64":"AAEC\u0000"}}`,
		`{"ping":{},"publish":{}}`,
		`{"join":{"mounts":{}}}`,
		`{"join":{"mounts":[5]}}`,
		`{"join":{"mounts":["chat"]}}`,
		`{"join":{"mounts":[{"resume":[]}]}}`,
		`{"setState":{"valueBase64":1}}`,
		`{"setState":{"value":}}`,
		"{\"publish\":{\"queue\":\"/\xff\"}}",
	} {
		t.Run(in, func(t *testing.T) {
			var m imqpb.ClientMessage
			if err := wire.UnmarshalJSON([]byte(in), &m); err == nil {
				t.Fatalf("UnmarshalJSON(%s) = %v, want an error", in, &m)
			}
		})
	}
	var s imqpb.ServerMessage
	for _, in := range []string{
		`{"reply":{"joined":{"mounts":{}}}}`,
		`{"reply":{"joined":{"mounts":[{"history":{}}]}}}`,
		`{"reply":{"joined":{"mounts":[{"history":[{"payloadBase64":7}]}]}}}`,
		`{"reply":{"joined":{"mounts":[{"state":[{"valueBase64":"%%"}]}]}}}`,
		`{"event":[]}`,
	} {
		if err := wire.UnmarshalJSON([]byte(in), &s); err == nil {
			t.Errorf("UnmarshalJSON(%s) into ServerMessage = %v, want an error", in, &s)
		}
	}
}

// TestUnmarshalJSONPayloadTwice: a bytes field given both as JSON and as
// base64 is one field given twice, which protojson rejects for any other
// field. Accepting it makes the result depend on map iteration order.
func TestUnmarshalJSONPayloadTwice(t *testing.T) {
	for _, in := range []string{
		`{"publish":{"payload":{"a":1},"payloadBase64":"AQID"}}`,
		`{"setState":{"key":"k","value":[1],"valueBase64":"AQID"}}`,
	} {
		results := map[string]int{}
		for range 200 {
			var m imqpb.ClientMessage
			if err := wire.UnmarshalJSON([]byte(in), &m); err == nil {
				results[fmt.Sprintf("%q", append(m.GetPublish().GetPayload(), m.GetSetState().GetValue()...))]++
			}
		}
		if len(results) > 0 {
			t.Errorf("UnmarshalJSON(%s) succeeded; want an error. Decoded bytes (count of 200 runs): %v", in, results)
		}
	}
}

// TestJSONRoundTripExact: a message survives MarshalJSON then UnmarshalJSON
// unchanged, byte for byte, for every payload in compact form: JSON that needs
// escaping in HTML, JSON null, and JSON-looking bytes that are not UTF-8.
func TestJSONRoundTripExact(t *testing.T) {
	for _, payload := range []string{
		`"<b>bold</b> & co"`,
		`{"html":"<script>alert(1)</script>"}`,
		"\"line\u2028separator\u2029\"",
		`null`,
		"\"\xff\"",
		"[\"\xc3\"]",
		"{\"\xed\xa0\x80\":1}", // a UTF-16 surrogate encoded in UTF-8
	} {
		t.Run(fmt.Sprintf("%q", payload), func(t *testing.T) {
			for _, m := range []proto.Message{publishMsg([]byte(payload)), eventMsg([]byte(payload)), stateChangeMsg([]byte(payload))} {
				roundTrip(t, m, marshalJSON(t, m))
			}
		})
	}
}

// TestJSONReencodeIsStable: decoding what MarshalJSON wrote gives back the
// same message for any JSON value a client sends (the property
// FuzzUnmarshalJSON checks).
func TestJSONReencodeIsStable(t *testing.T) {
	for _, payload := range []string{
		`{"a":1}`,
		`[ 1 , 2 ]`,
		`"<tag>"`,
		`"\u003ctag\u003e"`,
		`"a&b"`,
	} {
		t.Run(payload, func(t *testing.T) {
			in := `{"publish":{"queue":"/q","mount":"m","payload":` + payload + `}}`
			var m imqpb.ClientMessage
			if err := wire.UnmarshalJSON([]byte(in), &m); err != nil {
				t.Fatal(err)
			}
			var sent, got any
			if err := json.Unmarshal([]byte(payload), &sent); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(m.GetPublish().GetPayload(), &got); err != nil || !reflect.DeepEqual(sent, got) {
				t.Fatalf("payload %s decoded to %s (%v)", payload, m.GetPublish().GetPayload(), err)
			}
			roundTrip(t, &m, marshalJSON(t, &m))
		})
	}
}

// Unknown fields and enum names are ignored, as in the binary form, so that
// either side may add to the protocol; the server then judges what is left
// (an empty message is UNKNOWN_MESSAGE, an unspecified kind INVALID_MOUNT).
func TestUnmarshalJSONIgnoresUnknown(t *testing.T) {
	for in, want := range map[string]*imqpb.ClientMessage{
		`{"bogus":1}`: {},
		`{"id":"3","publish":{"queue":"/q","payload_base64":"AAEC"}}`: {Id: 3, Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: "/q"}}},
		`{"join":{"mounts":[{"name":"a","kind":"NOPE"}]}}`:            {Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Mounts: []*imqpb.MountSpec{{Name: "a"}}}}},
	} {
		var m imqpb.ClientMessage
		if err := wire.UnmarshalJSON([]byte(in), &m); err != nil {
			t.Fatalf("UnmarshalJSON(%s): %v", in, err)
		}
		if !proto.Equal(&m, want) {
			t.Errorf("UnmarshalJSON(%s) = %v, want %v", in, &m, want)
		}
	}
}
