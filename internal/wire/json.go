package wire

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// The JSON form is the protobuf JSON mapping with one change that a browser
// developer expects: a bytes field whose content is valid JSON travels as that
// JSON value rather than as base64. Bytes that are not valid JSON travel as
// base64 under the field's JSON name plus this suffix.
const base64Suffix = "Base64"

var (
	jsonMarshal = protojson.MarshalOptions{UseProtoNames: false, EmitUnpopulated: false}
	// Unknown fields are ignored, as in the binary form, so that either side
	// may add fields without breaking the other.
	jsonUnmarshal = protojson.UnmarshalOptions{DiscardUnknown: true}
)

// MarshalJSON encodes m in the JSON form.
//
// It goes through protojson and then rewrites bytes fields, so it costs
// several times the binary encoding; gateways call it once per event for all
// JSON subscribers, never once per subscriber.
func MarshalJSON(m proto.Message) ([]byte, error) {
	b, err := jsonMarshal.Marshal(m)
	if err != nil {
		return nil, err
	}
	out, err := rewriteObject(b, m.ProtoReflect().Descriptor(), bytesToJSON)
	if err != nil {
		return nil, err
	}
	return out, nil
}

// UnmarshalJSON decodes the JSON form into m.
func UnmarshalJSON(b []byte, m proto.Message) error {
	if !json.Valid(b) {
		return fmt.Errorf("not valid JSON")
	}
	pj, err := rewriteObject(b, m.ProtoReflect().Descriptor(), jsonToBytes)
	if err != nil {
		return err
	}
	return jsonUnmarshal.Unmarshal(pj, m)
}

// rewriteFn rewrites one bytes field: given its JSON name and raw value it
// returns the key and value to emit.
type rewriteFn func(name string, raw json.RawMessage, fd protoreflect.FieldDescriptor) (string, json.RawMessage, error)

// rewriteObject walks a JSON object alongside message descriptor md and applies
// fn to every bytes field at any depth. Keys it does not recognise are left for
// protojson to judge.
func rewriteObject(b []byte, md protoreflect.MessageDescriptor, fn rewriteFn) ([]byte, error) {
	if bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
		return b, nil
	}
	keys, vals, err := objectMembers(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", md.Name(), err)
	}
	fields := md.Fields()
	seen := make(map[protoreflect.FieldNumber]string, len(keys))
	changed := false
	for i, key := range keys {
		raw := vals[i]
		fd := fieldByJSONKey(fields, key)
		if fd == nil {
			continue
		}
		if prev, dup := seen[fd.Number()]; dup {
			return nil, fmt.Errorf("%s: field %q given twice (as %q and %q)", md.Name(), fd.JSONName(), prev, key)
		}
		seen[fd.Number()] = key
		if bytes.Equal(raw, []byte("null")) {
			continue
		}
		switch {
		case fd.Kind() == protoreflect.BytesKind && !fd.IsList() && !fd.IsMap():
			keys[i], vals[i], err = fn(key, raw, fd)
		case fd.Kind() == protoreflect.MessageKind && fd.IsList():
			var items []json.RawMessage
			if err := json.Unmarshal(raw, &items); err != nil {
				return nil, fmt.Errorf("%s: expected a JSON array", key)
			}
			for j, item := range items {
				if items[j], err = rewriteObject(item, fd.Message(), fn); err != nil {
					return nil, err
				}
			}
			vals[i], err = MarshalUnescaped(items)
		case fd.Kind() == protoreflect.MessageKind && !fd.IsMap() && !isWellKnown(fd.Message()):
			vals[i], err = rewriteObject(raw, fd.Message(), fn)
		default:
			continue
		}
		if err != nil {
			return nil, err
		}
		changed = true
	}
	if !changed {
		return b, nil
	}
	var out bytes.Buffer
	out.WriteByte('{')
	for i, key := range keys {
		if i > 0 {
			out.WriteByte(',')
		}
		k, err := MarshalUnescaped(key)
		if err != nil {
			return nil, err
		}
		out.Write(k)
		out.WriteByte(':')
		out.Write(vals[i])
	}
	out.WriteByte('}')
	return out.Bytes(), nil
}

// objectMembers splits a JSON object into its keys and raw values, in order.
// Duplicate keys are kept, for the caller to reject.
func objectMembers(b []byte) (keys []string, vals []json.RawMessage, err error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, fmt.Errorf("expected a JSON object")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, err
		}
		key, _ := tok.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, nil, err
		}
		keys = append(keys, key)
		vals = append(vals, raw)
	}
	if _, err := dec.Token(); err != nil {
		return nil, nil, err
	}
	return keys, vals, nil
}

// MarshalUnescaped is json.Marshal without HTML escaping, which would change
// the bytes of payloads that contain < > or &.
func MarshalUnescaped(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// fieldByJSONKey finds a field by the keys protojson accepts, plus the base64
// alternative for bytes fields.
func fieldByJSONKey(fields protoreflect.FieldDescriptors, key string) protoreflect.FieldDescriptor {
	if fd := fields.ByJSONName(key); fd != nil {
		return fd
	}
	if fd := fields.ByName(protoreflect.Name(key)); fd != nil {
		return fd
	}
	if n := len(key) - len(base64Suffix); n > 0 && key[n:] == base64Suffix {
		if fd := fields.ByJSONName(key[:n]); fd != nil && fd.Kind() == protoreflect.BytesKind {
			return fd
		}
	}
	return nil
}

func isWellKnown(md protoreflect.MessageDescriptor) bool {
	return md.ParentFile().Package() == "google.protobuf"
}

// bytesToJSON turns protojson's base64 string into the JSON value it encodes,
// or leaves it base64 under the suffixed key when it is not JSON.
func bytesToJSON(key string, raw json.RawMessage, fd protoreflect.FieldDescriptor) (string, json.RawMessage, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", nil, err
	}
	data, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return "", nil, err
	}
	// JSON travels as JSON, except null (which protojson reads as "absent")
	// and invalid UTF-8 (which text frames may not carry).
	if json.Valid(data) && utf8.Valid(data) && !bytes.Equal(bytes.TrimSpace(data), []byte("null")) {
		var buf bytes.Buffer
		if err := json.Compact(&buf, data); err != nil {
			return "", nil, err
		}
		return fd.JSONName(), buf.Bytes(), nil
	}
	return fd.JSONName() + base64Suffix, raw, nil
}

// jsonToBytes turns a JSON value into the base64 string protojson expects:
// under the plain key any JSON value is taken as the bytes of its compact text;
// under the suffixed key a base64 string is passed through.
func jsonToBytes(key string, raw json.RawMessage, fd protoreflect.FieldDescriptor) (string, json.RawMessage, error) {
	if key != fd.JSONName() && key != string(fd.Name()) {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", nil, fmt.Errorf("%s: expected a base64 string", key)
		}
		return fd.JSONName(), raw, nil
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return "", nil, fmt.Errorf("%s: %v", key, err)
	}
	enc, err := MarshalUnescaped(buf.Bytes()) // []byte marshals as a base64 string
	if err != nil {
		return "", nil, err
	}
	return fd.JSONName(), enc, nil
}
