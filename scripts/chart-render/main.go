// chart-render renders a Helm chart's templates the way `helm template`
// does, for the subset of Helm this chart uses (sprig functions, include,
// toYaml, required, fail), then parses every document and checks what the
// chart promises: each object has apiVersion, kind and a name; every
// container runs as non-root on a read-only root filesystem with one of
// the binary's modes (serve, migrate, gateway).
//
// Helm itself is not installable here; Debian ships Go, sprig and yaml.v3.
//
//	chart-render CHART_DIR [VALUES_OVERRIDE.yaml]
//
// With CHART_RENDER_PRINT=1 it prints the rendered YAML as well.
// It prints one line per object ("Kind name args...") and exits non-zero
// on the first template or check that fails.
package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	sprig "github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

func must(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "chart-render: %s: %v\n", what, err)
		os.Exit(1)
	}
}

func readYAML(path string) map[string]interface{} {
	raw, err := os.ReadFile(path)
	must(err, path)
	out := map[string]interface{}{}
	must(yaml.Unmarshal(raw, &out), path)
	return out
}

// merge lays b over a, map by map, as `helm -f` does.
func merge(a, b map[string]interface{}) map[string]interface{} {
	for k, v := range b {
		if bm, ok := v.(map[string]interface{}); ok {
			if am, ok := a[k].(map[string]interface{}); ok {
				a[k] = merge(am, bm)
				continue
			}
		}
		a[k] = v
	}
	return a
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: chart-render CHART_DIR [VALUES_OVERRIDE.yaml]")
		os.Exit(2)
	}
	dir := os.Args[1]
	values := readYAML(filepath.Join(dir, "values.yaml"))
	if len(os.Args) > 2 {
		values = merge(values, readYAML(os.Args[2]))
	}
	chart := readYAML(filepath.Join(dir, "Chart.yaml"))
	name, _ := chart["name"].(string)
	base := name + "/templates"

	root := template.New("chart").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	funcs["include"] = func(n string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, n, data)
		return buf.String(), err
	}
	funcs["toYaml"] = func(v interface{}) string {
		var out bytes.Buffer
		enc := yaml.NewEncoder(&out)
		enc.SetIndent(2) // as Helm's toYaml
		if err := enc.Encode(v); err != nil {
			return ""
		}
		return strings.TrimSuffix(out.String(), "\n")
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, errors.New(msg)
		}
		return v, nil
	}
	funcs["fail"] = func(msg string) (string, error) { return "", errors.New(msg) }
	root.Funcs(funcs)

	files, err := filepath.Glob(filepath.Join(dir, "templates", "*"))
	must(err, "templates")
	sort.Strings(files)
	for _, f := range files {
		raw, err := os.ReadFile(f)
		must(err, f)
		_, err = root.New(base + "/" + filepath.Base(f)).Parse(string(raw))
		must(err, f)
	}
	data := map[string]interface{}{
		"Values":  values,
		"Release": map[string]interface{}{"Name": "rel", "Namespace": "default", "Service": "Helm"},
		"Chart": map[string]interface{}{
			"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"],
		},
		"Template": map[string]interface{}{"BasePath": base},
	}
	for _, f := range files {
		file := filepath.Base(f)
		if strings.HasPrefix(file, "_") {
			continue
		}
		var buf bytes.Buffer
		must(root.ExecuteTemplate(&buf, base+"/"+file, data), file)
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if os.Getenv("CHART_RENDER_PRINT") != "" {
			fmt.Printf("# %s\n%s\n---\n", file, text)
		}
		for i, doc := range strings.Split(text, "\n---") {
			if strings.TrimSpace(doc) == "" || isComments(doc) {
				continue
			}
			obj := map[string]interface{}{}
			must(yaml.Unmarshal([]byte(doc), &obj), fmt.Sprintf("%s (document %d) is not YAML:\n%s", file, i+1, doc))
			check(file, obj)
		}
	}
}

func isComments(doc string) bool {
	for _, line := range strings.Split(doc, "\n") {
		line = strings.TrimSpace(line)
		if line != "" && !strings.HasPrefix(line, "#") {
			return false
		}
	}
	return true
}

func get(m interface{}, path ...string) interface{} {
	for _, p := range path {
		mm, ok := m.(map[string]interface{})
		if !ok {
			return nil
		}
		m = mm[p]
	}
	return m
}

func check(file string, obj map[string]interface{}) {
	kind, _ := obj["kind"].(string)
	name, _ := get(obj, "metadata", "name").(string)
	if obj["apiVersion"] == nil || kind == "" || name == "" {
		must(errors.New("an object without apiVersion, kind or metadata.name"), file)
	}
	line := kind + " " + name
	if kind == "Deployment" || kind == "Job" {
		containers, _ := get(obj, "spec", "template", "spec", "containers").([]interface{})
		if len(containers) == 0 {
			must(errors.New("no containers"), file)
		}
		for _, c := range containers {
			sc := get(c, "securityContext")
			if get(sc, "readOnlyRootFilesystem") != true || get(sc, "runAsNonRoot") != true {
				must(fmt.Errorf("container %v: not non-root with a read-only root filesystem", get(c, "name")), file)
			}
			if image, _ := get(c, "image").(string); image == "" || strings.HasSuffix(image, ":") {
				must(fmt.Errorf("container %v: no image tag", get(c, "name")), file)
			}
			args, _ := get(c, "args").([]interface{})
			if len(args) == 0 {
				must(fmt.Errorf("container %v: no args", get(c, "name")), file)
			}
			switch args[0] {
			case "serve", "migrate", "gateway":
			default:
				must(fmt.Errorf("container %v: unknown mode %v", get(c, "name"), args[0]), file)
			}
			for _, a := range args {
				line += fmt.Sprintf(" %v", a)
			}
		}
	}
	fmt.Println(line)
}
