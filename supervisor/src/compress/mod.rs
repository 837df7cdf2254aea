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
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match decide_with_len(settings, accepted, prefer, status, headers, len) {
        Decision::Encode(_) if head => Decision::Vary,
        decision => decision,
    }
}

/// [`decide`] for a GET whose body is `len` bytes (when known).
fn decide_with_len(
    settings: &Settings,
    accepted: &Accepted,
    prefer: &[Coding],
    status: StatusCode,
    headers: &HeaderMap,
    len: Option<u64>,
) -> Decision {
    // The cheap questions first: most small answers stop here.
    if !settings.enabled || accepted.no_transform() {
        return Decision::Leave;
    }
    // A client that refuses identity gets a coding even for a small body.
    if len.is_some_and(|len| len < settings.min_size) && !accepted.identity_refused() {
        return Decision::Leave;
    }
    if !candidate(status, headers) {
        return Decision::Leave;
    }
    match accepted.best_among(prefer) {
        Some(coding) => Decision::Encode(coding),
        None => Decision::Vary,
    }
}

/// [`decide_with_len`] for a stored answer already known to be a
/// [`candidate`] (its `Vary` already names Accept-Encoding): `None` for
/// identity.
pub fn stored_coding(settings: &Settings, accepted: &Accepted, len: usize) -> Option<Coding> {
    if !settings.enabled
        || accepted.no_transform()
        || (len as u64) < settings.min_size && !accepted.identity_refused()
    {
        return None;
    }
    accepted.best_among(&STORED_ORDER)
}

/// May this response be compressed at all (whatever the client accepts
/// and the settings say)? The cache asks once per stored object.
pub fn candidate(status: StatusCode, headers: &HeaderMap) -> bool {
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        )
    {
        return false;
    }
    // The type first: it rules out most of what is not compressed.
    if !headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(compressible)
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
    // Digests of the bytes sent (RFC 9530, RFC 1864) would no longer
    // match. (One pass over the names: cheaper than a lookup for each.)
    if headers.keys().any(|name| DIGESTS.contains(name)) {
        return false;
    }
    !says_no_transform(headers.get_all(header::CACHE_CONTROL))
}

/// `Cache-Control: no-transform` among these `Cache-Control` values (of a
/// request or a response).
fn says_no_transform<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> bool {
    values.into_iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    })
}

/// Response fields that describe the bytes sent, not the content.
static DIGESTS: [HeaderName; 4] = [
    HeaderName::from_static("content-digest"),
    HeaderName::from_static("repr-digest"),
    HeaderName::from_static("digest"),
    HeaderName::from_static("content-md5"),
];

/// Does a body of this media type shrink when compressed? Text, JSON, XML,
/// JavaScript, SVG, wasm and the uncompressed font formats do; images,
/// video, archives and fonts that are already compressed do not.
pub fn compressible(content_type: &str) -> bool {
    // (Runs on every cached answer: no allocation.)
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    let ends_with = |suffix: &str| {
        sub.len() >= suffix.len()
            && sub.as_bytes()[sub.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    kind.eq_ignore_ascii_case("text")
        || ends_with("+json")
        || ends_with("+xml")
        || [
            "json",
            "javascript",
            "x-javascript",
            "ecmascript",
            "xml",
            "wasm",
            "x-ndjson",
            "vnd.ms-fontobject",
            "x-font-ttf",
            "ttf",
            "otf",
        ]
        .iter()
        .any(|s| sub.eq_ignore_ascii_case(s))
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

/// Compresses a response the app streams (not a stored one), as it
/// streams, at the streamed levels; or only says `Vary`; or, for the app's
/// 304 to a client whose 200 would have been compressed, gives it the same
/// `Vary` and weak `ETag`.
pub fn compress_streamed(
    settings: &Settings,
    accepted: &Accepted,
    response: &mut http::Response<crate::body::Body>,
    head: bool,
) {
    match decide(
        settings,
        accepted,
        &STREAMED_ORDER,
        response.status(),
        response.headers(),
        head,
    ) {
        Decision::Leave => {
            // The app's 304 to a client that holds a compressed copy (it
            // sent the weak tag bext gave it): the same weak tag and Vary.
            if response.status() == StatusCode::NOT_MODIFIED
                && settings.enabled
                && accepted.weak_if_none_match()
                && !accepted.no_transform()
                && accepted.best_among(&STREAMED_ORDER).is_some()
                && response.headers().contains_key(header::ETAG)
            {
                mark_not_modified(response.headers_mut());
            }
        }
        Decision::Vary => add_vary(response.headers_mut()),
        Decision::Encode(coding) => {
            // Every compressor in use: this one goes out as it is.
            let Some(slot) = stream_slot() else {
                add_vary(response.headers_mut());
                return;
            };
            mark_encoded(response.headers_mut(), coding, None);
            let body = std::mem::replace(response.body_mut(), crate::body::empty());
            *response.body_mut() = stream(body, coding, &settings.streamed, slot);
        }
    }
}

/// Asks the app for an identity body (bext compresses).
pub fn ask_identity(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// The headers of a 304 for a client whose 200 would have been
/// compressed: the same `Vary` and weak `ETag` (RFC 9110 §15.4.5).
pub fn mark_not_modified(headers: &mut HeaderMap) {
    add_vary(headers);
    weaken_etag(headers);
}

/// Adds `accept-encoding` to `Vary` unless it is there (or `*` is).
pub fn add_vary(headers: &mut HeaderMap) {
    if !varies_on_encoding(headers) {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Does `Vary` already name Accept-Encoding (or `*`)?
pub fn varies_on_encoding(headers: &HeaderMap) -> bool {
    headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|name| {
            let name = name.trim_ascii();
            name == b"*" || name.eq_ignore_ascii_case(b"accept-encoding")
        })
    })
}

/// The weak form of a strong `ETag` (`None` if there is none, or it is
/// weak already).
pub fn weak_etag(headers: &HeaderMap) -> Option<HeaderValue> {
    let etag = headers.get(header::ETAG)?;
    if etag.as_bytes().starts_with(b"W/") {
        return None;
    }
    let mut weak = Vec::with_capacity(etag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(etag.as_bytes());
    HeaderValue::from_bytes(&weak).ok()
}

/// [`mark_encoded`] for a stored variant whose weak `ETag` and `Vary` were
/// worked out once, when it was stored (this runs on every compressed hit).
pub fn mark_variant(
    headers: &mut HeaderMap,
    coding: Coding,
    len: usize,
    weak_etag: Option<&HeaderValue>,
    varies: bool,
) {
    headers.insert(header::CONTENT_ENCODING, coding.header_value());
    if let Some(etag) = weak_etag {
        headers.insert(header::ETAG, etag.clone());
    }
    if !varies {
        add_vary(headers);
    }
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// `"x"` becomes `W/"x"` (nginx does the same for gzip): a compressed
/// variant is the same content, not the same bytes.
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(weak) = weak_etag(headers) {
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

/// Bodies larger than this get their stored variants at the streamed
/// levels (still made once): an 8 MiB page at br 9 would take a core for
/// over a second.
pub const STORED_HIGH_MAX: usize = 1 << 20;

/// How long a request waits for a variant another task is making; then it
/// gets identity, and the variant serves the requests after it.
pub const VARIANT_WAIT: Duration = Duration::from_millis(50);

/// Whole-body compressions at once, process-wide (each on the blocking
/// pool, holding its permit until it ends, whoever waits for it): a burst
/// of misses on big pages must not take every core from the requests being
/// served.
static ENCODERS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Arc::new(Semaphore::new(cpus.div_ceil(2)))
});

/// A turn at whole-body compression (wait for it before deciding the work
/// is still wanted).
pub async fn encoder_turn() -> std::io::Result<OwnedSemaphorePermit> {
    Arc::clone(&ENCODERS)
        .acquire_owned()
        .await
        .map_err(|_| std::io::Error::other("the encoder pool is closed"))
}

/// [`encode_all`] on the blocking pool, in `permit`'s turn (held until the
/// compression ends, whoever waits for it).
pub async fn encode_off_loop(
    permit: OwnedSemaphorePermit,
    data: Bytes,
    coding: Coding,
    levels: Levels,
) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        encode_all(&data, coding, &levels)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Bodies compressed as they stream at once, process-wide. Each holds a
/// compressor (about 1 MiB for zstd at the default level, less for br and
/// gzip): beyond this many, answers go out uncompressed.
pub const MAX_STREAMS: usize = 512;

static STREAMS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(MAX_STREAMS)));

/// A place for one more streamed compressor, if there is one.
pub fn stream_slot() -> Option<OwnedSemaphorePermit> {
    Arc::clone(&STREAMS).try_acquire_owned().ok()
}

#[cfg(test)]
pub(crate) mod tests;
