package wire_test

import (
	"bytes"
	"encoding/json"
	"io"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// jsonSeeds are client frames of the JSON subprotocol: realistic ones first,
// then nasty ones.
var jsonSeeds = []string{
	`{"id":"7","publish":{"queue":"/room/1","mount":"chat","payload":{"a":1}}}`,
	`{"id":"1","connect":{"token":"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.sig","client":"imq-js/0.1"}}`,
	`{"id":"2","join":{"queue":"/room/1","mounts":[{"name":"chat","kind":"MESSAGE","resume":{"epoch":"3","offset":"9"}},{"name":"score","kind":"STATE"}]}}`,
	`{"id":"3","join":{"queue":"/room/1","mounts":[{"name":"chat","kind":1,"recent":10}]}}`,
	`{"id":"4","leave":{"queue":"/room/1"}}`,
	`{"id":"5","setState":{"queue":"/room/1","mount":"score","key":"alice","value":{"hp":10,"pos":[1.5,-2]}}}`,
	`{"id":"6","set_state":{"queue":"/room/1","mount":"score","key":"alice","delete":true}}`,
	`{"id":"7","publish":{"queue":"/room/1","mount":"input","payloadBase64":"AAECAwQ="}}`,
	`{"id":8,"ping":{}}`,
	`{"publish":{"payload":"just a string"}}`,
	`{"publish":{"payload":[1,2,3,{"nested":[true,false,null]}]}}`,
	`{"publish":{"payload":-0.0e-0}}`,
	`{"publish":{"payload":"\u00e9\ud83c\udfb2 \\ \" \/"}}`,
	`{"publish":{"payload":null}}`,
	`{"publish":{"payload":{"a":1},"payloadBase64":"AQID"}}`,
	`{"publish":{"payloadBase64":"/w"}}`,
	`{"publish":{"payloadBase64":"-_8="}}`,
	`{"publish":{"payloadBase64":7}}`,
	`{"publish":{"payloadBase64":"!!"}}`,
	`{"publish":[]}`,
	`{"join":{"mounts":{}}}`,
	`{"join":{"mounts":[null,{"name":null}]}}`,
	`{"join":{"mounts":[{"resume":null}]}}`,
	`{"ping":{},"publish":{}}`,
	`{"id":"1","id":"2","ping":{}}`,
	`{"unknown":1}`,
	`{}`,
	`[]`,
	`null`,
	`"x"`,
	``,
	`{`,
	`{"publish":{"payload":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}}`,
	`{"publish":{"payload":"` + strings.Repeat("x", 5000) + `"}}`,
	`{"publish":{"payload":1e999}}`,
	`{"publish":{"payload":{"a":1,"a":2}}}`,
	`{"id":"18446744073709551615","ping":{}}`,
	`{"id":"18446744073709551616","ping":{}}`,
}

// FuzzUnmarshalJSON: any client text frame either fails to decode or decodes
// to a message that MarshalJSON writes as a valid text frame (valid JSON, valid
// UTF-8) which decodes back to the same message.
func FuzzUnmarshalJSON(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var m imqpb.ClientMessage
		if err := wire.UnmarshalJSON(data, &m); err != nil {
			return
		}
		out, err := wire.MarshalJSON(&m)
		if err != nil {
			t.Fatalf("MarshalJSON of %v (decoded from %q): %v", &m, data, err)
		}
		if !json.Valid(out) || !utf8.Valid(out) {
			t.Fatalf("MarshalJSON of %v (decoded from %q) = %q: not a valid JSON text", &m, data, out)
		}
		var back imqpb.ClientMessage
		if err := wire.UnmarshalJSON(out, &back); err != nil {
			t.Fatalf("UnmarshalJSON(%q) (encoded from %q): %v", out, data, err)
		}
		if !proto.Equal(&m, &back) {
			t.Fatalf("re-decoding changed the message:\n input %q\n first %v\n  text %q\nsecond %v", data, &m, out, &back)
		}
	})
}

// FuzzMarshalJSON: any payload and state value bytes encode to a valid text
// frame and decode back: byte for byte when they travel as base64, to the
// same JSON value when they travel as JSON.
func FuzzMarshalJSON(f *testing.F) {
	for _, s := range []string{`{"a":1}`, `"hi"`, `[1, 2]`, `42`, `true`, "\x00\x01", "hello", ``, ` {"a" : 1} `, `{"a":`, "\xff\xfe"} {
		f.Add([]byte(s), []byte(s))
	}
	f.Fuzz(func(t *testing.T, payload, value []byte) {
		msgs := []proto.Message{
			&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{Queue: "/q", Mount: "m", Offset: 1, Payload: payload}}},
			&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Reply{Reply: &imqpb.Reply{Result: &imqpb.Reply_Joined{Joined: &imqpb.Joined{Mounts: []*imqpb.MountState{
				{History: []*imqpb.Event{{Payload: payload}, {Payload: value}}},
				{State: []*imqpb.StateEntry{{Key: "k", Value: value}}},
			}}}}}},
			&imqpb.ClientMessage{Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Key: "k", Value: value}}},
		}
		for _, m := range msgs {
			out, err := wire.MarshalJSON(m)
			if err != nil {
				t.Fatalf("MarshalJSON(%v): %v", m, err)
			}
			if !json.Valid(out) || !utf8.Valid(out) {
				t.Fatalf("MarshalJSON(%v) = %q: not a valid JSON text", m, out)
			}
			back := m.ProtoReflect().New().Interface()
			if err := wire.UnmarshalJSON(out, back); err != nil {
				t.Fatalf("UnmarshalJSON(%q): %v", out, err)
			}
			if proto.Equal(m, back) {
				continue
			}
			// Only a JSON value may come back in another spelling.
			var bs [][]byte
			collectBytes(back, &bs)
			var ws [][]byte
			collectBytes(m, &ws)
			if len(bs) != len(ws) {
				t.Fatalf("round trip through %q: %v, want %v", out, back, m)
			}
			for i := range ws {
				if !bytes.Equal(ws[i], bs[i]) && !sameJSON(ws[i], bs[i]) {
					t.Fatalf("round trip through %q turned bytes %q into %q", out, ws[i], bs[i])
				}
			}
		}
	})
}

// collectBytes appends the payloads and values of m in a fixed order.
func collectBytes(m proto.Message, out *[][]byte) {
	switch m := m.(type) {
	case *imqpb.ServerMessage:
		if ev := m.GetEvent(); ev != nil {
			*out = append(*out, ev.GetPayload())
		}
		for _, ms := range m.GetReply().GetJoined().GetMounts() {
			for _, ev := range ms.GetHistory() {
				*out = append(*out, ev.GetPayload())
			}
			for _, e := range ms.GetState() {
				*out = append(*out, e.GetValue())
			}
		}
	case *imqpb.ClientMessage:
		*out = append(*out, m.GetSetState().GetValue())
	}
}

// sameJSON reports whether a and b are both JSON texts of the same value.
func sameJSON(a, b []byte) bool {
	decode := func(b []byte) (any, bool) {
		d := json.NewDecoder(bytes.NewReader(b))
		d.UseNumber()
		var v any
		if err := d.Decode(&v); err != nil {
			return nil, false
		}
		if _, err := d.Token(); err != io.EOF {
			return nil, false
		}
		return v, true
	}
	va, okA := decode(a)
	vb, okB := decode(b)
	return okA && okB && reflect.DeepEqual(va, vb)
}

// FuzzBinaryClientMessage: any binary client frame either fails to decode or
// decodes to a message whose names the validators judge without panicking,
// with a documented code, and which re-encodes to the same message in both
// forms.
func FuzzBinaryClientMessage(f *testing.F) {
	for _, m := range []*imqpb.ClientMessage{
		{Id: 1, Msg: &imqpb.ClientMessage_Connect{Connect: &imqpb.Connect{Token: "t", Client: "imq-go/0.1"}}},
		{Id: 2, Msg: &imqpb.ClientMessage_Join{Join: &imqpb.Join{Queue: "/room/1", Mounts: []*imqpb.MountSpec{
			{Name: "chat", Kind: imqpb.MountKind_MESSAGE, Resume: &imqpb.Position{Epoch: 3, Offset: 9}},
			{Name: "score", Kind: imqpb.MountKind_STATE},
			{Name: "bad name", Kind: 7, Recent: 3},
		}}}},
		{Id: 3, Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: "/room/1", Mount: "chat", Payload: []byte(`{"a":1}`)}}},
		{Id: 4, Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{Queue: "//..", Mount: "", Payload: []byte{0xff}}}},
		{Id: 5, Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: "/room/1", Mount: "score", Key: "alice", Value: []byte("10")}}},
		{Id: 6, Msg: &imqpb.ClientMessage_SetState{SetState: &imqpb.SetState{Queue: "/room/1", Mount: "score", Key: "a\x00b", Delete: true}}},
		{Id: 7, Msg: &imqpb.ClientMessage_Leave{Leave: &imqpb.Leave{Queue: "/room/1"}}},
		{Id: 8, Msg: &imqpb.ClientMessage_Ping{Ping: &imqpb.Ping{}}},
		{},
	} {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, b := range [][]byte{
		nil,
		{0x08}, // id, truncated varint
		{0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, // overlong varint
		{0x1a, 0x05, 0x0a, 0x03, '/', 'a'},                                       // join with a length past the end
		{0x1a, 0x04, 0x0a, 0x02, '/', 0xff},                                      // queue name not UTF-8
		{0x2a, 0x02, 0x1a, 0x00, 0x2a, 0x00},                                     // publish twice: merged
		{0x7a, 0x00},                                                             // unknown field 15
		{0x0b},                                                                   // start group
		{0xff, 0xff, 0xff, 0xff, 0x0f},
	} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var m imqpb.ClientMessage
		if err := proto.Unmarshal(data, &m); err != nil {
			return
		}
		var errs []error
		switch msg := m.GetMsg().(type) {
		case *imqpb.ClientMessage_Join:
			errs = append(errs, wire.ValidateQueueName(msg.Join.GetQueue()))
			for _, s := range msg.Join.GetMounts() {
				errs = append(errs, wire.ValidateMountName(s.GetName()), wire.ValidateMountKind(s.GetName(), s.GetKind()))
			}
		case *imqpb.ClientMessage_Leave:
			errs = append(errs, wire.ValidateQueueName(msg.Leave.GetQueue()))
		case *imqpb.ClientMessage_Publish:
			errs = append(errs, wire.ValidateQueueName(msg.Publish.GetQueue()), wire.ValidateMountName(msg.Publish.GetMount()))
		case *imqpb.ClientMessage_SetState:
			errs = append(errs, wire.ValidateQueueName(msg.SetState.GetQueue()), wire.ValidateMountName(msg.SetState.GetMount()), wire.ValidateStateKey(msg.SetState.GetKey()))
		}
		for _, err := range errs {
			switch code := imqerr.CodeOf(err); code {
			case imqpb.Code_OK, imqpb.Code_INVALID_QUEUE_NAME, imqpb.Code_INVALID_MOUNT, imqpb.Code_BAD_REQUEST:
			default:
				t.Fatalf("validator answered %v (%v)", code, err)
			}
		}

		b, err := proto.Marshal(&m)
		if err != nil {
			t.Fatalf("re-encoding %v: %v", &m, err)
		}
		var back imqpb.ClientMessage
		if err := proto.Unmarshal(b, &back); err != nil || !proto.Equal(&m, &back) {
			t.Fatalf("binary round trip: %v, %v; want %v", &back, err, &m)
		}
		// The same message must be expressible in the JSON form.
		out, err := wire.MarshalJSON(&m)
		if err != nil {
			t.Fatalf("MarshalJSON(%v): %v", &m, err)
		}
		if !json.Valid(out) {
			t.Fatalf("MarshalJSON(%v) = %q: not valid JSON", &m, out)
		}
	})
}

// queueNameOK is the documented rule, written out independently of
// ValidateQueueName: "/"-separated segments, each 1 or more of
// [A-Za-z0-9_.:@+=~-] and not "." or "..", at most 255 bytes in all.
func queueNameOK(name string) bool {
	const allowed = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@+=~-"
	if len(name) == 0 || len(name) > 255 || !strings.HasPrefix(name, "/") {
		return false
	}
	for _, seg := range strings.Split(name[1:], "/") {
		if seg == "" || seg == "." || seg == ".." {
			return false
		}
		for i := 0; i < len(seg); i++ {
			if strings.IndexByte(allowed, seg[i]) < 0 {
				return false
			}
		}
	}
	return true
}

func FuzzValidateQueueName(f *testing.F) {
	for _, s := range []string{
		"/room/123", "/a", "/game/eu-1/lobby", "/user/alice@example.com", "/A-Z_a.z:0@9+=~-",
		"", "/", "//", "room", "/a/", "//a", "/a//b", "/.", "/..", "/a/./b", "/a/../b", "/.../a",
		"/a b", "/é", "/\xff", "/a\x00", "\x00", "/a?b", "/a\\b",
		"/" + strings.Repeat("a", 254), "/" + strings.Repeat("a", 255), strings.Repeat("/a", 128),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		err := wire.ValidateQueueName(name)
		if want := queueNameOK(name); (err == nil) != want {
			t.Fatalf("ValidateQueueName(%q) = %v; the documented rules say valid=%v", name, err, want)
		}
		if err != nil && imqerr.CodeOf(err) != imqpb.Code_INVALID_QUEUE_NAME {
			t.Fatalf("ValidateQueueName(%q) code %v, want INVALID_QUEUE_NAME", name, imqerr.CodeOf(err))
		}
	})
}
