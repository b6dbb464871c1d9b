<?php
/**
 * ImqClient: a dependency-free PHP 8 client for IMQ's admin RPC.
 *
 * IMQ gateways serve `POST /rpc/v1/<method>` with a JSON body and an API key
 * (`Authorization: Bearer <key>`). This file holds two classes: ImqClient,
 * one method per RPC method, and ImqException, what every failure throws.
 * Drop the file into a project and `require` it; it needs PHP 8.1+ and the
 * curl extension (without curl it falls back to PHP's HTTP stream wrapper,
 * which opens a new connection for every call).
 *
 *     require __DIR__ . '/ImqClient.php';
 *     $imq = new ImqClient('http://127.0.0.1:8080', getenv('IMQ_API_KEY'));
 *     $r = $imq->publish('/room/123', 'chat', ['text' => 'gl hf']);
 *     echo $r['offset'];
 *
 * Results are the decoded JSON objects of the contract, as associative
 * arrays (so an empty JSON object comes back as []). Offsets, versions and
 * epochs are PHP ints (64-bit builds).
 *
 * An ImqClient keeps one curl handle, so consecutive calls reuse one
 * keep-alive connection. It is not meant to be shared between processes
 * (php-fpm gives each worker its own anyway).
 */

declare(strict_types=1);

/**
 * ImqException is an admin RPC call that failed: refused by the gateway, or
 * not answered at all.
 *
 * getErrorCode() (and getCode(), as PDOException does) returns the name from
 * IMQ's single error enum: "BAD_REQUEST", "UNAUTHORIZED", "FORBIDDEN",
 * "INVALID_QUEUE_NAME", "NOT_FOUND", "DENIED", "TIMEOUT", "UNAVAILABLE", ...
 * Match on it, never on the message.
 *
 * A call that got no answer (connection refused, client-side timeout) has
 * HTTP status 0 and code "UNAVAILABLE" (not connected) or "TIMEOUT" (sent,
 * no answer in time: a publish may or may not have happened).
 */
class ImqException extends RuntimeException
{
    private string $errorCode;
    private int $httpStatus;
    private bool $retryable;
    private ?string $requestId;

    /**
     * @param string          $message    the server's (or the client's) account of the failure
     * @param string          $errorCode  the Code enum name, e.g. "FORBIDDEN"
     * @param int             $httpStatus the response's HTTP status; 0 if none arrived
     * @param bool            $retryable  whether the same call may succeed later
     * @param string|null     $requestId  the call's X-Request-Id, to find it in the gateway's log
     */
    public function __construct(
        string $message,
        string $errorCode,
        int $httpStatus = 0,
        bool $retryable = false,
        ?string $requestId = null,
        ?Throwable $previous = null,
    ) {
        parent::__construct($message, 0, $previous);
        $this->code = $errorCode; // Exception::$code is untyped: getCode() returns the name
        $this->errorCode = $errorCode;
        $this->httpStatus = $httpStatus;
        $this->retryable = $retryable;
        $this->requestId = $requestId;
    }

    /**
     * Builds the exception for one `{"code", "message", "retryable"}` error
     * object, as found in a batch's or a broadcast's results.
     *
     * @param array<string,mixed> $error
     */
    public static function fromError(array $error, int $httpStatus = 0, ?string $requestId = null): self
    {
        $code = is_string($error['code'] ?? null) ? $error['code'] : 'INTERNAL';
        $message = is_string($error['message'] ?? null) ? $error['message'] : $code;
        return new self($message, $code, $httpStatus, (bool)($error['retryable'] ?? false), $requestId);
    }

    /** The Code enum name, e.g. "FORBIDDEN". */
    public function getErrorCode(): string
    {
        return $this->errorCode;
    }

    /** The HTTP status of the answer, 0 when none arrived. */
    public function getHttpStatus(): int
    {
        return $this->httpStatus;
    }

    /**
     * Whether sending the same call again later may succeed. For a TIMEOUT
     * the call may also have succeeded: a publish sent again can appear twice.
     */
    public function isRetryable(): bool
    {
        return $this->retryable;
    }

    /** The X-Request-Id of the call (null if it never left the client). */
    public function getRequestId(): ?string
    {
        return $this->requestId;
    }
}

/**
 * ImqClient calls one IMQ gateway's admin RPC.
 *
 * Every method returns the method's result object as an associative array,
 * or throws ImqException. Data values: by default `$data` is any JSON value
 * (array, string, number, bool) sent as `data`; with `$raw = true` it is a
 * string of bytes sent as `data_base64`. Values read back (history, state)
 * carry `data`/`value` when the stored bytes are valid JSON and
 * `data_base64`/`value_base64` otherwise; ImqClient::bytesOf() turns either
 * into bytes.
 */
class ImqClient
{
    /** Admin RPC path prefix on the gateway. */
    public const PATH = '/rpc/v1/';

    private const JSON_OUT = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR;
    private const JSON_IN = JSON_BIGINT_AS_STRING | JSON_THROW_ON_ERROR;

    private string $baseUrl;
    private string $apiKey;
    private float $timeout;
    private bool $useCurl;
    /** @var CurlHandle|null reused across calls: one keep-alive connection */
    private ?CurlHandle $curl = null;
    private ?string $nextRequestId = null;
    private ?string $lastRequestId = null;

    /**
     * @param string      $baseUrl   the gateway's HTTP root, e.g. "http://127.0.0.1:8080"
     * @param string      $apiKey    an API key's secret (the part before any options)
     * @param float       $timeout   seconds to wait for each call; keep it above the
     *                               gateway's --rpc-timeout (5 s) so that its TIMEOUT
     *                               answer, which says more, arrives first
     * @param string|null $transport "curl", "stream" (PHP's HTTP wrapper, one
     *                               connection per call), or null: curl when loaded
     */
    public function __construct(string $baseUrl, string $apiKey, float $timeout = 10.0, ?string $transport = null)
    {
        if (!preg_match('#^https?://[^/]+#', $baseUrl)) {
            throw new InvalidArgumentException("IMQ base URL must be http(s)://host[:port], got \"$baseUrl\"");
        }
        if ($timeout <= 0) {
            throw new InvalidArgumentException('IMQ timeout must be positive');
        }
        $this->baseUrl = rtrim($baseUrl, '/');
        $this->apiKey = $apiKey;
        $this->timeout = $timeout;
        $this->useCurl = match ($transport) {
            null => extension_loaded('curl'),
            'curl' => true,
            'stream' => false,
            default => throw new InvalidArgumentException("IMQ transport must be \"curl\" or \"stream\", got \"$transport\""),
        };
        if ($this->useCurl && !extension_loaded('curl')) {
            throw new InvalidArgumentException('the curl extension is not loaded (install php-curl)');
        }
    }

    public function __destruct()
    {
        $this->curl = null; // closes the connection (curl_close is a no-op since PHP 8)
    }

    /**
     * Appends an event to a message mount. Subscribers see it with sender ""
     * (the backend); no call-out is asked.
     *
     * @param mixed $data any JSON value, or with $raw a string of bytes
     * @return array{offset:int, created:bool} created: the queue did not exist before
     */
    public function publish(string $queue, string $mount, mixed $data, bool $raw = false): array
    {
        return $this->call('publish', ['queue' => $queue, 'mount' => $mount] + self::dataParam('data', $data, $raw));
    }

    /**
     * Sets one key of a state mount; subscribers of the mount see the change.
     *
     * @param mixed $value any JSON value, or with $raw a string of bytes
     * @return array{version:int, created:bool} version: the change's offset in the queue
     */
    public function setState(string $queue, string $mount, string $key, mixed $value, bool $raw = false): array
    {
        return $this->call('set_state', ['queue' => $queue, 'mount' => $mount, 'key' => $key] + self::dataParam('value', $value, $raw));
    }

    /**
     * Deletes one key of a state mount.
     *
     * @return array{version:int}
     */
    public function deleteState(string $queue, string $mount, string $key): array
    {
        return $this->call('delete_state', ['queue' => $queue, 'mount' => $mount, 'key' => $key]);
    }

    /**
     * Reads a state mount: every key, or only $keys.
     *
     * @param list<string>|null $keys
     * @return array{epoch:int, head:int, state:array<string,array{version:int, value?:mixed, value_base64?:string}>}
     * @throws ImqException NOT_FOUND if the queue does not exist
     */
    public function getState(string $queue, string $mount, ?array $keys = null): array
    {
        $p = ['queue' => $queue, 'mount' => $mount];
        if ($keys !== null) {
            $p['keys'] = array_values($keys);
        }
        return $this->call('get_state', $p);
    }

    /**
     * Reads a message mount's retained events after $sinceOffset, oldest first.
     * "missed" says events after $sinceOffset are gone from the history;
     * "more" says there are more than $limit: call again from the last offset.
     *
     * @param int $sinceOffset return events with a larger offset (0: from the oldest kept)
     * @param int $limit       at most this many events (1..1000)
     * @return array{epoch:int, head:int, events:list<array{offset:int, sender:string, time_ms:int, data?:mixed, data_base64?:string}>, missed:bool, more:bool}
     * @throws ImqException NOT_FOUND if the queue does not exist
     */
    public function history(string $queue, string $mount, int $sinceOffset = 0, int $limit = 100): array
    {
        return $this->call('history', ['queue' => $queue, 'mount' => $mount, 'since_offset' => $sinceOffset, 'limit' => $limit]);
    }

    /**
     * Describes a queue: its node, its mounts and its subscribers.
     *
     * @return array<string,mixed> queue, epoch, head, node, created_ms, mounts, subscribers
     * @throws ImqException NOT_FOUND if the queue does not exist
     */
    public function queueInfo(string $queue): array
    {
        return $this->call('queue_info', ['queue' => $queue]);
    }

    /**
     * Disconnects every session of a user on every gateway. The clients get a
     * goodbye KICKED that tells them not to reconnect, with $reason as message.
     *
     * A key limited to queue prefixes needs one covering "/user/<id>".
     *
     * @return array{sessions:int, gateways:int, failed:list<string>} sessions closed;
     *         gateways that took part (this one included); failed: ids of
     *         gateways that did not answer (their sessions may remain)
     */
    public function kick(string $user, ?string $reason = null): array
    {
        $p = ['user' => $user];
        if ($reason !== null) {
            $p['reason'] = $reason;
        }
        return $this->call('kick', $p);
    }

    /**
     * Publishes one event to the same mount of up to 1000 distinct queues.
     * Every queue name, and the key's right to each queue, is checked first:
     * one bad name fails the whole call (INVALID_QUEUE_NAME, FORBIDDEN) and
     * nothing is published. After that each queue succeeds or fails on its
     * own and the call still succeeds: check each result for "error".
     *
     * @param list<string> $queues
     * @param mixed        $data any JSON value, or with $raw a string of bytes
     * @return array{results:list<array<string,mixed>>} per queue:
     *         {queue, offset, created} or {queue, error:{code, message}}
     */
    public function broadcast(array $queues, string $mount, mixed $data, bool $raw = false): array
    {
        return $this->call('broadcast', ['queues' => array_values($queues), 'mount' => $mount] + self::dataParam('data', $data, $raw));
    }

    /**
     * Runs up to 100 calls in one request, in order. Each call is
     * [method, params] (or ['method' => ..., 'params' => ...]); no nested
     * batch. Each result is {"result": {...}} or {"error": {...}}:
     *
     *     foreach ($imq->batch([['publish', [...]], ['get_state', [...]]])['results'] as $r) {
     *         if (isset($r['error'])) throw ImqException::fromError($r['error']);
     *     }
     *
     * Params are the raw RPC params (snake_case, "data" or "data_base64").
     *
     * @param list<array{0:string,1:array<string,mixed>}|array{method:string,params:array<string,mixed>}> $calls
     * @return array{results:list<array{result?:array<string,mixed>, error?:array<string,mixed>}>}
     */
    public function batch(array $calls): array
    {
        $out = [];
        foreach (array_values($calls) as $i => $c) {
            if (!is_array($c)) {
                throw new InvalidArgumentException("batch call $i is not an array");
            }
            $method = $c['method'] ?? $c[0] ?? null;
            $params = $c['params'] ?? $c[1] ?? [];
            if (!is_string($method) || !is_array($params)) {
                throw new InvalidArgumentException("batch call $i must be [method, params]");
            }
            $out[] = ['method' => $method, 'params' => self::object($params)];
        }
        return $this->call('batch', ['calls' => $out]);
    }

    /**
     * Sets the X-Request-Id of the next call only, e.g. to carry the id of
     * the web request being served into the gateway's log. Without it each
     * call gets a fresh random id. An id must be 1 to 128 printable ASCII
     * characters, not starting or ending with a space; an unusable one
     * (say, a client's header passed on as is) is not sent: the call gets a
     * random id, and this returns false.
     *
     * @return bool whether $id will be sent (true for null: a random id)
     */
    public function setRequestId(?string $id): bool
    {
        if ($id !== null && !preg_match('/^[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?$/', $id)) {
            $this->nextRequestId = null;
            return false;
        }
        $this->nextRequestId = $id;
        return true;
    }

    /** The X-Request-Id the gateway answered to the last call (or sent, if it did not answer). */
    public function lastRequestId(): ?string
    {
        return $this->lastRequestId;
    }

    /**
     * Calls any RPC method with raw params (what the typed methods use).
     *
     * @param array<string,mixed> $params
     * @return array<string,mixed> the decoded result object
     * @throws ImqException
     */
    public function call(string $method, array $params): array
    {
        $requestId = $this->nextRequestId ?? bin2hex(random_bytes(8));
        $this->nextRequestId = null;
        $this->lastRequestId = $requestId;
        try {
            $body = json_encode(self::object($params), self::JSON_OUT);
        } catch (JsonException $e) {
            throw new InvalidArgumentException("IMQ $method: params are not JSON-encodable (raw bytes need \$raw = true): " . $e->getMessage(), 0, $e);
        }
        $url = $this->baseUrl . self::PATH . rawurlencode($method);
        $headers = [
            'Content-Type: application/json',
            'Accept: application/json',
            'Authorization: Bearer ' . $this->apiKey,
            'X-Request-Id: ' . $requestId,
        ];
        [$status, $respHeaders, $respBody] = $this->useCurl
            ? $this->sendCurl($method, $url, $headers, $body, $requestId)
            : $this->sendStream($method, $url, $headers, $body, $requestId);
        $this->lastRequestId = $respHeaders['x-request-id'] ?? $requestId;
        return $this->decode($method, $status, $respBody, $this->lastRequestId);
    }

    /**
     * Returns the bytes of a value read back: the "data" (or "value") field
     * re-encoded as JSON, or the "data_base64" field decoded. Re-encoded JSON
     * may differ from what was published in whitespace and key escaping.
     *
     * @param array<string,mixed> $item  an event from history(), or a state entry
     * @param string              $field "data" or "value"
     */
    public static function bytesOf(array $item, string $field = 'data'): string
    {
        if (array_key_exists($field . '_base64', $item)) {
            $b = base64_decode((string)$item[$field . '_base64'], true);
            if ($b === false) {
                throw new UnexpectedValueException("$field" . '_base64 is not base64');
            }
            return $b;
        }
        if (!array_key_exists($field, $item)) {
            throw new UnexpectedValueException("no $field in the item");
        }
        return json_encode($item[$field], self::JSON_OUT);
    }

    /** @return array<string,mixed> */
    private static function dataParam(string $name, mixed $data, bool $raw): array
    {
        if (!$raw) {
            return [$name => $data];
        }
        if (!is_string($data)) {
            throw new InvalidArgumentException("raw $name must be a string of bytes, got " . get_debug_type($data));
        }
        return [$name . '_base64' => base64_encode($data)];
    }

    /** An empty PHP array encodes as [] but params are JSON objects. */
    private static function object(array $params): array|stdClass
    {
        return $params === [] ? new stdClass() : $params;
    }

    /**
     * @param list<string> $headers
     * @return array{0:int, 1:array<string,string>, 2:string}
     */
    private function sendCurl(string $method, string $url, array $headers, string $body, string $requestId): array
    {
        if ($this->curl === null) {
            $this->curl = curl_init();
        }
        $respHeaders = [];
        $ms = (int)ceil($this->timeout * 1000);
        curl_setopt_array($this->curl, [
            CURLOPT_URL => $url,
            CURLOPT_POST => true,
            CURLOPT_POSTFIELDS => $body,
            CURLOPT_HTTPHEADER => array_merge($headers, ['Expect:']), // no 100-continue round trip
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_FOLLOWLOCATION => false,
            CURLOPT_TIMEOUT_MS => $ms,
            CURLOPT_CONNECTTIMEOUT_MS => $ms,
            CURLOPT_NOSIGNAL => true, // sub-second timeouts without SIGALRM
            CURLOPT_TCP_KEEPALIVE => 1,
            CURLOPT_HEADERFUNCTION => static function ($ch, string $line) use (&$respHeaders): int {
                $p = strpos($line, ':');
                if ($p !== false) {
                    $respHeaders[strtolower(trim(substr($line, 0, $p)))] = trim(substr($line, $p + 1));
                } elseif (str_starts_with($line, 'HTTP/')) {
                    $respHeaders = []; // a new response (after 1xx): forget the previous one's
                }
                return strlen($line);
            },
        ]);
        $resp = curl_exec($this->curl);
        if ($resp === false) {
            $errno = curl_errno($this->curl);
            $err = curl_error($this->curl);
            $this->curl = null; // a broken connection: start afresh next time
            $timedOut = $errno === CURLE_OPERATION_TIMEDOUT;
            // Timed out after connecting: the call may have happened.
            throw new ImqException(
                "IMQ $method: " . ($timedOut ? 'no answer in time' : 'cannot reach the gateway') . ": $err",
                $timedOut ? 'TIMEOUT' : 'UNAVAILABLE',
                0,
                true,
                $requestId,
            );
        }
        $status = (int)curl_getinfo($this->curl, CURLINFO_RESPONSE_CODE);
        return [$status, $respHeaders, (string)$resp];
    }

    /**
     * The fallback without curl: PHP's HTTP stream wrapper, one connection
     * per call.
     *
     * @param list<string> $headers
     * @return array{0:int, 1:array<string,string>, 2:string}
     */
    private function sendStream(string $method, string $url, array $headers, string $body, string $requestId): array
    {
        $ctx = stream_context_create(['http' => [
            'method' => 'POST',
            'header' => implode("\r\n", array_merge($headers, ['Connection: close'])),
            'content' => $body,
            'timeout' => $this->timeout,
            'ignore_errors' => true, // read error bodies too
            'follow_location' => 0,
            'protocol_version' => 1.1,
        ]]);
        $err = null;
        set_error_handler(static function (int $no, string $msg) use (&$err): bool {
            $err = $msg;
            return true;
        });
        try {
            $resp = file_get_contents($url, false, $ctx);
        } finally {
            restore_error_handler();
        }
        $lines = function_exists('http_get_last_response_headers')
            ? (http_get_last_response_headers() ?? [])
            : ($http_response_header ?? []);
        if ($resp === false || $lines === []) {
            $timedOut = $err !== null && stripos($err, 'timed out') !== false;
            throw new ImqException(
                "IMQ $method: " . ($timedOut ? 'no answer in time' : 'cannot reach the gateway') . ': ' . ($err ?? 'no response'),
                $timedOut ? 'TIMEOUT' : 'UNAVAILABLE',
                0,
                true,
                $requestId,
            );
        }
        $status = 0;
        $respHeaders = [];
        foreach ($lines as $line) {
            if (preg_match('#^HTTP/\S+\s+(\d{3})#', $line, $m)) {
                $status = (int)$m[1];
                $respHeaders = [];
            } elseif (($p = strpos($line, ':')) !== false) {
                $respHeaders[strtolower(trim(substr($line, 0, $p)))] = trim(substr($line, $p + 1));
            }
        }
        return [$status, $respHeaders, $resp];
    }

    /**
     * @return array<string,mixed>
     * @throws ImqException
     */
    private function decode(string $method, int $status, string $body, string $requestId): array
    {
        $json = null;
        if ($body !== '') {
            try {
                $json = json_decode($body, true, 512, self::JSON_IN);
            } catch (JsonException) {
                $json = null;
            }
        }
        if ($status === 200 && is_array($json)) {
            return $json;
        }
        if (is_array($json) && is_array($json['error'] ?? null)) {
            $e = ImqException::fromError($json['error'], $status, $requestId);
            throw new ImqException("IMQ $method: " . $e->getMessage(), $e->getErrorCode(), $status, $e->isRetryable(), $requestId);
        }
        // Not an IMQ answer (a proxy's error page, say): judge by the status.
        [$code, $retryable] = match (true) {
            $status === 200 => ['INTERNAL', false], // 200 without a JSON object
            $status === 401 => ['UNAUTHORIZED', false],
            $status === 403 => ['FORBIDDEN', false],
            $status === 404 => ['NOT_FOUND', false],
            $status === 413 => ['PAYLOAD_TOO_LARGE', false],
            $status === 429 => ['LIMIT_EXCEEDED', true],
            $status === 502, $status === 503 => ['UNAVAILABLE', true],
            $status === 504 => ['TIMEOUT', true],
            $status >= 400 && $status < 500 => ['BAD_REQUEST', false],
            default => ['INTERNAL', false],
        };
        $snippet = substr(trim($body), 0, 200);
        throw new ImqException("IMQ $method: unexpected HTTP $status answer: $snippet", $code, $status, $retryable, $requestId);
    }
}
