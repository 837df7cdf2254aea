//! One file's HTTP representation: content type, validators (ETag,
//! Last-Modified) and 304s, single byte ranges, HEAD, compression
//! (precompressed `.zst` / `.br` / `.gz` siblings first, else a copy
//! compressed once and remembered), and how long clients may cache it.

use std::io::{Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::StreamBody;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use super::lookup::{FileEntry, Variant, open_beneath};
use crate::body::{self, Body};
use crate::compress::{self, Coding};

/// Chunk size when streaming a large file.
const STREAM_CHUNK: usize = 64 * 1024;
/// Cache lifetime of content-hashed assets: a year, never revalidated.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Everything else: cacheable, but revalidated (cheap: a 304).
const REVALIDATE: &str = "public, max-age=0, must-revalidate";

/// Compressed copies of kept files that have no precompressed sibling,
/// made on first demand (at the streamed levels: on the event loop, at
/// most [`super::lookup::FILE_CACHE_MAX_FILE`] bytes) and remembered by
/// file, version (ETag) and coding within [`PACKED_BYTES`].
pub(super) struct Packed {
    /// A reload may change them (the copies made before stay until they
    /// go idle or are evicted).
    settings: arc_swap::ArcSwap<compress::Settings>,
    copies: moka::sync::Cache<CopyKey, Bytes>,
}

/// Mount, file, version (ETag), coding.
type CopyKey = (u16, Box<[u8]>, HeaderValue, Coding);

/// Memory the compressed copies of one app's files may use.
pub(super) const PACKED_BYTES: u64 = 32 * 1024 * 1024;
/// A copy not asked for in this long is dropped.
const PACKED_IDLE: Duration = Duration::from_secs(3600);

impl Packed {
    pub(super) fn new(settings: compress::Settings) -> Self {
        Packed {
            settings: arc_swap::ArcSwap::from_pointee(settings),
            copies: moka::sync::Cache::builder()
                .max_capacity(PACKED_BYTES)
                .time_to_idle(PACKED_IDLE)
                .weigher(|key: &CopyKey, copy: &Bytes| {
                    u32::try_from(copy.len() + key.1.len() + 64).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    pub(super) fn set_settings(&self, settings: compress::Settings) {
        self.settings.store(std::sync::Arc::new(settings));
    }

    /// `bytes` (the file at `rel` of mount `mount`, version `etag`)
    /// compressed with `coding`; `None` when that does not make it smaller
    /// (remembered as an empty copy, so it is not tried again).
    /// `make`: compress it now if no copy is remembered (else only look).
    fn copy(
        &self,
        mount: u16,
        rel: &[u8],
        etag: &HeaderValue,
        coding: Coding,
        bytes: &Bytes,
        make: bool,
    ) -> Option<Bytes> {
        let key = (mount, Box::<[u8]>::from(rel), etag.clone(), coding);
        let copy = if make {
            let levels = self.settings.load().streamed;
            self.copies.get_with(key, || {
                compress::encode_all(bytes, coding, &levels)
                    .ok()
                    .filter(|copy| copy.len() < bytes.len())
                    .unwrap_or_default()
            })
        } else {
            self.copies.get(&key)?
        };
        (!copy.is_empty()).then_some(copy)
    }
}

/// Where a file was found: its mount's directory and id.
pub(super) struct Place<'a> {
    pub(super) dir: &'a OwnedFd,
    pub(super) mount: u16,
    pub(super) packed: &'a Packed,
}

/// Builds the response for a file found at `rel` in `place`.
pub(super) fn respond<B>(
    req: &Request<B>,
    place: &Place<'_>,
    rel: &[u8],
    entry: &FileEntry,
    immutable: bool,
) -> Response<Body> {
    let dir = place.dir;
    let settings = **place.packed.settings.load();
    // A precompressed sibling the client accepts replaces the file's bytes.
    let accepted = compress::Accepted::parse(req.headers());
    let mut offered = [Coding::Zstd; 3];
    let mut n = 0;
    for coding in compress::STORED_ORDER {
        if entry.variants[1..]
            .iter()
            .any(|v| v.encoding == Some(coding))
        {
            offered[n] = coding;
            n += 1;
        }
    }
    let chosen = accepted
        .best_among(&offered[..n])
        .and_then(|c| entry.variants.iter().find(|v| v.encoding == Some(c)))
        .unwrap_or(&entry.variants[0]);
    // Else a compressed copy of a kept file (never for a range: ranges are
    // of the file's own bytes).
    let head = req.method() == Method::HEAD;
    let packed_coding = if chosen.encoding.is_none()
        && entry.compressible
        && settings.enabled
        && !accepted.no_transform()
        && !req.headers().contains_key(header::RANGE)
        && (chosen.len >= settings.min_size || accepted.identity_refused())
        && chosen.bytes.is_some()
    {
        accepted.best_among(&compress::STORED_ORDER)
    } else {
        None
    };

    let mut headers = HeaderMap::with_capacity(10);
    headers.insert(header::CONTENT_TYPE, entry.content_type.clone());
    headers.insert(header::ETAG, chosen.etag.clone());
    headers.insert(header::LAST_MODIFIED, chosen.last_modified.clone());
    let lifetime = if immutable || looks_hashed(rel) {
        IMMUTABLE
    } else {
        REVALIDATE
    };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(lifetime));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(encoding) = chosen.encoding {
        headers.insert(header::CONTENT_ENCODING, encoding.header_value());
    }
    // The answer varies on Accept-Encoding whenever another client could
    // get other bytes.
    if entry.variants.len() > 1 || (entry.compressible && settings.enabled) {
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if let Some(coding) = packed_coding
        && let Some(bytes) = &chosen.bytes
    {
        // `"<mtime>-<size>-<coding>"`, weak: the bytes depend on the level.
        let tag = chosen.etag.to_str().unwrap_or("\"\"").trim_end_matches('"');
        let etag = value(&format!("W/{tag}-{}\"", coding.as_str()));
        // A client holding the copy revalidates without any compression.
        if not_modified(req.headers(), etag.to_str().unwrap_or(""), chosen.modified) {
            headers.insert(header::ETAG, etag);
            headers.insert(header::CONTENT_ENCODING, coding.header_value());
            headers.remove(header::ACCEPT_RANGES);
            headers.remove(header::CONTENT_TYPE);
            return build(StatusCode::NOT_MODIFIED, headers, body::empty());
        }
        // (A HEAD says what a GET would once the copy exists; it never
        // makes one.)
        let copy = place
            .packed
            .copy(place.mount, rel, &chosen.etag, coding, bytes, !head);
        if let Some(copy) = copy {
            headers.insert(header::ETAG, etag);
            headers.insert(header::CONTENT_ENCODING, coding.header_value());
            headers.remove(header::ACCEPT_RANGES);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(copy.len()));
            let body = if head {
                body::empty()
            } else {
                body::full(copy)
            };
            return build(StatusCode::OK, headers, body);
        }
    }

    let etag = chosen.etag.to_str().unwrap_or("");
    if not_modified(req.headers(), etag, chosen.modified) {
        headers.remove(header::CONTENT_TYPE);
        return build(StatusCode::NOT_MODIFIED, headers, body::empty());
    }

    let len = chosen.len;
    let (status, start, count) = match requested_range(req.headers(), etag, chosen.modified, len) {
        RangeAnswer::Full => (StatusCode::OK, 0, len),
        RangeAnswer::Partial(start, end) => {
            headers.insert(
                header::CONTENT_RANGE,
                value(&format!("bytes {start}-{end}/{len}")),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeAnswer::Unsatisfiable => {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_RANGE, value(&format!("bytes */{len}")));
            return build(StatusCode::RANGE_NOT_SATISFIABLE, h, body::empty());
        }
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if req.method() == Method::HEAD {
        return build(status, headers, body::empty());
    }
    match read_body(dir, chosen, start, count) {
        Ok(body) => build(status, headers, body),
        Err(e) => {
            tracing::warn!(file = %String::from_utf8_lossy(&chosen.rel), "could not read static file: {e}");
            super::plain(StatusCode::INTERNAL_SERVER_ERROR, "could not read file\n")
        }
    }
}

fn build(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Kept bytes are sliced (no copy); large files stream in chunks without
/// being held in memory.
fn read_body(dir: &OwnedFd, variant: &Variant, start: u64, count: u64) -> std::io::Result<Body> {
    if let Some(bytes) = &variant.bytes {
        return Ok(body::full(
            bytes.slice(start as usize..(start + count) as usize),
        ));
    }
    let (mut file, meta) =
        open_beneath(dir, &variant.rel).ok_or_else(|| std::io::Error::other("the file is gone"))?;
    if meta.len() < start + count {
        return Err(std::io::Error::other("the file shrank"));
    }
    file.seek(SeekFrom::Start(start))?;
    let reader = tokio::fs::File::from_std(file).take(count);
    let frames = ReaderStream::with_capacity(reader, STREAM_CHUNK).map(|chunk| {
        chunk
            .map(Frame::data)
            .map_err(|e| Box::new(e) as crate::body::BoxError)
    });
    Ok(body::boxed(StreamBody::new(frames)))
}

/// RFC 9110 §13.2.2: If-None-Match wins over If-Modified-Since.
fn not_modified(headers: &HeaderMap, etag: &str, modified: SystemTime) -> bool {
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        return inm
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || weak_eq(tag, etag));
    }
    if let Some(since) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        return truncate_to_seconds(modified) <= since;
    }
    false
}

fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

enum RangeAnswer {
    Full,
    /// Inclusive byte positions.
    Partial(u64, u64),
    Unsatisfiable,
}

/// One byte range, honoured when If-Range (if any) still matches. Several
/// ranges are answered with the whole file, which RFC 9110 allows.
fn requested_range(headers: &HeaderMap, etag: &str, modified: SystemTime, len: u64) -> RangeAnswer {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let still_valid = if if_range.starts_with('"') {
            if_range == etag
        } else {
            httpdate::parse_http_date(if_range).is_ok_and(|d| d == truncate_to_seconds(modified))
        };
        if !still_valid {
            return RangeAnswer::Full;
        }
    }
    let Ok(parsed) = http_range_header::parse_range_header(range) else {
        return RangeAnswer::Full; // unparseable: ignore, as RFC 9110 allows
    };
    match parsed.validate(len) {
        Ok(ranges) if ranges.len() == 1 => {
            RangeAnswer::Partial(*ranges[0].start(), *ranges[0].end())
        }
        Ok(_) => RangeAnswer::Full,
        Err(_) => RangeAnswer::Unsatisfiable,
    }
}

/// A file name with a content hash in it (`app.3f9a1c2b.js`,
/// `index-BnK3x9aZ.js`): a dot- or dash-separated part of at least 8
/// alphanumeric characters mixing letters and digits.
fn looks_hashed(rel: &[u8]) -> bool {
    let path = String::from_utf8_lossy(rel);
    let name = path.rsplit('/').next().unwrap_or(&path);
    let stem = name.split_once('.').map_or(name, |(stem, _)| stem);
    let parts = name.split('.').skip(1).chain(stem.split('-').skip(1));
    parts.into_iter().any(|part| {
        part.len() >= 8
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.chars().any(|c| c.is_ascii_digit())
            && part.chars().any(|c| c.is_ascii_alphabetic())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_names_are_recognised() {
        assert!(looks_hashed(b"assets/app.3f9a1c2b.js"));
        assert!(looks_hashed(b"index-BnK3x9aZ.js"));
        assert!(!looks_hashed(b"jquery-3.7.1.min.js"));
        assert!(!looks_hashed(b"logo-final.png"));
        assert!(!looks_hashed(b"background-20240101.png"));
    }
}
