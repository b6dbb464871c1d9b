// Package imqpb holds the generated Go code for the IMQ client protocol
// (imq.proto) and the gateway to queue node link (link.proto). Regenerate it
// with `make proto`; never edit the .pb.go files by hand.
package imqpb
