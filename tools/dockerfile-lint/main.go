// Command dockerfile-lint runs BuildKit's Dockerfile checks (what
// `docker build --check` runs) on a Dockerfile without a Docker engine or a
// BuildKit daemon: the parser, instruction parsing and every lint rule
// BuildKit evaluates while converting the file, for all stages.
//
//	dockerfile-lint Dockerfile
//
// Prints one line per warning or error (file:line: rule: message) and exits
// 1 if there was any, 0 if the file is clean.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	digest "github.com/opencontainers/go-digest"
)

// offline answers every base image with a minimal Linux image config instead
// of asking a registry: the checks need the stage graph, not the images.
type offline struct{}

const imageConfig = `{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},` +
	`"config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}}`

func (offline) ResolveImageConfig(
	_ context.Context, ref string, _ sourceresolver.Opt,
) (string, digest.Digest, []byte, error) {
	return ref, digest.FromString(ref), []byte(imageConfig), nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: dockerfile-lint <Dockerfile>")
		os.Exit(2)
	}
	path := os.Args[1]
	data, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	source := llb.NewSourceMap(nil, path, "Dockerfile", data)
	source.Definition = &llb.Definition{} // no build: nothing to define
	results, err := dockerfile2llb.DockerfileLint(context.Background(), data, dockerfile2llb.ConvertOpt{
		SourceMap:    source,
		MetaResolver: offline{},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	problems := 0
	for _, warning := range results.Warnings {
		line := 0
		if warning.Location != nil && len(warning.Location.Ranges) > 0 {
			line = int(warning.Location.Ranges[0].Start.Line)
		}
		fmt.Printf("%s:%d: %s: %s\n", path, line, warning.RuleName, warning.Detail)
		problems++
	}
	if results.Error != nil {
		line := 0
		if len(results.Error.Location.Ranges) > 0 {
			line = int(results.Error.Location.Ranges[0].Start.Line)
		}
		fmt.Printf("%s:%d: error: %s\n", path, line, results.Error.Message)
		problems++
	}
	if problems > 0 {
		os.Exit(1)
	}
}
