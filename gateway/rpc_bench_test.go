package gateway_test

import (
	"bytes"
	"io"
	"net/http"
	"testing"
)

// BenchmarkRPCPublish is one admin RPC publish over HTTP with keep-alive,
// as a PHP backend would send it: key check, strict decoding, routing to the
// node and back, the JSON answer. Parallel runs 8 callers at once.
func BenchmarkRPCPublish(b *testing.B) {
	d := startRPC(b, nil)
	url := "http://" + d.Gateway.Addr() + "/rpc/v1/publish"
	body := []byte(`{"queue":"/room/bench","mount":"chat","data":{"text":"hello from the backend"}}`)
	call := func(c *http.Client) {
		req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
		req.Header.Set("Content-Type", "application/json")
		resp, err := c.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
	b.Run("serial", func(b *testing.B) {
		c := &http.Client{}
		b.ReportAllocs()
		for b.Loop() {
			call(c)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetParallelism(4) // 8 callers on 2 cores
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			for pb.Next() {
				call(c)
			}
		})
	})
}
