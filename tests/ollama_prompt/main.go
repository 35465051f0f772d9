// Renders a chat through a Modelfile as Ollama does, with Go's own text/template.
//
// Reads {"modelfile": "...", "messages": [{"role", "content"}, ...]} on stdin and writes
// {"commands": [[name, args], ...], "prompt": "..."} on stdout. What it models of Ollama:
//   - Modelfile arguments: a quoted argument ends where the text read so far, trimmed,
//     starts and ends with the same quotes ("""...""" or "..."), checked at each space,
//     tab, newline or the end; no escapes; unprintable characters are dropped.
//   - The chat: the Modelfile's SYSTEM is put first unless the chat starts with a system
//     message; consecutive messages of one role are joined with a blank line; .System is
//     every system message joined with a blank line; the template sees .System, .Messages
//     (system messages included) and an empty .Response, missing keys as zero values.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/template"
	"unicode"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type input struct {
	Modelfile string    `json:"modelfile"`
	Messages  []message `json:"messages"`
}

type output struct {
	Commands [][2]string `json:"commands"`
	Prompt   string      `json:"prompt"`
}

func unquoted(s string) (string, bool) {
	for _, q := range []string{`"""`, `"`} {
		if strings.HasPrefix(s, q) {
			if len(s) >= 2*len(q) && strings.HasSuffix(s, q) {
				return s[len(q) : len(s)-len(q)], true
			}
			return "", false
		}
	}
	return s, true
}

func parse(text string) ([][2]string, error) {
	var commands [][2]string
	runes := []rune(text)
	i := 0
	for i < len(runes) {
		r := runes[i]
		if r == ' ' || r == '\t' || r == '\n' || r == '\r' {
			i++
			continue
		}
		if r == '#' {
			for i < len(runes) && runes[i] != '\n' {
				i++
			}
			continue
		}
		start := i
		for i < len(runes) && unicode.IsLetter(runes[i]) {
			i++
		}
		name := strings.ToLower(string(runes[start:i]))
		if name == "parameter" {
			i++
			start = i
			for i < len(runes) && runes[i] != ' ' && runes[i] != '\t' {
				i++
			}
			name = string(runes[start:i])
		}
		for i < len(runes) && (runes[i] == ' ' || runes[i] == '\t') {
			i++
		}
		var value strings.Builder
		done := false
		for ; i <= len(runes); i++ {
			end := i == len(runes)
			if end || runes[i] == ' ' || runes[i] == '\t' || runes[i] == '\n' || runes[i] == '\r' {
				args, ok := unquoted(strings.TrimSpace(value.String()))
				if end && !ok {
					return nil, fmt.Errorf("unterminated quote in %s", name)
				}
				if ok && (end || runes[i] == '\n' || runes[i] == '\r') {
					commands = append(commands, [2]string{name, args})
					done = true
					break
				}
				value.WriteRune(runes[i])
				continue
			}
			if strconv.IsPrint(runes[i]) {
				value.WriteRune(runes[i])
			}
		}
		if !done {
			return nil, fmt.Errorf("no value for %s", name)
		}
	}
	return commands, nil
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	commands, err := parse(in.Modelfile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var tmplText, system string
	for _, c := range commands {
		switch c[0] {
		case "template":
			tmplText = c[1]
		case "system":
			system = c[1]
		}
	}
	msgs := in.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && system != "" {
		msgs = append([]message{{Role: "system", Content: system}}, msgs...)
	}
	var systems []string
	var collated []*message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(tmplText)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var prompt strings.Builder
	values := map[string]any{"System": strings.Join(systems, "\n\n"), "Messages": collated, "Response": ""}
	if err := tmpl.Execute(&prompt, values); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(output{commands, prompt.String()}); err != nil {
		os.Exit(1)
	}
}
