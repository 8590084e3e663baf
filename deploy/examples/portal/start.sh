#!/bin/sh
# Entry point of the Berth example "portal" image (busybox sh).
# Writes a small page naming the task and the host that runs it, then serves it with busybox httpd
# (which does no reverse DNS lookups, so it starts instantly in a namespace without DNS).
set -eu

# Like docker-entrypoint.sh: arguments (a service's `args`, or `berth service create ... -- CMD`)
# run instead of the page server, so one image serves the demo and the tests' probes.
if [ "$#" -gt 0 ]; then
    exec "$@"
fi

PORT="${PORT:-8080}"
TASK="${BERTH_TASK_ID:-unknown}"
SERVICE="${BERTH_SERVICE:-portal}"
SLOT="${BERTH_SLOT:-?}"
NODE="${BERTH_NODE_NAME:-unknown}"
STARTED="$(date -u '+%Y-%m-%dT%H:%M:%SZ')"

# The page is written at start; fall back to /tmp if the root filesystem is read-only.
WWW=/www
if ! (: > "$WWW/.probe") 2>/dev/null; then
    WWW=/tmp/www
    mkdir -p "$WWW"
    cp -R /www/. "$WWW/" 2>/dev/null || true
fi
rm -f "$WWW/.probe"

cat > "$WWW/index.html" <<HTML
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>portal - ${SERVICE} #${SLOT}</title>
<link rel="stylesheet" href="/style.css">
</head>
<body>
<main>
<h1>Berth portal</h1>
<p class="who">portal task=${TASK} host=${NODE}</p>
<table>
<tr><th>service</th><td>${SERVICE}</td></tr>
<tr><th>slot</th><td>${SLOT}</td></tr>
<tr><th>task</th><td>${TASK}</td></tr>
<tr><th>host</th><td>${NODE}</td></tr>
<tr><th>container</th><td>$(hostname)</td></tr>
<tr><th>started</th><td>${STARTED}</td></tr>
</table>
<p class="foot">Served by busybox httpd on port ${PORT}. Reload to see which replica answers.</p>
</main>
</body>
</html>
HTML

# A plain-text line for scripts and tests: curl -s host:port/whoami
echo "portal task=${TASK} service=${SERVICE} slot=${SLOT} host=${NODE}" > "$WWW/whoami"

echo "portal: task=${TASK} host=${NODE} serving ${WWW} on 0.0.0.0:${PORT}" >&2
# As PID 1 of its namespace the shell would ignore SIGTERM (no default action for PID 1), so a
# stop would wait for the SIGKILL deadline: run httpd as a child and forward TERM/INT to it.
httpd -f -v -p "0.0.0.0:${PORT}" -h "$WWW" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child"
trap - TERM INT
wait "$child"
