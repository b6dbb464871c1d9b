package e2e

import (
	"bufio"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// secretFlags are the flags whose values are secrets: a README command
// must give them as --NAME-file or in the environment, never as a value on
// the command line, which every user of the machine can read.
var secretFlags = map[string]bool{"jwt-secret": true, "api-key": true, "gossip-key": true, "secret": true, "token": true}

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
	helps := map[string]string{}
	for _, line := range cmds {
		words := shellWords(line)
		sub := []string{words[1]}
		if words[1] == "state" && len(words) > 2 {
			sub = append(sub, words[2])
		}
		key := strings.Join(sub, " ")
		help, ok := helps[key]
		if !ok {
			out, err := exec.Command(imqBinary(t), append(sub, "--help")...).CombinedOutput()
			if err != nil {
				t.Errorf("README: imq %s --help: %v\n%s", key, err, out)
				continue
			}
			help, helps[key] = string(out), string(out)
		}
		for _, w := range words[2:] {
			if !strings.HasPrefix(w, "--") || w == "--" {
				continue
			}
			name, _, _ := strings.Cut(strings.TrimPrefix(w, "--"), "=")
			if !strings.Contains(help, "--"+name+"  [") {
				t.Errorf("README: `%s`: imq %s has no flag --%s", line, key, name)
			}
			if secretFlags[name] {
				t.Errorf("README: `%s` puts --%s on the command line; use --%s-file or its environment variable", line, name, name)
			}
		}
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
