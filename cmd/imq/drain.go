package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/imq-dev/imq/boss"
)

// runDrain is imq drain NODE and imq undrain NODE: it asks the boss to take
// the node out of (or put it back in) the bucket layout, says what the boss
// did, and with --wait follows the node's buckets until it is done.
func runDrain(cmd string, args []string) error {
	drain := cmd == "drain"
	summary := `Asks the boss to drain queue node NODE: every bucket it owns moves to
other nodes (by hand-off when the boss runs with --handoff, at once
otherwise); once it holds none it can be stopped. The node stays drained,
across restarts of the boss, until 'imq undrain NODE'.`
	if !drain {
		summary = `Asks the boss to undrain queue node NODE: it is back in the bucket layout
and buckets move to it again as the table rebalances.`
	}
	fs := newFlagSet(cmd+" NODE", summary+`

The operator key (the boss's --operator-key) comes from IMQ_OPERATOR_KEY,
IMQ_OPERATOR_KEY_FILE or --operator-key-file, never from the command line.`)
	bossURL := fs.String("boss", "http://127.0.0.1:7900", "URL of the boss's API (its --addr)")
	var key string
	fs.StringVar(&key, "operator-key", "", "operator key of the boss; not accepted on the command line of this command")
	wait := fs.Bool("wait", false, "follow the node, printing progress, until it holds no buckets (drain) or has buckets and none moving in (undrain)")
	timeout := fs.Duration("timeout", 10*time.Minute, "with --wait: give up waiting after this long (the drain goes on)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	onArgv := false
	fs.Visit(func(f *flag.Flag) { onArgv = onArgv || f.Name == "operator-key" })
	switch {
	case onArgv:
		return errors.New("the operator key is not taken from the command line, where other users see it in ps: set IMQ_OPERATOR_KEY or use --operator-key-file")
	case len(pos) != 1:
		return fmt.Errorf("usage: imq %s [flags] NODE (one queue node id)", cmd)
	case len(operatorKeys(key)) == 0:
		return errors.New("no operator key: set IMQ_OPERATOR_KEY or use --operator-key-file (the boss's --operator-key)")
	}
	key = string(operatorKeys(key)[0]) // of a rotation list, the first
	node, base := pos[0], strings.TrimRight(*bossURL, "/")
	ctx, stop := signalContext()
	defer stop()

	var dv boss.DrainView
	if err := bossCall(ctx, http.MethodPost, base+"/v1/nodes/"+node+"/"+cmd, key, &dv); err != nil {
		return fmt.Errorf("%s %s: %w", cmd, node, err)
	}
	fmt.Printf("%s (table v%d: %d buckets, %d moving away, %d moving in)\n", dv.Message, dv.TableVersion, dv.Buckets, dv.MovingOut, dv.MovingIn)
	if !*wait {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	last := ""
	for {
		var nv boss.NodesView
		if err := bossCall(ctx, http.MethodGet, base+"/v1/nodes", "", &nv); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("stopped waiting for %s after %s; the boss goes on (see GET /v1/nodes)", node, *timeout)
			}
			fmt.Fprintf(os.Stderr, "imq: %v; retrying\n", err)
		} else {
			n, ok := findNode(nv, node)
			line := fmt.Sprintf("%s: %d buckets, %d moving away, %d moving in (table v%d, %d moves in progress cluster-wide)",
				node, n.buckets, n.out, n.in, nv.TableVersion, len(nv.Moving))
			if line != last {
				fmt.Println(line)
				last = line
			}
			switch {
			case drain && (!ok || n.buckets == 0 && n.in == 0 && n.out == 0):
				fmt.Printf("%s is drained: it holds no buckets and can be stopped\n", node)
				return nil
			case !drain && ok && n.buckets > 0 && n.in == 0:
				fmt.Printf("%s is serving again: %d buckets\n", node, n.buckets)
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stopped waiting for %s; the boss goes on (see GET /v1/nodes)", node)
		case <-time.After(time.Second):
		}
	}
}

type nodeBuckets struct{ buckets, out, in int }

// findNode returns id's buckets in nv; ok is false when the boss lists no
// queue node id.
func findNode(nv boss.NodesView, id string) (n nodeBuckets, ok bool) {
	for _, m := range nv.Members {
		if m.ID != id || m.Buckets == nil || m.Status == boss.StatusSuperseded {
			continue
		}
		return nodeBuckets{*m.Buckets, m.MovingOut, m.MovingIn}, true
	}
	return n, false
}

// bossCall sends a request to the boss's API with the operator key (when
// given) and decodes a 200's JSON into out; any other answer is an error
// carrying the boss's message.
func bossCall(ctx context.Context, method, url, key string, out any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return err
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error.Message != "" {
			return fmt.Errorf("the boss answered %s: %s", resp.Status, e.Error.Message)
		}
		return fmt.Errorf("the boss answered %s: %s", resp.Status, bytes.TrimSpace(body))
	}
	return json.Unmarshal(body, out)
}
