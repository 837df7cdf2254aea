//! What is on disk at a path under a mount, read once and remembered for
//! [`FILE_CACHE_TTL`] — like nginx's `open_file_cache`, plus the bytes of
//! small files, so a hot static file costs no file system calls at all.
//!
//! Files are opened with `openat2(RESOLVE_BENEATH)` relative to the mount's
//! directory descriptor: `..`, absolute symlinks and symlinks that climb out
//! of the mount are refused by the kernel itself. The cache only memoizes
//! that answer for a second; it never widens it.

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

use crate::compress::Coding;

/// How long what was found on disk is trusted before it is looked at again.
pub const FILE_CACHE_TTL: Duration = Duration::from_secs(1);
/// Files up to this size are kept in memory; larger ones are streamed from
/// disk on every request.
pub const FILE_CACHE_MAX_FILE: u64 = 256 * 1024;
/// Memory the file cache may use, per app.
pub const FILE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The precompressed siblings bext looks for.
pub const ENCODINGS: [(Coding, &[u8]); 3] = [
    (Coding::Zstd, b".zst"),
    (Coding::Br, b".br"),
    (Coding::Gzip, b".gz"),
];

/// What a path resolved to.
#[derive(Debug)]
pub enum Lookup {
    Missing,
    Dir,
    File(FileEntry),
}

/// A regular file and its precompressed siblings.
#[derive(Debug)]
pub struct FileEntry {
    pub content_type: HeaderValue,
    /// Worth compressing (text, JSON, SVG, wasm…).
    pub compressible: bool,
    /// The file itself, then any `.zst` / `.br` / `.gz` sibling.
    pub variants: Vec<Variant>,
}

/// One stored representation of a file.
#[derive(Debug)]
pub struct Variant {
    /// `None` for the file itself.
    pub encoding: Option<Coding>,
    /// The path to open when the bytes are not kept.
    pub rel: Vec<u8>,
    pub len: u64,
    pub modified: SystemTime,
    pub etag: HeaderValue,
    pub last_modified: HeaderValue,
    /// The whole content, for small files.
    pub bytes: Option<Bytes>,
}

impl Lookup {
    /// Bytes this lookup holds, for the cache's size bound.
    pub fn weight(&self) -> u32 {
        let bytes = match self {
            Lookup::File(f) => f
                .variants
                .iter()
                .map(|v| v.bytes.as_ref().map_or(0, Bytes::len) + 128)
                .sum(),
            _ => 0,
        };
        u32::try_from(bytes + 64).unwrap_or(u32::MAX)
    }
}

/// The per-app cache of lookups.
pub type LookupCache = moka::sync::Cache<(u16, Box<[u8]>), Arc<Lookup>>;

pub fn new_cache() -> LookupCache {
    moka::sync::Cache::builder()
        .time_to_live(FILE_CACHE_TTL)
        .max_capacity(FILE_CACHE_BYTES)
        .weigher(|key: &(u16, Box<[u8]>), value: &Arc<Lookup>| {
            value.weight().saturating_add(key.1.len() as u32)
        })
        .build()
}

/// Reads what is at `rel` under `dir`.
pub fn resolve(dir: &OwnedFd, rel: &[u8]) -> Lookup {
    let Some((file, meta)) = open_beneath(dir, rel) else {
        return Lookup::Missing;
    };
    if meta.is_dir() {
        return Lookup::Dir;
    }
    if !meta.is_file() {
        return Lookup::Missing;
    }
    let name = String::from_utf8_lossy(rel);
    let mime = mime_guess::from_path(&*name).first_or_octet_stream();
    let content_type = if is_text(&mime) {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    let mut variants = vec![variant(None, rel.to_vec(), &file, &meta)];
    let compressible = crate::compress::compressible(mime.essence_str());
    if compressible {
        for (encoding, suffix) in ENCODINGS {
            let sibling = [rel, suffix].concat();
            if let Some((file, meta)) = open_beneath(dir, &sibling).filter(|(_, m)| m.is_file()) {
                variants.push(variant(Some(encoding), sibling, &file, &meta));
            }
        }
    }
    Lookup::File(FileEntry {
        content_type: HeaderValue::from_str(&content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        compressible,
        variants,
    })
}

fn variant(
    encoding: Option<Coding>,
    rel: Vec<u8>,
    file: &std::fs::File,
    meta: &std::fs::Metadata,
) -> Variant {
    let len = meta.len();
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    // "<mtime>-<size>[-<encoding>]" in hex, like nginx: strong, because the
    // bytes of one mtime and size are the bytes on disk.
    let mtime = meta.mtime() as u64;
    let etag = match encoding {
        Some(e) => format!("\"{mtime:x}-{len:x}-{}\"", e.as_str()),
        None => format!("\"{mtime:x}-{len:x}\""),
    };
    let bytes = (len <= FILE_CACHE_MAX_FILE).then(|| {
        let mut buf = vec![0; len as usize];
        file.read_exact_at(&mut buf, 0)
            .ok()
            .map(|()| Bytes::from(buf))
    });
    Variant {
        encoding,
        rel,
        len,
        modified,
        etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\"")),
        last_modified: HeaderValue::from_str(&httpdate::fmt_http_date(modified))
            .unwrap_or(HeaderValue::from_static("")),
        bytes: bytes.flatten(),
    }
}

/// Tries `openat2` once (on `/`).
pub fn probe_openat2() -> Result<(), Errno> {
    let root = nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH);
    openat2(&root, ".", how).map(drop)
}

/// Static files are served only through `openat2` (Linux 5.6+): a kernel
/// (or a seccomp filter) without it is an error at start, not a silent 404
/// for every file.
pub fn require_openat2(probe: impl FnOnce() -> Result<(), Errno>) -> std::io::Result<()> {
    match probe() {
        Err(Errno::ENOSYS) | Err(Errno::EPERM) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the kernel refuses openat2 (Linux 5.6 or later is needed to serve static files safely)",
        )),
        Ok(()) | Err(_) => Ok(()),
    }
}

/// Opens `rel` under `dir`, refusing anything that resolves outside it.
/// `None` for anything that cannot be served (missing, escaping, special).
pub fn open_beneath(dir: &OwnedFd, rel: &[u8]) -> Option<(std::fs::File, std::fs::Metadata)> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(dir, std::ffi::OsStr::from_bytes(rel), how) {
        Ok(fd) => {
            let file = std::fs::File::from(fd);
            let meta = file.metadata().ok()?;
            Some((file, meta))
        }
        Err(Errno::EXDEV) | Err(Errno::ELOOP) => {
            tracing::debug!(path = %String::from_utf8_lossy(rel), "refused a path that leaves the static root");
            None
        }
        Err(_) => None,
    }
}

fn is_text(mime: &mime_guess::Mime) -> bool {
    mime.type_() == mime_guess::mime::TEXT
        || matches!(mime.subtype().as_str(), "javascript" | "json" | "xml")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11, fault 8: no openat2 is an error at start, not 404s.
    #[test]
    fn a_kernel_without_openat2_is_refused_at_start() {
        assert!(probe_openat2().is_ok(), "this kernel has openat2");
        assert!(require_openat2(probe_openat2).is_ok());
        let err = require_openat2(|| Err(Errno::ENOSYS)).expect_err("no openat2");
        assert!(err.to_string().contains("openat2"), "{err}");
    }
}
