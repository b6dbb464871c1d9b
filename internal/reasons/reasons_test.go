package reasons

import (
	"regexp"
	"testing"

	imqpb "github.com/imq-dev/imq/proto"
)

// TestEveryReasonHasARow: every value of the Reason enum has a row with a
// label, a close code, a retry policy and a description, and no two share
// a label (metrics could not tell them apart). A reason added to
// proto/imq.proto fails here until the table says what it means.
func TestEveryReasonHasARow(t *testing.T) {
	label := regexp.MustCompile(`^[a-z][a-z_]*$`)
	seen := map[string]imqpb.Reason{}
	values := imqpb.Reason(0).Descriptor().Values()
	for i := range values.Len() {
		r := imqpb.Reason(values.Get(i).Number())
		if int(r) >= len(table) || table[r].Label == "" {
			t.Errorf("%v has no row in the reasons table", r)
			continue
		}
		info := Of(r)
		if info.Reason != r || !label.MatchString(info.Label) || info.CloseCode < 1000 || info.Retry < Terminal || info.Retry > PerCase || info.Doc == "" {
			t.Errorf("%v: incomplete row %+v", r, info)
		}
		if other, dup := seen[info.Label]; dup {
			t.Errorf("%v and %v share the label %q", r, other, info.Label)
		}
		seen[info.Label] = r
	}
	if len(All()) != values.Len() {
		t.Errorf("the table has %d rows, the enum %d values", len(All()), values.Len())
	}
}

// TestAgain: a terminal reason never brings the client back whatever the
// flag says, a retryable one always does, and a per-case one follows the
// flag, as does a reason this build does not know.
func TestAgain(t *testing.T) {
	for _, tc := range []struct {
		r         imqpb.Reason
		flag      bool
		want, now bool
	}{
		{imqpb.Reason_REASON_KICKED, true, false, false},
		{imqpb.Reason_REASON_PROTOCOL_ERROR, true, false, false},
		{imqpb.Reason_REASON_SLOW_CONSUMER, false, true, false},
		{imqpb.Reason_REASON_NODE_LOST, false, true, false},
		{imqpb.Reason_REASON_SHUTDOWN, false, true, true},
		{imqpb.Reason_REASON_AUTH_FAILED, false, false, false},
		{imqpb.Reason_REASON_AUTH_FAILED, true, true, false},
		{imqpb.Reason(999), true, true, false},
		{imqpb.Reason(999), false, false, false},
	} {
		info := Of(tc.r)
		if got := info.Again(tc.flag); got != tc.want {
			t.Errorf("Of(%v).Again(%v) = %v, want %v", tc.r, tc.flag, got, tc.want)
		}
		if got := info.AtOnce(); got != tc.now {
			t.Errorf("Of(%v).AtOnce() = %v, want %v", tc.r, got, tc.now)
		}
	}
	if l := Of(imqpb.Reason(999)).Label; l != "other" {
		t.Errorf("an unknown reason is labelled %q, want other", l)
	}
}
