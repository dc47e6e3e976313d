//go:build tools

// Package tools pins the three control-plane commands so that `go mod tidy` keeps their dependencies;
// they are built with `go build k8s.io/kubernetes/cmd/...` from this module.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
