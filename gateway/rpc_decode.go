package gateway

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"unicode/utf8"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// Strict decoding of RPC params: a JSON object whose every key is a field of
// the params struct (by its json tag), each once, with the field's type;
// fields tagged rpc:"required" must be present and not null. Unknown fields
// are errors, so that a typo ("qeueu") is caught rather than ignored. Every
// error is BAD_REQUEST and names the field.

var rawMessageType = reflect.TypeFor[json.RawMessage]()

// decodeParams decodes the object b into the struct *v and returns the keys
// present (null counts as absent, except for json.RawMessage fields, where
// it is a JSON value). where prefixes field names in errors ("calls[2].").
func decodeParams(b []byte, v any, where string) (map[string]bool, error) {
	rv := reflect.ValueOf(v).Elem()
	rt := rv.Type()
	fields := make(map[string]int, rt.NumField())
	var names []string
	for i := range rt.NumField() {
		name, _, _ := strings.Cut(rt.Field(i).Tag.Get("json"), ",")
		fields[name] = i
		names = append(names, name)
	}
	bad := func(format string, args ...any) error {
		return imqerr.New(imqpb.Code_BAD_REQUEST, format, args...)
	}

	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	switch {
	case errors.Is(err, io.EOF):
		return nil, bad("%sexpected a JSON object of params, got nothing", where)
	case err != nil:
		return nil, bad("%smalformed JSON: %v", where, jsonErr(err))
	case tok != json.Delim('{'):
		return nil, bad("%sexpected a JSON object of params, got %s", where, jsonKind(tok))
	}
	present := make(map[string]bool, len(fields))
	seen := make(map[string]bool, len(fields))
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, bad("%smalformed JSON: %v", where, jsonErr(err))
		}
		key, _ := tok.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, bad("%smalformed JSON at field %q: %v", where, key, jsonErr(err))
		}
		i, ok := fields[key]
		if !ok {
			return nil, bad("%sunknown field %q (fields: %s)", where, key, strings.Join(names, ", "))
		}
		if seen[key] {
			return nil, bad("%sfield %q given twice", where, key)
		}
		seen[key] = true
		f := rv.Field(i)
		if f.Type() == rawMessageType {
			f.SetBytes(raw)
			present[key] = true
			continue
		}
		if bytes.Equal(raw, []byte("null")) {
			continue
		}
		if err := json.Unmarshal(raw, f.Addr().Interface()); err != nil {
			return nil, bad("%sfield %q: expected %s, got %s", where, key, typeName(f.Type()), jsonKindOf(raw))
		}
		present[key] = true
	}
	if _, err := dec.Token(); err != nil {
		return nil, bad("%smalformed JSON: %v", where, jsonErr(err))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, bad("%sunexpected data after the JSON object", where)
	}
	for i := range rt.NumField() {
		name, _, _ := strings.Cut(rt.Field(i).Tag.Get("json"), ",")
		if rt.Field(i).Tag.Get("rpc") == "required" && !present[name] {
			return nil, bad("%smissing field %q", where, name)
		}
	}
	return present, nil
}

// jsonErr shortens encoding/json's errors for callers.
func jsonErr(err error) string {
	if se, ok := errors.AsType[*json.SyntaxError](err); ok {
		return fmt.Sprintf("%s (at byte %d)", strings.TrimPrefix(se.Error(), "json: "), se.Offset)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return "unexpected end of the body"
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

// typeName says what a field of type t takes, for errors.
func typeName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a non-negative integer"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "an integer"
	case reflect.Slice:
		if t.Elem() == rawMessageType {
			return "an array"
		}
		return "an array of " + strings.TrimPrefix(strings.TrimPrefix(typeName(t.Elem()), "a "), "an ") + "s"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return t.String()
}

// jsonKind names the JSON kind of a token.
func jsonKind(tok json.Token) string {
	switch t := tok.(type) {
	case json.Delim:
		if t == '[' {
			return "an array"
		}
		return "an object"
	case string:
		return "a string"
	case float64, json.Number:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return "something else"
}

// jsonKindOf names the JSON kind of a raw value, for errors.
func jsonKindOf(raw json.RawMessage) string {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return "nothing"
	}
	switch c := raw[0]; {
	case c == '{':
		return "an object"
	case c == '[':
		return "an array"
	case c == '"':
		return "a string"
	case c == 't' || c == 'f':
		return "a boolean"
	case c == 'n':
		return "null"
	}
	if len(raw) > 32 {
		return "a number"
	}
	return "the number " + string(raw)
}

// payloadOf returns the bytes of a data value given as JSON (name) or as
// base64 (name + "_base64"): exactly one of the two. JSON is stored as its
// compact text.
func payloadOf(present map[string]bool, name string, raw json.RawMessage, b64 string) ([]byte, error) {
	hasJSON, hasB64 := present[name], present[name+"_base64"]
	switch {
	case hasJSON && hasB64:
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "give %q or %q, not both", name, name+"_base64")
	case !hasJSON && !hasB64:
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "missing field %q (any JSON value) or %q (base64 bytes)", name, name+"_base64")
	case hasB64:
		b, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field %q is not valid standard base64 (with padding): %v", name+"_base64", err)
		}
		return b, nil
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return nil, imqerr.New(imqpb.Code_BAD_REQUEST, "field %q: %v", name, jsonErr(err))
	}
	return buf.Bytes(), nil
}

// dataOut is a stored value as the RPC answers it: under the JSON name when
// the bytes are JSON text (valid UTF-8), else base64 under name_base64.
// Exactly one of the two is set.
func dataOut(b []byte) (json.RawMessage, *string) {
	if json.Valid(b) && utf8.Valid(b) {
		return json.RawMessage(b), nil
	}
	s := base64.StdEncoding.EncodeToString(b)
	return nil, &s
}
