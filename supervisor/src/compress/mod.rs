//! Compression at the edge: which coding a client gets ([`Accepted`], from
//! its `Accept-Encoding`), whether a response may be compressed at all
//! ([`decide`]), the header edits a compressed answer needs, and the
//! encoders — streamed bodies through async-compression, flushed whenever
//! the app pauses so that an SSE event never waits in a compressor
//! ([`stream`]), and whole bodies through the codecs under it, at a higher
//! level, once ([`encode_all`]).
//!
//! It knows nothing of where a body comes from: the cache stores the
//! variants it makes, `server` wraps what the app streams, `statics` picks
//! among files. Workers are asked for identity bodies, so one stored body
//! serves every client encoding.

mod negotiate;
mod stream;

use std::io::Write as _;
use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::Semaphore;

pub use negotiate::{Accepted, Coding};
pub use stream::stream;

/// Preference among codings a client weighs equally, for bodies
/// compressed as they stream: zstd is the cheapest per request at a ratio
/// close to brotli's; gzip is for clients with neither.
pub const STREAMED_ORDER: [Coding; 3] = [Coding::Zstd, Coding::Br, Coding::Gzip];
/// For bodies compressed once and kept (cached pages, static files): the
/// smallest first. At the stored levels brotli beats zstd on HTML (the Next
/// fixture's page: 1,875 bytes against 2,055).
pub const STORED_ORDER: [Coding; 3] = [Coding::Br, Coding::Zstd, Coding::Gzip];

/// Bodies smaller than this are sent as they are (nginx `gzip_min_length`):
/// below it a coding's header and checksum eat most of the gain.
pub const DEFAULT_MIN_SIZE: u64 = 512;

/// Levels for what is compressed once and kept (cached variants, static
/// files). Measured on this machine (`bench/RESULTS.md`, "Issue #13:
/// compression levels"): br 11 and zstd 19 save 3–8 % more for 7–10 times
/// the CPU, paid again at every revalidation of a cached page.
pub const DEFAULT_STORED: Levels = Levels {
    zstd: 15,
    br: 9,
    gzip: 9,
};
/// Levels for bodies compressed as they stream (everything not cached):
/// fast, as every request pays them.
pub const DEFAULT_STREAMED: Levels = Levels {
    zstd: 3,
    br: 4,
    gzip: 5,
};

/// Window of a streamed compressor (2^18 = 256 KiB): what one compressed
/// stream holds in memory, whatever its level; many SSE clients at once
/// must not cost megabytes each.
const STREAM_WINDOW_LOG: u32 = 18;

/// A level per coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels {
    /// 1–19.
    pub zstd: i32,
    /// 0–11.
    pub br: u32,
    /// 1–9.
    pub gzip: u32,
}

/// How one app compresses (`[compression]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub min_size: u64,
    pub stored: Levels,
    pub streamed: Levels,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            min_size: DEFAULT_MIN_SIZE,
            stored: DEFAULT_STORED,
            streamed: DEFAULT_STREAMED,
        }
    }
}

/// A response extension: compression was already decided for it (a cached
/// answer, a static file); the server must not compress it again.
#[derive(Debug, Clone, Copy)]
pub struct Decided;

/// What to do with one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not a candidate (already encoded, no body, a range, `no-transform`,
    /// a type that does not compress, too small): leave it alone.
    Leave,
    /// A candidate, but this client gets identity: only `Vary`.
    Vary,
    /// Compress with this coding.
    Encode(Coding),
}

/// Decides for a response with these facts, preferring codings in the
/// order `prefer` ([`STORED_ORDER`] or [`STREAMED_ORDER`]). `head`: the
/// request was HEAD (its answer has no body to compress; it gets `Vary` as
/// a GET would).
pub fn decide(
    settings: &Settings,
    accepted: &Accepted,
    prefer: &[Coding],
    status: StatusCode,
    headers: &HeaderMap,
    head: bool,
) -> Decision {
    if !settings.enabled || !candidate(status, headers) {
        return Decision::Leave;
    }
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A client that refuses identity gets a coding even for a small body.
    if len.is_some_and(|len| len < settings.min_size) && !accepted.identity_refused() {
        return Decision::Leave;
    }
    match accepted.best_among(prefer) {
        Some(coding) if !head => Decision::Encode(coding),
        _ => Decision::Vary,
    }
}

/// May this response be compressed at all (whatever the client accepts)?
fn candidate(status: StatusCode, headers: &HeaderMap) -> bool {
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        )
    {
        return false;
    }
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    if headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    }) {
        return false;
    }
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(compressible)
}

/// Does a body of this media type shrink when compressed? Text, JSON, XML,
/// JavaScript, SVG, wasm and the uncompressed font formats do; images,
/// video, archives and fonts that are already compressed do not.
pub fn compressible(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    kind == "text"
        || sub.ends_with("+json")
        || sub.ends_with("+xml")
        || matches!(
            sub,
            "json"
                | "javascript"
                | "x-javascript"
                | "ecmascript"
                | "xml"
                | "wasm"
                | "x-ndjson"
                | "graphql-response+json"
                | "vnd.ms-fontobject"
                | "x-font-ttf"
                | "ttf"
                | "otf"
        )
}

/// The headers of an answer compressed with `coding`: `Content-Encoding`,
/// `Vary`, a weak `ETag` (the bytes differ from the identity ones), no
/// `Accept-Ranges` (ranges are of the identity body), and
/// `Content-Length` set for a whole body or removed for a streamed one.
pub fn mark_encoded(headers: &mut HeaderMap, coding: Coding, len: Option<usize>) {
    headers.insert(header::CONTENT_ENCODING, coding.header_value());
    add_vary(headers);
    weaken_etag(headers);
    headers.remove(header::ACCEPT_RANGES);
    match len {
        Some(len) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// Adds `accept-encoding` to `Vary` unless it is there (or `*` is).
pub fn add_vary(headers: &mut HeaderMap) {
    let present = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|n| {
                let n = n.trim();
                n == "*" || n.eq_ignore_ascii_case("accept-encoding")
            })
        })
    });
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// `"x"` becomes `W/"x"` (nginx does the same for gzip): a compressed
/// variant is the same content, not the same bytes.
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(etag) = headers.get(header::ETAG) else {
        return;
    };
    if etag.as_bytes().starts_with(b"W/") {
        return;
    }
    let mut weak = Vec::with_capacity(etag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(etag.as_bytes());
    if let Ok(weak) = HeaderValue::from_bytes(&weak) {
        headers.insert(header::ETAG, weak);
    }
}

/// Compresses a whole body at `levels` (synchronously: call it off the
/// event loop for anything large, see [`encode_off_loop`]).
pub fn encode_all(data: &[u8], coding: Coding, levels: &Levels) -> std::io::Result<Bytes> {
    let out = match coding {
        Coding::Zstd => zstd::bulk::compress(data, levels.zstd)?,
        Coding::Br => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: levels.br.min(11) as i32,
                size_hint: data.len(),
                ..Default::default()
            };
            let mut out = Vec::with_capacity(data.len() / 3);
            brotli::BrotliCompress(&mut &data[..], &mut out, &params)?;
            out
        }
        Coding::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(data.len() / 3),
                flate2::Compression::new(levels.gzip.min(9)),
            );
            encoder.write_all(data)?;
            encoder.finish()?
        }
    };
    Ok(Bytes::from(out))
}

/// Bodies up to this size are compressed on the event loop (well under a
/// millisecond at the stored levels); larger ones on the blocking pool.
const INLINE_MAX: usize = 2048;

/// Compressions of large bodies at once, process-wide: a burst of misses
/// on big pages must not take every core from the requests being served.
static ENCODERS: LazyLock<Semaphore> = LazyLock::new(|| {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Semaphore::new(cpus.div_ceil(2))
});

/// [`encode_all`] off the event loop (unless the body is tiny), at most
/// half the CPUs at once.
pub async fn encode_off_loop(
    data: Bytes,
    coding: Coding,
    levels: Levels,
) -> std::io::Result<Bytes> {
    if data.len() <= INLINE_MAX {
        return encode_all(&data, coding, &levels);
    }
    let _permit = ENCODERS
        .acquire()
        .await
        .map_err(|_| std::io::Error::other("the encoder pool is closed"))?;
    tokio::task::spawn_blocking(move || encode_all(&data, coding, &levels))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
pub(crate) mod tests;
