package gateway

import (
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/imq-dev/imq/internal/imqerr"
	"github.com/imq-dev/imq/internal/wire"
	imqpb "github.com/imq-dev/imq/proto"
)

// verifyToken checks an HS256 JWT and returns its subject, the user id.
// Expiry (exp) and not-before (nbf) are honoured when present.
func verifyToken(secret []byte, token string) (string, error) {
	if len(secret) == 0 {
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "this gateway accepts no tokens (development mode: use ?user=ID)")
	}
	if token == "" {
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "connect carries no token")
	}
	var claims jwt.RegisteredClaims
	_, err := jwt.ParseWithClaims(token, &claims, func(*jwt.Token) (any, error) { return secret, nil },
		jwt.WithValidMethods([]string{"HS256"}), jwt.WithLeeway(5*time.Second))
	if err != nil {
		return "", imqerr.New(imqpb.Code_UNAUTHORIZED, "token rejected: %v", err)
	}
	if err := validUserID(claims.Subject); err != nil {
		return "", err
	}
	return claims.Subject, nil
}

// validUserID checks that id can name the user's queue /user/<id>.
func validUserID(id string) error {
	if id == "" {
		return imqerr.New(imqpb.Code_UNAUTHORIZED, "no user id (the token's sub claim)")
	}
	if err := wire.ValidateQueueName("/user/" + id); err != nil {
		return imqerr.New(imqpb.Code_UNAUTHORIZED, "user id %q is not a valid queue segment (use A-Z a-z 0-9 _ . : @ + = ~ -, at most 249 bytes)", id)
	}
	for i := 0; i < len(id); i++ {
		if id[i] == '/' {
			return imqerr.New(imqpb.Code_UNAUTHORIZED, "user id %q contains '/'", id)
		}
	}
	return nil
}
