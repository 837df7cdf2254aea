// Starts the origin server of the `http-cache-tests` suite (Mark Nottingham's
// HTTP caching tests, https://cache-tests.fyi) as a plain Node app.
//
//   PORT=8000 node tests/cache-tests/origin.mjs
//
// The suite's own entry point is node_modules/http-cache-tests/server/server.mjs.
// It is meant to be started with `npm run server --port=N`, so it reads its
// settings from npm's environment (npm_config_port, npm_config_protocol,
// npm_config_pidfile) and crashes if they are missing. This wrapper fills them
// in from PORT (default 8000) and then loads server.mjs unchanged; server.mjs
// does `http.createServer(handler).listen(port)` with the port as a numeric
// string, on all interfaces, and prints "Listening on http://<addr>:<port>/".
//
// It needs no working directory: the test endpoints (/config, /test, /state)
// are served from memory; only other paths read files relative to cwd (the
// suite's browser pages), which the cache tests never request.
import { fileURLToPath } from 'node:url'
import path from 'node:path'

const here = path.dirname(fileURLToPath(import.meta.url))
const env = process.env
env.npm_config_port = env.PORT || env.npm_config_port || '8000'
env.npm_config_protocol = env.npm_config_protocol || 'http'
// server.mjs always writes its pid to this file (by default server.pid in the
// working directory); discard it unless one is asked for.
env.npm_config_pidfile = env.npm_config_pidfile || '/dev/null'

await import(path.join(here, 'node_modules/http-cache-tests/server/server.mjs'))
