//! `X-Forwarded-For` lines from a trusted proxy, and the headers bext sets
//! for the app: the client address is always one the chain (or the peer)
//! names, and nothing panics.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use bext::listener::Peer;
use bext::proxy::headers::{X_FORWARDED_FOR, client_ip, forwarded_addr, set_forwarded};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
    let peer: SocketAddr = "10.0.0.2:4000".parse().expect("addr");
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(X_FORWARDED_FOR, value);
        }
        if let Ok(text) = std::str::from_utf8(line) {
            let _ = forwarded_addr(text);
        }
    }
    let client = client_ip(peer.ip(), &headers, &trusted);
    let named = |ip: IpAddr| {
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(forwarded_addr)
            .any(|a| a == ip)
    };
    assert!(client == peer.ip() || named(client), "{client} came from nowhere");
    set_forwarded(
        &mut headers,
        &Peer::new(peer),
        true,
        "http",
        None,
        &HeaderValue::from_static("id"),
    );
    assert_eq!(headers.get_all(X_FORWARDED_FOR).iter().count(), 1);
});
