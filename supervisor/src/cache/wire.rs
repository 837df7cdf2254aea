//! A stored object as bytes, for edge mode's L2 (Redis): versioned,
//! compact, checksummed.
//!
//! ```text
//! "BXO" VERSION(1) | HEAD_LEN u32 LE | head (postcard) | body | CRC32 u32 LE
//! ```
//!
//! The checksum covers everything before it: a truncated or altered value
//! (another program's key under the same prefix, a partial write) is
//! refused, never served. Decoding bounds every size before using it, and
//! what comes out is checked as any response from an app would be (header
//! names and values parsed again).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::object::Object;
use super::policy::Lifetime;

const MAGIC: &[u8; 3] = b"BXO";
/// Bumped when the head's fields change: an older value is then a miss.
const VERSION: u8 = 1;
/// Longest encoded head accepted (headers, tags, keys).
pub const MAX_HEAD: usize = 1 << 20;
/// Most headers, tags and Vary entries accepted, each.
const MAX_ITEMS: usize = 1000;

#[derive(Debug, Serialize, Deserialize)]
struct Head {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    stored_at_ms: u64,
    initial_age_ms: u64,
    ttl_ms: u64,
    swr_ms: u64,
    stale_if_error_ms: u64,
    tags: Vec<String>,
    path: String,
    primary: String,
    vary: Vec<(String, Option<Vec<u8>>)>,
    shared_with_auth: bool,
    soft_purged_ms: u64,
}

/// Why bytes did not decode to an object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a bext object (or of another version)")]
    Foreign,
    #[error("truncated")]
    Truncated,
    #[error("checksum mismatch")]
    Checksum,
    #[error("larger than allowed")]
    TooLarge,
    #[error("malformed head: {0}")]
    Head(String),
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether `object` can be decoded again once encoded (within the bounds
/// [`decode`] sets): one that cannot is not shared.
pub fn fits(object: &Object) -> bool {
    let head: usize = object
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .chain(object.tags.iter().map(|t| t.len() + 2))
        .chain(
            object
                .vary
                .iter()
                .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, HeaderValue::len) + 4),
        )
        .sum::<usize>()
        + object.path.len()
        + object.primary.len();
    object.headers.len() <= MAX_ITEMS
        && object.tags.len() <= MAX_ITEMS
        && object.vary.len() <= MAX_ITEMS
        && head < MAX_HEAD / 2
}

/// `object` as bytes.
pub fn encode(object: &Object) -> Bytes {
    let head = Head {
        status: object.status.as_u16(),
        headers: object
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        stored_at_ms: millis(
            object
                .stored_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        ),
        initial_age_ms: millis(object.initial_age),
        ttl_ms: millis(object.lifetime.ttl),
        swr_ms: millis(object.lifetime.swr),
        stale_if_error_ms: millis(object.lifetime.stale_if_error),
        tags: object.tags.clone(),
        path: object.path.clone(),
        primary: object.primary.clone(),
        vary: object
            .vary
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    v.as_ref().map(|v| v.as_bytes().to_vec()),
                )
            })
            .collect(),
        shared_with_auth: object.shared_with_auth,
        soft_purged_ms: object.soft_purged_ms(),
    };
    let head = postcard::to_allocvec(&head).unwrap_or_default();
    let mut out = BytesMut::with_capacity(4 + 4 + head.len() + object.body.len() + 4);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u32_le(u32::try_from(head.len()).unwrap_or(u32::MAX));
    out.put_slice(&head);
    out.put_slice(&object.body);
    let crc = crc32fast::hash(&out);
    out.put_u32_le(crc);
    out.freeze()
}

/// The object in `bytes`, whose body may be at most `max_body` bytes.
pub fn decode(bytes: &[u8], max_body: usize) -> Result<Object, WireError> {
    if bytes.len() < 4 || &bytes[..3] != MAGIC || bytes[3] != VERSION {
        return Err(WireError::Foreign);
    }
    if bytes.len() < 12 {
        return Err(WireError::Truncated);
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| WireError::Truncated)?);
    if crc32fast::hash(content) != crc {
        return Err(WireError::Checksum);
    }
    let head_len =
        u32::from_le_bytes(content[4..8].try_into().map_err(|_| WireError::Truncated)?) as usize;
    if head_len > MAX_HEAD {
        return Err(WireError::TooLarge);
    }
    let rest = &content[8..];
    if rest.len() < head_len {
        return Err(WireError::Truncated);
    }
    let (head, body) = rest.split_at(head_len);
    if body.len() > max_body {
        return Err(WireError::TooLarge);
    }
    let head: Head = postcard::from_bytes(head).map_err(|e| WireError::Head(e.to_string()))?;
    if head.headers.len() > MAX_ITEMS || head.tags.len() > MAX_ITEMS || head.vary.len() > MAX_ITEMS
    {
        return Err(WireError::TooLarge);
    }
    let bad = |what: &str| WireError::Head(what.to_string());
    let status = StatusCode::from_u16(head.status).map_err(|_| bad("status"))?;
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    for (name, value) in head.headers {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("header name"))?,
            HeaderValue::from_bytes(&value).map_err(|_| bad("header value"))?,
        );
    }
    let mut vary = Vec::with_capacity(head.vary.len());
    for (name, value) in head.vary {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("vary name"))?;
        let value = value
            .map(|v| HeaderValue::from_bytes(&v).map_err(|_| bad("vary value")))
            .transpose()?;
        vary.push((name, value));
    }
    let ms = Duration::from_millis;
    let stored_at = UNIX_EPOCH
        .checked_add(ms(head.stored_at_ms))
        .ok_or_else(|| bad("stored_at"))?;
    // A copy stored "in the future" (a clock ahead on another instance)
    // counts from now: it never lives longer than it would here.
    let stored_at = stored_at.min(SystemTime::now());
    Ok(Object::restored(
        status,
        headers,
        Bytes::copy_from_slice(body),
        (stored_at, ms(head.initial_age_ms)),
        Lifetime {
            ttl: ms(head.ttl_ms),
            swr: ms(head.swr_ms),
            stale_if_error: ms(head.stale_if_error_ms),
        },
        head.tags,
        (head.path, head.primary),
        vary,
        (head.shared_with_auth, head.soft_purged_ms),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Object {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/html"));
        headers.append("set-thing", HeaderValue::from_static("a"));
        headers.append("set-thing", HeaderValue::from_static("b"));
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        let object = Object::new(
            StatusCode::OK,
            headers,
            Bytes::from_static(b"<h1>hello</h1>"),
            Duration::from_secs(3),
            Lifetime {
                ttl: Duration::from_secs(60),
                swr: Duration::from_secs(600),
                stale_if_error: Duration::from_secs(3600),
            },
            vec!["posts".into(), "home".into()],
            ("/".into(), "http example.com /".into()),
            vec![
                (
                    HeaderName::from_static("rsc"),
                    Some(HeaderValue::from_static("1")),
                ),
                (HeaderName::from_static("next-router-state-tree"), None),
            ],
            true,
        );
        object.soft_purge();
        object
    }

    #[test]
    fn an_object_survives_the_round_trip() {
        let object = sample();
        let bytes = encode(&object);
        let back = decode(&bytes, 1 << 20).expect("decodes");
        assert_eq!(back.status, object.status);
        assert_eq!(back.headers, object.headers);
        assert_eq!(back.body, object.body);
        assert_eq!(back.tags, object.tags);
        assert_eq!(back.path, object.path);
        assert_eq!(back.primary, object.primary);
        assert_eq!(back.vary, object.vary);
        assert_eq!(back.lifetime, object.lifetime);
        assert_eq!(back.initial_age, object.initial_age);
        assert!(back.shared_with_auth);
        assert_eq!(back.soft_purged_ms(), object.soft_purged_ms());
        assert_ne!(back.soft_purged_ms(), 0);
        let drift = object
            .stored_at
            .duration_since(back.stored_at)
            .unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_millis(1), "{drift:?}");
        assert_eq!(back.weak_etag, object.weak_etag);
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused() {
        let bytes = encode(&sample()).to_vec();
        assert_eq!(
            decode(b"hello world", 1 << 20).err(),
            Some(WireError::Foreign)
        );
        let mut other_version = bytes.clone();
        other_version[3] = VERSION + 1;
        assert_eq!(
            decode(&other_version, 1 << 20).err(),
            Some(WireError::Foreign)
        );
        for cut in [5, 12, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], 1 << 20).is_err(), "cut at {cut}");
        }
        for at in [5, 9, bytes.len() / 2, bytes.len() - 6] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x40;
            assert_eq!(
                decode(&flipped, 1 << 20).err(),
                Some(WireError::Checksum),
                "at {at}"
            );
        }
        assert_eq!(
            decode(&bytes, 4).err(),
            Some(WireError::TooLarge),
            "body bound"
        );
    }

    #[test]
    fn a_huge_head_length_is_refused_before_anything_is_read() {
        let mut bytes = encode(&sample()).to_vec();
        bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let len = bytes.len();
        let crc = crc32fast::hash(&bytes[..len - 4]);
        bytes[len - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&bytes, 1 << 20).err(), Some(WireError::TooLarge));
    }
}
