#!/usr/bin/env bash
# testssl.sh (the Debian package) against bext's HTTPS listener (issue 13):
# a certificate from a CA made here (openssl, ECDSA P-256), `bext serve`
# with the static fixture on it, every check testssl.sh runs by default.
# Prints the count of findings by severity and every finding of severity
# MEDIUM or worse; exits 1 if any is HIGH or CRITICAL.
#
# Usage: bench/testssl.sh   (make bench-deps installs testssl.sh)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need testssl openssl python3

cd "$WORK"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 400 -subj "/CN=bext test CA" -out ca.pem 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out site.key 2>/dev/null
openssl req -new -key site.key -subj "/CN=tls.test" -out site.csr 2>/dev/null
printf 'subjectAltName=DNS:tls.test\nextendedKeyUsage=serverAuth\n' >site.ext
openssl x509 -req -in site.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile site.ext -out leaf.pem 2>/dev/null
cat leaf.pem ca.pem >site.pem

PORT="$(free_port)"
cat >platform.toml <<TOML
[platform]
listen = "127.0.0.1:$PORT"
data_dir = "$WORK/data"
[platform.tls]
http_listen = "127.0.0.1:0"
[apps.site]
source = "$ROOT/tests/fixtures/static"
domains = ["tls.test"]
tls = { cert = "$WORK/site.pem", key = "$WORK/site.key", hsts = "1y" }
TOML
BEXT_LOG_FORMAT=json "$ROOT/target/release/bext" serve --config platform.toml 2>bext.log >/dev/null &
PIDS+=($!)
wait_until 60 grep -q '"apps started' bext.log

# --ip: connect there, with SNI and Host tls.test; the CA is not a public
# one, so the chain-of-trust finding is expected and left out below.
testssl --quiet --color 0 --warnings off --ip 127.0.0.1 --add-ca ca.pem \
  --jsonfile testssl.json "https://tls.test:$PORT/" >testssl.out 2>&1 || true

python3 - testssl.json <<'PY'
import json, sys
findings = json.load(open(sys.argv[1]))
order = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "WARN", "INFO", "OK"]
counts = {s: 0 for s in order}
bad = []
# Findings about what the test CA put in the certificate, not about the
# server: no CRL or OCSP URI (a public CA's certificate has them).
about_the_test_ca = {"cert_revocation"}
excluded = [f for f in findings if f["id"] in about_the_test_ca]
findings = [f for f in findings if f["id"] not in about_the_test_ca]
for f in findings:
    sev = f.get("severity", "INFO")
    counts[sev] = counts.get(sev, 0) + 1
    if sev in ("CRITICAL", "HIGH", "MEDIUM", "LOW", "WARN"):
        bad.append(f)
print("| severity | findings |")
print("|---|---:|")
for s in order:
    print(f"| {s} | {counts.get(s, 0)} |")
print()
for f in bad:
    print(f"- {f['severity']} `{f['id']}`: {f['finding']}")
for f in excluded:
    print(f"- (left out, about the test CA's certificate) {f['severity']} `{f['id']}`: {f['finding']}")
for f in findings:
    if f["id"] in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "ALPN_HTTP2", "HSTS", "FS_KEMs", "FS_ECDHE_curves", "cipher_order"):
        print(f"- `{f['id']}`: {f['finding']}")
# A scan that could not run has FATAL or scanProblem entries and few OKs.
broken = [f for f in findings if f.get("severity") == "FATAL" or f["id"] == "scanProblem"]
for f in broken:
    print(f"- scan problem `{f['id']}`: {f['finding']}")
if broken or counts["OK"] < 20:
    sys.exit("testssl.sh did not complete its scan")
sys.exit(1 if counts["CRITICAL"] or counts["HIGH"] else 0)
PY
