package e2e

import (
	"bufio"
	"fmt"
	"github.com/imq-dev/imq/launch/launchtest"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// TestReadmeCommands: every `imq ...` command in the README's sh blocks
// names a real subcommand and only flags that subcommand has (checked
// against its --help), keeps secrets off the command line, and the Go
// version the README asks for is go.mod's.
func TestReadmeCommands(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	cmds := readmeCommands(string(readme))
	if len(cmds) < 15 {
		t.Fatalf("found %d imq commands in the README's sh blocks; the extraction is broken", len(cmds))
	}
	helps := map[string]helpFlags{}
	secrets := 0
	for _, line := range cmds {
		key := subcommand(line)
		flags, ok := helps[key]
		if !ok {
			if flags, err = subcommandFlags(t, key); err != nil {
				t.Errorf("README: %v", err)
				continue
			}
			helps[key] = flags
			for _, secret := range flags {
				if secret {
					secrets++
				}
			}
		}
		for _, p := range checkCommand(line, flags) {
			t.Errorf("README: %s", p)
		}
	}
	if secrets == 0 {
		t.Fatalf("no secret flag found in the --help of %d subcommands; the extraction is broken", len(helps))
	}

	mod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(mod)
	if m == nil {
		t.Fatal("go.mod has no go directive")
	}
	if want := "With Go " + string(m[1]) + " or later"; !strings.Contains(string(readme), want) {
		t.Errorf("the README's set-up does not say %q, go.mod's version", want)
	}
}

// TestReadmeCheckRefusesSecrets: the README check finds a secret flag
// given a value on the command line, for every subcommand's secret flags
// as their --help marks them (a new one is covered without editing this
// test), and accepts their file forms.
func TestReadmeCheckRefusesSecrets(t *testing.T) {
	for _, tc := range []struct {
		line string
		want string // "" for none
	}{
		{`imq loadtest --secret "$SECRET"`, "puts --secret on the command line"},
		{`imq loadtest --url ws://127.0.0.1:8080/ws --secret="$SECRET"`, "puts --secret on the command line"},
		{`imq gateway --jwt-secret "$JWT_SECRET" --join 127.0.0.1:7946`, "puts --jwt-secret on the command line"},
		{`imq gateway --cluster-key "$KEY"`, "puts --cluster-key on the command line"},
		{`imq gateway --gossip-key "$KEY"`, "puts --gossip-key on the command line"},
		{`imq cluster --api-key "$KEY methods=publish"`, "puts --api-key on the command line"},
		{`imq sub /room/1 --token "$TOKEN"`, "puts --token on the command line"},
		{`imq state get /room/1 --token "$TOKEN"`, "puts --token on the command line"},
		{`imq loadtest --secret-file secret.txt`, ""},
		{`imq sub /room/1 --token-file token.jwt`, ""},
		{`imq gateway --bogus 1`, "has no flag --bogus"},
	} {
		flags, err := subcommandFlags(t, subcommand(tc.line))
		if err != nil {
			t.Fatal(err)
		}
		problems := strings.Join(checkCommand(tc.line, flags), "\n")
		if (tc.want == "") != (problems == "") || !strings.Contains(problems, tc.want) {
			t.Errorf("`%s`: problems %q, want %q", tc.line, problems, tc.want)
		}
	}
}

// helpFlags are a subcommand's flags as its --help lists them, each with
// whether it is a secret flag.
type helpFlags map[string]bool

// helpFlag is one flag of --help (cmd/imq/flags.go newFlagSet): "  --NAME
// [IMQ_NAME]" and its usage on the next line. A secret flag's usage says
// "Secret: prefer IMQ_NAME or --NAME-file" (registerSecretFiles).
var helpFlag = regexp.MustCompile(`(?m)^  --(\S+)  \[IMQ_\w+\]\n      (.*)$`)

// subcommand returns the subcommand a README command line runs: "loadtest",
// or "state get" for imq state's.
func subcommand(line string) string {
	words := shellWords(line)
	if len(words) < 2 {
		return ""
	}
	if words[1] == "state" && len(words) > 2 {
		return "state " + words[2]
	}
	return words[1]
}

// subcommandFlags runs imq SUB --help and returns its flags.
func subcommandFlags(t *testing.T, sub string) (helpFlags, error) {
	t.Helper()
	out, err := exec.Command(launchtest.Binary(t), append(strings.Fields(sub), "--help")...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("imq %s --help: %v\n%s", sub, err, out)
	}
	flags := helpFlags{}
	for _, m := range helpFlag.FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = strings.Contains(m[2], "Secret: prefer "+envVar(m[1])+" or --"+m[1]+"-file")
	}
	return flags, nil
}

// envVar is a flag's environment variable: --jwt-secret is IMQ_JWT_SECRET.
func envVar(flag string) string {
	return "IMQ_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// checkCommand returns what is wrong with one README command line: a flag
// its subcommand does not have, or a secret flag given on the command line.
func checkCommand(line string, flags helpFlags) []string {
	var out []string
	for _, w := range shellWords(line)[2:] {
		if !strings.HasPrefix(w, "--") || w == "--" {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimPrefix(w, "--"), "=")
		secret, ok := flags[name]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("`%s`: imq %s has no flag --%s", line, subcommand(line), name))
		case secret:
			out = append(out, fmt.Sprintf("`%s` puts --%s on the command line; use --%s-file or its environment variable", line, name, name))
		}
	}
	return out
}

// readmeCommands returns the `imq ...` command lines of md's sh blocks,
// continuation lines joined and comments cut.
func readmeCommands(md string) []string {
	var out []string
	in, cont := false, ""
	sc := bufio.NewScanner(strings.NewReader(md))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "```sh"):
			in = true
			continue
		case strings.HasPrefix(line, "```"):
			in, cont = false, ""
			continue
		case !in:
			continue
		}
		line = cont + " " + strings.TrimSpace(line)
		if strings.HasSuffix(line, "\\") {
			cont = strings.TrimSuffix(line, "\\")
			continue
		}
		cont = ""
		line = strings.TrimSpace(cutComment(line))
		if strings.HasPrefix(line, "imq ") {
			out = append(out, line)
		}
	}
	return out
}

// cutComment drops a shell comment: a # at the start of a word, outside
// quotes.
func cutComment(line string) string {
	var quote rune
	for i, r := range line {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			}
		case r == '\'' || r == '"':
			quote = r
		case r == '#' && (i == 0 || line[i-1] == ' '):
			return line[:i]
		}
	}
	return line
}

// shellWords splits line into words as a shell would for these simple
// commands: on spaces, with quotes kept together and removed.
func shellWords(line string) []string {
	var words []string
	var cur strings.Builder
	var quote rune
	inWord := false
	for _, r := range line {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}
