//! An app's caching headers (`Cache-Control`, `Surrogate-Control`, `Age`,
//! `Expires`, `Vary`, ...), one `name: value` a line: the verdict, the
//! stored object's lifetime arithmetic and the cache key must never panic.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bext::cache::object::Object;
use bext::cache::policy::{self, Verdict};
use bext::config::{Config, IsrConfig};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;

fn settings() -> &'static IsrConfig {
    static SETTINGS: OnceLock<IsrConfig> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        Config::parse(std::path::Path::new("x.toml"), "")
            .expect("defaults")
            .isr
    })
}

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let _ = policy::CacheControl::parse(&headers);
    let _ = policy::SurrogateControl::parse(&headers);
    let age = policy::upstream_age(&headers);
    let now = SystemTime::now();
    let verdict = policy::response_verdict(StatusCode::OK, &headers, false, None, settings(), now);
    if let Verdict::Store { lifetime, .. } = verdict {
        let object = Object::new(
            StatusCode::OK,
            headers.clone(),
            bytes::Bytes::new(),
            age,
            lifetime,
            vec![],
            ("/".into(), "h /".into()),
            vec![],
            false,
        );
        for later in [0, 1, 86_400, 1 << 40] {
            let at = now + Duration::from_secs(later);
            let _ = object.freshness(at);
            let _ = object.ttl_left(at);
        }
        let _ = object.keep_for();
    }
    let names = bext::cache::key::vary_names(&headers);
    let _ = bext::cache::key::full("h /x", &headers, &names);
});
