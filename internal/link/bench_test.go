package link_test

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

func BenchmarkMarshalLinkDeliver(b *testing.B) {
	frame, _ := proto.Marshal(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{Queue: "/room/12345", Mount: "chat", Offset: 42, Payload: bytes.Repeat([]byte("x"), 100)}}})
	m := &imqpb.LinkDown{Msg: &imqpb.LinkDown_Deliver{Deliver: &imqpb.Deliver{Queue: "/room/12345", Mount: "chat", Frame: frame}}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := link.MarshalFrame(m); err != nil {
			b.Fatal(err)
		}
	}
}
