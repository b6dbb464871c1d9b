package gateway_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math/big"
	"net/http"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/imq-dev/imq/gateway"
)

// docs/openapi.json is the admin RPC's contract for backend developers.
// These tests hold it to the real handlers: every documented method is
// served and every served method documented; each method's documented
// example, sent to a live gateway and queue node, is answered 200 with a
// body its documented schema accepts; and the documented request schemas
// refuse what the handlers refuse.

const openAPIPath = "../docs/openapi.json"

// exampleOrder runs the examples so that each finds what it reads: the
// state set before it is read, the events published before the history.
var exampleOrder = []string{"publish", "set_state", "get_state", "broadcast", "history", "queue_info", "delete_state", "batch", "kick"}

// errorStatuses are the statuses every method documents (405 included).
var errorStatuses = []string{"400", "401", "403", "404", "405", "409", "413", "429", "500", "503", "504"}

type openAPIOp struct {
	schema   map[string]any // the request body's
	example  any
	response map[string]any // the 200 answer's
}

func loadOpenAPI(t *testing.T) (*schemaChecker, map[string]openAPIOp) {
	t.Helper()
	b, err := os.ReadFile(openAPIPath)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var doc map[string]any
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("%s: %v", openAPIPath, err)
	}
	sc := &schemaChecker{doc: doc}
	if v, _ := doc["openapi"].(string); !strings.HasPrefix(v, "3.0.") {
		t.Fatalf("openapi version %q, want 3.0.x", v)
	}
	bearer := dig(doc, "components", "securitySchemes", "bearerAuth")
	if dig(bearer, "type") != "http" || dig(bearer, "scheme") != "bearer" {
		t.Fatalf("security scheme %v, want http bearer", bearer)
	}
	if !reflect.DeepEqual(doc["security"], []any{map[string]any{"bearerAuth": []any{}}}) {
		t.Fatalf("security %v, want bearerAuth for every operation", doc["security"])
	}
	ops := map[string]openAPIOp{}
	paths, _ := doc["paths"].(map[string]any)
	for path, item := range paths {
		method, ok := strings.CutPrefix(path, gateway.RPCPath)
		if !ok || method == "" || strings.Contains(method, "/") {
			t.Fatalf("path %s is not %s<method>", path, gateway.RPCPath)
		}
		if keys := slices.Collect(maps.Keys(item.(map[string]any))); !slices.Equal(keys, []string{"post"}) {
			t.Fatalf("%s documents %v; the RPC is POST only", path, keys)
		}
		post := dig(item, "post")
		media := dig(post, "requestBody", "content", "application/json")
		if media == nil || dig(post, "requestBody", "required") != true {
			t.Fatalf("%s: no required application/json request body", path)
		}
		op := openAPIOp{
			schema:   sc.resolve(dig(media, "schema")),
			example:  dig(media, "example"),
			response: sc.resolve(dig(post, "responses", "200", "content", "application/json", "schema")),
		}
		if op.schema == nil || op.example == nil || op.response == nil {
			t.Fatalf("%s: a request schema, its example and a 200 answer schema are required", path)
		}
		for _, st := range errorStatuses {
			r := dig(post, "responses", st)
			if ref, _ := dig(r, "$ref").(string); ref != "" {
				r = sc.lookup(ref)
			}
			if sc.resolve(dig(r, "content", "application/json", "schema")) == nil {
				t.Fatalf("%s: status %s is not documented with the error schema", path, st)
			}
		}
		ops[method] = op
	}
	return sc, ops
}

// TestOpenAPIMethods: the documented methods are exactly the served ones.
func TestOpenAPIMethods(t *testing.T) {
	_, ops := loadOpenAPI(t)
	documented := slices.Sorted(maps.Keys(ops))
	if served := gateway.RPCMethods(); !slices.Equal(documented, served) {
		t.Fatalf("documented methods %v, served %v", documented, served)
	}
	if order := slices.Sorted(slices.Values(exampleOrder)); !slices.Equal(order, documented) {
		t.Fatalf("exampleOrder %v does not list the documented methods %v", exampleOrder, documented)
	}
	// Every path is served: a call without a key reaches the RPC (401),
	// whereas an unknown method with the key is 404.
	d := startRPC(t, nil)
	for _, m := range documented {
		a := rpcDo(t, d.Gateway.Addr(), http.MethodPost, m, "", `{}`, nil)
		expectRPCError(t, a, http.StatusUnauthorized, "UNAUTHORIZED")
		if a := rpc(t, d, m, `{"unknown_field_for_the_test":1}`); a.status != http.StatusBadRequest {
			t.Fatalf("%s: %s; a served method refuses an unknown field with 400", m, a)
		}
	}
}

// TestOpenAPIExamples: each documented example, sent to a live gateway, is
// answered 200 with a body that the documented result schema accepts.
func TestOpenAPIExamples(t *testing.T) {
	sc, ops := loadOpenAPI(t)
	d := startRPC(t, nil)
	alice := mustDial(t, d, "alice", false) // the kick example's user
	alice.connected()
	for _, m := range exampleOrder {
		op, ok := ops[m]
		if !ok {
			t.Fatalf("%s is not documented", m)
		}
		if err := sc.check(op.schema, op.example, "example"); err != nil {
			t.Fatalf("%s: the documented example breaks the documented request schema: %v", m, err)
		}
		body, err := json.Marshal(op.example)
		if err != nil {
			t.Fatal(err)
		}
		a := rpc(t, d, m, string(body))
		if a.status != http.StatusOK {
			t.Fatalf("%s example %s: %s", m, body, a)
		}
		if err := sc.check(op.response, decodeUseNumber(t, a.body), "result"); err != nil {
			t.Fatalf("%s example answered %s, which the documented schema refuses: %v", m, a.body, err)
		}
	}
	// Error answers match the error schema.
	errSchema := sc.lookup("#/components/schemas/Error")
	for _, a := range []rpcAnswer{
		rpc(t, d, "get_state", `{"queue":"/room/none","mount":"x"}`),
		rpc(t, d, "nope", `{}`),
		rpcDo(t, d.Gateway.Addr(), http.MethodGet, "publish", "", "", nil),
	} {
		if a.status == http.StatusOK {
			t.Fatalf("want an error: %s", a)
		}
		if err := sc.check(errSchema, decodeUseNumber(t, a.body), "error"); err != nil {
			t.Fatalf("%s: %v", a, err)
		}
	}
}

// TestOpenAPIRequestSchemas: what the request schemas refuse, the handlers
// refuse too (400, nothing done): a field that is not documented, and each
// documented required field left out.
func TestOpenAPIRequestSchemas(t *testing.T) {
	sc, ops := loadOpenAPI(t)
	d := startRPC(t, nil)
	for _, m := range exampleOrder {
		op := ops[m]
		ex := op.example.(map[string]any)
		var variants []map[string]any
		extra := maps.Clone(ex)
		extra["undocumented"] = true
		variants = append(variants, extra)
		required, _ := op.schema["required"].([]any)
		for _, f := range required {
			v := maps.Clone(ex)
			delete(v, f.(string))
			variants = append(variants, v)
		}
		if len(required) == 0 {
			t.Fatalf("%s: no required fields documented", m)
		}
		for _, v := range variants {
			body, _ := json.Marshal(v)
			if sc.check(op.schema, decodeUseNumber(t, body), "params") == nil {
				t.Fatalf("%s: the schema accepts %s", m, body)
			}
			expectRPCError(t, rpc(t, d, m, string(body)), http.StatusBadRequest, "BAD_REQUEST")
		}
	}
	rpcFail(t, d, "queue_info", `{"queue":"/room/lobby"}`, http.StatusNotFound, "NOT_FOUND")
}

// TestSchemaChecker: the checker itself, on the keywords the document uses.
func TestSchemaChecker(t *testing.T) {
	sc := &schemaChecker{doc: map[string]any{"components": map[string]any{"schemas": map[string]any{
		"N": map[string]any{"type": "integer", "minimum": json.Number("0")},
	}}}}
	obj := map[string]any{
		"type": "object", "required": []any{"a"}, "additionalProperties": false,
		"properties": map[string]any{
			"a": map[string]any{"$ref": "#/components/schemas/N"},
			"b": map[string]any{"type": "array", "items": map[string]any{"type": "string", "pattern": "^/", "maxLength": json.Number("3")}, "maxItems": json.Number("2")},
			"c": map[string]any{"nullable": true},
			"d": map[string]any{"type": "string", "enum": []any{"X", "Y"}},
			"e": map[string]any{"type": "object", "additionalProperties": map[string]any{"type": "boolean"}},
		},
		"oneOf": []any{map[string]any{"required": []any{"c"}}, map[string]any{"required": []any{"d"}}},
	}
	for _, c := range []struct {
		json string
		ok   bool
	}{
		{`{"a":1,"c":null}`, true},
		{`{"a":1,"d":"X","b":["/x"],"e":{"k":true}}`, true},
		{`{"a":1}`, false},                         // oneOf: neither
		{`{"a":1,"c":1,"d":"X"}`, false},           // oneOf: both
		{`{"c":1}`, false},                         // required
		{`{"a":-1,"c":1}`, false},                  // minimum
		{`{"a":1.5,"c":1}`, false},                 // integer
		{`{"a":1,"c":1,"z":1}`, false},             // additionalProperties
		{`{"a":1,"d":"Z"}`, false},                 // enum
		{`{"a":1,"c":1,"b":["x"]}`, false},         // pattern
		{`{"a":1,"c":1,"b":["/xyz"]}`, false},      // maxLength
		{`{"a":1,"c":1,"b":["/","/","/"]}`, false}, // maxItems
		{`{"a":1,"c":1,"e":{"k":1}}`, false},       // additionalProperties schema
		{`[]`, false},
		{`null`, false},
	} {
		err := sc.check(obj, decodeUseNumber(t, []byte(c.json)), "v")
		if (err == nil) != c.ok {
			t.Errorf("%s: %v, want ok %v", c.json, err, c.ok)
		}
	}
	if sc.check(map[string]any{"type": "string", "frobnicate": 1}, "x", "v") == nil {
		t.Error("an unknown keyword passed")
	}
}

func decodeUseNumber(t *testing.T, b []byte) any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return v
}

// dig walks nested JSON objects.
func dig(v any, keys ...string) any {
	for _, k := range keys {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	return v
}

// schemaChecker validates JSON values (decoded with UseNumber) against the
// subset of OpenAPI 3.0 schemas the document uses: $ref (to
// #/components/...), type, nullable, enum, properties, required,
// additionalProperties (false or a schema), items, oneOf, minimum,
// maximum, minItems, maxItems, minLength, maxLength and pattern. Any other
// keyword but annotations is an error, so the document cannot rely on one
// that is not checked.
type schemaChecker struct {
	doc map[string]any
}

var schemaAnnotations = map[string]bool{"description": true, "format": true, "example": true, "title": true, "default": true}

func (sc *schemaChecker) lookup(ref string) map[string]any {
	path, ok := strings.CutPrefix(ref, "#/")
	if !ok {
		return nil
	}
	m, _ := dig(sc.doc, strings.Split(path, "/")...).(map[string]any)
	return m
}

// resolve follows $ref.
func (sc *schemaChecker) resolve(s any) map[string]any {
	m, _ := s.(map[string]any)
	for m != nil {
		ref, ok := m["$ref"].(string)
		if !ok {
			break
		}
		m = sc.lookup(ref)
	}
	return m
}

func (sc *schemaChecker) check(schema map[string]any, v any, at string) error {
	if ref, ok := schema["$ref"].(string); ok {
		target := sc.lookup(ref)
		if target == nil {
			return fmt.Errorf("%s: unresolvable $ref %s", at, ref)
		}
		return sc.check(target, v, at)
	}
	for k := range schema {
		switch k {
		case "type", "nullable", "enum", "properties", "required", "additionalProperties", "items", "oneOf",
			"minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength", "pattern":
		default:
			if !schemaAnnotations[k] {
				return fmt.Errorf("%s: the schema uses %q, which the checker does not know", at, k)
			}
		}
	}
	typ, _ := schema["type"].(string)
	if v == nil {
		if schema["nullable"] == true || typ == "" {
			return nil
		}
		return fmt.Errorf("%s: null, want %s", at, typ)
	}
	if err := checkType(typ, v, at); err != nil {
		return err
	}
	if enum, ok := schema["enum"].([]any); ok && !slices.ContainsFunc(enum, func(e any) bool { return reflect.DeepEqual(e, v) }) {
		return fmt.Errorf("%s: %v is not one of %v", at, v, enum)
	}
	if err := checkBounds(schema, v, at); err != nil {
		return err
	}
	if obj, ok := v.(map[string]any); ok {
		props, _ := schema["properties"].(map[string]any)
		for _, r := range asList(schema["required"]) {
			if _, ok := obj[r.(string)]; !ok {
				return fmt.Errorf("%s: missing %q", at, r)
			}
		}
		for k, fv := range obj {
			if ps, ok := props[k].(map[string]any); ok {
				if err := sc.check(ps, fv, at+"."+k); err != nil {
					return err
				}
				continue
			}
			switch ap := schema["additionalProperties"].(type) {
			case bool:
				if !ap {
					return fmt.Errorf("%s: field %q is not in the schema", at, k)
				}
			case map[string]any:
				if err := sc.check(ap, fv, at+"."+k); err != nil {
					return err
				}
			}
		}
	}
	if arr, ok := v.([]any); ok {
		if items, ok := schema["items"].(map[string]any); ok {
			for i, iv := range arr {
				if err := sc.check(items, iv, at+"["+strconv.Itoa(i)+"]"); err != nil {
					return err
				}
			}
		}
	}
	if oneOf := asList(schema["oneOf"]); len(oneOf) > 0 {
		n := 0
		for _, alt := range oneOf {
			if sc.check(alt.(map[string]any), v, at) == nil {
				n++
			}
		}
		if n != 1 {
			return fmt.Errorf("%s: matches %d of the oneOf alternatives, want exactly 1", at, n)
		}
	}
	return nil
}

func asList(v any) []any { l, _ := v.([]any); return l }

func checkType(typ string, v any, at string) error {
	ok := true
	switch typ {
	case "":
	case "object":
		_, ok = v.(map[string]any)
	case "array":
		_, ok = v.([]any)
	case "string":
		_, ok = v.(string)
	case "boolean":
		_, ok = v.(bool)
	case "number":
		_, ok = v.(json.Number)
	case "integer":
		n, isNum := v.(json.Number)
		_, isInt := new(big.Int).SetString(string(n), 10)
		ok = isNum && isInt
	default:
		return fmt.Errorf("%s: unknown type %q in the schema", at, typ)
	}
	if !ok {
		return fmt.Errorf("%s: %v (%T) is not of type %s", at, v, v, typ)
	}
	return nil
}

func checkBounds(schema map[string]any, v any, at string) error {
	bound := func(k string) (*big.Float, bool) {
		n, ok := schema[k].(json.Number)
		if !ok {
			return nil, false
		}
		f, _ := new(big.Float).SetString(string(n))
		return f, f != nil
	}
	switch x := v.(type) {
	case json.Number:
		f, _ := new(big.Float).SetString(string(x))
		if lo, ok := bound("minimum"); ok && f.Cmp(lo) < 0 {
			return fmt.Errorf("%s: %s is below the minimum %s", at, x, lo)
		}
		if hi, ok := bound("maximum"); ok && f.Cmp(hi) > 0 {
			return fmt.Errorf("%s: %s is above the maximum %s", at, x, hi)
		}
	case string:
		n := big.NewFloat(float64(utf8.RuneCountInString(x)))
		if lo, ok := bound("minLength"); ok && n.Cmp(lo) < 0 {
			return fmt.Errorf("%s: %q is shorter than %s", at, x, lo)
		}
		if hi, ok := bound("maxLength"); ok && n.Cmp(hi) > 0 {
			return fmt.Errorf("%s: %q is longer than %s", at, x, hi)
		}
		if p, ok := schema["pattern"].(string); ok {
			re, err := regexp.Compile(p)
			if err != nil {
				return fmt.Errorf("%s: bad pattern %q: %v", at, p, err)
			}
			if !re.MatchString(x) {
				return fmt.Errorf("%s: %q does not match %s", at, x, p)
			}
		}
	case []any:
		n := big.NewFloat(float64(len(x)))
		if lo, ok := bound("minItems"); ok && n.Cmp(lo) < 0 {
			return fmt.Errorf("%s: %d items, fewer than %s", at, len(x), lo)
		}
		if hi, ok := bound("maxItems"); ok && n.Cmp(hi) > 0 {
			return fmt.Errorf("%s: %d items, more than %s", at, len(x), hi)
		}
	}
	return nil
}
