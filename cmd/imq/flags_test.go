package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imq-dev/imq/gateway"
	"github.com/imq-dev/imq/internal/member"
	"github.com/imq-dev/imq/queuenode"
)

// secretFlagSet registers the three kinds of secret flag: a string, a
// validating flag.Value and a repeatable one.
func secretFlagSet(jwt *string, key *keyList, apiKeys *repeatFlag) *flag.FlagSet {
	fs := newFlagSet("test", "test")
	fs.SetOutput(new(bytes.Buffer))
	fs.StringVar(jwt, "jwt-secret", "", "HS256 secret")
	fs.Var(key, "cluster-key", "cluster key")
	fs.Var(apiKeys, "api-key", "admin RPC key")
	return fs
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestSecretFileForms: every secret flag has a --NAME-file form and an
// IMQ_NAME_FILE variable that read the file less one trailing newline.
func TestSecretFileForms(t *testing.T) {
	key := make([]byte, 32)
	key[0] = 7
	b64 := base64.StdEncoding.EncodeToString(key)
	jwtFile := writeFile(t, "jwt-secret-0123456789\n")
	keyFile := writeFile(t, b64+"\n")
	apiFile := writeFile(t, "key-one-0123456789 methods=publish\n\nkey-two-0123456789\r\n")

	t.Run("flags", func(t *testing.T) {
		var jwt string
		var gk keyList
		var api repeatFlag
		fs := secretFlagSet(&jwt, &gk, &api)
		if err := parse(fs, []string{"--jwt-secret-file", jwtFile, "--cluster-key-file", keyFile, "--api-key-file", apiFile}); err != nil {
			t.Fatal(err)
		}
		if jwt != "jwt-secret-0123456789" {
			t.Errorf("jwt secret %q", jwt)
		}
		if len(gk) != 1 || !bytes.Equal(gk[0], key) {
			t.Errorf("cluster key %x, want %x", gk, key)
		}
		if want := []string{"key-one-0123456789 methods=publish", "key-two-0123456789"}; strings.Join(api, "|") != strings.Join(want, "|") {
			t.Errorf("api keys %q, want %q", api, want)
		}
	})
	t.Run("environment", func(t *testing.T) {
		t.Setenv("IMQ_JWT_SECRET_FILE", jwtFile)
		t.Setenv("IMQ_CLUSTER_KEY_FILE", keyFile)
		t.Setenv("IMQ_API_KEY_FILE", apiFile)
		var jwt string
		var gk keyList
		var api repeatFlag
		if err := parse(secretFlagSet(&jwt, &gk, &api), nil); err != nil {
			t.Fatal(err)
		}
		if jwt != "jwt-secret-0123456789" || len(gk) != 1 || !bytes.Equal(gk[0], key) || len(api) != 2 {
			t.Errorf("got jwt %q, cluster key %x, api keys %q", jwt, gk, api)
		}
	})
	t.Run("the command line wins over the environment", func(t *testing.T) {
		t.Setenv("IMQ_JWT_SECRET", "from-the-environment")
		var jwt string
		if err := parse(secretFlagSet(&jwt, new(keyList), new(repeatFlag)), []string{"--jwt-secret-file", jwtFile}); err != nil {
			t.Fatal(err)
		}
		if jwt != "jwt-secret-0123456789" {
			t.Errorf("jwt secret %q, want the file's", jwt)
		}
	})
}

// TestSecretFileErrors: a missing or empty file, or a secret given twice,
// is refused with an error naming the flag; no error repeats a secret.
func TestSecretFileErrors(t *testing.T) {
	empty := writeFile(t, "\n")
	good := writeFile(t, "jwt-secret-0123456789")
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"missing file", []string{"--jwt-secret-file", "/nonexistent/secret"}, nil, "flag -jwt-secret-file: open /nonexistent/secret"},
		{"empty file", []string{"--jwt-secret-file", empty}, nil, "flag -jwt-secret-file: " + empty + " is empty"},
		{"empty key file", []string{"--api-key-file", empty}, nil, "flag -api-key-file: " + empty + " is empty"},
		{"both flags", []string{"--jwt-secret", "x-0123456789abcdef", "--jwt-secret-file", good}, nil, "give --jwt-secret or --jwt-secret-file, not both"},
		{"both variables", nil, map[string]string{"IMQ_JWT_SECRET": "x-0123456789abcdef", "IMQ_JWT_SECRET_FILE": good}, "set IMQ_JWT_SECRET or IMQ_JWT_SECRET_FILE, not both"},
		{"bad key in a variable", nil, map[string]string{"IMQ_CLUSTER_KEY": "s3cr3t-not-base64"}, "IMQ_CLUSTER_KEY: key 1: not base64"},
		{"bad key on the command line", []string{"--cluster-key", "s3cr3t-not-base64"}, nil, "--cluster-key: key 1: not base64"},
		{"bad key in a file", []string{"--cluster-key-file", writeFile(t, "s3cr3t-not-base64\n")}, nil, "--cluster-key-file "},
		{"empty flag", []string{"--jwt-secret", ""}, nil, "--jwt-secret is empty"},
		{"blank flag", []string{"--jwt-secret", " \n"}, nil, "--jwt-secret is empty"},
		{"empty key flag", []string{"--cluster-key", ""}, nil, "--cluster-key is empty"},
		{"empty repeatable flag", []string{"--api-key", "key-one-0123456789", "--api-key", ""}, nil, "--api-key is empty"},
		{"empty variable", nil, map[string]string{"IMQ_JWT_SECRET": ""}, "IMQ_JWT_SECRET is empty"},
		{"empty key variable", nil, map[string]string{"IMQ_CLUSTER_KEY": ""}, "IMQ_CLUSTER_KEY is empty"},
		{"empty api key variable", nil, map[string]string{"IMQ_API_KEY": ""}, "IMQ_API_KEY is empty"},
		{"empty file variable", nil, map[string]string{"IMQ_JWT_SECRET_FILE": empty}, empty + " is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var jwt string
			fs := secretFlagSet(&jwt, new(keyList), new(repeatFlag))
			var out bytes.Buffer
			fs.SetOutput(&out)
			err := parse(fs, tc.args)
			if err == nil {
				t.Fatalf("parse succeeded (jwt secret %q)", jwt)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to contain %q", err, tc.want)
			}
			if strings.Contains(err.Error()+out.String(), "s3cr3t") {
				t.Errorf("the error repeats the secret: %q %s", err, out.String())
			}
		})
	}
}

// TestSecretFlagHelp: --help lists every *-file form and says why to
// prefer it.
func TestSecretFlagHelp(t *testing.T) {
	fs := secretFlagSet(new(string), new(keyList), new(repeatFlag))
	var out bytes.Buffer
	fs.SetOutput(&out)
	if err := parse(fs, []string{"--help"}); err != flag.ErrHelp {
		t.Fatalf("parse --help: %v", err)
	}
	for _, want := range []string{
		"--jwt-secret-file  [IMQ_JWT_SECRET_FILE]",
		"--cluster-key-file  [IMQ_CLUSTER_KEY_FILE]",
		"--api-key-file  [IMQ_API_KEY_FILE]",
		"Secret: prefer IMQ_JWT_SECRET or --jwt-secret-file; a value on the command line is visible to other users in ps",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("--help lacks %q:\n%s", want, out.String())
		}
	}
}

// TestHelpDefaults: --help says each default once: not "(default false)"
// for a boolean off by default, nor a second "(default X)" after a usage
// that already names its default; other defaults are shown.
func TestHelpDefaults(t *testing.T) {
	fs := newFlagSet("test", "test")
	var out bytes.Buffer
	fs.SetOutput(&out)
	fs.Bool("off", false, "a boolean off by default")
	fs.Bool("on", true, "a boolean on by default")
	fs.Bool("said", false, "accept tokens without exp (default: exp required)")
	fs.Int("said-int", 3, "retries (default: three)")
	fs.Duration("interval", time.Second, "how often")
	fs.Int("zero", 0, "limit (0: none)")
	if err := parse(fs, []string{"--help"}); err != flag.ErrHelp {
		t.Fatalf("parse --help: %v", err)
	}
	help := out.String()
	for _, want := range []string{
		"a boolean off by default\n", "a boolean on by default (default true)\n",
		"(default: exp required)\n", "retries (default: three)\n", "how often (default 1s)\n", "limit (0: none) (default 0)\n",
	} {
		if !strings.Contains(help, want) {
			t.Errorf("--help lacks %q:\n%s", want, help)
		}
	}
}

// TestProbeIntervalFlagAlone: --probe-interval shorter than the default
// probe timeout works alone (imq cluster -- --probe-interval 200ms); with
// an explicit --probe-timeout not shorter, it is refused.
func TestProbeIntervalFlagAlone(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // "" for valid
	}{
		{[]string{"--probe-interval", "200ms"}, ""},
		{[]string{"--probe-interval", "200ms", "--probe-timeout", "100ms"}, ""},
		{[]string{"--probe-interval", "200ms", "--probe-timeout", "500ms"}, "probe timeout (500ms) must be shorter than the probe interval (200ms)"},
	} {
		fs := newFlagSet("test", "test")
		cfg := member.DefaultConfig()
		memberFlags(fs, &cfg, "127.0.0.1:0", nil)
		if err := parse(fs, tc.args); err != nil {
			t.Fatal(err)
		}
		err := cfg.Validate()
		if (tc.want == "" && err != nil) || (tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want))) {
			t.Errorf("%q: %v, want %q", tc.args, err, tc.want)
		}
	}
}

// TestAPIKeySources: --api-key is one secret flag with every source of
// one: --api-key (repeatable), --api-key-file (one per line), IMQ_API_KEY,
// IMQ_API_KEY_FILE, and its list variable IMQ_API_KEYS (newlines or ';'),
// which adds to the others. Every key is checked while parsing, and a bad
// one is named by its source, never by its text.
func TestAPIKeySources(t *testing.T) {
	const k1, k2, k3, k4 = "key-one-0123456789", "key-two-0123456789", "key-three-0123456789", "key-four-0123456789"
	parseKeys := func(t *testing.T, args []string, env map[string]string) (gateway.Config, error) {
		t.Helper()
		for k, v := range env {
			t.Setenv(k, v)
		}
		fs := newFlagSet("test", "test")
		fs.SetOutput(new(bytes.Buffer))
		var rf rpcFlags
		var cfg gateway.Config
		rf.register(fs, &cfg)
		if err := parse(fs, args); err != nil {
			return cfg, err
		}
		rf.apply(&cfg)
		return cfg, nil
	}
	secrets := func(keys []gateway.APIKey) string {
		var out []string
		for _, k := range keys {
			out = append(out, k.Secret)
		}
		return strings.Join(out, " ")
	}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string // the keys' secrets, in order
	}{
		{"flags", []string{"--api-key", k1, "--api-key", k2 + " methods=publish"}, nil, k1 + " " + k2},
		{"file", []string{"--api-key-file", writeFile(t, k1+"\n\n"+k2+" prefixes=/room/\n")}, nil, k1 + " " + k2},
		{"variable", nil, map[string]string{"IMQ_API_KEY": k1}, k1},
		{"list variable", nil, map[string]string{"IMQ_API_KEYS": k1 + ";" + k2 + " methods=publish\n" + k3 + "\n"}, k1 + " " + k2 + " " + k3},
		{"list variable adds to the flags", []string{"--api-key", k4}, map[string]string{"IMQ_API_KEYS": k1 + ";" + k2}, k4 + " " + k1 + " " + k2},
		{"list variable adds to the variable", nil, map[string]string{"IMQ_API_KEY": k4, "IMQ_API_KEYS": k1}, k4 + " " + k1},
		{"the command line wins over IMQ_API_KEY", []string{"--api-key", k1}, map[string]string{"IMQ_API_KEY": k4}, k1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := parseKeys(t, tc.args, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			if got := secrets(cfg.APIKeys); got != tc.want {
				t.Errorf("keys %q, want %q", got, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"short key", []string{"--api-key", "s3cr3t"}, nil, "--api-key: the secret is 6 bytes"},
		{"bad option", []string{"--api-key", k1 + "s3cr3t methods=nope"}, nil, `--api-key: unknown method "nope"`},
		{"bad key in a file", []string{"--api-key-file", writeFile(t, k1+"\ns3cr3t\n")}, nil, "--api-key-file "},
		{"bad key in the variable", nil, map[string]string{"IMQ_API_KEY": "s3cr3t"}, "IMQ_API_KEY: the secret is 6 bytes"},
		{"bad key in the list", nil, map[string]string{"IMQ_API_KEYS": k1 + ";s3cr3t"}, "IMQ_API_KEYS: API key 2: the secret is 6 bytes"},
		{"empty list", nil, map[string]string{"IMQ_API_KEYS": ""}, "IMQ_API_KEYS is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseKeys(t, tc.args, tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "s3cr3t") {
				t.Errorf("the error repeats the secret: %v", err)
			}
		})
	}
}

// TestAPIKeySpecsRoundTrip: imq cluster passes its keys to the gateways as
// specs in IMQ_API_KEYS; the gateways read back the same keys.
func TestAPIKeySpecsRoundTrip(t *testing.T) {
	var keys apiKeysFlag
	for _, spec := range []string{"key-one-0123456789", "key-two-0123456789 methods=publish,get_state prefixes=/room/,/lobby/", "key-three-0123456789 prefixes=/user/"} {
		if err := keys.Set(spec); err != nil {
			t.Fatal(err)
		}
	}
	specs, err := keys.specs()
	if err != nil {
		t.Fatal(err)
	}
	back, err := gateway.ParseAPIKeys(strings.Join(specs, "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprintf("%#v", back) != fmt.Sprintf("%#v", []gateway.APIKey(keys)) {
		t.Errorf("read back %#v, want %#v", back, keys)
	}
	if err := keys.Set("key;with-a-semicolon-0123456789"); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.specs(); err == nil || strings.Contains(err.Error(), "semicolon") {
		t.Errorf("a key with ';' (which IMQ_API_KEYS would split): %v, want an error without the key", err)
	}
}

// TestClusterChecksAPIKeysFirst: imq cluster refuses a bad API key before
// it starts anything (no boss data directory is made), naming its source.
func TestClusterChecksAPIKeysFirst(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  string
		want string
	}{
		{[]string{"--api-key", "s3cr3t"}, "", "--api-key: the secret is 6 bytes"},
		{nil, "key-one-0123456789;s3cr3t", "IMQ_API_KEYS: API key 2: the secret is 6 bytes"},
	} {
		dir := t.TempDir()
		if tc.env != "" {
			t.Setenv("IMQ_API_KEYS", tc.env)
		}
		err := runCluster(append([]string{"--dir", dir}, tc.args...))
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "s3cr3t") {
			t.Errorf("imq cluster %q (IMQ_API_KEYS %q): %v, want an error with %q", tc.args, tc.env, err, tc.want)
		}
		if entries, _ := os.ReadDir(dir); len(entries) > 0 {
			t.Errorf("imq cluster %q started something before refusing the key: %s holds %v", tc.args, dir, entries)
		}
	}
}

// TestUsageListsSecretFlags: imq --help lists every secret flag, those of
// imq loadtest and the client commands included, from secretNames.
func TestUsageListsSecretFlags(t *testing.T) {
	for _, want := range []string{"  --api-key\n", "  --cluster-key (imq boss, queuenode, gateway)\n", "  --jwt-secret\n", "  --secret (imq loadtest)\n", "  --token (imq sub, pub, state)\n"} {
		if !strings.Contains(usage, want) {
			t.Errorf("imq --help lacks %q:\n%s", want, usage)
		}
	}
	for name := range secretNames {
		if !strings.Contains(usage, "  --"+name) {
			t.Errorf("imq --help does not list the secret flag --%s", name)
		}
	}
}

// TestClusterKeyFlags: --cluster-key takes one key or a list (commas,
// newlines, a file one a line), primary first, from every secret source;
// --gossip-key is its deprecated name; without a key a member refuses to
// start unless --insecure says so.
func TestClusterKeyFlags(t *testing.T) {
	k := func(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }
	b64 := func(b byte) string { return base64.StdEncoding.EncodeToString(k(b)) }
	k16 := base64.StdEncoding.EncodeToString(make([]byte, 16))
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want [][]byte // nil with an error or --insecure
		err  []string // the error contains each
	}{
		{"one key", []string{"--cluster-key", b64(1)}, nil, [][]byte{k(1)}, nil},
		{"a list, primary first", []string{"--cluster-key", b64(2) + ", " + b64(1)}, nil, [][]byte{k(2), k(1)}, nil},
		{"keys of 16 and 32 bytes", []string{"--cluster-key", k16 + "," + b64(1)}, nil, [][]byte{make([]byte, 16), k(1)}, nil},
		{"the variable, one a line", nil, map[string]string{"IMQ_CLUSTER_KEY": b64(2) + "\n" + b64(1) + "\n"}, [][]byte{k(2), k(1)}, nil},
		{"a file, one a line", []string{"--cluster-key-file", writeFile(t, b64(3)+"\r\n\n"+b64(2)+"\n"+b64(1)+"\n")}, nil, [][]byte{k(3), k(2), k(1)}, nil},
		{"the file variable", nil, map[string]string{"IMQ_CLUSTER_KEY_FILE": writeFile(t, b64(1)+"\n")}, [][]byte{k(1)}, nil},
		{"the deprecated name", []string{"--gossip-key", b64(1)}, nil, [][]byte{k(1)}, nil},
		{"the deprecated variable", nil, map[string]string{"IMQ_GOSSIP_KEY": b64(1)}, [][]byte{k(1)}, nil},
		{"both names, the same keys", []string{"--cluster-key", b64(1)}, map[string]string{"IMQ_GOSSIP_KEY": b64(1)}, [][]byte{k(1)}, nil},
		{"both names, different keys", []string{"--cluster-key", b64(1)}, map[string]string{"IMQ_GOSSIP_KEY": b64(2)}, nil,
			[]string{"give --cluster-key or its deprecated name --gossip-key, not both"}},
		{"no key", nil, nil, nil, []string{"no cluster key", "IMQ_CLUSTER_KEY", "--cluster-key-file", "head -c 32 /dev/urandom | base64", "--insecure"}},
		{"--insecure", []string{"--insecure"}, nil, nil, nil},
		{"IMQ_INSECURE", nil, map[string]string{"IMQ_INSECURE": "true"}, nil, nil},
		{"--insecure and a key", []string{"--insecure"}, map[string]string{"IMQ_CLUSTER_KEY": b64(1)}, nil, []string{"give a cluster key or --insecure, not both"}},
		{"a short key in the list", []string{"--cluster-key", b64(1) + ",c2hvcnQ="}, nil, nil, []string{"--cluster-key: key 2 is 5 bytes; want 16, 24 or 32"}},
		{"a bad key in the list", nil, map[string]string{"IMQ_CLUSTER_KEY": b64(1) + ",s3cr3t!"}, nil, []string{"IMQ_CLUSTER_KEY: key 2: not base64"}},
		{"only separators", []string{"--cluster-key", " , \n"}, nil, nil, []string{"--cluster-key: holds no key"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, v := range []string{"IMQ_CLUSTER_KEY", "IMQ_CLUSTER_KEY_FILE", "IMQ_GOSSIP_KEY", "IMQ_GOSSIP_KEY_FILE", "IMQ_INSECURE"} {
				t.Setenv(v, "") // restored after the test
				os.Unsetenv(v)
			}
			for name, v := range tc.env {
				t.Setenv(name, v)
			}
			fs := newFlagSet("test", "test")
			fs.SetOutput(new(bytes.Buffer))
			var kf clusterKeyFlags
			kf.register(fs)
			var keys [][]byte
			err := parse(fs, tc.args)
			if err == nil {
				keys, err = kf.clusterKeys()
			}
			if len(tc.err) > 0 {
				if err == nil {
					t.Fatalf("accepted: %d keys", len(keys))
				}
				for _, want := range tc.err {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error %q, want it to contain %q", err, want)
					}
				}
				if strings.Contains(err.Error(), "s3cr3t") {
					t.Errorf("the error repeats the key: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.EqualFunc(keys, tc.want, bytes.Equal) {
				t.Errorf("keys %x, want %x", keys, tc.want)
			}
		})
	}
}

// TestMembersRefuseToStartWithoutKey: imq boss, queuenode and gateway
// without a cluster key and without --insecure return the error that
// names the flags (main prints it and exits 1), before binding anything.
func TestMembersRefuseToStartWithoutKey(t *testing.T) {
	for _, v := range []string{"IMQ_CLUSTER_KEY", "IMQ_CLUSTER_KEY_FILE", "IMQ_GOSSIP_KEY", "IMQ_GOSSIP_KEY_FILE", "IMQ_INSECURE"} {
		t.Setenv(v, "")
		os.Unsetenv(v)
	}
	any0 := "127.0.0.1:0"
	for name, run := range map[string]func() error{
		"boss": func() error { return runBoss([]string{"--addr", any0, "--gossip-addr", any0}) },
		"queuenode": func() error {
			return runQueueNode([]string{"--link-addr", any0, "--internal-addr", any0, "--gossip-addr", any0, "--join", "127.0.0.1:1"})
		},
		"standalone queuenode": func() error { return runQueueNode([]string{"--link-addr", any0, "--internal-addr", any0}) },
		"gateway": func() error {
			return runGateway([]string{"--addr", any0, "--internal-addr", any0, "--gossip-addr", any0, "--join", "127.0.0.1:1"})
		},
		"standalone gateway": func() error {
			return runGateway([]string{"--addr", any0, "--internal-addr", any0, "--queuenode", "127.0.0.1:1"})
		},
	} {
		err := run()
		if err == nil || !strings.Contains(err.Error(), "no cluster key") || !strings.Contains(err.Error(), "--insecure") {
			t.Errorf("imq %s without a key: %v, want the no cluster key error", name, err)
		}
	}
}

// TestHandoffFlags: the hand-off flags reach the queue node's Config; the
// byte bounds left unset stay 0, for the node to derive from --link-buffer
// and --max-payload (so lowering the one or raising the other alone still
// starts a node), and one set past --link-buffer is refused with a message
// naming the bound.
func TestHandoffFlags(t *testing.T) {
	for _, tc := range []struct {
		args                []string
		wantHold, wantAdopt int
		wantErr             string
	}{
		{nil, 0, 0, ""},
		{[]string{"--link-buffer", "4194304"}, 0, 0, ""},
		{[]string{"--max-payload", "8388608"}, 0, 0, ""},
		{[]string{"--handoff-hold-bytes", "1048576", "--adopt-hold-bytes", "2097152"}, 1 << 20, 2 << 20, ""},
		{[]string{"--link-buffer", "4194304", "--adopt-hold-bytes", "8388608"}, 0, 8 << 20, "adopt hold bytes (8388608) must not exceed the link buffer"},
	} {
		fs := newFlagSet("test", "test")
		cfg := queuenode.DefaultConfig()
		nodeFlags(fs, &cfg)
		clusterNodeFlags(fs, &cfg)
		if err := parse(fs, append([]string{"--link-addr", "127.0.0.1:0", "--handoff-timeout", "7s", "--adopt-hold-time", "3s",
			"--max-link-handshakes", "100", "--max-link-handshakes-per-addr", "5"}, tc.args...)); err != nil {
			t.Fatal(err)
		}
		if cfg.MaxLinkHandshakes != 100 || cfg.MaxLinkHandshakesPerAddr != 5 {
			t.Errorf("%q: link handshakes %d, %d per address; want 100, 5", tc.args, cfg.MaxLinkHandshakes, cfg.MaxLinkHandshakesPerAddr)
		}
		if cfg.HandoffHoldBytes != tc.wantHold || cfg.AdoptHoldBytes != tc.wantAdopt || cfg.HandoffTimeout != 7*time.Second || cfg.AdoptHoldTime != 3*time.Second {
			t.Errorf("%q: hold %d, adopt hold %d, timeout %s, adopt hold time %s; want %d, %d, 7s, 3s",
				tc.args, cfg.HandoffHoldBytes, cfg.AdoptHoldBytes, cfg.HandoffTimeout, cfg.AdoptHoldTime, tc.wantHold, tc.wantAdopt)
		}
		n, err := queuenode.New(cfg)
		if err == nil {
			n.Shutdown(context.Background())
		}
		if (tc.wantErr == "" && err != nil) || (tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr))) {
			t.Errorf("%q: %v, want %q", tc.args, err, tc.wantErr)
		}
	}
}

// TestOperatorKeys: --operator-key holds one key or a rotation list
// (commas or lines), blanks dropped; imq drain presents the first.
func TestOperatorKeys(t *testing.T) {
	for in, want := range map[string][]string{
		"":                                       nil,
		"only-one-key-of-16":                     {"only-one-key-of-16"},
		"new-key-0123456789, old-key-0123456789": {"new-key-0123456789", "old-key-0123456789"},
		"new-key-0123456789\nold-key-0123456789\n\n": {"new-key-0123456789", "old-key-0123456789"},
	} {
		var got []string
		for _, k := range operatorKeys(in) {
			got = append(got, string(k))
		}
		if !slices.Equal(got, want) {
			t.Errorf("operatorKeys(%q) = %q, want %q", in, got, want)
		}
	}
}
