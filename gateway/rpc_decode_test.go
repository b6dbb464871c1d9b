package gateway

import (
	"encoding/json"
	"testing"

	"github.com/imq-dev/imq/internal/imqerr"
	imqpb "github.com/imq-dev/imq/proto"
)

// FuzzDecodeParams: the strict params decoder never panics, refuses with
// BAD_REQUEST only, and accepts only valid JSON objects holding every
// required field; an accepted data value is stored as valid compact JSON.
func FuzzDecodeParams(f *testing.F) {
	for _, s := range []string{
		`{"queue":"/room/1","mount":"chat","data":{"a":[1,2]}}`,
		`{"queue":"/room/1","mount":"chat","data_base64":"AAE="}`,
		`{"queue":"/room/1","mount":"chat","data":null}`,
		`{"queue":"/room/1","queue":"/room/2","mount":"chat","data":1}`,
		`{"queue":5}`, `[]`, `{`, ``, `{"queue":"/r","mount":"m","data":1} x`,
		`{"calls":[{"method":"publish","params":{}}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var p publishParams
		present, err := decodeParams(b, &p, "")
		if err != nil {
			if imqerr.CodeOf(err) != imqpb.Code_BAD_REQUEST {
				t.Fatalf("%q: %v", b, err)
			}
		} else {
			if !json.Valid(b) || !present["queue"] || !present["mount"] {
				t.Fatalf("%q accepted (present %v)", b, present)
			}
			if payload, err := payloadOf(present, "data", p.Data, p.DataBase64); err == nil && present["data"] && !json.Valid(payload) {
				t.Fatalf("%q: stored data %q is not JSON", b, payload)
			}
		}
		var bp batchParams
		if _, err := decodeParams(b, &bp, "calls[0]: "); err == nil && !json.Valid(b) {
			t.Fatalf("%q accepted as a batch", b)
		}
	})
}

// TestDataOut: stored bytes come back as JSON when they are JSON text, else
// base64; exactly one of the two.
func TestDataOut(t *testing.T) {
	for _, c := range []struct {
		in       string
		json, b6 string
	}{
		{`{"a":1}`, `{"a":1}`, ""},
		{`"s"`, `"s"`, ""},
		{`null`, `null`, ""},
		{` 7 `, ` 7 `, ""},
		{``, "", ""},
		{"\x00\x01", "", "AAE="},
		{`{"a":`, "", "eyJhIjo="},
		{"\"\xff\"", "", "Iv8i"},
	} {
		j, b := dataOut([]byte(c.in))
		switch {
		case c.json != "" && (string(j) != c.json || b != nil):
			t.Errorf("%q: %q %v", c.in, j, b)
		case c.json == "" && (j != nil || b == nil || *b != c.b6):
			t.Errorf("%q: %q %v, want base64 %q", c.in, j, b, c.b6)
		}
	}
}
