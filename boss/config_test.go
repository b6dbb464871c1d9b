package boss

import (
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	for name, tc := range map[string]struct {
		mod  func(*Config)
		want string
	}{
		"defaults":         {func(*Config) {}, ""},
		"bad http address": {func(c *Config) { c.HTTPAddr = "nowhere" }, "HTTP address"},
		"id with a slash":  {func(c *Config) { c.ID = "a/b" }, "slashes"},
		"negative grace":   {func(c *Config) { c.ReconcileGrace = -time.Second }, "reconcile grace"},
		"negative timeout": {func(c *Config) { c.PeerTimeout = -1 }, "peer timeout"},
		"bad gossip":       {func(c *Config) { c.Member.BindAddr = "x" }, "gossip address"},
		"short operator key": {func(c *Config) {
			c.OperatorKeys = [][]byte{[]byte("0123456789abcdef"), []byte("0123456789abcde")}
		}, "operator key 2 has 15 bytes, want at least 16"},
	} {
		t.Run(name, func(t *testing.T) {
			c := DefaultConfig()
			tc.mod(&c)
			c.setDefaults()
			err := c.validate()
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("validate = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestParseWait(t *testing.T) {
	for in, want := range map[string]time.Duration{"25s": 25 * time.Second, "0": 0, "500ms": 500 * time.Millisecond, "60": time.Minute} {
		if got, err := parseWait(in); err != nil || got != want {
			t.Errorf("parseWait(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "abc", "-1s", "61s", "1h", "-5", "1e3"} {
		if _, err := parseWait(in); err == nil {
			t.Errorf("parseWait(%q) accepted", in)
		}
	}
}
