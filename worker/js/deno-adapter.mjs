// bext runtime adapter for Deno, loaded with `--preload` before the app.
// Deno cannot listen on an inherited descriptor, so the app's
// `Deno.serve({ port })` is rewritten to serve on the Unix socket path the
// supervisor chose; the readiness token is printed once it listens. The
// socket path and token come in this module's URL query (no permission is
// needed to read them).
const params = new URL(import.meta.url).searchParams;
const worker = { socket: params.get("socket"), token: params.get("token") };
if (worker.socket && worker.token && typeof Deno?.serve === "function") {
  const serve = Deno.serve.bind(Deno);
  let taken = false;

  const bextServe = function (...args) {
    // Deno.serve(handler) | Deno.serve(options, handler) | Deno.serve({ ...options, handler })
    let options = {};
    let handler;
    if (typeof args[0] === "function") {
      handler = args[0];
    } else {
      options = args[0] ?? {};
      handler = typeof args[1] === "function" ? args[1] : options.handler;
    }
    if (taken || "path" in options) return serve(...args);
    taken = true;

    const { port: _port, hostname: _hostname, cert: _cert, key: _key, onListen, ...rest } = options;
    const unixOptions = {
      ...rest,
      path: worker.socket,
      transport: "unix",
      onListen(addr) {
        Deno.stdout.writeSync(new TextEncoder().encode(`\n${worker.token}\n`));
        if (typeof onListen === "function") onListen(addr);
      },
    };
    delete unixOptions.handler;
    return serve(unixOptions, handler);
  };

  Object.defineProperty(Deno, "serve", { value: bextServe, writable: true, configurable: true });
}
