package gateway_test

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/testutil"
)

const secret16 = "0123456789abcdef"

func TestParseAPIKey(t *testing.T) {
	cases := []struct {
		spec     string
		methods  []string
		prefixes []string
		err      string // a part of the error; "" for none
	}{
		{spec: secret16},
		{spec: "  " + secret16 + "  "},
		{spec: secret16 + "==", methods: nil}, // base64 secrets end in =
		{spec: secret16 + " methods=publish,get_state", methods: []string{"publish", "get_state"}},
		{spec: secret16 + " prefixes=/room/,/lobby/", prefixes: []string{"/room/", "/lobby/"}},
		{spec: secret16 + "\tprefixes=/room/eu-  methods=batch,kick,broadcast", methods: []string{"batch", "kick", "broadcast"}, prefixes: []string{"/room/eu-"}},
		{spec: "", err: "empty"},
		{spec: "short", err: "at least 16"},
		{spec: secret16 + " methods=publish,frobnicate", err: `"frobnicate"`},
		{spec: secret16 + " methods=", err: "empty item"},
		{spec: secret16 + " methods=publish,,kick", err: "empty item"},
		{spec: secret16 + " methods=publish methods=kick", err: "twice"},
		{spec: secret16 + " prefixes=room/", err: "start with '/'"},
		{spec: secret16 + " prefixes=/room//", err: "empty segment"},
		{spec: secret16 + " prefixes=/../", err: `".."`},
		{spec: secret16 + " prefixes=/ro om/", err: "not name=value"},
		{spec: secret16 + " prefixes=/room/*", err: "not allowed"},
		{spec: secret16 + " users=bob", err: "unknown API key option"},
		{spec: secret16 + " publish", err: "not name=value"},
	}
	for _, c := range cases {
		k, err := gateway.ParseAPIKey(c.spec)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("ParseAPIKey(%q): %v", c.spec, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("ParseAPIKey(%q) = %v, want an error mentioning %s", c.spec, err, c.err)
		case err != nil && strings.Contains(err.Error(), secret16):
			t.Errorf("ParseAPIKey(%q): the error shows the secret: %v", c.spec, err)
		case c.err == "" && (!strings.HasPrefix(k.Secret, secret16) || !slices.Equal(k.Methods, c.methods) || !slices.Equal(k.Prefixes, c.prefixes)):
			t.Errorf("ParseAPIKey(%q) = %+v", c.spec, k)
		}
	}
}

func TestParseAPIKeys(t *testing.T) {
	keys, err := gateway.ParseAPIKeys("\n" + secret16 + "a methods=publish;" + secret16 + "b\r\n ;\n" + secret16 + "c prefixes=/x/\n")
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 3 || keys[0].Secret != secret16+"a" || keys[1].Secret != secret16+"b" || keys[2].Prefixes[0] != "/x/" {
		t.Fatalf("keys %v", keys)
	}
	if keys, err := gateway.ParseAPIKeys(" \n ; "); err != nil || len(keys) != 0 {
		t.Fatalf("blank: %v, %v", keys, err)
	}
	_, err = gateway.ParseAPIKeys(secret16 + ";" + "tooshort")
	if err == nil || !strings.Contains(err.Error(), "API key 2") || strings.Contains(err.Error(), "tooshort") {
		t.Fatalf("a bad second key: %v", err)
	}
}

// TestAPIKeyRedacted: a key printed or logged never shows its secret.
func TestAPIKeyRedacted(t *testing.T) {
	k, err := gateway.ParseAPIKey(secret16 + " methods=publish")
	if err != nil {
		t.Fatal(err)
	}
	var logs testutil.SyncBuffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("key", "key", k, "keys", []gateway.APIKey{k})
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v", k, []gateway.APIKey{k}, k), logs.String()} {
		if strings.Contains(s, secret16) || !strings.Contains(s, "redacted") {
			t.Errorf("shows the secret or hides the key: %s", s)
		}
	}
}

func TestRPCConfigValidation(t *testing.T) {
	for _, c := range []struct {
		name string
		mod  func(*gateway.Config)
		err  string
	}{
		{"no auth at all", func(c *gateway.Config) { c.Dev = false }, "JWT secret or an auth URL"},
		{"auth URL alone", func(c *gateway.Config) { c.Dev, c.AuthURL = false, "http://127.0.0.1:9/auth" }, ""},
		{"bad auth URL", func(c *gateway.Config) { c.AuthURL = "ftp://x/auth" }, "auth URL"},
		{"relative auth URL", func(c *gateway.Config) { c.AuthURL = "/auth" }, "auth URL"},
		{"short key", func(c *gateway.Config) { c.APIKeys = []gateway.APIKey{{Secret: "short"}} }, "API key 1"},
		{"unknown method", func(c *gateway.Config) { c.APIKeys = []gateway.APIKey{{Secret: secret16, Methods: []string{"nope"}}} }, `"nope"`},
		{"bad prefix", func(c *gateway.Config) { c.APIKeys = []gateway.APIKey{{Secret: secret16, Prefixes: []string{"room"}}} }, "prefix"},
		{"same secret twice", func(c *gateway.Config) { c.APIKeys = []gateway.APIKey{{Secret: secret16}, {Secret: secret16}} }, "same secret"},
		{"negative body", func(c *gateway.Config) { c.RPCMaxBody = -1 }, "RPC max body"},
		{"negative timeout", func(c *gateway.Config) { c.RPCTimeout = -time.Second }, "RPC timeout"},
		{"negative call-out timeout", func(c *gateway.Config) { c.AuthCalloutTimeout = -time.Second }, "auth call-out timeout"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := gateway.DefaultConfig()
			cfg.Addr, cfg.InternalAddr, cfg.Dev, cfg.QueueNode = "127.0.0.1:0", "127.0.0.1:0", true, "127.0.0.1:1"
			c.mod(&cfg)
			gw, err := gateway.New(cfg)
			if gw != nil {
				gw.Shutdown(t.Context())
			}
			switch {
			case c.err == "" && err != nil:
				t.Fatal(err)
			case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
				t.Fatalf("got %v, want an error mentioning %s", err, c.err)
			case err != nil && strings.Contains(err.Error(), secret16):
				t.Fatalf("the error shows a secret: %v", err)
			}
		})
	}
}
