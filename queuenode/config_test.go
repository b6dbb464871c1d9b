package queuenode

import (
	"math"
	"strings"
	"testing"
)

// TestConfigUpperBounds: limits the node multiplies are bounded, so that a
// huge flag value is a clear error rather than an overflow.
func TestConfigUpperBounds(t *testing.T) {
	for _, c := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"callout concurrency", func(c *Config) { c.CalloutConcurrency = math.MaxInt }, "callout concurrency must be at most"},
		{"callout concurrency 2^31", func(c *Config) { c.CalloutConcurrency = 1 << 31 }, "callout concurrency must be at most"},
		{"max payload", func(c *Config) { c.Limits.MaxPayload = math.MaxInt }, "max payload must be at most"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := Config{}
			cfg.setDefaults()
			c.mod(&cfg)
			if err := cfg.validate(); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v; want an error saying %q", err, c.want)
			}
		})
	}
	cfg := Config{CalloutConcurrency: maxCalloutConcurrency}
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		t.Fatalf("callout concurrency at the bound: %v", err)
	}
}
