<?php
/**
 * A tour of ImqClient against a running `imq dev`.
 *
 *     KEY=$(openssl rand -hex 16)
 *     imq dev --api-key "$KEY"                      # in one terminal
 *     IMQ_API_KEY="$KEY" php examples/php/demo.php  # in another
 *
 * Environment: IMQ_URL (default http://127.0.0.1:8080), IMQ_API_KEY
 * (required), IMQ_DEMO_QUEUE (default /room/php-demo). To watch the events
 * arrive, connect a client first, e.g. with websocat:
 *
 *     websocat -t --protocol imq.v1.json 'ws://127.0.0.1:8080/ws?user=watcher'
 *     {"id":"1","join":{"queue":"/room/php-demo","mounts":[{"name":"chat","kind":"MESSAGE"},{"name":"scores","kind":"STATE"}]}}
 */

declare(strict_types=1);

require __DIR__ . '/ImqClient.php';

$url = getenv('IMQ_URL') ?: 'http://127.0.0.1:8080';
$key = getenv('IMQ_API_KEY') ?: '';
$queue = getenv('IMQ_DEMO_QUEUE') ?: '/room/php-demo';
if ($key === '') {
    fwrite(STDERR, "demo.php: set IMQ_API_KEY to a key given to imq dev --api-key\n");
    exit(2);
}

function show(string $what, mixed $result): void
{
    echo str_pad($what, 28), json_encode($result, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE), "\n";
}

$imq = new ImqClient($url, $key);
echo "IMQ admin RPC at $url, queue $queue\n\n";

try {
    // Publish: any JSON value, or raw bytes. Subscribers see sender "".
    show('publish JSON', $imq->publish($queue, 'chat', ['text' => 'Welcome to the room!']));
    show('publish raw bytes', $imq->publish($queue, 'chat', "\x01\x02binary", raw: true));
    echo '  request id of that call:   ', $imq->lastRequestId(), "\n";

    // State: set, read, delete.
    show('set_state scores/alice', $imq->setState($queue, 'scores', 'alice', ['points' => 10, 'level' => 2]));
    show('set_state scores/bob', $imq->setState($queue, 'scores', 'bob', ['points' => 7, 'level' => 1]));
    show('get_state scores', $imq->getState($queue, 'scores'));
    show('delete_state scores/bob', $imq->deleteState($queue, 'scores', 'bob'));
    show('get_state scores [alice]', $imq->getState($queue, 'scores', ['alice']));

    // History: events after an offset, and their bytes.
    $h = $imq->history($queue, 'chat', 0, 10);
    show('history chat', ['head' => $h['head'], 'events' => count($h['events']), 'missed' => $h['missed'], 'more' => $h['more']]);
    foreach ($h['events'] as $ev) {
        printf("  #%d from %s: %s\n", $ev['offset'], $ev['sender'] === '' ? '(backend)' : $ev['sender'], ImqClient::bytesOf($ev) === "\x01\x02binary" ? '<raw bytes>' : ImqClient::bytesOf($ev));
    }

    // Queue info: node, mounts, subscribers.
    $info = $imq->queueInfo($queue);
    show('queue_info', ['node' => $info['node'], 'head' => $info['head'], 'mounts' => array_column($info['mounts'], 'kind', 'name'), 'subscribers' => count($info['subscribers'])]);

    // Broadcast and batch: one request, many operations.
    show('broadcast', $imq->broadcast([$queue, '/room/php-demo-2'], 'chat', ['text' => 'Server restarts in 5 minutes']));
    show('batch', $imq->batch([
        ['publish', ['queue' => $queue, 'mount' => 'chat', 'data' => ['text' => 'one']]],
        ['set_state', ['queue' => $queue, 'mount' => 'scores', 'key' => 'alice', 'value' => ['points' => 11, 'level' => 2]]],
    ]));

    // Kick: closes every session of the user, on every gateway.
    show('kick watcher', $imq->kick('watcher', 'the demo kicks you'));
} catch (ImqException $e) {
    fprintf(STDERR, "demo.php: %s (code %s, HTTP %d, request %s)\n", $e->getMessage(), $e->getErrorCode(), $e->getHttpStatus(), $e->getRequestId());
    exit(1);
}

// Errors: one exception type; match on the code, never on the message.
echo "\nErrors:\n";
$tries = [
    'invalid queue name' => fn() => $imq->publish('no-leading-slash', 'chat', 1),
    'unknown method' => fn() => $imq->call('publsh', ['queue' => $queue]),
    'queue that does not exist' => fn() => $imq->getState('/room/php-demo-nobody-here', 'scores'),
    'wrong API key' => fn() => (new ImqClient($url, 'wrong-key-0123456789abcdef'))->publish($queue, 'chat', 1),
];
foreach ($tries as $what => $f) {
    try {
        $f();
        echo "  $what: unexpectedly succeeded\n";
    } catch (ImqException $e) {
        printf("  %-26s %s (HTTP %d, retryable %s): %s\n", $what, $e->getErrorCode(), $e->getHttpStatus(), $e->isRetryable() ? 'yes' : 'no', $e->getMessage());
    }
}
