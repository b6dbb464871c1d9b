# IMQ build. `make run` starts a development cluster; `make test` runs every test.
GO            ?= go
BIN           := bin/imq
VERSION       ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PROTOC_GEN_GO := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GOBIN         := $(shell $(GO) env GOPATH)/bin

.PHONY: all build install run test test-short lint bench proto fuzz clean

all: build

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/imq

# Installs imq into $(GOBIN) (go env GOPATH/bin): put that directory on PATH.
install:
	$(GO) install -ldflags "-X main.version=$(VERSION)" ./cmd/imq

# Runs the built binary rather than `go run`: after a Ctrl-C, go run exits 1
# even when imq exits 0, and make reports "*** [run] Interrupt". imq exits 0,
# and make ends silently (with 130, as any interrupted make).
run: build
	@exec ./$(BIN) dev

# vet, gofmt, staticcheck (a tool dependency in go.mod, so `go tool`
# fetches the pinned version through the module proxy) and a tidy go.mod.
lint:
	@$(GO) mod tidy -diff || { echo "go.mod or go.sum is not tidy: run go mod tidy"; exit 1; }
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) tool staticcheck ./...

# The race detector runs on every package; fuzz targets run their seed corpus.
test: lint
	@scripts/ensure-php.sh
	$(GO) test -race -count=1 -timeout 8m ./...

test-short:
	$(GO) test -short -count=1 ./...

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

# Runs each fuzz target briefly (make fuzz FUZZTIME=5m for longer).
FUZZTIME ?= 30s
fuzz:
	@for pkg in ./internal/wire/ ./internal/link/; do \
		for t in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

# Regenerates the committed protobuf code, installing protoc and
# protoc-gen-go first when they are missing.
proto:
	@command -v protoc >/dev/null || { \
		echo "installing protoc (protobuf-compiler)"; \
		apt-get update -qq && apt-get install -y -qq protobuf-compiler; }
	@test -x $(GOBIN)/protoc-gen-go || $(GO) install $(PROTOC_GEN_GO)
	cd proto && PATH="$(GOBIN):$$PATH" protoc --go_out=. --go_opt=paths=source_relative imq.proto link.proto

clean:
	rm -rf bin
