//go:build tools

// Package tools pins kwok's command so that `go mod tidy` keeps its dependencies; it is built with
// `go build sigs.k8s.io/kwok/cmd/kwok` from this module.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
