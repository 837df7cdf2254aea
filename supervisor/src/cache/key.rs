//! Cache keys: host, path and query (the primary key), plus the values of
//! the request headers the response varies on (Next.js varies on `rsc`,
//! `next-router-state-tree`, `next-router-prefetch`,
//! `next-router-segment-prefetch`). `Accept-Encoding` is not part of the key:
//! bext asks workers for identity bodies, so every variant is the same bytes.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue, Request, header};

/// `host` + path + query; the host lowercased, without port or trailing
/// dot; prefixed with `https:` for a request that came over TLS (answers
/// for `http` and `https` are never mixed).
pub fn primary<B>(req: &Request<B>) -> String {
    primary_with_host(req, req.headers().get(header::HOST))
}

/// [`primary`], given the request's first `Host` value.
pub fn primary_with_host<B>(req: &Request<B>, host: Option<&HeaderValue>) -> String {
    let host = host
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    // (Bytes, not `rsplit_once`: this runs for every request.)
    let host = match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => {
            &host[..colon]
        }
        _ => host,
    };
    let host = host.trim_end_matches('.');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut key = String::with_capacity(HTTPS.len() + host.len() + target.len() + 1);
    if crate::listener::is_secure(req) {
        key.push_str(HTTPS);
    }
    key.push_str(host);
    key.make_ascii_lowercase();
    key.push(' ');
    key.push_str(target);
    key
}

/// A control character no `Host` can carry: a client cannot forge an https
/// key over plain HTTP.
const HTTPS: &str = "\u{1}https:";

/// A primary key as a request header's value (for a Next.js worker, which
/// names it back: [`crate::nextcache`]): `s ` or `p ` (the scheme) and the
/// rest. `None` for one a header cannot carry.
pub fn primary_to_header(primary: &str) -> Option<HeaderValue> {
    match primary.strip_prefix(HTTPS) {
        Some(rest) => HeaderValue::from_str(&format!("s {rest}")).ok(),
        None => HeaderValue::from_str(&format!("p {primary}")).ok(),
    }
}

/// [`primary_to_header`] read back.
pub fn primary_from_header(value: &str) -> Option<String> {
    if let Some(rest) = value.strip_prefix("s ") {
        Some(format!("{HTTPS}{rest}"))
    } else {
        value.strip_prefix("p ").map(str::to_string)
    }
}

/// The same primary key for the other scheme (an unsafe request over one
/// invalidates what was stored for both).
pub fn other_scheme(primary: &str) -> String {
    match primary.strip_prefix(HTTPS) {
        Some(plain) => plain.to_string(),
        None => format!("{HTTPS}{primary}"),
    }
}

/// The response's `Vary` names that select variants.
pub fn vary_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| *n != header::ACCEPT_ENCODING)
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

/// The request's values of `names`.
pub fn vary_values(
    headers: &HeaderMap,
    names: &[HeaderName],
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .map(|n| (n.clone(), combined(headers, n)))
        .collect()
}

/// Every line of `name` in `headers`, as one value (`, `-joined, as
/// RFC 9110 §5.3 combines field lines): a variant is chosen by all of
/// them, never by the first alone.
pub fn combined(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let Some(second) = lines.next() else {
        return Some(first.clone());
    };
    let mut joined = first.as_bytes().to_vec();
    for line in std::iter::once(second).chain(lines) {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(line.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// The full key: primary plus the varied header values.
pub fn full<'a>(primary: &'a str, headers: &HeaderMap, names: &[HeaderName]) -> Cow<'a, str> {
    with_values(
        primary,
        names.iter().map(|name| (name, combined(headers, name))),
    )
}

/// The key an object was stored under (its primary key and the values it
/// was stored for, in the order of its `Vary` names).
pub fn stored(object: &super::object::Object) -> Cow<'_, str> {
    with_values(
        &object.primary,
        object
            .vary
            .iter()
            .map(|(name, value)| (name, value.clone())),
    )
}

fn with_values<'a, 'n>(
    primary: &'a str,
    values: impl ExactSizeIterator<Item = (&'n HeaderName, Option<HeaderValue>)>,
) -> Cow<'a, str> {
    if values.len() == 0 {
        return Cow::Borrowed(primary);
    }
    let mut key = String::with_capacity(primary.len() + 32);
    key.push_str(primary);
    for (name, value) in values {
        key.push('\n');
        key.push_str(name.as_str());
        key.push('=');
        if let Some(value) = value {
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        } else {
            key.push('\u{0}');
        }
    }
    Cow::Owned(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, target: &str) -> Request<()> {
        Request::builder()
            .uri(target)
            .header("host", host)
            .body(())
            .expect("request")
    }

    #[test]
    fn https_and_http_answers_have_their_own_keys() {
        let plain = primary(&req("a.test", "/x"));
        let mut secure = req("a.test", "/x");
        secure.extensions_mut().insert(crate::listener::Secure);
        let secure = primary(&secure);
        assert_ne!(plain, secure);
        assert_eq!(secure, "\u{1}https:a.test /x");
        let mut forged = req("https:a.test", "/x");
        forged.extensions_mut().clear();
        assert_ne!(primary(&forged), secure, "a Host cannot forge the scheme");
        assert_eq!(other_scheme(&plain), secure);
        assert_eq!(other_scheme(&secure), plain);
    }

    #[test]
    fn every_line_of_a_varied_header_selects_the_variant() {
        let names = [header::ACCEPT_LANGUAGE];
        let mut one = HeaderMap::new();
        one.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        let mut two = one.clone();
        two.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("fr"));
        assert_ne!(full("p", &one, &names), full("p", &two, &names));
        assert_eq!(
            combined(&two, &header::ACCEPT_LANGUAGE).expect("value"),
            "en, fr"
        );
    }

    #[test]
    fn primary_keys_normalise_the_host() {
        assert_eq!(
            primary(&req("Example.COM:8080", "/a?b=1")),
            "example.com /a?b=1"
        );
        assert_eq!(primary(&req("example.com.", "/")), "example.com /");
        assert_ne!(primary(&req("a.com", "/x")), primary(&req("b.com", "/x")));
        assert_ne!(
            primary(&req("a.com", "/isr")),
            primary(&req("a.com", "/isr?_rsc=1"))
        );
    }

    #[test]
    fn vary_selects_variants_but_not_on_accept_encoding() {
        let mut response = HeaderMap::new();
        response.insert(
            header::VARY,
            HeaderValue::from_static("rsc, Next-Router-State-Tree, Accept-Encoding"),
        );
        let names = vary_names(&response);
        assert_eq!(names, ["next-router-state-tree", "rsc"]);
        let html = HeaderMap::new();
        let mut rsc = HeaderMap::new();
        rsc.insert("rsc", HeaderValue::from_static("1"));
        let mut gzip = HeaderMap::new();
        gzip.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        assert_ne!(full("h /p", &html, &names), full("h /p", &rsc, &names));
        assert_eq!(full("h /p", &html, &names), full("h /p", &gzip, &names));
    }
}
