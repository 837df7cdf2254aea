//! Static files, served by the supervisor without a worker hop.
//!
//! Owns: mapping a request path onto a mount (`public/` at `/`, Next's
//! `.next/static` at `/_next/static/`, or a whole static site), finding the
//! file without ever leaving the mount ([`lookup`], cached for a second), and
//! answering with the right representation ([`file`]). It never calls a
//! worker: a miss is [`Outcome::Pass`] and the caller decides.
//!
//! Not `tower-http`'s `ServeDir`: it has no ETag / If-None-Match, follows
//! symlinks out of the root, and opens every file on every request.

mod file;
pub mod lookup;
pub mod path;

use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::app::Mount;
use crate::body::{self, Body};
use lookup::{Lookup, LookupCache};

/// What the static layer did with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Answered from disk (or refused).
    Response(Response<Body>),
    /// Not a static file: ask the app.
    Pass,
}

/// The static mounts of one app.
pub struct StaticFiles {
    mounts: Vec<MountDir>,
    cache: LookupCache,
    packed: file::Packed,
}

impl std::fmt::Debug for StaticFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticFiles")
            .field("mounts", &self.mounts)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct MountDir {
    id: u16,
    prefix: Vec<Vec<u8>>,
    dir: OwnedFd,
    immutable: bool,
    site: bool,
}

impl StaticFiles {
    /// Opens every mount's directory. Longer prefixes are tried first.
    /// With `confine` (multi-app mode: a tenant's files), every mount must
    /// resolve inside that directory: a `static_dir = "/"`, or a `public`
    /// symlink out of the app, would otherwise have bext serve the host's
    /// files with its own rights.
    pub fn open(mounts: &[Mount], confine: Option<&std::path::Path>) -> std::io::Result<Self> {
        if !mounts.is_empty() {
            // Without openat2 every file would be refused: say so now.
            lookup::require_openat2(lookup::probe_openat2)?;
        }
        let mut dirs = Vec::with_capacity(mounts.len());
        for (id, mount) in mounts.iter().enumerate() {
            let dir = nix::fcntl::open(
                &mount.root,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(std::io::Error::from)?;
            if let Some(within) = confine {
                // Where the opened directory really is (a rename or a
                // symlink swapped in since detection changes nothing).
                let real = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
                if !real.starts_with(within) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "the static directory {} is outside the app's directory {}",
                            real.display(),
                            within.display()
                        ),
                    ));
                }
            }
            let prefix = mount
                .prefix
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec())
                .collect();
            dirs.push(MountDir {
                id: u16::try_from(id).unwrap_or(u16::MAX),
                prefix,
                dir,
                immutable: mount.immutable,
                site: mount.site,
            });
        }
        dirs.sort_by_key(|m| std::cmp::Reverse(m.prefix.len()));
        Ok(StaticFiles {
            mounts: dirs,
            cache: lookup::new_cache(),
            packed: file::Packed::new(crate::compress::Settings::default()),
        })
    }

    /// Compresses with `settings` (default: the defaults).
    pub fn with_compression(self, settings: crate::compress::Settings) -> Self {
        self.set_compression(settings);
        self
    }

    /// Compresses with `settings` from now on (a reload).
    /// Forgets what lookups found (`bext dev`, after a change on disk).
    pub fn forget(&self) {
        self.cache.invalidate_all();
    }

    pub fn set_compression(&self, settings: crate::compress::Settings) {
        self.packed.set_settings(settings);
    }

    fn place<'a>(&'a self, mount: &'a MountDir) -> file::Place<'a> {
        file::Place {
            dir: &mount.dir,
            mount: mount.id,
            packed: &self.packed,
        }
    }

    /// Whether a whole static site is mounted (no app behind it).
    pub fn is_site(&self) -> bool {
        self.mounts.iter().any(|m| m.site)
    }

    /// Serves `req` from disk if a mount has the file.
    pub fn serve<B>(&self, req: &Request<B>) -> Outcome {
        if self.mounts.is_empty() {
            return Outcome::Pass;
        }
        let method = req.method();
        if method != Method::GET && method != Method::HEAD {
            return if self.is_site() {
                method_not_allowed()
            } else {
                Outcome::Pass
            };
        }
        let path = match path::decode(req.uri().path()) {
            Ok(path) => path,
            Err(refusal) => {
                tracing::debug!(?refusal, path = req.uri().path(), "refused static path");
                return Outcome::Response(plain(StatusCode::BAD_REQUEST, "bad request path\n"));
            }
        };
        let Some(mount) = self.mounts.iter().find(|m| {
            path.segments.len() >= m.prefix.len() && path.segments[..m.prefix.len()] == m.prefix[..]
        }) else {
            return Outcome::Pass;
        };
        if path.hidden {
            return self.miss(mount, req);
        }
        let rel = path.segments[mount.prefix.len()..].join(&b'/');
        match &*self.lookup(mount, &rel) {
            Lookup::File(entry) => Outcome::Response(file::respond(
                req,
                &self.place(mount),
                &rel,
                entry,
                mount.immutable,
            )),
            Lookup::Dir if mount.site => {
                if !path.trailing_slash && !rel.is_empty() {
                    return Outcome::Response(redirect_to_slash(req));
                }
                let index = if rel.is_empty() {
                    b"index.html".to_vec()
                } else {
                    [&rel[..], b"/index.html"].concat()
                };
                match &*self.lookup(mount, &index) {
                    Lookup::File(entry) => Outcome::Response(file::respond(
                        req,
                        &self.place(mount),
                        &index,
                        entry,
                        false,
                    )),
                    _ => self.miss(mount, req),
                }
            }
            _ => {
                // Clean URLs on static sites: /about → about.html.
                if mount.site && !path.trailing_slash && !rel.is_empty() {
                    let html = [&rel[..], b".html"].concat();
                    if let Lookup::File(entry) = &*self.lookup(mount, &html) {
                        return Outcome::Response(file::respond(
                            req,
                            &self.place(mount),
                            &html,
                            entry,
                            false,
                        ));
                    }
                }
                self.miss(mount, req)
            }
        }
    }

    /// Whether `raw_path` could name a hashed asset of these mounts (a
    /// cheap test before [`Self::serve_hashed`]).
    pub fn may_have_hashed(&self, raw_path: &str) -> bool {
        let last = raw_path.rsplit('/').next().unwrap_or("");
        looks_hashed(last.as_bytes())
            || self.mounts.iter().any(|m| {
                m.immutable && {
                    let mut segments = raw_path.split('/').filter(|s| !s.is_empty());
                    m.prefix.iter().all(|p| {
                        segments
                            .next()
                            .is_some_and(|s| s.as_bytes() == p.as_slice())
                    })
                }
            })
    }

    /// Serves `req` only if it names a content-hashed file these mounts
    /// have: one under an immutable mount (`/_next/static`), or whose name
    /// carries a hash (`app.3f9a1c2b.js`, `index-BQ3nUq1z.css`). For an
    /// older version's files, which may only answer for assets whose name
    /// cannot mean anything else.
    pub fn serve_hashed<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return None;
        }
        let path = path::decode(req.uri().path()).ok()?;
        if path.hidden || path.trailing_slash {
            return None;
        }
        let mount = self.mounts.iter().find(|m| {
            path.segments.len() > m.prefix.len() && path.segments[..m.prefix.len()] == m.prefix[..]
        })?;
        let name = path.segments.last()?;
        if !mount.immutable && !looks_hashed(name) {
            return None;
        }
        let rel = path.segments[mount.prefix.len()..].join(&b'/');
        match &*self.lookup(mount, &rel) {
            Lookup::File(entry) => Some(file::respond(req, &self.place(mount), &rel, entry, true)),
            _ => None,
        }
    }

    fn lookup(&self, mount: &MountDir, rel: &[u8]) -> Arc<Lookup> {
        let key = (mount.id, Box::<[u8]>::from(rel));
        self.cache
            .get_with(key, || Arc::new(lookup::resolve(&mount.dir, rel)))
    }

    /// Nothing on disk: a static site answers 404 (with its `404.html`);
    /// any other mount lets the app answer.
    fn miss<B>(&self, mount: &MountDir, req: &Request<B>) -> Outcome {
        if !mount.site {
            return Outcome::Pass;
        }
        if let Lookup::File(entry) = &*self.lookup(mount, b"404.html") {
            let mut response = file::respond(req, &self.place(mount), b"404.html", entry, false);
            if response.status() == StatusCode::OK {
                *response.status_mut() = StatusCode::NOT_FOUND;
                let headers = response.headers_mut();
                headers.remove(header::ETAG);
                headers.remove(header::LAST_MODIFIED);
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                return Outcome::Response(response);
            }
        }
        Outcome::Response(plain(StatusCode::NOT_FOUND, "not found\n"))
    }
}

/// A file name with a build hash in it: a part between dots or dashes,
/// before the extension, of 8 to 64 letters, digits or `_`, with both
/// letters and digits (`main.3f9a1c2b.js`, `index-BQ3nUq1z.js`,
/// `chunk.5d41402abc4b2a76.css`; not `report-20240115.pdf`).
pub fn looks_hashed(name: &[u8]) -> bool {
    let Some(dot) = name.iter().rposition(|&b| b == b'.') else {
        return false;
    };
    name[..dot]
        .split(|&b| b == b'.' || b == b'-')
        .skip(1)
        .any(|part| {
            (8..=64).contains(&part.len())
                && part.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
                && part.iter().any(u8::is_ascii_digit)
                && part.iter().any(u8::is_ascii_alphabetic)
        })
}

fn method_not_allowed() -> Outcome {
    let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    Outcome::Response(response)
}

/// `Location: /dir/` for `/dir`. Leading slashes (and backslashes, which
/// browsers read as slashes) collapse to one: `//evil.example` must not
/// become a protocol-relative redirect to another site.
fn redirect_to_slash<B>(req: &Request<B>) -> Response<Body> {
    let path = req.uri().path().trim_start_matches(['/', '\\']);
    let mut location = format!("/{path}/");
    if let Some(query) = req.uri().query() {
        location.push('?');
        location.push_str(query);
    }
    let mut response = plain(StatusCode::MOVED_PERMANENTLY, "");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A short text response.
pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::looks_hashed;

    #[test]
    fn hashed_names_are_told_from_plain_ones() {
        for name in [
            "app.3f9a1c2b.js",
            "index-BQ3nUq1z.js",
            "chunk.5d41402abc4b2a76.css",
            "main.a1b2c3d4.chunk.js",
            "logo.0a23456789.svg",
        ] {
            assert!(looks_hashed(name.as_bytes()), "{name}");
        }
        for name in [
            "app.js",
            "notes.txt",
            "favicon.ico",
            "robots.txt",
            "dashboard-settings.js",
            "jquery-3.7.1.min.js",
            "3f9a1c2b",
            "app.3f9a1c2b",
            "report-20240115.pdf",
            "logo.0123456789.svg",
        ] {
            assert!(!looks_hashed(name.as_bytes()), "{name}");
        }
    }
}
