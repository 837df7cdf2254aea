//! What may be stored and for how long: `Cache-Control` parsing, request
//! eligibility, and the lifetime of a response (route rules, then the
//! response's own directives, then the defaults for responses marked
//! cacheable without a lifetime).
//!
//! Pure functions of headers and settings: no I/O, no clock except the one
//! passed in.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode, header};

use crate::config::{IsrConfig, RouteRule};

/// The directives bext acts on, from every `Cache-Control` header value.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    /// Bare `no-cache`: stored, but revalidated before every use.
    pub no_cache: bool,
    /// `no-cache="Field, …"`: those fields are not stored.
    pub no_cache_fields: Vec<String>,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl CacheControl {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || arg.and_then(delta_seconds);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => match arg {
                        Some(fields) => cc.no_cache_fields.extend(
                            fields
                                .split(',')
                                .map(|f| f.trim().to_ascii_lowercase())
                                .filter(|f| !f.is_empty()),
                        ),
                        None => cc.no_cache = true,
                    },
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    // A malformed duplicate makes the value unusable (RFC 9111 §4.2.1).
                    "max-age" => cc.max_age = merge(cc.max_age, seconds()),
                    "s-maxage" => cc.s_maxage = merge(cc.s_maxage, seconds()),
                    "stale-while-revalidate" => cc.stale_while_revalidate = seconds(),
                    "stale-if-error" => cc.stale_if_error = seconds(),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Conflicting lifetimes: the shorter wins.
fn merge(existing: Option<u64>, new: Option<u64>) -> Option<u64> {
    match (existing, new) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (None, n) => n,
        (e, None) => e.map(|_| 0),
    }
}

/// The token bext announces in `Surrogate-Capability` and honours in
/// targeted `Surrogate-Control` directives (`max-age=60;bext`).
pub const SURROGATE_TARGET: &str = "bext";
/// What bext announces to apps in `Surrogate-Capability` (Edge Architecture
/// Specification 1.0): it understands `Surrogate-Control` targeted at it.
pub const SURROGATE_CAPABILITY: &str = "bext=\"Surrogate/1.0\"";

/// `Surrogate-Control` (Edge Architecture 1.0): directives for surrogates
/// such as bext, which take precedence over `Cache-Control` and `Expires`.
/// Only directives without a target, or targeted at bext, count.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SurrogateControl {
    pub no_store: bool,
    pub max_age: Option<u64>,
}

impl SurrogateControl {
    /// `None` when there is no applicable directive.
    pub fn parse(headers: &HeaderMap) -> Option<Self> {
        let mut sc = SurrogateControl::default();
        let mut any = false;
        for value in headers.get_all("surrogate-control") {
            let Ok(value) = value.to_str() else { continue };
            for directive in value.split(',') {
                let (directive, target) = match directive.split_once(';') {
                    Some((d, t)) => (d.trim(), Some(t.trim())),
                    None => (directive.trim(), None),
                };
                if target.is_some_and(|t| !t.eq_ignore_ascii_case(SURROGATE_TARGET)) {
                    continue;
                }
                let lower = directive.to_ascii_lowercase();
                if lower == "no-store" {
                    sc.no_store = true;
                    any = true;
                } else if let Some(seconds) = lower.strip_prefix("max-age=") {
                    // Strict: `max-age = 60` is not a directive.
                    if let Some(seconds) = delta_seconds(seconds) {
                        sc.max_age = Some(seconds);
                        any = true;
                    }
                }
            }
        }
        any.then_some(sc)
    }
}

/// RFC 9111 §1.2.2: larger delta-seconds are this.
pub const MAX_DELTA_SECONDS: u64 = 2_147_483_648;

/// A delta-seconds value (RFC 9111 §1.2.2): one or more digits, capped at
/// [`MAX_DELTA_SECONDS`] however many there are; anything else (a sign, a
/// fraction, a unit, nothing) is not one.
pub fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        text.parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |s| s.min(MAX_DELTA_SECONDS)),
    )
}

/// How long a stored response lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Fresh (served as HIT) this long after it was generated.
    pub ttl: Duration,
    /// Then served as STALE while one background revalidation runs.
    pub swr: Duration,
    /// Then (or any time after `ttl`) served when the app fails.
    pub stale_if_error: Duration,
}

/// Next.js's draft-mode (and legacy preview-mode) cookie: its value is the
/// build's preview mode id.
pub const NEXT_DRAFT_COOKIE: &str = "__prerender_bypass";

/// The values of cookie `name` in a request's `Cookie` fields (HTTP/2
/// clients send one field per cookie).
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"'))
        })
}

/// The first `[[route_rules]]` entry for `path`.
pub fn rule_for<'a>(settings: &'a IsrConfig, path: &str) -> Option<&'a RouteRule> {
    settings
        .route_rules
        .iter()
        .find(|r| r.path.matcher.is_match(path))
}

/// Why a request does not use the cache.
pub fn request_bypass(
    method: &Method,
    fields: &crate::fields::Fields<'_>,
    rule: Option<&RouteRule>,
) -> Option<&'static str> {
    if method != Method::GET && method != Method::HEAD {
        return Some("method");
    }
    if rule.is_some_and(|r| !r.cache) {
        return Some("route-rule");
    }
    if fields.contains(&header::UPGRADE) {
        return Some("upgrade");
    }
    None
}

/// The decision on one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Store {
        lifetime: Lifetime,
        /// May be served to requests that carry `Authorization`.
        shared_with_auth: bool,
    },
    /// Not stored, and why (for `Cache-Status`).
    Pass(&'static str),
}

/// Decides whether a response to a GET may be stored, and for how long.
pub fn response_verdict(
    status: StatusCode,
    headers: &HeaderMap,
    request_has_authorization: bool,
    rule: Option<&RouteRule>,
    settings: &IsrConfig,
    now: SystemTime,
) -> Verdict {
    if !storable_status(status) {
        return Verdict::Pass("status");
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Verdict::Pass("set-cookie");
    }
    if headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == "*")
    {
        return Verdict::Pass("vary-star");
    }
    let cc = CacheControl::parse(headers);
    // Surrogate-Control speaks to bext directly and wins over Cache-Control.
    let surrogate = SurrogateControl::parse(headers);
    match &surrogate {
        Some(sc) if sc.no_store => return Verdict::Pass("surrogate-no-store"),
        Some(sc) if sc.max_age.is_some() => {}
        _ => {
            if cc.no_store {
                return Verdict::Pass("no-store");
            }
            if cc.private {
                return Verdict::Pass("private");
            }
            // no-cache: stored only if it can be revalidated cheaply (a
            // validator for a conditional request), and never used without.
            if cc.no_cache
                && !headers.contains_key(header::ETAG)
                && !headers.contains_key(header::LAST_MODIFIED)
            {
                return Verdict::Pass("no-cache");
            }
        }
    }
    let shared_with_auth = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
    if request_has_authorization && !shared_with_auth {
        return Verdict::Pass("authorization");
    }

    let secs = Duration::from_secs;
    let explicit = match surrogate.as_ref().and_then(|sc| sc.max_age) {
        Some(max_age) => Some(secs(max_age)),
        None => cc
            .s_maxage
            .or(cc.max_age)
            .map(secs)
            .or_else(|| expires_lifetime(headers, now)),
    };
    let (ttl, default_swr) = match (rule.and_then(|r| r.ttl), explicit) {
        (Some(ttl), _) => (ttl, Duration::ZERO),
        (None, Some(ttl)) => (ttl, Duration::ZERO),
        // Marked cacheable without a lifetime: the app's defaults.
        (None, None) if cc.public && heuristically_cacheable(status) => {
            (settings.default_ttl, settings.default_swr)
        }
        // no-cache with a validator: stored to be revalidated on every use.
        (None, None) if cc.no_cache && surrogate.is_none() => (Duration::ZERO, Duration::ZERO),
        (None, None) => return Verdict::Pass("no-lifetime"),
    };
    // must-revalidate forbids stale answers; s-maxage implies
    // proxy-revalidate, so only windows the response (or a route rule)
    // names explicitly apply to it, never the defaults.
    let implied_revalidate = cc.s_maxage.is_some();
    let always_revalidate = cc.no_cache && surrogate.is_none();
    let ttl = if always_revalidate {
        Duration::ZERO
    } else {
        ttl
    };
    let (swr, stale_if_error) = if cc.must_revalidate || always_revalidate {
        (Duration::ZERO, Duration::ZERO)
    } else {
        let default_sie = if implied_revalidate {
            Duration::ZERO
        } else {
            settings.stale_if_error
        };
        (
            rule.and_then(|r| r.swr)
                .or(cc.stale_while_revalidate.map(secs))
                .unwrap_or(default_swr),
            rule.and_then(|r| r.stale_if_error)
                .or(cc.stale_if_error.map(secs))
                .unwrap_or(default_sie),
        )
    };
    Verdict::Store {
        lifetime: Lifetime {
            ttl,
            swr,
            stale_if_error,
        },
        shared_with_auth,
    }
}

/// Statuses bext stores (given a lifetime): not partial content, not
/// not-modified, not server errors.
fn storable_status(status: StatusCode) -> bool {
    let code = status.as_u16();
    (200..500).contains(&code) && code != 206 && code != 304
}

/// RFC 9110 §15.1: statuses cacheable by default.
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// `Expires` minus `Date` (or now); an invalid `Expires` means "already
/// expired".
fn expires_lifetime(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = expires
        .to_str()
        .ok()
        .and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// The `Age` a response arrived with. Anything but one non-negative integer
/// (a list, two header lines, a fraction, a parameter) makes the response
/// count as stale: the age that matters cannot be known.
pub fn upstream_age(headers: &HeaderMap) -> Duration {
    let mut values = headers.get_all(header::AGE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if headers.contains_key(header::AGE) {
            UNKNOWN_AGE
        } else {
            Duration::ZERO
        };
    };
    match value.to_str().ok().map(str::trim).and_then(delta_seconds) {
        Some(seconds) => Duration::from_secs(seconds),
        None => UNKNOWN_AGE,
    }
}

/// The age assumed when `Age` is invalid: older than any lifetime.
const UNKNOWN_AGE: Duration = Duration::from_secs(MAX_DELTA_SECONDS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_in_every_cookie_field() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            "theme=dark; __prerender_bypass=abc".parse().expect("value"),
        );
        headers.append(
            header::COOKIE,
            "__prerender_bypass=\"def\"".parse().expect("value"),
        );
        headers.append(
            header::COOKIE,
            "x__prerender_bypass=no".parse().expect("value"),
        );
        let found: Vec<&str> = cookie_values(&headers, NEXT_DRAFT_COOKIE).collect();
        assert_eq!(found, ["abc", "def"]);
    }
    use http::HeaderValue;

    fn settings() -> IsrConfig {
        crate::config::Config::parse(std::path::Path::new("x.toml"), "")
            .expect("defaults")
            .isr
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn verdict(pairs: &[(&'static str, &'static str)]) -> Verdict {
        response_verdict(
            StatusCode::OK,
            &headers(pairs),
            false,
            None,
            &settings(),
            SystemTime::now(),
        )
    }

    /// Issue 11, fault 2: `max-age=18446744073709551615` (and larger) is
    /// 2^31 seconds, not a panic or a negative ttl.
    #[test]
    fn delta_seconds_are_capped_at_two_to_the_31() {
        for value in [
            "public, max-age=18446744073709551615",
            "public, max-age=99999999999999999999999999",
            "public, s-maxage=18446744073709551615",
        ] {
            let v = response_verdict(
                StatusCode::OK,
                &headers(&[("cache-control", value)]),
                false,
                None,
                &settings(),
                SystemTime::now(),
            );
            let Verdict::Store { lifetime, .. } = v else {
                panic!("{value}: not stored: {v:?}")
            };
            assert_eq!(
                lifetime.ttl,
                Duration::from_secs(MAX_DELTA_SECONDS),
                "{value}"
            );
        }
        let cc = CacheControl::parse(&headers(&[(
            "cache-control",
            "stale-while-revalidate=18446744073709551616, stale-if-error=-1, max-age=1.5",
        )]));
        assert_eq!(cc.stale_while_revalidate, Some(MAX_DELTA_SECONDS));
        assert_eq!(cc.stale_if_error, None);
        assert_eq!(cc.max_age, None);
        assert_eq!(
            upstream_age(&headers(&[("age", "184467440737095516150")])),
            Duration::from_secs(MAX_DELTA_SECONDS)
        );
        let sc = SurrogateControl::parse(&headers(&[(
            "surrogate-control",
            "max-age=18446744073709551616",
        )]));
        assert_eq!(sc.and_then(|s| s.max_age), Some(MAX_DELTA_SECONDS));
    }

    #[test]
    fn next_isr_pages_cache_with_no_configuration() {
        let v = verdict(&[(
            "cache-control",
            "s-maxage=5, stale-while-revalidate=31535995",
        )]);
        assert_eq!(
            v,
            Verdict::Store {
                lifetime: Lifetime {
                    ttl: Duration::from_secs(5),
                    swr: Duration::from_secs(31_535_995),
                    // s-maxage implies proxy-revalidate: no default window.
                    stale_if_error: Duration::ZERO,
                },
                shared_with_auth: true,
            }
        );
    }

    #[test]
    fn the_default_stale_if_error_window_applies_to_max_age() {
        let Verdict::Store { lifetime, .. } = verdict(&[("cache-control", "max-age=60")]) else {
            panic!("stored")
        };
        assert_eq!(lifetime.stale_if_error, settings().stale_if_error);
    }

    #[test]
    fn the_capability_names_the_target() {
        assert!(SURROGATE_CAPABILITY.starts_with(&format!("{SURROGATE_TARGET}=")));
    }

    #[test]
    fn surrogate_control_wins_over_cache_control() {
        let stored = verdict(&[
            ("cache-control", "no-store"),
            ("surrogate-control", "max-age=100;bext"),
        ]);
        assert!(
            matches!(stored, Verdict::Store { lifetime, .. } if lifetime.ttl == Duration::from_secs(100))
        );
        assert_eq!(
            verdict(&[
                ("cache-control", "max-age=100"),
                ("surrogate-control", "no-store")
            ]),
            Verdict::Pass("surrogate-no-store")
        );
        let other = verdict(&[
            ("cache-control", "max-age=5"),
            ("surrogate-control", "max-age=100;cdn"),
        ]);
        assert!(
            matches!(other, Verdict::Store { lifetime, .. } if lifetime.ttl == Duration::from_secs(5))
        );
        assert_eq!(
            SurrogateControl::parse(&headers(&[("surrogate-control", "max-age =100")])),
            None
        );
    }

    #[test]
    fn only_one_plain_integer_is_a_valid_age() {
        assert_eq!(
            upstream_age(&headers(&[("age", "30")])),
            Duration::from_secs(30)
        );
        assert_eq!(upstream_age(&headers(&[])), Duration::ZERO);
        for bad in ["abc", "-5", "7.0", "0, 0", "30;x=1"] {
            assert_eq!(
                upstream_age(&headers(&[("age", bad)])),
                UNKNOWN_AGE,
                "{bad}"
            );
        }
        assert_eq!(
            upstream_age(&headers(&[("age", "0"), ("age", "0")])),
            UNKNOWN_AGE
        );
    }

    #[test]
    fn private_no_store_cookies_and_vary_star_are_never_stored() {
        assert_eq!(
            verdict(&[(
                "cache-control",
                "private, no-cache, no-store, max-age=0, must-revalidate"
            )]),
            Verdict::Pass("no-store")
        );
        assert_eq!(
            verdict(&[("cache-control", "private, max-age=60")]),
            Verdict::Pass("private")
        );
        assert_eq!(
            verdict(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
            Verdict::Pass("set-cookie")
        );
        assert_eq!(
            verdict(&[("cache-control", "max-age=60"), ("vary", "Accept, *")]),
            Verdict::Pass("vary-star")
        );
        assert_eq!(verdict(&[]), Verdict::Pass("no-lifetime"));
    }

    #[test]
    fn public_without_a_lifetime_gets_the_defaults() {
        let Verdict::Store { lifetime, .. } = verdict(&[("cache-control", "public")]) else {
            panic!("stored")
        };
        assert_eq!(
            (lifetime.ttl, lifetime.swr),
            (settings().default_ttl, settings().default_swr)
        );
    }

    #[test]
    fn s_maxage_wins_over_max_age_and_must_revalidate_forbids_stale() {
        let Verdict::Store { lifetime, .. } = verdict(&[(
            "cache-control",
            "max-age=10, s-maxage=20, must-revalidate, stale-while-revalidate=9",
        )]) else {
            panic!("stored")
        };
        assert_eq!(
            lifetime,
            Lifetime {
                ttl: Duration::from_secs(20),
                swr: Duration::ZERO,
                stale_if_error: Duration::ZERO
            }
        );
    }

    #[test]
    fn authorization_needs_an_explicitly_shared_response() {
        let h = headers(&[("cache-control", "max-age=60")]);
        let v = response_verdict(
            StatusCode::OK,
            &h,
            true,
            None,
            &settings(),
            SystemTime::now(),
        );
        assert_eq!(v, Verdict::Pass("authorization"));
        let h = headers(&[("cache-control", "public, max-age=60")]);
        let v = response_verdict(
            StatusCode::OK,
            &h,
            true,
            None,
            &settings(),
            SystemTime::now(),
        );
        assert!(matches!(
            v,
            Verdict::Store {
                shared_with_auth: true,
                ..
            }
        ));
    }

    #[test]
    fn route_rules_come_first() {
        let config = crate::config::Config::parse(
            std::path::Path::new("x.toml"),
            "[[route_rules]]\npath = \"/blog/**\"\nttl_ms = 30000\nswr_ms = 1000\n",
        )
        .expect("config");
        let rule = &config.isr.route_rules[0];
        assert!(rule.path.matcher.is_match("/blog/2026/post"));
        assert!(!rule.path.matcher.is_match("/about"));
        let h = headers(&[("cache-control", "max-age=5")]);
        let Verdict::Store { lifetime, .. } = response_verdict(
            StatusCode::OK,
            &h,
            false,
            Some(rule),
            &config.isr,
            SystemTime::now(),
        ) else {
            panic!("stored")
        };
        assert_eq!(
            (lifetime.ttl, lifetime.swr),
            (Duration::from_secs(30), Duration::from_secs(1))
        );
    }

    #[test]
    fn expires_counts_from_date() {
        let h = headers(&[
            ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
            ("expires", "Tue, 01 Jan 2030 00:01:40 GMT"),
        ]);
        let Verdict::Store { lifetime, .. } = response_verdict(
            StatusCode::OK,
            &h,
            false,
            None,
            &settings(),
            SystemTime::now(),
        ) else {
            panic!("stored")
        };
        assert_eq!(lifetime.ttl, Duration::from_secs(100));
    }
}
