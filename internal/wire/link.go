package wire

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/proto"
)

// Link liveness defaults: the gateway pings every DefaultLinkPingInterval;
// either end closes a link on which nothing arrived for DefaultLinkTimeout.
const (
	DefaultLinkPingInterval = 5 * time.Second
	DefaultLinkTimeout      = 3 * DefaultLinkPingInterval
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

// DefaultMaxLinkFrame bounds one link frame. A Joined reply with a full replay
// and a state snapshot is the largest frame; the queue node keeps those well
// below this.
const DefaultMaxLinkFrame = 16 << 20

// AppendFrame appends the 4-byte big-endian length of msg and msg to dst.
func AppendFrame(dst, msg []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(msg)))
	return append(dst, msg...)
}

// FrameReader reads length-prefixed link frames.
type FrameReader struct {
	r   *bufio.Reader
	max int
	buf []byte
}

// NewFrameReader reads frames of at most max bytes from r.
func NewFrameReader(r io.Reader, max int) *FrameReader {
	return &FrameReader{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// Next returns the next frame. The slice is valid only until the next call.
func (fr *FrameReader) Next() ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(fr.r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[:]))
	if n > fr.max {
		return nil, fmt.Errorf("link frame of %d bytes exceeds the limit of %d", n, fr.max)
	}
	if cap(fr.buf) < n {
		fr.buf = make([]byte, n)
	}
	fr.buf = fr.buf[:n]
	if _, err := io.ReadFull(fr.r, fr.buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return fr.buf, nil
}

// MarshalFrame encodes m as one length-prefixed link frame.
func MarshalFrame(m proto.Message) ([]byte, error) {
	size := proto.Size(m)
	b := make([]byte, 4, 4+size)
	binary.BigEndian.PutUint32(b, uint32(size))
	return proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, m)
}
