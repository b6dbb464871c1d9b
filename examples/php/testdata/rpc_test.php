<?php
/**
 * Drives ImqClient against a live gateway for php_test.go. Each step prints
 * one JSON line: {"step": name, "result": ...} or {"step": name, "error":
 * {code, http, retryable, request_id, message}}; the Go test asserts on
 * them. Anything but an ImqException (a bug in the client) exits 1.
 *
 * Environment: IMQ_URL, IMQ_API_KEY (all methods, all queues), IMQ_LOBBY_KEY
 * (publish only, /lobby/ only), IMQ_PHP_TRANSPORT (curl|stream), IMQ_QUEUE
 * (the queue to work on, joined by a Go watcher), IMQ_VICTIM (a user the Go
 * test connected, to kick), IMQ_DEAD_URL (a URL where nothing listens).
 */

declare(strict_types=1);

require __DIR__ . '/../ImqClient.php';

function env(string $name): string
{
    $v = getenv($name);
    if ($v === false || $v === '') {
        fwrite(STDERR, "rpc_test.php: $name is not set\n");
        exit(2);
    }
    return $v;
}

/** Runs one step and prints its line. */
function step(string $name, callable $f): void
{
    try {
        $line = ['step' => $name, 'result' => $f()];
    } catch (ImqException $e) {
        $line = ['step' => $name, 'error' => [
            'code' => $e->getErrorCode(),
            'get_code' => $e->getCode(),
            'http' => $e->getHttpStatus(),
            'retryable' => $e->isRetryable(),
            'request_id' => $e->getRequestId(),
            'message' => $e->getMessage(),
        ]];
    } catch (Throwable $e) {
        fwrite(STDERR, "rpc_test.php: step $name: " . get_class($e) . ': ' . $e->getMessage() . "\n" . $e->getTraceAsString() . "\n");
        exit(1);
    }
    echo json_encode($line, JSON_UNESCAPED_SLASHES | JSON_THROW_ON_ERROR), "\n";
}

$url = env('IMQ_URL');
$transport = env('IMQ_PHP_TRANSPORT');
$q = env('IMQ_QUEUE');
$victim = env('IMQ_VICTIM');
$imq = new ImqClient($url, env('IMQ_API_KEY'), 10.0, $transport);
$lobby = new ImqClient($url, env('IMQ_LOBBY_KEY'), 10.0, $transport);

step('publish_json', fn() => $imq->publish($q, 'chat', ['text' => 'hello from php', 'n' => 1]));
step('publish_raw', fn() => $imq->publish($q, 'chat', "\x00\xffraw", true));
step('set_state', fn() => $imq->setState($q, 'scores', 'alice', 42));
step('set_state_raw', fn() => $imq->setState($q, 'scores', 'blob', "\x01\x02", true));
step('get_state', fn() => $imq->getState($q, 'scores'));
step('get_state_keys', fn() => $imq->getState($q, 'scores', ['alice']));
step('delete_state', fn() => $imq->deleteState($q, 'scores', 'blob'));
step('history', function () use ($imq, $q) {
    $h = $imq->history($q, 'chat', 0, 10);
    // The bytes of each event, as the application would read them.
    $h['bytes_base64'] = array_map(fn(array $ev) => base64_encode(ImqClient::bytesOf($ev)), $h['events']);
    return $h;
});
step('history_since', fn() => $imq->history($q, 'chat', 1, 1));
step('queue_info', fn() => $imq->queueInfo($q));
step('request_id', function () use ($imq, $q) {
    $imq->setRequestId('php-test-rid-1');
    $r = $imq->publish($q, 'chat', ['text' => 'with an id']);
    return ['offset' => $r['offset'], 'request_id' => $imq->lastRequestId()];
});
step('request_id_generated', function () use ($imq, $q) {
    $accepted = $imq->setRequestId(str_repeat('x', 200)); // too long: not sent
    $imq->publish($q, 'chat', ['text' => 'with a generated id']);
    return ['request_id' => $imq->lastRequestId(), 'accepted' => $accepted];
});
// A queue whose "chat" is a state mount: the broadcast fails there alone.
step('make_state_chat', fn() => $imq->setState($q . '-state', 'chat', 'k', 1));
step('broadcast', fn() => $imq->broadcast([$q, $q . '-b', $q . '-state'], 'chat', ['text' => 'to all']));
// An invalid name refuses the whole call: nothing is published.
step('broadcast_invalid', fn() => $imq->broadcast([$q, 'no-slash'], 'chat', ['text' => 'never']));
step('batch', fn() => $imq->batch([
    ['publish', ['queue' => $q, 'mount' => 'chat', 'data' => ['text' => 'in a batch']]],
    ['method' => 'get_state', 'params' => ['queue' => $q, 'mount' => 'scores']],
    ['publish', ['queue' => 'no-slash', 'mount' => 'chat', 'data' => 1]],
]));
step('kick', fn() => $imq->kick($victim, 'bye from php'));
step('lobby_ok', fn() => $lobby->publish('/lobby/php', 'chat', ['text' => 'lobby']));

// Errors.
step('err_unauthorized', fn() => (new ImqClient($url, 'not-a-key-0123456789abcdef', 10.0, $transport))->publish($q, 'chat', 1));
step('err_forbidden_queue', fn() => $lobby->publish($q, 'chat', ['text' => 'not my prefix']));
step('err_forbidden_method', fn() => $lobby->setState('/lobby/php', 'scores', 'k', 1));
step('err_invalid_queue', function () use ($imq) {
    $imq->setRequestId('php-test-rid-err');
    return $imq->publish('room-without-slash', 'chat', 1);
});
step('err_unknown_method', fn() => $imq->call('no_such_method', ['queue' => $q]));
step('err_not_found', fn() => $imq->getState('/room/php-never-created', 'scores'));
step('err_unknown_field', fn() => $imq->call('publish', ['queue' => $q, 'mount' => 'chat', 'data' => 1, 'bogus' => true]));
step('err_both_data', fn() => $imq->call('publish', ['queue' => $q, 'mount' => 'chat', 'data' => 1, 'data_base64' => 'AQ==']));
step('err_payload_too_large', fn() => $imq->publish($q, 'chat', str_repeat('x', 70 * 1024)));
step('err_body_too_large', fn() => $imq->publish($q, 'chat', str_repeat('x', 1100 * 1024)));
// Consecutive calls share one connection (curl only; the stream fallback
// opens one per call): curl counts no new connection for the second.
step('keepalive', function () use ($imq, $q, $transport) {
    if ($transport !== 'curl') {
        return ['new_connections' => null];
    }
    $imq->queueInfo($q);
    $imq->queueInfo($q);
    $h = (new ReflectionProperty(ImqClient::class, 'curl'))->getValue($imq);
    return ['new_connections' => curl_getinfo($h, CURLINFO_NUM_CONNECTS)];
});
step('err_unreachable', fn() => (new ImqClient(env('IMQ_DEAD_URL'), 'whatever-0123456789abcdef', 2.0, $transport))->publish($q, 'chat', 1));
