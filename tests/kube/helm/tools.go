//go:build tools

// Package tools pins helm (built from its Go module for the chart tests: helm lint,
// helm template, helm install against the test API server).
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
