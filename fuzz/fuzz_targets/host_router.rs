//! `Host` values (and HTTP/2 authorities) against a route table with exact
//! names, wildcards and a default: never a panic, and a name the table
//! lists exactly always finds its own app.
#![no_main]

use std::sync::{Arc, OnceLock};

use bext::router::{RouteTable, normalize};
use libfuzzer_sys::fuzz_target;

fn table() -> &'static RouteTable<&'static str> {
    static TABLE: OnceLock<RouteTable<&'static str>> = OnceLock::new();
    TABLE.get_or_init(|| {
        RouteTable::new(
            [
                ("example.com", "site"),
                ("www.example.com", "site"),
                ("*.example.com", "wild"),
                ("*.a.example.com", "deeper"),
                ("api.test", "api"),
            ]
            .into_iter()
            .map(|(d, a)| (d.to_string(), Arc::new(a))),
            Some(Arc::new("default")),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(host) = std::str::from_utf8(data) else {
        return;
    };
    let routed = table().route(host);
    assert!(routed.is_some(), "the default catches everything");
    let normalized = normalize(host);
    if normalized == "api.test" {
        assert_eq!(routed.map(|a| **a), Some("api"));
    }
});
