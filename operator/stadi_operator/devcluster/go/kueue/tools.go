//go:build tools

// Package tools pins Kueue's manager command so that `go mod tidy` keeps its dependencies; it is built with
// `go build sigs.k8s.io/kueue/cmd/kueue` from this module.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
