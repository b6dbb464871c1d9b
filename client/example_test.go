package client_test

import (
	"context"
	"errors"
	"log"
	"time"

	"github.com/imq-dev/imq/client"
	imqpb "github.com/imq-dev/imq/proto"
)

func Example() {
	ctx := context.Background()
	c, err := client.Dial(ctx, "ws://127.0.0.1:8080/ws", client.WithUser("alice"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	sub, err := c.Join(ctx, "/room/1", client.Messages("chat").WithRecent(20), client.State("seats"))
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for u := range sub.Updates() {
			switch u.Kind {
			case client.KindEvent:
				log.Printf("%s: %s", u.Sender, u.Payload)
			case client.KindStateSet, client.KindStateDeleted:
				log.Printf("seats: %q", sub.State("seats"))
			case client.KindGap, client.KindClosed:
				log.Print(u.Message)
			}
		}
	}()
	if _, err := c.Publish(ctx, "/room/1", "chat", []byte(`{"text":"hi"}`)); err != nil {
		log.Print(err)
	}
}

func ExampleError() {
	_, err := client.Dial(context.Background(), "ws://127.0.0.1:8080/ws", client.WithToken("expired"))
	if e, ok := errors.AsType[*client.Error](err); ok && e.Code == imqpb.Code_UNAUTHORIZED {
		log.Print("log in again")
	}
}

func ExampleWithTokenFunc() {
	refresh := func(ctx context.Context) (string, error) {
		return "a fresh JWT from the game backend", nil
	}
	c, err := client.Dial(context.Background(), "wss://imq.example.com/ws",
		client.WithTokenFunc(refresh),
		client.WithBackoff(100*time.Millisecond, 10*time.Second),
		client.WithOnStateChange(func(s client.ConnState) { log.Print("imq: ", s) }))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
}
