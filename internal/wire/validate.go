package wire

import (
	"errors"
	"fmt"
	"unicode"
	"unicode/utf8"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// Naming rules. They are part of the protocol (README "Queue names") and
// checked at every entry point, so a bad name never reaches a queue.
const (
	// MaxQueueName is the longest queue name, in bytes.
	MaxQueueName = 255
	// MaxMountName is the longest mount name, in bytes.
	MaxMountName = 64
	// MaxStateKey is the longest state key, in bytes.
	MaxStateKey = 256
	// MaxUserID is the longest user id, in bytes: the segment of the
	// user's queue /user/<id> within MaxQueueName.
	MaxUserID = MaxQueueName - len(userQueuePrefix)
)

const userQueuePrefix = "/user/"

// ValidateUserID checks a user id (a token's sub, a development ?user=, an
// auth backend's answer): it names the user's queue /user/<id>, so it is one
// queue-name segment, 1 to MaxUserID bytes of [A-Za-z0-9_.:@+=~-], not "."
// or "..". The error is a plain one: each caller says what the id was for
// (the gateway refuses the connection UNAUTHORIZED, imq sub names --user).
func ValidateUserID(id string) error {
	switch {
	case id == "":
		return errors.New("the user id is empty")
	case len(id) > MaxUserID:
		return fmt.Errorf("the user id is %d bytes; at most %d", len(id), MaxUserID)
	case id == "." || id == "..":
		return fmt.Errorf("user id %q is not a valid queue segment", id)
	}
	for i := 0; i < len(id); i++ {
		if !queueChar(id[i]) {
			return fmt.Errorf("user id %q: character %q is not allowed (use A-Z a-z 0-9 _ . : @ + = ~ -)", id, rune(id[i]))
		}
	}
	return nil
}

// ValidateQueueName checks a queue name: one or more segments, each "/"
// followed by 1 or more of [A-Za-z0-9_.:@+=~-], not "." or "..", at most
// MaxQueueName bytes in all. Examples: /room/123, /user/alice, /game/eu-1/lobby.
func ValidateQueueName(name string) error {
	if name == "" {
		return imqerr.New(imqpb.Code_INVALID_QUEUE_NAME, "queue name is empty")
	}
	if len(name) > MaxQueueName {
		return imqerr.New(imqpb.Code_INVALID_QUEUE_NAME, "queue name is %d bytes; the limit is %d", len(name), MaxQueueName)
	}
	if name[0] != '/' {
		return imqerr.New(imqpb.Code_INVALID_QUEUE_NAME, "queue name %q must start with '/'", name)
	}
	segStart := 1
	for i := 1; i <= len(name); i++ {
		if i < len(name) && name[i] != '/' {
			if !queueChar(name[i]) {
				return imqerr.New(imqpb.Code_INVALID_QUEUE_NAME, "queue name %q: character %q is not allowed (use A-Z a-z 0-9 _ . : @ + = ~ -)", name, rune(name[i]))
			}
			continue
		}
		seg := name[segStart:i]
		switch seg {
		case "":
			return imqerr.New(imqpb.Code_INVALID_QUEUE_NAME, "queue name %q has an empty segment", name)
		case ".", "..":
			return imqerr.New(imqpb.Code_INVALID_QUEUE_NAME, "queue name %q has a %q segment", name, seg)
		}
		segStart = i + 1
	}
	return nil
}

func queueChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '_', '.', ':', '@', '+', '=', '~', '-':
		return true
	}
	return false
}

// ValidateMountName checks a mount name: 1 to MaxMountName bytes of
// [A-Za-z0-9_.-].
func ValidateMountName(name string) error {
	if name == "" || len(name) > MaxMountName {
		return imqerr.New(imqpb.Code_INVALID_MOUNT, "mount name must be 1 to %d bytes, got %d", MaxMountName, len(name))
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			return imqerr.New(imqpb.Code_INVALID_MOUNT, "mount name %q: character %q is not allowed (use A-Z a-z 0-9 _ . -)", name, rune(c))
		}
	}
	return nil
}

// ValidateMountKind checks that a mount kind is MESSAGE or STATE.
func ValidateMountKind(name string, kind imqpb.MountKind) error {
	switch kind {
	case imqpb.MountKind_MESSAGE, imqpb.MountKind_STATE:
		return nil
	}
	return imqerr.New(imqpb.Code_INVALID_MOUNT, "mount %q: kind must be MESSAGE or STATE", name)
}

// ValidateStateKey checks a state key: 1 to MaxStateKey bytes of valid UTF-8
// without control characters.
func ValidateStateKey(key string) error {
	if key == "" || len(key) > MaxStateKey {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "state key must be 1 to %d bytes, got %d", MaxStateKey, len(key))
	}
	if !utf8.ValidString(key) {
		return imqerr.New(imqpb.Code_BAD_REQUEST, "state key is not valid UTF-8")
	}
	for _, r := range key {
		if unicode.IsControl(r) {
			return imqerr.New(imqpb.Code_BAD_REQUEST, "state key contains control character %U", r)
		}
	}
	return nil
}
