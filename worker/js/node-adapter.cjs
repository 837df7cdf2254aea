'use strict';
// bext runtime adapter for Node.js, preloaded with `--require` by the bext
// supervisor. The app is not modified: its first HTTP server that asks to
// listen on a TCP port (`app.listen(3000)`, `serve({ port })`, Next's
// standalone server.js, `server.listen()`) listens instead on the Unix socket
// that the supervisor created and passed down as an inherited descriptor.
// Once that server is listening, the adapter prints the readiness token.
(function bextNodeAdapter() {
  const fd = Number(process.env.BEXT_LISTEN_FD);
  const token = process.env.BEXT_READY_TOKEN;
  if (!Number.isInteger(fd) || fd < 0 || !token) return;

  // Processes the app spawns must not inherit the adapter or the descriptor.
  // Under `bext dev` they do until one of them listens: a development server
  // (`next dev`, `node --watch`) is a parent that watches and a child that
  // serves, restarted by the parent.
  function forget() {
    delete process.env.BEXT_LISTEN_FD;
    delete process.env.BEXT_READY_TOKEN;
    delete process.env.BEXT_ADAPTER_PASS_DOWN;
    if (process.env.NODE_OPTIONS) {
      process.env.NODE_OPTIONS = process.env.NODE_OPTIONS
        .replace(/--require(=|\s+)("[^"]*node-adapter\.cjs"|\S*node-adapter\.cjs)/g, '')
        .trim();
    }
  }
  const passDown = process.env.BEXT_ADAPTER_PASS_DOWN === '1';
  if (!passDown) forget();

  const fs = require('fs');
  const net = require('net');
  const http = require('http');

  const listen = net.Server.prototype.listen;
  let taken = false;

  // Does this listen() call ask for a TCP port (as opposed to a path, a
  // descriptor or a handle the app manages itself)?
  function asksForTcpPort(args) {
    const first = args[0];
    if (first === undefined || first === null || typeof first === 'function') return true;
    if (typeof first === 'number') return true;
    if (typeof first === 'string') return /^\d+$/.test(first);
    if (typeof first === 'object') {
      return !('fd' in first || 'path' in first || 'handle' in first || '_handle' in first);
    }
    return false;
  }

  // `listen(0)`, `listen({ port: 0 })`: explicitly any free port.
  function asksForEphemeralPort(args) {
    const first = args[0];
    const port = typeof first === 'object' && first !== null ? first.port : first;
    return port === 0 || port === '0';
  }

  function requestedPort(args) {
    const first = args[0];
    const port = typeof first === 'object' && first !== null ? first.port : first;
    const n = Number(port);
    return Number.isInteger(n) && n >= 0 ? n : 0;
  }

  net.Server.prototype.listen = function bextListen(...args) {
    if (taken || !(this instanceof http.Server) || !asksForTcpPort(args)) {
      return listen.apply(this, args);
    }
    // Passed down, the socket goes to a server on a real port: a helper
    // on an ephemeral one (port 0) is not the app.
    if (passDown && asksForEphemeralPort(args)) {
      return listen.apply(this, args);
    }
    taken = true;
    if (passDown) forget();
    // Node reports no address for a server listening on an inherited
    // descriptor; apps (Hono's serve callback, Next's startup log) read
    // `address().port`, so report the port the app asked for.
    const requested = requestedPort(args);
    this.address = () => ({ address: '127.0.0.1', family: 'IPv4', port: requested });
    const callback = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    this.once('listening', () => {
      // One write of one short line: atomic on a pipe, so it cannot be split
      // by the app's own output. The leading newline ends any partial line.
      fs.writeSync(1, `\n${token}\n`);
    });
    return callback ? listen.call(this, { fd }, callback) : listen.call(this, { fd });
  };

  // Belt and braces beside the kernel's parent-death signal, which only
  // reaches the process the supervisor forked: exit when re-parented.
  const parent = process.ppid;
  const watch = setInterval(() => {
    if (process.ppid !== parent) process.exit(1);
  }, 1000);
  watch.unref();
})();
