// promql-check reads PromQL expressions, one JSON string per line, parses each with Prometheus'
// own parser and prints one JSON object per line: {"names": [metric names it selects]} or
// {"error": "what the parser says"}. The chart's tests use it on the dashboard and the alerts.
//
// `promql-check objects` reads Prometheus Operator objects (ServiceMonitor, PrometheusRule) as
// JSON, one per line, and decodes each strictly into the operator's own Go types: a field the
// operator does not know, or a value of the wrong type, is an error (exit 1).
//
// `promql-check rules` reads a Prometheus rules file (groups) on standard input and checks it as
// Prometheus loads one (unknown fields, durations, label names, expressions, the templates of
// labels and annotations): it prints each error on a line and exits 1 if there is any.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "rules" {
		checkRules()
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "objects" {
		checkObjects()
		return
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	// The functions and syntax a default Prometheus accepts (no experimental ones).
	promql := parser.NewParser(parser.Options{})
	for in.Scan() {
		var expr string
		if err := json.Unmarshal(in.Bytes(), &expr); err != nil {
			fmt.Fprintln(os.Stderr, "promql-check: each line must be a JSON string:", err)
			os.Exit(2)
		}
		node, err := promql.ParseExpr(expr)
		if err != nil {
			_ = out.Encode(map[string]any{"error": err.Error()})
			continue
		}
		names := []string{}
		parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
			if selector, ok := n.(*parser.VectorSelector); ok {
				names = append(names, selector.Name)
			}
			return nil
		})
		_ = out.Encode(map[string]any{"names": names})
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "promql-check:", err)
		os.Exit(2)
	}
}

func checkRules() {
	content, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "promql-check:", err)
		os.Exit(2)
	}
	groups, errs := rulefmt.Parse(content, false, model.LegacyValidation, parser.NewParser(parser.Options{}), slog.Default())
	for _, err := range errs {
		fmt.Println(err)
	}
	if len(errs) > 0 {
		os.Exit(1)
	}
	count := 0
	for _, group := range groups.Groups {
		count += len(group.Rules)
	}
	fmt.Printf("%d rules in %d groups\n", count, len(groups.Groups))
}

func checkObjects() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<22), 1<<22)
	failed := false
	for in.Scan() {
		var kind struct{ Kind string }
		if err := json.Unmarshal(in.Bytes(), &kind); err != nil {
			fmt.Fprintln(os.Stderr, "promql-check:", err)
			os.Exit(2)
		}
		var object any
		switch kind.Kind {
		case "ServiceMonitor":
			object = &monitoringv1.ServiceMonitor{}
		case "PrometheusRule":
			object = &monitoringv1.PrometheusRule{}
		default:
			fmt.Printf("%s: not a kind this checker knows\n", kind.Kind)
			failed = true
			continue
		}
		decoder := json.NewDecoder(bytes.NewReader(in.Bytes()))
		decoder.DisallowUnknownFields()
		if err := decoder.Decode(object); err != nil {
			fmt.Printf("%s: %v\n", kind.Kind, err)
			failed = true
			continue
		}
		fmt.Printf("%s: ok\n", kind.Kind)
	}
	if failed {
		os.Exit(1)
	}
}
