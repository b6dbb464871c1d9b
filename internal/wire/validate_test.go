package wire_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// checkValidator runs validate over valid and invalid inputs: valid ones must
// pass, invalid ones must fail with code.
func checkValidator(t *testing.T, validate func(string) error, code imqpb.Code, valid, invalid []string) {
	t.Helper()
	for _, s := range valid {
		if err := validate(s); err != nil {
			t.Errorf("%q (%d bytes): %v, want nil", s, len(s), err)
		}
	}
	for _, s := range invalid {
		if got := imqerr.CodeOf(validate(s)); got != code {
			t.Errorf("%q (%d bytes): code %v, want %v", s, len(s), got, code)
		}
	}
}

func TestValidateQueueName(t *testing.T) {
	maxName := "/" + strings.Repeat("a", wire.MaxQueueName-1)
	segments := strings.Repeat("/ab", wire.MaxQueueName/3) // 255 bytes
	checkValidator(t, wire.ValidateQueueName, imqpb.Code_INVALID_QUEUE_NAME,
		[]string{
			"/room/123",
			"/a",
			"/0",
			"/game/eu-1/lobby",
			"/user/alice",
			"/A-Z_a.z:0@9+=~-",
			"/.a",
			"/a.",
			"/...",
			"/a/.b/..c",
			"/user/alice@example.com",
			maxName,
			segments,
		},
		[]string{
			"",
			"room",
			"room/1",
			"/",
			"//",
			"//a",
			"/a//b",
			"/a/",
			"/room/1/",
			"/.",
			"/..",
			"/a/.",
			"/a/..",
			"/a/./b",
			"/a/../b",
			"/../a",
			"/a b",
			" /a",
			"/a\t",
			"/a\n",
			"/a\x00",
			"/a\x7f",
			"/a?b",
			"/a#b",
			"/a%20b",
			"/a*",
			"/a\\b",
			"/a,b",
			"/a!",
			"/a\"b",
			"/a'b",
			"/a$b",
			"/a;b",
			"/a<b>",
			"/a|b",
			"/é",
			"/ròom",
			"/\xff",
			"/room/🎲",
			"\\a",
			maxName + "a",
			"/" + strings.Repeat("a", 255),
			segments + "/a",
		})
}

func TestValidateMountName(t *testing.T) {
	checkValidator(t, wire.ValidateMountName, imqpb.Code_INVALID_MOUNT,
		[]string{
			"chat",
			"a",
			"0",
			"-",
			".",
			"..",
			"_",
			"A-Z_a.z-0.9",
			"player.input_v2",
			strings.Repeat("m", wire.MaxMountName),
		},
		[]string{
			"",
			strings.Repeat("m", wire.MaxMountName+1),
			"a b",
			" ",
			"a/b",
			"/chat",
			"a:b",
			"a@b",
			"a+b",
			"a~b",
			"chat\n",
			"\x00",
			"é",
			"\xff",
			"🎲",
		})
}

func TestValidateMountKind(t *testing.T) {
	for _, c := range []struct {
		kind imqpb.MountKind
		want imqpb.Code
	}{
		{imqpb.MountKind_MESSAGE, imqpb.Code_OK},
		{imqpb.MountKind_STATE, imqpb.Code_OK},
		{imqpb.MountKind_MOUNT_KIND_UNSPECIFIED, imqpb.Code_INVALID_MOUNT},
		{3, imqpb.Code_INVALID_MOUNT},
		{-1, imqpb.Code_INVALID_MOUNT},
		{1 << 30, imqpb.Code_INVALID_MOUNT},
	} {
		if got := imqerr.CodeOf(wire.ValidateMountKind("m", c.kind)); got != c.want {
			t.Errorf("ValidateMountKind(%v): code %v, want %v", c.kind, got, c.want)
		}
	}
}

func TestValidateStateKey(t *testing.T) {
	checkValidator(t, wire.ValidateStateKey, imqpb.Code_BAD_REQUEST,
		[]string{
			"k",
			"player:1",
			"a b",
			" ",
			"/path/like",
			"with \"quotes\" and \\",
			"ключ",
			"🎲 dice",
			"\u00a0", // no-break space is not a control character
			strings.Repeat("k", wire.MaxStateKey),
			strings.Repeat("é", wire.MaxStateKey/2), // 256 bytes, 128 runes
		},
		[]string{
			"",
			strings.Repeat("k", wire.MaxStateKey+1),
			strings.Repeat("é", wire.MaxStateKey/2) + "k", // 257 bytes
			strings.Repeat("é", wire.MaxStateKey),         // 256 runes, 512 bytes
			"\x00",
			"a\x00b",
			"a\nb",
			"\t",
			"\r",
			"\x1b[31m",
			"\x1f",
			"\x7f",
			"\xff",
			"a\xc3",
			"\xed\xa0\x80", // UTF-16 surrogate
			"\xc0\xaf",     // overlong "/"
			// C1 control characters are control characters too (Unicode Cc).
			"\u0085",
			"\u009b31m",
			"a\u0080",
		})
}

func TestValidateErrorsNameTheLimit(t *testing.T) {
	// The messages are for humans; check they carry the limit, so a client
	// developer can fix the request without reading the source.
	for _, c := range []struct {
		err  error
		want string
	}{
		{wire.ValidateQueueName("/" + strings.Repeat("a", 300)), fmt.Sprint(wire.MaxQueueName)},
		{wire.ValidateMountName(strings.Repeat("a", 100)), fmt.Sprint(wire.MaxMountName)},
		{wire.ValidateStateKey(strings.Repeat("a", 300)), fmt.Sprint(wire.MaxStateKey)},
	} {
		if c.err == nil || !strings.Contains(c.err.Error(), c.want) {
			t.Errorf("error %v does not mention the limit %s", c.err, c.want)
		}
	}
}

func TestValidateUserID(t *testing.T) {
	maxID := strings.Repeat("a", wire.MaxUserID)
	valid := []string{"alice", "u-1", "a.b", "bob@example.com", "x+y=z~", "A_Z:0", "...", maxID}
	invalid := []string{"", ".", "..", "a/b", "/a", "a/", "al ice", "é", "a\x00", "a\n", maxID + "a"}
	for _, id := range valid {
		if err := wire.ValidateUserID(id); err != nil {
			t.Errorf("%q: %v, want nil", id, err)
		}
	}
	for _, id := range invalid {
		err := wire.ValidateUserID(id)
		if err == nil {
			t.Errorf("%q: nil, want an error", id)
			continue
		}
		if _, ok := errors.AsType[*imqerr.Error](err); ok {
			t.Errorf("%q: %v carries a protocol code; want a plain error for the caller to wrap", id, err)
		}
	}
	if err := wire.ValidateUserID(maxID + "a"); err == nil || !strings.Contains(err.Error(), fmt.Sprint(wire.MaxUserID)) {
		t.Errorf("error %v does not mention the limit %d", err, wire.MaxUserID)
	}
	// The rule is "one segment of the user's queue /user/<id>": it agrees
	// with the queue name rule on every id, for every byte.
	for _, id := range append(append(valid, invalid...), allBytes()...) {
		want := wire.ValidateQueueName("/user/"+id) == nil && !strings.Contains(id, "/")
		if got := wire.ValidateUserID(id) == nil; got != want {
			t.Errorf("%q: valid %v, but /user/%s as a queue name: valid %v", id, got, id, want)
		}
	}
}

// allBytes returns every one-byte string, and each byte between two letters.
func allBytes() []string {
	var out []string
	for b := range 256 {
		out = append(out, string([]byte{byte(b)}), "a"+string([]byte{byte(b)})+"b")
	}
	return out
}
