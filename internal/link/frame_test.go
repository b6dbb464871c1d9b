package link_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"google.golang.org/protobuf/proto"

	"github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

// linkFrames returns a few link messages, the empty one included.
func linkFrames() []proto.Message {
	event, _ := proto.Marshal(&imqpb.ServerMessage{Msg: &imqpb.ServerMessage_Event{Event: &imqpb.Event{Queue: "/room/1", Mount: "chat", Offset: 1, Payload: []byte(`{"a":1}`)}}})
	return []proto.Message{
		&imqpb.LinkUp{Msg: &imqpb.LinkUp_Hello{Hello: &imqpb.Hello{Id: "gw-1", Protocol: 1}}},
		&imqpb.LinkDown{Msg: &imqpb.LinkDown_HelloAck{HelloAck: &imqpb.HelloAck{NodeId: "node-1", Protocol: 1}}},
		&imqpb.LinkUp{},
		&imqpb.LinkUp{Msg: &imqpb.LinkUp_Request{Request: &imqpb.NodeRequest{Id: 5, User: "alice", Session: "s1", Op: &imqpb.NodeRequest_Publish{Publish: &imqpb.Publish{
			Queue: "/room/1", Mount: "chat", Payload: bytes.Repeat([]byte{0xab}, 100_000),
		}}}}},
		&imqpb.LinkDown{Msg: &imqpb.LinkDown_Deliver{Deliver: &imqpb.Deliver{Queue: "/room/1", Mount: "chat", Frame: event}}},
		&imqpb.LinkDown{Msg: &imqpb.LinkDown_Reply{Reply: &imqpb.NodeReply{Id: 5, Code: imqpb.Code_MOVED, Message: "moved"}}},
	}
}

func TestFrameRoundTrip(t *testing.T) {
	msgs := linkFrames()
	var stream bytes.Buffer
	for _, m := range msgs {
		b, err := link.MarshalFrame(m)
		if err != nil {
			t.Fatal(err)
		}
		stream.Write(b)
	}
	// A raw frame and an empty one through AppendFrame.
	raw := []byte("not a protobuf, just bytes")
	stream.Write(link.AppendFrame(nil, raw))
	stream.Write(link.AppendFrame(nil, nil))

	readers := map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one byte": iotest.OneByteReader,
		"half":     iotest.HalfReader,
		"data+EOF": iotest.DataErrReader,
	}
	for name, wrap := range readers {
		t.Run(name, func(t *testing.T) {
			fr := link.NewFrameReader(wrap(bytes.NewReader(stream.Bytes())), link.MaxFrame)
			for i, want := range msgs {
				frame, err := fr.Next()
				if err != nil {
					t.Fatalf("frame %d: %v", i, err)
				}
				got := want.ProtoReflect().New().Interface()
				if err := proto.Unmarshal(frame, got); err != nil {
					t.Fatalf("frame %d: %v", i, err)
				}
				if !proto.Equal(got, want) {
					t.Fatalf("frame %d = %v, want %v", i, got, want)
				}
			}
			if frame, err := fr.Next(); err != nil || !bytes.Equal(frame, raw) {
				t.Fatalf("raw frame = %q, %v; want %q", frame, err, raw)
			}
			if frame, err := fr.Next(); err != nil || len(frame) != 0 {
				t.Fatalf("empty frame = %q, %v", frame, err)
			}
			if frame, err := fr.Next(); err != io.EOF {
				t.Fatalf("after the last frame: %q, %v; want io.EOF", frame, err)
			}
		})
	}
}

func TestAppendFrameLayout(t *testing.T) {
	got := link.AppendFrame([]byte("pre"), []byte("abc"))
	if want := []byte("pre\x00\x00\x00\x03abc"); !bytes.Equal(got, want) {
		t.Fatalf("AppendFrame = %q, want %q", got, want)
	}
	big := bytes.Repeat([]byte("x"), 0x010203)
	got = link.AppendFrame(nil, big)
	if !bytes.Equal(got[:4], []byte{0, 1, 2, 3}) || !bytes.Equal(got[4:], big) {
		t.Fatalf("AppendFrame header = % x", got[:4])
	}
}

func TestMarshalFrameMatchesAppendFrame(t *testing.T) {
	for _, m := range linkFrames() {
		body, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		frame, err := link.MarshalFrame(m)
		if err != nil {
			t.Fatal(err)
		}
		if want := link.AppendFrame(nil, body); !bytes.Equal(frame, want) {
			t.Fatalf("MarshalFrame(%T) = % x..., want % x...", m, frame[:min(len(frame), 16)], want[:min(len(want), 16)])
		}
	}
}

func header(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }

func TestFrameReaderLimit(t *testing.T) {
	const limit = 8
	var stream []byte
	stream = link.AppendFrame(stream, []byte("12345678")) // exactly the limit
	stream = link.AppendFrame(stream, []byte("123456789"))
	fr := link.NewFrameReader(bytes.NewReader(stream), limit)
	if frame, err := fr.Next(); err != nil || string(frame) != "12345678" {
		t.Fatalf("frame at the limit = %q, %v", frame, err)
	}
	frame, err := fr.Next()
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("frame over the limit = %q, %v; want a size error", frame, err)
	}

	// The size is judged from the header alone: the reader does not wait for
	// a body it will refuse.
	for _, n := range []uint32{link.MaxFrame + 1, 1<<32 - 1} {
		fr := link.NewFrameReader(bytes.NewReader(header(n)), link.MaxFrame)
		frame, err := fr.Next()
		if err == nil || errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("header %d without body = %q, %v; want a size error", n, frame, err)
		}
	}
}

func TestFrameReaderTruncated(t *testing.T) {
	full := link.AppendFrame(nil, []byte("hello"))
	for _, c := range []struct {
		name   string
		stream []byte
		frames int // whole frames before the error
		want   error
	}{
		{"empty stream", nil, 0, io.EOF},
		{"clean end", full, 1, io.EOF},
		{"partial header", []byte{0, 0}, 0, io.ErrUnexpectedEOF},
		{"header without body", header(10), 0, io.ErrUnexpectedEOF},
		{"partial body", append(header(10), "abc"...), 0, io.ErrUnexpectedEOF},
		{"one byte short", full[:len(full)-1], 0, io.ErrUnexpectedEOF},
		{"frame then partial header", append(append([]byte{}, full...), 0, 0, 0), 1, io.ErrUnexpectedEOF},
		{"frame then partial body", append(append([]byte{}, full...), full[:6]...), 1, io.ErrUnexpectedEOF},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, wrap := range []func(io.Reader) io.Reader{func(r io.Reader) io.Reader { return r }, iotest.OneByteReader, iotest.DataErrReader} {
				fr := link.NewFrameReader(wrap(bytes.NewReader(c.stream)), 64)
				for i := range c.frames {
					if frame, err := fr.Next(); err != nil || string(frame) != "hello" {
						t.Fatalf("frame %d = %q, %v", i, frame, err)
					}
				}
				if frame, err := fr.Next(); err != c.want {
					t.Fatalf("Next = %q, %v; want %v", frame, err, c.want)
				}
			}
		})
	}
}

func TestFrameReaderReadError(t *testing.T) {
	errBoom := errors.New("connection reset")
	for _, prefix := range [][]byte{nil, {0, 0}, header(10), append(header(10), "abc"...)} {
		fr := link.NewFrameReader(io.MultiReader(bytes.NewReader(prefix), iotest.ErrReader(errBoom)), 64)
		if frame, err := fr.Next(); !errors.Is(err, errBoom) {
			t.Errorf("after %q: Next = %q, %v; want %v", prefix, frame, err, errBoom)
		}
	}
}
