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
  // Next.js apps: where the app's shared cache lives in the supervisor.
  const nextCache = {
    socket: process.env.BEXT_NEXT_CACHE_SOCKET,
    token: process.env.BEXT_NEXT_CACHE_TOKEN,
  };
  delete process.env.BEXT_NEXT_CACHE_SOCKET;
  delete process.env.BEXT_NEXT_CACHE_TOKEN;

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

  if (nextCache.socket && nextCache.token) installNextCache(nextCache.socket, nextCache.token);

  // Belt and braces beside the kernel's parent-death signal, which only
  // reaches the process the supervisor forked: exit when re-parented.
  const parent = process.ppid;
  const watch = setInterval(() => {
    if (process.ppid !== parent) process.exit(1);
  }, 1000);
  watch.unref();

  // One Next.js cache for all the app's workers. Next takes the class at
  // `globalThis[Symbol.for('@next/cache-handlers')].FetchCache` as its
  // `cacheHandler` when the app configures none (an app that does keeps
  // its own). The class is Next's own file-system cache without its
  // per-process memory: every worker reads and writes the same entries in
  // `.next`. What stays per process in Next, the revalidated tags (its
  // `tagsManifest`), goes through the supervisor: a revalidation in one
  // worker is sent there, applied by every other worker (which acknowledge
  // it) and turned into a purge of bext's HTTP cache. The answer to a
  // request through bext (it carries `x-bext-primary`) names the tags of the
  // Next entry it showed in `x-next-cache-tags`, with the page's path as
  // Next's implicit tag `_N_T_<path>`: bext keeps them with its copy, and
  // purges by them.
  function installNextCache(socketPath, secret) {
    const path = require('path');
    const SYMBOL = Symbol.for('@next/cache-handlers');
    const RESPONSE_KINDS = new Set(['APP_PAGE', 'APP_ROUTE', 'PAGES']);
    // What each answer shows: by its request (Next hands the handler the
    // request's own headers object), else by its URL (a request Next
    // answered from another's lookup of the same entry).
    const shownBy = new WeakMap();
    const MAX_URLS = 1000;
    const shownAt = new Map();
    // Next's own limits on an entry's tags.
    const MAX_TAGS = 128;
    const MAX_TAG_LEN = 256;
    // How long a worker waits for the supervisor's tag state before it
    // reads the cache anyway.
    const SYNC_WAIT_MS = 1000;

    // A module of the `next` the app runs (already loaded by Next when it
    // asks for the handler), else from the app's directory.
    function nextModule(rel) {
      const suffix = path.sep + path.join('next', 'dist', rel);
      for (const id of Object.keys(require.cache)) {
        if (id.endsWith(suffix)) return { id, exports: require.cache[id].exports };
      }
      try {
        const id = require.resolve('next/dist/' + rel, { paths: [process.cwd()] });
        return { id, exports: require(id) };
      } catch {
        return null;
      }
    }

    let manifest = null;
    let nextVersion = 'unknown';
    const link = {
      socket: null,
      buffer: '',
      // Messages with effects sent (revalidations, new entries), and
      // whether the supervisor may still hear them.
      sent: 0,
      dead: false,
      synced: null,
      connect() {
        if (this.socket) return;
        let done;
        this.synced = new Promise((resolve) => {
          done = resolve;
        });
        this.done = done;
        setTimeout(done, SYNC_WAIT_MS).unref();
        const s = net.createConnection(socketPath);
        this.socket = s;
        s.setEncoding('utf8');
        s.on('data', (chunk) => {
          this.buffer += chunk;
          let at;
          while ((at = this.buffer.indexOf('\n')) >= 0) {
            const line = this.buffer.slice(0, at);
            this.buffer = this.buffer.slice(at + 1);
            this.receive(line);
          }
          if (this.buffer.length > 1 << 20) this.buffer = '';
        });
        // Without the supervisor, the worker goes on with its own state
        // (the supervisor closes the socket only when the app stops).
        s.on('error', () => {});
        s.on('close', () => {
          this.dead = true;
          done();
        });
        s.unref();
        s.write(
          JSON.stringify({
            t: 'hello',
            token: secret,
            pid: process.pid,
            worker: process.env.BEXT_WORKER || '',
            next: nextVersion,
          }) + '\n',
        );
      },
      receive(line) {
        let m;
        try {
          m = JSON.parse(line);
        } catch {
          return;
        }
        if (m.t === 'tags' && Array.isArray(m.tags)) {
          for (const [tag, update] of m.tags) {
            if (typeof tag !== 'string' || !update || typeof update !== 'object') continue;
            const entry = { ...(manifest.get(tag) || {}) };
            if (typeof update.stale === 'number') entry.stale = Math.max(entry.stale || 0, update.stale);
            if (typeof update.expired === 'number') entry.expired = update.expired;
            manifest.set(tag, entry);
          }
          if (m.ack !== undefined) this.send({ t: 'ack', id: m.ack });
        } else if (m.t === 'synced') {
          this.done();
        }
      },
      // Messages are numbered: a response this worker sends after one
      // carries the numbers, and bext passes it on only once the message
      // has been applied (a revalidation: everywhere).
      send(message, counted) {
        if (!this.socket || this.socket.destroyed) return;
        if (counted) message.n = ++this.sent;
        this.socket.write(JSON.stringify(message) + '\n');
      },
    };

    // The page an entry's key names (`/route-cache/KIND/HASH/$PATH`, with
    // `/` as `/index`; before Next 16, the path itself).
    function pageOf(key) {
      const at = key.startsWith('/route-cache/') ? key.indexOf('/$') : -1;
      const page = at >= 0 ? key.slice(at + 2) : key;
      if (page === '/index') return '/';
      return page.startsWith('/index/') ? page.slice('/index'.length) : page;
    }

    // A page's implicit tag, encoded as Next encodes tags for a header
    // (its `encodeHeaderSafe`: runs outside tab and printable ASCII are
    // percent-encoded).
    function implicitTag(key) {
      return `_N_T_${pageOf(key)}`.replace(/[^\t\x20-\x7e]+/g, (run) => encodeURIComponent(run));
    }

    // The tags of an entry, with its page's implicit one.
    function tagsOf(key, value) {
      const header = value && value.headers && value.headers['x-next-cache-tags'];
      const tags = typeof header === 'string'
        ? header.split(',').filter((t) => t && t.length <= MAX_TAG_LEN && !/[^\t\x20-\x7e]/.test(t)).slice(0, MAX_TAGS)
        : [];
      const implicit = implicitTag(key);
      if (implicit.length <= MAX_TAG_LEN && !tags.includes(implicit)) tags.push(implicit);
      return tags;
    }

    function shows(headers, primary, key, value) {
      const tags = tagsOf(key, value).join(',');
      shownBy.set(headers, tags);
      if (shownAt.size >= MAX_URLS) shownAt.clear();
      shownAt.set(primary, tags);
    }

    let temporaries = 0;
    async function atomicWrite(file, data) {
      const temporary = `${file}.bext-${process.pid}-${++temporaries}.tmp`;
      try {
        await fs.promises.writeFile(temporary, data);
        await fs.promises.rename(temporary, file);
      } catch (error) {
        await fs.promises.unlink(temporary).catch(() => {});
        throw error;
      }
    }

    let FetchCache;
    function fetchCache() {
      if (FetchCache !== undefined) return FetchCache || undefined;
      const fsCache = nextModule(path.join('server', 'lib', 'incremental-cache', 'file-system-cache.js'));
      const tags = nextModule(path.join('server', 'lib', 'incremental-cache', 'tags-manifest.external.js'));
      const Base = fsCache && (fsCache.exports.default || fsCache.exports);
      if (typeof Base !== 'function' || !tags || !(tags.exports.tagsManifest instanceof Map)) {
        FetchCache = null;
        return undefined;
      }
      try {
        const root = fsCache.id.slice(0, fsCache.id.lastIndexOf(path.sep + path.join('dist', 'server')));
        nextVersion = String(require(path.join(root, 'package.json')).version);
      } catch {
        // (reported as unknown)
      }
      // Next 16's tag entries ({stale, expired}); 15 keeps other ones.
      if (!(Number(nextVersion.split('.')[0]) >= 16)) {
        FetchCache = null;
        return undefined;
      }
      manifest = tags.exports.tagsManifest;
      FetchCache = class BextNextCache extends Base {
        constructor(ctx) {
          // Every worker reads what the others write: each file is written
          // whole under another name, then renamed over the old one.
          const fs = ctx.fs && { ...ctx.fs, writeFile: atomicWrite };
          super({ ...ctx, fs, maxMemoryCacheSize: 0 });
          const headers = ctx._requestHeaders || {};
          this.bextHeaders = headers;
          const primary = headers['x-bext-primary'];
          this.bextPrimary = typeof primary === 'string' ? primary : null;
          // Next regenerating a page on the app's own demand
          // (`res.revalidate`), not for a request.
          this.onDemand = typeof headers['x-prerender-revalidate'] === 'string';
          link.connect();
        }

        async get(key, ctx) {
          await link.synced;
          const data = await super.get(key, ctx);
          if (data && data.value && this.bextPrimary && ctx && RESPONSE_KINDS.has(ctx.kind)) {
            shows(this.bextHeaders, this.bextPrimary, key, data.value);
          }
          return data;
        }

        async set(key, data, ctx) {
          await super.set(key, data, ctx);
          const response = data ? RESPONSE_KINDS.has(data.kind) : key.startsWith('/route-cache/');
          if (!response) return;
          if (this.bextPrimary) shows(this.bextHeaders, this.bextPrimary, key, data);
          else if (this.onDemand) link.send({ t: 'set', tag: implicitTag(key) }, true);
        }

        async revalidateTag(tags, durations) {
          const list = typeof tags === 'string' ? [tags] : Array.isArray(tags) ? tags : [];
          // Next's own update of its tags runs to its end at once; the
          // message leaves before this call returns, so a response written
          // right after it already carries its number.
          const applied = super.revalidateTag(list, durations);
          if (list.length > 0) {
            link.send(
              {
                t: 'rev',
                tags: list.map((tag) => [tag, manifest.get(tag) || {}]),
                soft: Boolean(durations) && !(durations.expire <= 0),
              },
              true,
            );
          }
          await applied;
        }
      };
      return FetchCache;
    }

    const holder = globalThis[SYMBOL] || {};
    if (!('FetchCache' in holder)) {
      Object.defineProperty(holder, 'FetchCache', { get: fetchCache, configurable: true, enumerable: true });
    }
    globalThis[SYMBOL] = holder;

    // On the way out: the number of this worker's last message with
    // effects, on every response after one (while the supervisor hears
    // them), and what the answer shows.
    const writeHead = http.ServerResponse.prototype.writeHead;
    http.ServerResponse.prototype.writeHead = function bextWriteHead(...args) {
      if (!this.headersSent) {
        if (link.sent > 0 && !link.dead) {
          this.setHeader('x-bext-next-sync', `${process.pid}:${link.sent}`);
        }
        const headers = this.req && this.req.headers;
        const primary = headers && headers['x-bext-primary'];
        if (typeof primary === 'string') {
          const tags = shownBy.get(headers) ?? shownAt.get(primary);
          try {
            if (tags) this.setHeader('x-next-cache-tags', tags);
          } catch {
            // (Never in the way of the answer.)
          }
        }
      }
      return writeHead.apply(this, args);
    };
  }
})();
