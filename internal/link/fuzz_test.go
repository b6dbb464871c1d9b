package link_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/imq-dev/imq/internal/link"
	imqpb "github.com/imq-dev/imq/proto"
)

// FuzzFrameReader: any byte stream yields exactly the frames an independent
// parse of the stream finds, none over the limit, then io.EOF at a clean end,
// io.ErrUnexpectedEOF in a truncated frame, or a size error.
func FuzzFrameReader(f *testing.F) {
	var two []byte
	two = link.AppendFrame(two, []byte("hello"))
	two = link.AppendFrame(two, nil)
	hello, _ := link.MarshalFrame(&imqpb.LinkUp{Msg: &imqpb.LinkUp_Hello{Hello: &imqpb.Hello{Id: "gw-1", Protocol: 1}}})
	for _, s := range []struct {
		stream  []byte
		limit   uint32
		oneByte bool
	}{
		{two, 64, false},
		{two, 5, true},
		{two, 4, false},
		{hello, 1 << 16, false},
		{append(hello, hello[:3]...), 1 << 16, true},
		{nil, 0, false},
		{[]byte{0, 0, 0, 0}, 0, false},
		{[]byte{0, 0}, 10, false},
		{[]byte{0, 0, 0, 10, 'a'}, 10, true},
		{[]byte{0xff, 0xff, 0xff, 0xff}, 1 << 20, false},
		{[]byte{0x7f, 0xff, 0xff, 0xff, 0}, 1 << 31, false},
	} {
		f.Add(s.stream, s.limit, s.oneByte)
	}
	f.Fuzz(func(t *testing.T, stream []byte, limit uint32, oneByte bool) {
		limit %= 1 << 20 // keep a hostile header's allocation small
		var r io.Reader = bytes.NewReader(stream)
		if oneByte {
			r = iotest.OneByteReader(r)
		}
		fr := link.NewFrameReader(r, int(limit))
		pos := 0
		for {
			frame, err := fr.Next()
			rest := stream[pos:]
			if err != nil {
				var want error
				switch {
				case len(rest) == 0:
					want = io.EOF
				case len(rest) < 4:
					want = io.ErrUnexpectedEOF
				case binary.BigEndian.Uint32(rest) > limit:
					want = nil // a size error
				default:
					want = io.ErrUnexpectedEOF
				}
				if want == nil {
					if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
						t.Fatalf("at %d: oversized frame answered %v, want a size error", pos, err)
					}
				} else if err != want {
					t.Fatalf("at %d of %d: Next error %v, want %v", pos, len(stream), err, want)
				}
				return
			}
			if len(frame) > int(limit) {
				t.Fatalf("frame of %d bytes over the limit %d", len(frame), limit)
			}
			if len(rest) < 4 {
				t.Fatalf("at %d: frame %q from a stream with %d bytes left", pos, frame, len(rest))
			}
			n := int(binary.BigEndian.Uint32(rest))
			if n > len(rest)-4 || !bytes.Equal(frame, rest[4:4+n]) {
				t.Fatalf("at %d: frame %q does not match the stream", pos, frame)
			}
			pos += 4 + n
		}
	})
}
