//! The JavaScript runtime adapters that bext ships.
//!
//! * Node.js: `node-adapter.cjs`, preloaded with `--require`. It makes the
//!   app's first `http.Server#listen(port)` listen on [`LISTEN_FD`] instead
//!   and prints the readiness token once the server is listening.
//! * Deno: the runtime cannot listen on an inherited descriptor, so the
//!   adapter (`deno-adapter.mjs`, loaded with `--preload`) rewrites
//!   `Deno.serve({port})` to `Deno.serve({path})` on the socket path the
//!   supervisor chose.
//!
//! Readiness is a line on the worker's stdout holding a random per-launch
//! token: it works for every runtime, needs no extra descriptor, and cannot be
//! produced by accident.
//!
//! [`LISTEN_FD`]: crate::LISTEN_FD

use std::io;
use std::path::{Path, PathBuf};

/// Environment variable naming the listening descriptor (Node).
pub const ENV_LISTEN_FD: &str = "BEXT_LISTEN_FD";
/// Environment variable holding the readiness token.
pub const ENV_READY_TOKEN: &str = "BEXT_READY_TOKEN";
/// Set to `1`: the Node adapter is inherited by the app's child processes
/// until one of them listens (`bext dev`: `next dev`, `node --watch`).
pub const ENV_PASS_DOWN: &str = "BEXT_ADAPTER_PASS_DOWN";

const NODE_ADAPTER: &str = include_str!("../js/node-adapter.cjs");
const DENO_ADAPTER: &str = include_str!("../js/deno-adapter.mjs");

/// Where the adapters were written.
#[derive(Debug, Clone)]
pub struct Adapters {
    pub node: PathBuf,
    pub deno: PathBuf,
}

/// Writes the adapters into `dir` (the supervisor's private runtime
/// directory).
pub fn install(dir: &Path) -> io::Result<Adapters> {
    let node = dir.join("node-adapter.cjs");
    let deno = dir.join("deno-adapter.mjs");
    std::fs::write(&node, NODE_ADAPTER)?;
    std::fs::write(&deno, DENO_ADAPTER)?;
    Ok(Adapters { node, deno })
}

/// The `--preload` module URL for one Deno worker launch: the adapter, with
/// the socket path and readiness token in its query string.
pub fn deno_preload_url(adapters: &Adapters, socket: &Path, token: &str) -> String {
    format!(
        "{}?socket={}&token={}",
        file_url(&adapters.deno),
        query_value(&socket.to_string_lossy()),
        query_value(token),
    )
}

fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char);
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn file_url(path: &Path) -> String {
    format!("file://{}", query_value(&path.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_escape_what_a_url_cannot_hold() {
        assert_eq!(
            file_url(Path::new("/srv/my app/main.ts")),
            "file:///srv/my%20app/main.ts"
        );
        assert_eq!(file_url(Path::new("/a/#b?.ts")), "file:///a/%23b%3F.ts");
    }

    #[test]
    fn the_preload_url_carries_socket_and_token() {
        let adapters = Adapters {
            node: "/r/n.cjs".into(),
            deno: "/r/deno-adapter.mjs".into(),
        };
        assert_eq!(
            deno_preload_url(&adapters, Path::new("/r/w0.0.sock"), "ab12"),
            "file:///r/deno-adapter.mjs?socket=/r/w0.0.sock&token=ab12"
        );
    }
}
