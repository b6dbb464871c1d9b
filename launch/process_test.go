package launch

import (
	"slices"
	"testing"
)

// TestChildEnv: what the launcher sets replaces what the child inherits,
// and an inherited file form of a secret it sets goes (the child would
// refuse a secret given two ways); so do the variables it unsets, file
// forms included.
func TestChildEnv(t *testing.T) {
	got := childEnv(
		[]string{"PATH=/bin", "IMQ_JWT_SECRET=old", "IMQ_JWT_SECRET_FILE=/run/secret", "IMQ_LOG_LEVEL=debug",
			"IMQ_GOSSIP_KEY_FILE=/run/old-key", "IMQ_INSECURE=true"},
		[]string{"IMQ_JWT_SECRET=new", "IMQ_CLUSTER_KEY=k"},
		[]string{"IMQ_GOSSIP_KEY", "IMQ_INSECURE"},
	)
	want := []string{"PATH=/bin", "IMQ_LOG_LEVEL=debug", "IMQ_JWT_SECRET=new", "IMQ_CLUSTER_KEY=k"}
	if !slices.Equal(got, want) {
		t.Fatalf("childEnv = %q, want %q", got, want)
	}
}
