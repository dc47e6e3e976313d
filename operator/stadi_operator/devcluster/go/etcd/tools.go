//go:build tools

// Package tools pins etcd's server command so that `go mod tidy` keeps its dependencies; it is built with
// `go build go.etcd.io/etcd/server/v3` from this module.
package tools

import _ "go.etcd.io/etcd/server/v3"
