//! Answering from a stored object (with `Age`, 304s and HEAD), and the
//! headers that tell clients what the cache did.

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};

use super::TAG_HEADERS;
use super::object::Object;
use crate::body::{self, Body};

/// `x-bext-cache`.
pub const X_BEXT_CACHE: HeaderName = HeaderName::from_static("x-bext-cache");
/// RFC 9211.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How a response was produced.
#[derive(Debug, Clone, Copy)]
pub enum Served {
    Hit,
    StaleWhileRevalidate,
    /// The app failed with this status; a stale copy stood in.
    StaleIfError(StatusCode),
    /// Fetched and stored; `collapsed` when it waited for another request's
    /// fetch.
    Miss {
        collapsed: bool,
    },
    /// Fetched, not storable, and why.
    NotStored(StatusCode, &'static str),
    /// The app failed and nothing could stand in.
    Failed(StatusCode),
    /// The request did not use the cache, and why.
    Bypass(&'static str),
}

/// Builds the answer to `req` from `object`.
pub fn serve<B>(
    req: &Request<B>,
    object: &Object,
    served: Served,
    now: SystemTime,
) -> Response<Body> {
    let mut response = Response::new(body::empty());
    let age = object.age(now).as_secs();
    if not_modified(req.headers(), object) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        for name in [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::DATE,
            header::ETAG,
            header::EXPIRES,
            header::VARY,
            header::LAST_MODIFIED,
        ] {
            for value in object.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
    } else {
        *response.status_mut() = object.status;
        // `no-cache="Field"`: the field goes out with the response that was
        // just fetched, never with a reuse.
        if matches!(served, Served::Miss { collapsed: false }) {
            *response.headers_mut() = object.headers.clone();
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(object.body.len()));
        } else {
            *response.headers_mut() = object.reuse_head().clone();
        }
        if req.method() != Method::HEAD {
            *response.body_mut() = body::full(object.body.clone());
        }
    }
    response.headers_mut().insert(header::AGE, age_value(age));
    mark_with_ttl(response.headers_mut(), served, Some(object.ttl_left(now)));
    response
}

/// `Age: age`; the last one made on this thread is reused (hits in the
/// same second share it).
fn age_value(age: u64) -> HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((a, value)) if *a == age => value.clone(),
            _ => {
                let value = HeaderValue::from(age);
                *last = Some((age, value.clone()));
                value
            }
        }
    })
}

/// Adds `x-bext-cache` and `Cache-Status` to a response that did not come
/// from an object.
pub fn mark(headers: &mut HeaderMap, served: Served) {
    mark_with_ttl(headers, served, None);
}

fn mark_with_ttl(headers: &mut HeaderMap, served: Served, ttl: Option<i64>) {
    use std::fmt::Write as _;
    // Written into one buffer that becomes the header value without a copy
    // (this runs on every cached answer).
    if let Served::Bypass(reason) = served {
        headers.insert(X_BEXT_CACHE, HeaderValue::from_static("BYPASS"));
        headers.insert(CACHE_STATUS, bypass_status(reason));
        return;
    }
    // A plain hit with the same ttl as the last one on this thread (hits
    // of one page within a second) shares its value.
    if let (Served::Hit, Some(ttl)) = (served, ttl) {
        headers.insert(X_BEXT_CACHE, HeaderValue::from_static("HIT"));
        headers.insert(CACHE_STATUS, hit_status(ttl));
        return;
    }
    let mut status = String::with_capacity(80);
    let label = match served {
        Served::Hit => {
            status.push_str("bext; hit");
            "HIT"
        }
        Served::StaleWhileRevalidate => {
            status.push_str("bext; hit");
            "STALE"
        }
        Served::StaleIfError(s) => {
            let _ = write!(status, "bext; fwd=stale; fwd-status={}", s.as_u16());
            "STALE"
        }
        Served::Miss { .. } => {
            status.push_str("bext; fwd=uri-miss; stored");
            "MISS"
        }
        Served::NotStored(s, reason) => {
            let _ = write!(
                status,
                "bext; fwd=uri-miss; fwd-status={}; detail={reason}",
                s.as_u16()
            );
            "BYPASS"
        }
        Served::Failed(s) => {
            let _ = write!(status, "bext; fwd=uri-miss; fwd-status={}", s.as_u16());
            "MISS"
        }
        Served::Bypass(_) => "BYPASS",
    };
    if let Some(ttl) = ttl {
        let _ = write!(status, "; ttl={ttl}");
    }
    match served {
        Served::StaleWhileRevalidate => status.push_str("; detail=stale-while-revalidate"),
        Served::StaleIfError(_) => status.push_str("; detail=stale-if-error"),
        Served::Miss { collapsed: true } => status.push_str("; collapsed"),
        _ => {}
    }
    headers.insert(X_BEXT_CACHE, HeaderValue::from_static(label));
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(status)) {
        headers.insert(CACHE_STATUS, value);
    }
}

/// `Cache-Status: bext; hit; ttl=TTL`, the last one made on this thread
/// reused.
fn hit_status(ttl: i64) -> HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<Option<(i64, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((t, value)) if *t == ttl => value.clone(),
            _ => {
                let mut status = Vec::with_capacity(32);
                push_hit_status(&mut status, ttl);
                let value = HeaderValue::from_maybe_shared(Bytes::from(status))
                    .unwrap_or_else(|_| HeaderValue::from_static("bext; hit"));
                *last = Some((ttl, value.clone()));
                value
            }
        }
    })
}

/// A hit's `Cache-Status` value.
fn push_hit_status(out: &mut Vec<u8>, ttl: i64) {
    out.extend_from_slice(b"bext; hit; ttl=");
    out.extend_from_slice(itoa::Buffer::new().format(ttl).as_bytes());
}

/// The fields [`serve`] gives a hit that differ from one to the next
/// (`Age` and the cache's status), as HTTP/1.1 field lines; `age` and
/// `ttl_left` in seconds ([`Object::fresh_at`]).
pub fn write_hit_fields(out: &mut Vec<u8>, age: u64, ttl_left: i64) {
    out.extend_from_slice(b"age: ");
    out.extend_from_slice(itoa::Buffer::new().format(age).as_bytes());
    out.extend_from_slice(b"\r\ncache-status: ");
    push_hit_status(out, ttl_left);
    out.extend_from_slice(b"\r\nx-bext-cache: HIT\r\n");
}

/// `Cache-Status` of a request that bypassed the cache (every request to a
/// dynamic page): made once per reason per thread, then shared.
fn bypass_status(reason: &'static str) -> HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static MADE: RefCell<Vec<(&'static str, HeaderValue)>> = const { RefCell::new(Vec::new()) };
    }
    MADE.with(|made| {
        let mut made = made.borrow_mut();
        if let Some((_, value)) = made.iter().find(|(r, _)| *r == reason) {
            return value.clone();
        }
        let value = HeaderValue::from_maybe_shared(Bytes::from(format!(
            "bext; fwd=bypass; detail={reason}"
        )))
        .unwrap_or_else(|_| HeaderValue::from_static("bext; fwd=bypass"));
        made.push((reason, value.clone()));
        value
    })
}

/// Removes what a stored response must not carry from an earlier cache.
pub fn unmark(headers: &mut HeaderMap) {
    headers.remove(X_BEXT_CACHE);
    headers.remove(CACHE_STATUS);
}

/// Removes what is meant for bext alone: the purge-tag headers and
/// `Surrogate-Control`.
pub fn strip_internal_headers(headers: &mut HeaderMap) {
    let internal = |name: &HeaderName| {
        TAG_HEADERS.contains(&name.as_str()) || name.as_str() == "surrogate-control"
    };
    // Usually there is none: one pass over the names instead of a lookup
    // for each.
    if !headers.keys().any(internal) {
        return;
    }
    for name in TAG_HEADERS {
        headers.remove(name);
    }
    headers.remove("surrogate-control");
}

/// Removes the purge-tag headers and returns their tags: `X-Cache-Tags` and
/// `x-next-cache-tags` are comma-separated, `Surrogate-Key` space-separated.
pub fn take_tags(headers: &mut HeaderMap) -> Vec<String> {
    let mut tags = Vec::new();
    for (name, separator) in [
        ("x-cache-tags", ','),
        ("x-next-cache-tags", ','),
        ("surrogate-key", ' '),
    ] {
        for value in headers.get_all(name) {
            let Ok(value) = value.to_str() else { continue };
            tags.extend(
                value
                    .split(separator)
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            );
        }
        headers.remove(name);
    }
    tags.sort();
    tags.dedup();
    tags
}

/// RFC 9111 §4.3.2: If-None-Match (weak comparison) first, else
/// If-Modified-Since against Last-Modified.
fn not_modified(request: &HeaderMap, object: &Object) -> bool {
    if !object.status.is_success() {
        return false;
    }
    if let Some(inm) = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        let Some(etag) = object
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm
            .split(',')
            .any(|t| t.trim() == "*" || bare(t) == bare(etag));
    }
    let since = request
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let modified = object
        .headers
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((since, modified), (Some(since), Some(modified)) if modified <= since)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hit reuses a head made once: the `no-cache="Field"` field is left
    /// out of every reuse but sent with the fetch that stored it, and each
    /// answer gets its own `Age` and `Cache-Status` (shared per thread
    /// only while they are the same).
    #[test]
    fn a_hit_reuses_one_head_without_no_cache_fields() {
        use std::time::Duration;
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60, no-cache=\"x-secret\""),
        );
        headers.insert("x-secret", HeaderValue::from_static("s3cret"));
        let object = Object::new(
            StatusCode::OK,
            headers,
            Bytes::from_static(b"hello"),
            Duration::ZERO,
            super::super::policy::Lifetime {
                ttl: Duration::from_secs(60),
                swr: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            },
            vec![],
            ("/".into(), "h /".into()),
            vec![],
            false,
        );
        let req = Request::get("/").body(()).expect("request");
        let at = |secs: u64| object.stored_at + Duration::from_secs(secs);
        let fresh = serve(&req, &object, Served::Miss { collapsed: false }, at(0));
        assert_eq!(fresh.headers()["x-secret"], "s3cret");
        for (secs, ttl) in [(1, "59"), (1, "59"), (5, "55")] {
            let hit = serve(&req, &object, Served::Hit, at(secs));
            let h = hit.headers();
            assert!(h.get("x-secret").is_none(), "never with a reuse");
            assert_eq!(h[header::CONTENT_LENGTH], "5");
            assert_eq!(h[header::CONTENT_TYPE], "text/html");
            assert_eq!(h[header::AGE], secs.to_string().as_str());
            assert_eq!(h[CACHE_STATUS], format!("bext; hit; ttl={ttl}").as_str());
            assert_eq!(h[X_BEXT_CACHE], "HIT");
            assert_eq!(h.get_all(header::AGE).iter().count(), 1);
        }
        let collapsed = serve(&req, &object, Served::Miss { collapsed: true }, at(0));
        assert!(
            collapsed.headers().get("x-secret").is_none(),
            "a waiter reuses"
        );
        let head = Request::head("/").body(()).expect("request");
        let headed = serve(&head, &object, Served::Hit, at(2));
        assert_eq!(headed.headers()[header::CONTENT_LENGTH], "5");
        assert!(headed.headers().get("x-secret").is_none());
        let stale = serve(&req, &object, Served::StaleWhileRevalidate, at(61));
        assert_eq!(
            stale.headers()[CACHE_STATUS],
            "bext; hit; ttl=-1; detail=stale-while-revalidate"
        );
    }

    #[test]
    fn tags_come_from_all_three_headers_and_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("x-cache-tags", HeaderValue::from_static("posts, post:1"));
        h.insert(
            "x-next-cache-tags",
            HeaderValue::from_static("_N_T_/layout,_N_T_/isr"),
        );
        h.insert("surrogate-key", HeaderValue::from_static("home  posts"));
        h.insert("content-type", HeaderValue::from_static("text/html"));
        let tags = take_tags(&mut h);
        assert_eq!(
            tags,
            ["_N_T_/isr", "_N_T_/layout", "home", "post:1", "posts"]
        );
        assert_eq!(h.len(), 1);
    }
}
