<?php
/**
 * An IMQ call-out backend: what a game's web backend answers when a queue
 * node asks "may this user join?", "is this message allowed?", and is told
 * "may this user change this state key?", and is told "this user left"; plus
 * the gateway's connect-time auth call-out.
 *
 * Run it with PHP's built-in server, this file as the router script:
 *
 *     php -S 127.0.0.1:9000 examples/php/backend.php
 *
 * and point IMQ at it:
 *
 *     imq dev --api-key "$KEY" --callout '/room/=http://127.0.0.1:9000/imq/room' \
 *             --auth-url http://127.0.0.1:9000/imq/auth
 *
 * Routes (all POST with a JSON body, all answer JSON):
 *
 *   (every body also has "seq", "time_ms" and "node": order by seq per node)
 *   /imq/<name>/join     {"hook":"join","user","session","queue","mounts":[names]}
 *                        → {"allow": true[, "state": {mount: {key: value}}]}
 *                        | {"allow": false, "reason": "..."}
 *   /imq/<name>/publish  {"hook":"publish","user","session","queue","mount","data"|"data_base64"}
 *                        → {"allow": true} | {"allow": true, "data"|"data_base64": ...}
 *                        | {"allow": false, "reason": "..."}
 *   /imq/<name>/set_state {"hook":"set_state","user","session","queue","mount","key",
 *                         "value"|"value_base64" (not for a delete),"delete"}
 *                        → {"allow": true} | {"allow": false, "reason": "..."}
 *   /imq/<name>/leave    {"hook":"leave","user","session","queue"} → 204
 *   /imq/auth            {"token": "..."} → {"user": "id"} | {"allow": false, "reason": "..."}
 *
 * <name> is any word (room, lobby, ...), so one backend can serve several
 * --callout prefixes. The demo policy:
 *
 *   join     users whose id starts with "banned" are refused ("you are banned
 *            from this room"). An allowed join that names a mount "scores"
 *            seeds its key "started" with true (only if not set yet: IMQ
 *            applies seeds to unset keys only).
 *   publish  a payload containing "forbidden" (any case) is refused; the word
 *            "darn" becomes "d**n": in a JSON payload's string field "text"
 *            (or a payload that is one JSON string), in raw bytes anywhere.
 *            An unchanged payload is answered {"allow": true}, so IMQ keeps
 *            the bytes as they were.
 *   set_state  keys starting with "_" are the server's: a player's change of
 *            one (set or delete) is refused ("keys starting with _ are set by
 *            the server"). Anything else is allowed.
 *   leave    appends one JSON line {time, user, session, queue} to the file
 *            named by IMQ_PHP_LEAVE_LOG (default: imq-php-leave.log in the
 *            system temp directory).
 *   auth     token "letmein-<user>" is user <user>; anything else is refused.
 *
 * Malformed input (not POST, bad JSON, missing or mistyped fields, a hook
 * that does not match the URL) is answered 400 {"error": "..."}: IMQ then
 * applies its failure policy (--callout-failure, deny by default).
 *
 * For tests: GET /healthz answers 200. A slow backend is simulated by
 * IMQ_PHP_SLOW_MS (milliseconds to wait before every call-out answer) or at
 * run time by POST /slow {"ms": N} (N = 0 turns it off), which lasts until
 * this server stops. GET /slow answers {"ms": N, "started": K}: K call-outs
 * began their wait since the last POST /slow. Run several workers
 * (PHP_CLI_SERVER_WORKERS=4) so that one slow answer does not hold up the
 * others: the built-in server is otherwise single-threaded.
 */

declare(strict_types=1);

const JSON_FLAGS = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION;

/** BadInput is malformed input: answered 400. */
final class BadInput extends RuntimeException
{
}

/** Sends a JSON answer and ends the request. */
function respond(int $status, mixed $body = null): never
{
    http_response_code($status);
    if ($status !== 204) {
        header('Content-Type: application/json');
        echo json_encode($body, JSON_FLAGS), "\n";
    }
    exit;
}

/** Reads the request body as a JSON object (stdClass, so {} stays {}). */
function readJsonObject(): stdClass
{
    $raw = file_get_contents('php://input');
    if ($raw === false || $raw === '') {
        throw new BadInput('empty body: want a JSON object');
    }
    try {
        $v = json_decode($raw, false, 64, JSON_THROW_ON_ERROR);
    } catch (JsonException $e) {
        throw new BadInput('body is not JSON: ' . $e->getMessage());
    }
    if (!$v instanceof stdClass) {
        throw new BadInput('body must be a JSON object');
    }
    return $v;
}

/** Returns the string field $name of $in, or throws BadInput. */
function str(stdClass $in, string $name): string
{
    if (!isset($in->$name) || !is_string($in->$name)) {
        throw new BadInput("field \"$name\" must be a string");
    }
    return $in->$name;
}

/** Checks the fields every hook carries and that the hook matches the URL. */
function hookInput(string $hook): stdClass
{
    $in = readJsonObject();
    if (str($in, 'hook') !== $hook) {
        throw new BadInput("hook \"{$in->hook}\" posted to the $hook URL");
    }
    str($in, 'user');
    str($in, 'session');
    str($in, 'queue');
    return $in;
}

/** Replaces the word "darn" (any case) by "d**n", keeping the first letter's case. */
function censor(string $s): string
{
    return preg_replace_callback('/\b(d)arn\b/i', static fn(array $m): string => $m[1] . '**n', $s) ?? $s;
}

/** The file where leaves are logged. */
function leaveLogPath(): string
{
    $p = getenv('IMQ_PHP_LEAVE_LOG');
    return $p !== false && $p !== '' ? $p : sys_get_temp_dir() . '/imq-php-leave.log';
}

/** Where the run-time /slow setting is kept (php -S workers share no memory). */
function slowFile(): string
{
    return sys_get_temp_dir() . '/imq-php-backend-slow-' . ($_SERVER['SERVER_PORT'] ?? '0');
}

/** Milliseconds to wait before answering a call-out. */
function slowMs(): int
{
    $f = @file_get_contents(slowFile());
    if ($f !== false && $f !== '') {
        return max(0, (int)$f);
    }
    return max(0, (int)(getenv('IMQ_PHP_SLOW_MS') ?: 0));
}

/** join: refuse banned users; seed the "scores" mount. */
function onJoin(stdClass $in): array
{
    if (!isset($in->mounts) || !is_array($in->mounts)) {
        throw new BadInput('field "mounts" must be an array of mount names');
    }
    foreach ($in->mounts as $m) {
        if (!is_string($m)) {
            throw new BadInput('field "mounts" must be an array of mount names');
        }
    }
    if (str_starts_with($in->user, 'banned')) {
        return ['allow' => false, 'reason' => 'you are banned from this room'];
    }
    $out = ['allow' => true];
    if (in_array('scores', $in->mounts, true)) {
        $out['state'] = ['scores' => ['started' => true]];
    }
    return $out;
}

/** publish: refuse "forbidden", rewrite "darn". */
function onPublish(stdClass $in): array
{
    str($in, 'mount');
    $hasData = property_exists($in, 'data');
    $hasRaw = property_exists($in, 'data_base64');
    if ($hasData === $hasRaw) {
        throw new BadInput('exactly one of "data" and "data_base64" is required');
    }
    if ($hasRaw) {
        $bytes = base64_decode(str($in, 'data_base64'), true);
        if ($bytes === false) {
            throw new BadInput('field "data_base64" is not base64');
        }
        if (stripos($bytes, 'forbidden') !== false) {
            return ['allow' => false, 'reason' => 'message contains a forbidden word'];
        }
        $new = censor($bytes);
        return $new === $bytes ? ['allow' => true] : ['allow' => true, 'data_base64' => base64_encode($new)];
    }
    $data = $in->data;
    if (stripos((string)json_encode($data, JSON_FLAGS), 'forbidden') !== false) {
        return ['allow' => false, 'reason' => 'message contains a forbidden word'];
    }
    if (is_string($data)) {
        $new = censor($data);
        return $new === $data ? ['allow' => true] : ['allow' => true, 'data' => $new];
    }
    if ($data instanceof stdClass && isset($data->text) && is_string($data->text)) {
        $new = censor($data->text);
        if ($new !== $data->text) {
            $data->text = $new;
            return ['allow' => true, 'data' => $data];
        }
    }
    return ['allow' => true];
}

/** set_state: keys starting with "_" are the server's. */
function onSetState(stdClass $in): array
{
    str($in, 'mount');
    $key = str($in, 'key');
    if (!isset($in->delete) || !is_bool($in->delete)) {
        throw new BadInput('field "delete" must be a boolean');
    }
    $hasValue = property_exists($in, 'value') || property_exists($in, 'value_base64');
    if ($in->delete === $hasValue) {
        throw new BadInput('a set carries "value" or "value_base64", a delete neither');
    }
    if (str_starts_with($key, '_')) {
        return ['allow' => false, 'reason' => 'keys starting with _ are set by the server'];
    }
    return ['allow' => true];
}

/** leave: log it. */
function onLeave(stdClass $in): void
{
    $line = json_encode([
        'time' => (new DateTimeImmutable())->format(DATE_RFC3339_EXTENDED),
        'user' => $in->user,
        'session' => $in->session,
        'queue' => $in->queue,
    ], JSON_FLAGS) . "\n";
    if (file_put_contents(leaveLogPath(), $line, FILE_APPEND | LOCK_EX) === false) {
        error_log('imq backend: cannot append to ' . leaveLogPath());
    }
}

/** auth: "letmein-<user>" is <user>. */
function onAuth(stdClass $in): array
{
    $token = str($in, 'token');
    if (preg_match('/^letmein-(.+)$/s', $token, $m)) {
        return ['user' => $m[1]];
    }
    return ['allow' => false, 'reason' => 'unknown token'];
}

$method = $_SERVER['REQUEST_METHOD'] ?? 'GET';
$path = parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH) ?: '/';

try {
    if ($path === '/healthz') {
        respond(200, ['ok' => true]);
    }
    if ($path === '/slow') {
        if ($method === 'POST') {
            $ms = readJsonObject()->ms ?? null;
            if (!is_int($ms) || $ms < 0) {
                throw new BadInput('field "ms" must be a non-negative integer');
            }
            file_put_contents(slowFile(), (string)$ms, LOCK_EX);
            file_put_contents(slowFile() . '.started', '', LOCK_EX);
        }
        clearstatcache();
        respond(200, ['ms' => slowMs(), 'started' => (int)@filesize(slowFile() . '.started')]);
    }
    $isHook = preg_match('#^/imq/[A-Za-z0-9_.-]+/(join|publish|set_state|leave)$#', $path, $m) === 1;
    if (!$isHook && $path !== '/imq/auth') {
        respond(404, ['error' => "no route for $path"]);
    }
    if ($method !== 'POST') {
        header('Allow: POST');
        respond(405, ['error' => 'use POST']);
    }
    if (($ms = slowMs()) > 0) {
        file_put_contents(slowFile() . '.started', '.', FILE_APPEND | LOCK_EX); // counted by GET /slow
        usleep($ms * 1000);
    }
    if (!$isHook) {
        respond(200, onAuth(readJsonObject()));
    }
    $hook = $m[1];
    $in = hookInput($hook);
    switch ($hook) {
        case 'join':
            respond(200, onJoin($in));
        case 'publish':
            respond(200, onPublish($in));
        case 'set_state':
            respond(200, onSetState($in));
        default:
            onLeave($in);
            respond(204);
    }
} catch (BadInput $e) {
    respond(400, ['error' => $e->getMessage()]);
} catch (Throwable $e) {
    error_log('imq backend: ' . $e);
    respond(500, ['error' => 'internal error']);
}
