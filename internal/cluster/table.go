package cluster

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"

	"github.com/imq-dev/imq/internal/bucket"
)

// TablePath is the boss's table endpoint, also served by every gateway and
// queue node (their current table) for the boss to reconcile with after a
// restart.
const TablePath = "/v1/table"

// MaxTableBytes bounds a table response: 2^20 buckets with long addresses
// stay well under it.
const MaxTableBytes = 64 << 20

// ServeTable answers GET TablePath with t, in the JSON form of bucket.Table;
// the X-IMQ-Table-Version header carries its version.
func ServeTable(w http.ResponseWriter, t *bucket.Table) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-IMQ-Table-Version", strconv.FormatUint(t.Version(), 10))
	json.NewEncoder(w).Encode(t)
}

// DecodeTable reads one table in the JSON form of bucket.Table, at most
// MaxTableBytes; bucket.Table's decoder refuses an inconsistent one.
func DecodeTable(r io.Reader) (*bucket.Table, error) {
	var t bucket.Table
	if err := json.NewDecoder(io.LimitReader(r, MaxTableBytes)).Decode(&t); err != nil {
		return nil, err
	}
	return &t, nil
}
