//! Header rules at the proxy boundary: hop-by-hop headers never cross it,
//! and the worker learns who the client was from headers bext sets itself
//! (a client's own `X-Forwarded-*` are replaced, never trusted).

use std::net::IpAddr;

use bytes::Bytes;
use ipnet::IpNet;

use crate::listener::Peer;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and
/// `Proxy-Connection`). Worker responses drop the same names while they are
/// parsed (`pool::h1::parse_response`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop headers and every header the `Connection` header
/// names. With `upgrade`, keeps `Upgrade` and sets `Connection: upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names (comparisons, no hashing) finds which are
    // present; only those are looked up to be removed. Most requests carry
    // none; Node's responses carry `Connection` and `Keep-Alive`.
    let mut present = [false; 8]; // as HOP_BY_HOP; [0] is Connection
    let mut has_upgrade = false;
    for name in headers.keys() {
        // By length first: most names are ruled out without a comparison.
        let i = match name.as_str() {
            "connection" => 0,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "proxy-authenticate" => 3,
            "proxy-authorization" => 4,
            "te" => 5,
            "trailer" => 6,
            "transfer-encoding" => 7,
            "upgrade" => {
                has_upgrade = true;
                continue;
            }
            _ => continue,
        };
        present[i] = true;
    }
    // Other headers `Connection` names (`close`, `keep-alive` and the
    // standard ones need no lookup; a lone `keep-alive`, as Node sends on
    // every response, needs no parsing).
    let simple = |v: &HeaderValue| {
        v.as_bytes().eq_ignore_ascii_case(b"keep-alive")
            || v.as_bytes().eq_ignore_ascii_case(b"close")
    };
    let named: Vec<HeaderName> =
        if present[0] && !headers.get_all(header::CONNECTION).iter().all(simple) {
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|token| {
                    !token.eq_ignore_ascii_case("close")
                        && !HOP_BY_HOP
                            .iter()
                            .any(|hop| token.eq_ignore_ascii_case(hop.as_str()))
                })
                .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
                .collect()
        } else {
            Vec::new()
        };
    for name in &named {
        if !(upgrade && *name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for (hop, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(hop);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if has_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Request headers a client may not set: only a trusted proxy's reach the
/// app. Frameworks and libraries read them as facts about the client
/// (`X-Real-IP` as its address, `X-Forwarded-Prefix` as the path the app is
/// mounted at).
const FROM_TRUSTED_ONLY: [HeaderName; 3] = [
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
];

/// Request headers that never reach the app: Next.js's internal marker of
/// its own middleware subrequests, which skips the middleware when a client
/// sends it (CVE-2025-29927).
const NEVER_FORWARDED: [HeaderName; 1] = [HeaderName::from_static("x-middleware-subrequest")];

/// One `X-Forwarded-For` entry: an address, with or without a port
/// (`203.0.113.7:4711`, `[2001:db8::1]:443`, `[2001:db8::1]`); IPv4-mapped
/// IPv6 is the IPv4 address.
pub fn forwarded_addr(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })?;
    Some(ip.to_canonical())
}

/// The client's address: the socket peer, or, when the peer is a trusted
/// proxy, the rightmost `X-Forwarded-For` address (over every line of it)
/// that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if !trusted.iter().any(|net| net.contains(&peer)) {
        return peer;
    }
    let chain: Vec<IpAddr> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(forwarded_addr)
        .collect();
    // Every entry a trusted proxy: the leftmost was still written by the
    // client, so the peer it is.
    chain
        .iter()
        .rev()
        .find(|ip| !trusted.iter().any(|net| net.contains(*ip)))
        .copied()
        .unwrap_or(peer)
}

/// Sets the `X-Forwarded-*` headers and `X-Request-Id` for the worker. A
/// client's own values are replaced; a trusted proxy's are extended (its
/// `X-Forwarded-For` gets the peer appended, its `-Proto` and `-Host` stay).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &Peer,
    trusted_peer: bool,
    scheme: &'static str,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) {
    // Which forwarding headers the client sent: one pass over the names
    // (most requests carry none) instead of a lookup for each.
    let (mut has_for, mut has_proto, mut has_host, mut has_forwarded, mut has_other) =
        (false, false, false, false, false);
    for name in headers.keys() {
        match name.as_str() {
            "x-forwarded-for" => has_for = true,
            "x-forwarded-proto" => has_proto = true,
            "x-forwarded-host" => has_host = true,
            "forwarded" => has_forwarded = true,
            "x-real-ip" | "x-forwarded-port" | "x-forwarded-prefix" | "x-middleware-subrequest" => {
                has_other = true;
            }
            _ => {}
        }
    }
    if has_other {
        for name in NEVER_FORWARDED
            .iter()
            .chain(FROM_TRUSTED_ONLY.iter().filter(|_| !trusted_peer))
        {
            headers.remove(name);
        }
    }
    // A trusted proxy's chain, every line of it (HAProxy appends a line of
    // its own), with the peer appended.
    let chain = (trusted_peer && has_for)
        .then(|| {
            let mut chain = String::new();
            for line in headers.get_all(X_FORWARDED_FOR) {
                let Ok(line) = line.to_str() else { continue };
                chain.push_str(line.trim());
                chain.push_str(", ");
            }
            chain.push_str(&peer.addr.ip().to_string());
            HeaderValue::from_str(&chain).ok()
        })
        .flatten();
    // Up to five more headers: room for them at once.
    headers.reserve(5);
    // insert replaces every line of a client's own.
    headers.insert(X_FORWARDED_FOR, chain.unwrap_or_else(|| peer.ip.clone()));
    if !(trusted_peer && has_proto) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
    if !(trusted_peer && has_host) {
        match host {
            Some(v) => {
                headers.insert(X_FORWARDED_HOST, v.clone());
            }
            None if has_host => {
                headers.remove(X_FORWARDED_HOST);
            }
            None => {}
        }
    }
    // RFC 7239 `Forwarded` from a client is as untrusted as X-Forwarded-*.
    if has_forwarded {
        headers.remove(header::FORWARDED);
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
}

/// Whether `X-Forwarded-Proto` says `https` in its last value: the one the
/// trusted peer wrote (a proxy that appends leaves the client's own in
/// front). Believe it only from a trusted peer.
pub fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get_all(X_FORWARDED_PROTO)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// An HTTP/2 client may send its cookies as separate `cookie` fields
/// (browsers do, for compression); an HTTP/1.1 server expects one line:
/// they are joined with `; ` (RFC 9113 §8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for cookie in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(cookie.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// The client's `X-Request-Id` if it is sane (1–128 characters of
/// `[A-Za-z0-9._:-]`), else a fresh one.
pub fn request_id(fields: &crate::fields::Fields<'_>) -> HeaderValue {
    fields
        .get(&X_REQUEST_ID)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        })
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// A fresh request id: a random UUID as 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    let id = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(id.as_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Is this a WebSocket upgrade request (HTTP/1.1 `Upgrade: websocket`)?
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade
        && headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
            })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_trusted_peers_own_proto_counts() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https, http"));
        assert!(!super::forwarded_https(&h), "the client's `https` in front");
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        h.append(X_FORWARDED_PROTO, HeaderValue::from_static("HTTPS"));
        assert!(super::forwarded_https(&h));
    }

    #[test]
    fn h2_cookie_fields_become_one_line() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2; c=3"));
        super::join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        super::join_cookies(&mut one);
        assert_eq!(one[header::COOKIE], "a=1");
    }

    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn each_hop_by_hop_header_is_dropped_on_its_own() {
        for hop in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(hop.clone(), HeaderValue::from_static("x"));
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(hop), "{hop} kept");
            assert!(
                h.contains_key(header::ACCEPT),
                "{hop}: the other header went too"
            );
        }
    }

    #[test]
    fn upgrades_keep_their_upgrade_header() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_websocket_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn client_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        set_forwarded(
            &mut h,
            &Peer::new("127.0.0.9:5000".parse().expect("addr")),
            false,
            "http",
            Some(&HeaderValue::from_static("a.example")),
            &HeaderValue::from_static("rid"),
        );
        assert_eq!(h[X_FORWARDED_FOR], "127.0.0.9");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "a.example");
        assert_eq!(h[X_REQUEST_ID], "rid");
        assert!(!h.contains_key(header::FORWARDED));

        // Without a Host to forward, a client's own X-Forwarded-Host goes.
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        set_forwarded(
            &mut h,
            &Peer::new("127.0.0.9:5000".parse().expect("addr")),
            false,
            "http",
            None,
            &HeaderValue::from_static("rid"),
        );
        assert!(!h.contains_key(X_FORWARDED_HOST));
        assert_eq!(h[X_FORWARDED_FOR], "127.0.0.9");
    }

    #[test]
    fn a_trusted_proxy_s_chain_is_believed_and_extended() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 203.0.113.7, 10.1.1.1"),
        );
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let proxy: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().expect("ip")
        );
        let stranger: IpAddr = "198.51.100.1".parse().expect("ip");
        assert_eq!(
            client_ip(stranger, &h, &trusted),
            stranger,
            "an untrusted peer's header is ignored"
        );
        set_forwarded(
            &mut h,
            &Peer::new(std::net::SocketAddr::new(proxy, 1)),
            true,
            "http",
            Some(&HeaderValue::from_static("a")),
            &HeaderValue::from_static("rid"),
        );
        assert_eq!(
            h[X_FORWARDED_FOR],
            "6.6.6.6, 203.0.113.7, 10.1.1.1, 10.0.0.2"
        );
        assert_eq!(h[X_FORWARDED_PROTO], "https");
    }

    /// Issue 11, fault 6: every X-Forwarded-For line of a trusted proxy
    /// counts (HAProxy appends a line of its own), entries with ports are
    /// parsed, and IPv4-mapped addresses are their IPv4 selves.
    #[test]
    fn every_forwarded_line_counts_and_ports_are_parsed() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let proxy: IpAddr = "10.0.0.2".parse().expect("ip");
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("203.0.113.7:4711"),
        );
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().expect("ip"),
            "the proxy's own line, not the client's first one"
        );
        for (entry, ip) in [
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            (" ::ffff:192.0.2.1 ", "192.0.2.1"),
            ("192.0.2.1:80", "192.0.2.1"),
        ] {
            assert_eq!(
                forwarded_addr(entry),
                Some(ip.parse().expect("ip")),
                "{entry}"
            );
        }
        assert_eq!(forwarded_addr("unknown"), None);
        set_forwarded(
            &mut h,
            &Peer::new(std::net::SocketAddr::new(proxy, 1)),
            true,
            "http",
            None,
            &HeaderValue::from_static("rid"),
        );
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            h[X_FORWARDED_FOR], "6.6.6.6, 203.0.113.7:4711, 10.0.0.2",
            "every line goes on"
        );
    }

    /// Issue 11, fault 6: headers a client could lie with reach the app only
    /// from a trusted proxy; Next's middleware marker never.
    #[test]
    fn client_claims_are_dropped_unless_a_trusted_proxy_makes_them() {
        let claims = || {
            let mut h = HeaderMap::new();
            for name in [
                "x-real-ip",
                "x-forwarded-port",
                "x-forwarded-prefix",
                "x-middleware-subrequest",
            ] {
                h.insert(name, HeaderValue::from_static("1"));
            }
            h
        };
        let peer = Peer::new("[::ffff:192.0.2.9]:5000".parse().expect("addr"));
        assert_eq!(peer.addr.ip(), "192.0.2.9".parse::<IpAddr>().expect("ip"));
        assert_eq!(peer.ip, "192.0.2.9");
        let rid = HeaderValue::from_static("rid");
        let mut untrusted = claims();
        set_forwarded(&mut untrusted, &peer, false, "http", None, &rid);
        for name in [
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-middleware-subrequest",
        ] {
            assert!(!untrusted.contains_key(name), "{name} from a client");
        }
        let mut trusted = claims();
        set_forwarded(&mut trusted, &peer, true, "http", None, &rid);
        for name in ["x-real-ip", "x-forwarded-port", "x-forwarded-prefix"] {
            assert!(trusted.contains_key(name), "{name} from a trusted proxy");
        }
        assert!(!trusted.contains_key("x-middleware-subrequest"));
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123.x:y_z"));
        let request_id = |h: &HeaderMap| request_id(&crate::fields::Fields::of(h));
        assert_eq!(request_id(&h), "abc-123.x:y_z");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        let generated = request_id(&h);
        assert_eq!(generated.len(), 32);
        assert!(generated.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(generated, request_id(&h), "fresh ids differ");
    }
}
