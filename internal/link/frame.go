package link

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/proto"
)

// Link liveness defaults: the dialer pings every DefaultPingInterval; either
// end closes a link on which nothing arrived for DefaultTimeout.
const (
	DefaultPingInterval = 5 * time.Second
	DefaultTimeout      = 3 * DefaultPingInterval
)

// MaxFrame bounds one link frame once the handshake is done. A Joined reply
// with a full replay and a state snapshot is the largest frame; the queue
// node keeps those well below this.
const MaxFrame = 16 << 20

// MaxHandshakeFrame bounds every frame before the handshake is done: a
// hello is a few hundred bytes, and a peer that has proved nothing must not
// make this end hold more.
const MaxHandshakeFrame = 4 << 10

const (
	// readBuffer is the socket read buffer of a FrameReader, once the
	// peer is authenticated (a handshake's reader has none).
	readBuffer = 32 << 10
	// growStep is the most a FrameReader allocates for a frame before the
	// bytes already allocated for have arrived: a header announcing 16 MiB
	// costs nothing until the body comes.
	growStep = 64 << 10
	// keepFrame is the largest frame buffer a FrameReader keeps between
	// frames; a larger one (a rare big reply) is dropped after use.
	keepFrame = 1 << 20
)

// ReadDeadline returns the read deadline for a link with the given timeout:
// the current one while it still has three quarters of the timeout to run
// (moving it costs a timer update, so not on every frame), otherwise now
// plus the timeout.
func ReadDeadline(current, now time.Time, timeout time.Duration) time.Time {
	if current.Sub(now) >= timeout*3/4 {
		return current
	}
	return now.Add(timeout)
}

// AppendFrame appends the 4-byte big-endian length of msg and msg to dst.
func AppendFrame(dst, msg []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(msg)))
	return append(dst, msg...)
}

// MarshalFrame encodes m as one length-prefixed link frame.
func MarshalFrame(m proto.Message) ([]byte, error) {
	size := proto.Size(m)
	b := make([]byte, 4, 4+size)
	binary.BigEndian.PutUint32(b, uint32(size))
	return proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, m)
}

// FrameReader reads length-prefixed link frames of at most a limit. It
// allocates for a frame as its bytes arrive, never the size its header
// announces up front, so that a peer cannot make it hold memory it has not
// sent. One goroutine at a time.
type FrameReader struct {
	src io.Reader // the socket
	r   io.Reader // src, or a read buffer in front of it
	max int
	buf []byte
}

// NewFrameReader reads frames of at most max bytes from r, through a read
// buffer.
func NewFrameReader(r io.Reader, max int) *FrameReader {
	return &FrameReader{src: r, r: bufio.NewReaderSize(r, readBuffer), max: max}
}

// newHandshakeReader reads frames of at most MaxHandshakeFrame bytes
// straight from r, without a read buffer: a connection whose peer has
// proved nothing costs no more than the frame it sent, and nothing is read
// ahead of the hello that authenticated would have to hand over.
func newHandshakeReader(r io.Reader) *FrameReader {
	return &FrameReader{src: r, r: r, max: MaxHandshakeFrame}
}

// authenticated readies a handshake's reader for the link: frames up to
// MaxFrame, read through a read buffer.
func (fr *FrameReader) authenticated() {
	fr.r, fr.max = bufio.NewReaderSize(fr.src, readBuffer), MaxFrame
}

// Next returns the next frame. The slice is valid only until the next call.
func (fr *FrameReader) Next() ([]byte, error) {
	if cap(fr.buf) > keepFrame {
		fr.buf = nil
	}
	var hdr [4]byte
	if _, err := io.ReadFull(fr.r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[:]))
	if n > fr.max {
		return nil, fmt.Errorf("%w: %d bytes, the limit is %d", ErrFrameTooLarge, n, fr.max)
	}
	buf := fr.buf[:0]
	for got := 0; got < n; {
		// Grow by what has arrived so far (at least growStep): the
		// allocation stays within about twice the bytes received.
		next := min(n, got+max(got, growStep))
		if cap(buf) < next {
			buf = append(buf[:got], make([]byte, next-got)...)
		}
		buf = buf[:next]
		if _, err := io.ReadFull(fr.r, buf[got:next]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		got = next
	}
	fr.buf = buf
	return buf, nil
}
