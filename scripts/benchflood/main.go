// Command benchflood measures what one user's flood costs a queue node: it
// starts `imq dev` (the binary given), reads the process's RSS, publishes
// -n messages of -size bytes as one user, each into a fresh queue, and
// reads the RSS again. It is the figure of BENCHMARKS.md, "Memory under a
// one-user flood":
//
//	go build -o bin/imq ./cmd/imq
//	go run ./scripts/benchflood -imq bin/imq [-- extra imq dev flags]
//
// Everything runs on 127.0.0.1 and stops after -n publishes.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/imq-dev/imq/client"
)

func main() {
	bin := flag.String("imq", "bin/imq", "the imq binary")
	n := flag.Int("n", 1600, "messages to publish, each into a fresh queue")
	size := flag.Int("size", 60_000, "payload bytes")
	settle := flag.Duration("settle", 3*time.Second, "wait before each RSS reading")
	flag.Parse()
	if err := run(*bin, *n, *size, *settle, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "benchflood:", err)
		os.Exit(1)
	}
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func rssKiB(pid int) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", errors.New("no VmRSS")
}

// metric returns the lines of /metrics that start with name.
func metric(addr, name string) string {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out []string
	for l := range strings.Lines(string(b)) {
		if strings.HasPrefix(l, name) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return strings.Join(out, "; ")
}

func run(bin string, n, size int, settle time.Duration, extra []string) error {
	addr, err := freePort()
	if err != nil {
		return err
	}
	internal, err := freePort() // where imq dev serves every service's /metrics
	if err != nil {
		return err
	}
	args := append([]string{"dev", "--addr", addr, "--internal-addr", internal, "--boss-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0", "--log-level", "warn"}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			return errors.New("imq dev did not become healthy")
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(settle)
	before, err := rssKiB(cmd.Process.Pid)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := client.Dial(ctx, "ws://"+addr+"/ws", client.WithUser("flooder"))
	if err != nil {
		return err
	}
	defer c.Close()
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = 'a' + byte(i%26)
	}
	start := time.Now()
	codes := map[string]int{}
	for i := range n {
		_, err := c.Publish(ctx, fmt.Sprintf("/flood/%d", i), "chat", payload)
		var ce *client.Error
		switch {
		case err == nil:
			codes["OK"]++
		case errors.As(err, &ce):
			codes[ce.Code.String()]++
		default:
			return err
		}
	}
	took := time.Since(start)
	time.Sleep(settle)
	after, err := rssKiB(cmd.Process.Pid)
	if err != nil {
		return err
	}
	fmt.Printf("imq dev %s\n", strings.Join(extra, " "))
	fmt.Printf("  %d publishes of %d bytes into fresh queues in %s: %v\n", n, size, took.Round(time.Millisecond), codes)
	fmt.Printf("  RSS before %s, after %s\n", before, after)
	fmt.Printf("  %s\n  %s\n", metric(internal, "imq_queuenode_budget_used_bytes "), metric(internal, "imq_queuenode_queues "))
	return nil
}
