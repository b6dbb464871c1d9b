package wire_test

import (
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

func benchEvent() *imqpb.ServerMessage {
	return &imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{
		Queue: "/room/12345", Mount: "chat", Offset: 123456, Sender: "player-42", TimeMs: 1795000000000,
		Payload: []byte(`{"text":"gg wp, rematch?","color":"#ffcc00","n":7}`), // 50 bytes
	}}}
}

func benchPublish() *imqpb.ClientMessage {
	return &imqpb.ClientMessage{Id: 99, Msg: &imqpb.ClientMessage_Publish{Publish: &imqpb.Publish{
		Queue: "/room/12345", Mount: "chat", Payload: []byte(`{"text":"gg wp, rematch?","color":"#ffcc00","n":7}`),
	}}}
}

func BenchmarkEncodeEventBinary(b *testing.B) {
	m := benchEvent()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := proto.Marshal(m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodePublishBinary(b *testing.B) {
	data, _ := proto.Marshal(benchPublish())
	b.ReportAllocs()
	for b.Loop() {
		var m imqpb.ClientMessage
		if err := proto.Unmarshal(data, &m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodeEventJSON(b *testing.B) {
	m := benchEvent()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := wire.MarshalJSON(m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodePublishJSON(b *testing.B) {
	data, _ := wire.MarshalJSON(benchPublish())
	b.ReportAllocs()
	for b.Loop() {
		var m imqpb.ClientMessage
		if err := wire.UnmarshalJSON(data, &m); err != nil {
			b.Fatal(err)
		}
	}
}
