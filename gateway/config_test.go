package gateway_test

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	imqpb "github.com/imq-dev/imq/proto"
)

// TestConfigBounds: values that would crash the gateway (a ticker of
// non-positive interval), wrap a sum or a conversion around (refusing
// every client), or leave it verifying no token are refused at New with
// an error naming the setting.
func TestConfigBounds(t *testing.T) {
	for _, c := range []struct {
		name string
		mod  func(*gateway.Config)
		err  string
	}{
		{"link ping 1ns", func(c *gateway.Config) { c.LinkPingInterval = time.Nanosecond }, "link ping interval must be at least 10ms"},
		{"link ping 15ms", func(c *gateway.Config) { c.LinkPingInterval = 15 * time.Millisecond }, ""},
		{"ping 1ns", func(c *gateway.Config) { c.PingInterval = time.Nanosecond }, "ping interval must be at least 10ms"},
		{"JWKS refresh 1ns", func(c *gateway.Config) { c.JWKSRefresh = time.Nanosecond }, "JWKS refresh must be at least 10ms"},
		{"JWKS refetch 1ns", func(c *gateway.Config) { c.JWKSMinRefetch = time.Nanosecond }, "JWKS minimum refetch interval must be at least 10ms"},
		{"ping 1000h", func(c *gateway.Config) { c.PingInterval, c.ClientTimeout = 1000*time.Hour, 2000*time.Hour }, "ping interval must be at most 24h0m0s"},
		{"max pending MaxInt", func(c *gateway.Config) { c.MaxPending = math.MaxInt }, "max pending must be at most"},
		{"max connections MaxInt", func(c *gateway.Config) { c.MaxConnections = math.MaxInt }, "max connections must be at most"},
		{"max inflight 2^31", func(c *gateway.Config) { c.MaxInflight = 1 << 31 }, "max inflight must be at most"},
		{"max subscriptions MaxInt", func(c *gateway.Config) { c.MaxSubscriptions = math.MaxInt }, "max subscriptions must be at most"},
		{"auth call-out concurrency MaxInt", func(c *gateway.Config) { c.AuthCalloutConcurrency = math.MaxInt }, "auth call-out concurrency must be at most"},
		{"max payload MaxInt", func(c *gateway.Config) { c.MaxPayload = math.MaxInt }, "max payload must be at most"},
		{"empty PEM", func(c *gateway.Config) { c.JWTPublicKeys = []byte{} }, "no PEM block"},
		{"shutdown spread -1s", func(c *gateway.Config) { c.ShutdownSpread = -time.Second }, "shutdown spread must not be negative"},
		{"shutdown spread 0", func(c *gateway.Config) { c.ShutdownSpread = 0 }, ""},
		{"PEM of no key", func(c *gateway.Config) { c.JWTPublicKeys = []byte("\n# nothing here\n") }, "no PEM block"},
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
				t.Fatalf("got %v; want an error saying %q", err, c.err)
			}
		})
	}
}

// TestLimitsAtTheirBounds: the largest accepted limits leave the gateway
// working: a client connects, joins and publishes (nothing computed from
// them wrapped around).
func TestLimitsAtTheirBounds(t *testing.T) {
	d := startDev(t, func(c *gateway.Config) {
		c.MaxConnections, c.MaxPending = 1<<24, 1<<24
		c.MaxInflight, c.MaxSubscriptions = 1<<20, 1<<20
	})
	c := dialGateway(t, d.Gateway, "alice")
	expectCode(t, c.join("/room/bounds", chat()), imqpb.Code_OK)
	expectCode(t, c.publish("/room/bounds", "chat", []byte(`1`)), imqpb.Code_OK)
}
