package queuenode

import (
	"math"
	"strings"
	"testing"
	"time"
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

// TestConfigHandoffBounds: the hand-off bounds are checked against each
// other and the link buffer that carries what they hold, with messages
// that name the bound.
func TestConfigHandoffBounds(t *testing.T) {
	for _, c := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"handoff hold past the link buffer", func(c *Config) { c.HandoffHoldBytes = c.LinkBuffer + 1 }, "handoff hold bytes (67108865) must not exceed the link buffer"},
		{"adopt hold past the link buffer", func(c *Config) { c.AdoptHoldBytes = c.LinkBuffer + 1 }, "adopt hold bytes (67108865) must not exceed the link buffer"},
		{"handoff hold under 4 payloads", func(c *Config) { c.HandoffHoldBytes = 4*c.Limits.MaxPayload - 1 }, "handoff hold bytes (262143) must hold at least 4 payloads"},
		{"negative adopt hold", func(c *Config) { c.AdoptHoldBytes = -1 }, "adopt hold bytes (-1) must hold at least 4 payloads"},
		{"negative handoff timeout", func(c *Config) { c.HandoffTimeout = -time.Second }, "handoff timeout must be positive, got -1s"},
		{"negative handoff retry", func(c *Config) { c.HandoffRetry = -time.Second }, "handoff retry must be positive"},
		{"negative handoff grace", func(c *Config) { c.HandoffGrace = -time.Second }, "handoff grace must be positive"},
		{"negative adopt hold time", func(c *Config) { c.AdoptHoldTime = -time.Second }, "adopt hold time must be positive"},
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

	// Zero takes the default, raised to 4 payloads and lowered to the link
	// buffer: a valid node config never fails on a bound it did not set.
	for _, c := range []struct {
		name                string
		mod                 func(*Config)
		wantHold, wantAdopt int
	}{
		{"defaults", func(*Config) {}, 16 << 20, 8 << 20},
		{"small link buffer", func(c *Config) { c.LinkBuffer = 4 << 20 }, 4 << 20, 4 << 20},
		{"large payloads", func(c *Config) { c.Limits.MaxPayload = 4 << 20 }, 16 << 20, 16 << 20},
		{"set", func(c *Config) { c.HandoffHoldBytes, c.AdoptHoldBytes = 1<<20, 2<<20 }, 1 << 20, 2 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := DefaultConfig()
			c.mod(&cfg)
			cfg.setDefaults()
			if err := cfg.validate(); err != nil {
				t.Fatal(err)
			}
			if cfg.HandoffHoldBytes != c.wantHold || cfg.AdoptHoldBytes != c.wantAdopt {
				t.Fatalf("hold bytes %d, adopt hold bytes %d; want %d, %d", cfg.HandoffHoldBytes, cfg.AdoptHoldBytes, c.wantHold, c.wantAdopt)
			}
		})
	}
}
