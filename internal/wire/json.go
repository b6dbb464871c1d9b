package wire

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"

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
	jsonMarshal   = protojson.MarshalOptions{UseProtoNames: false, EmitUnpopulated: false}
	jsonUnmarshal = protojson.UnmarshalOptions{DiscardUnknown: false}
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
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(b, &obj); err != nil {
		return nil, fmt.Errorf("%s: expected a JSON object", md.Name())
	}
	if obj == nil { // JSON null
		return b, nil
	}
	fields := md.Fields()
	changed := false
	for key, raw := range obj {
		fd := fieldByJSONKey(fields, key)
		if fd == nil || bytes.Equal(raw, []byte("null")) {
			continue
		}
		switch {
		case fd.Kind() == protoreflect.BytesKind && !fd.IsList() && !fd.IsMap():
			newKey, newRaw, err := fn(key, raw, fd)
			if err != nil {
				return nil, err
			}
			if newKey != key {
				delete(obj, key)
			}
			obj[newKey] = newRaw
			changed = true
		case fd.Kind() == protoreflect.MessageKind && fd.IsList():
			var items []json.RawMessage
			if err := json.Unmarshal(raw, &items); err != nil {
				return nil, fmt.Errorf("%s: expected a JSON array", key)
			}
			for i, item := range items {
				out, err := rewriteObject(item, fd.Message(), fn)
				if err != nil {
					return nil, err
				}
				items[i] = out
			}
			out, err := json.Marshal(items)
			if err != nil {
				return nil, err
			}
			obj[key] = out
			changed = true
		case fd.Kind() == protoreflect.MessageKind && !fd.IsMap() && !isWellKnown(fd.Message()):
			out, err := rewriteObject(raw, fd.Message(), fn)
			if err != nil {
				return nil, err
			}
			obj[key] = out
			changed = true
		}
	}
	if !changed {
		return b, nil
	}
	return json.Marshal(obj)
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
	if json.Valid(data) {
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
	enc, err := json.Marshal(buf.Bytes()) // []byte marshals as a base64 string
	if err != nil {
		return "", nil, err
	}
	return fd.JSONName(), enc, nil
}
