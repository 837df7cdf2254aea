//! `bext dev`: the cache in preview. Nothing is stored or served from it;
//! each answer says what production would have done with it, in a
//! `Cache-Status` with `detail=preview`: `would-store` with the lifetimes it
//! would get, `would-not-store=REASON`, or `would-bypass=REASON` for a
//! request the cache never looks at.

use std::fmt::Write as _;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue, Request, StatusCode, header};

use super::policy::{self, Verdict};
use super::respond::{CACHE_STATUS, X_BEXT_CACHE};
use crate::config::{IsrConfig, RouteRule};

/// What is known of the request before it goes to the app.
#[derive(Debug)]
pub struct Preview<'a> {
    settings: &'a IsrConfig,
    rule: Option<&'a RouteRule>,
    bypass: Option<&'static str>,
    authorization: bool,
}

impl<'a> Preview<'a> {
    pub fn of<B>(settings: &'a IsrConfig, req: &Request<B>) -> Self {
        let rule = policy::rule_for(settings, req.uri().path());
        let fields = crate::fields::Fields::of(req.headers());
        Preview {
            settings,
            rule,
            bypass: policy::request_bypass(req.method(), &fields, rule),
            authorization: fields.contains(&header::AUTHORIZATION),
        }
    }

    /// Marks the app's answer with the decision.
    pub fn mark(&self, status: StatusCode, headers: &mut HeaderMap) {
        let mut text = String::from("bext; fwd=bypass; detail=preview");
        match self.bypass {
            Some(reason) => {
                let _ = write!(text, "; would-bypass={reason}");
            }
            None => match policy::response_verdict(
                status,
                headers,
                self.authorization,
                self.rule,
                self.settings,
                SystemTime::now(),
            ) {
                Verdict::Store { lifetime, .. } => {
                    let _ = write!(
                        text,
                        "; would-store; ttl={}; swr={}",
                        lifetime.ttl.as_secs(),
                        lifetime.swr.as_secs()
                    );
                    if !lifetime.stale_if_error.is_zero() {
                        let _ = write!(
                            text,
                            "; stale-if-error={}",
                            lifetime.stale_if_error.as_secs()
                        );
                    }
                }
                Verdict::Pass(reason) => {
                    let _ = write!(text, "; would-not-store={reason}");
                }
            },
        }
        headers.insert(X_BEXT_CACHE, HeaderValue::from_static("PREVIEW"));
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.insert(CACHE_STATUS, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> IsrConfig {
        crate::config::Config::parse(std::path::Path::new("bext.config.toml"), "")
            .expect("the defaults")
            .isr
    }

    fn decide(req_headers: &[(&str, &str)], method: &str, resp: &[(&str, &str)]) -> String {
        let settings = settings();
        let mut req = Request::builder().method(method).uri("/page");
        for (k, v) in req_headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).expect("request");
        let mut headers = HeaderMap::new();
        for (k, v) in resp {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        Preview::of(&settings, &req).mark(StatusCode::OK, &mut headers);
        assert_eq!(headers[X_BEXT_CACHE], "PREVIEW");
        headers[CACHE_STATUS].to_str().expect("ascii").to_string()
    }

    #[test]
    fn an_isr_page_would_be_stored_with_its_lifetimes() {
        assert_eq!(
            decide(
                &[],
                "GET",
                &[("cache-control", "s-maxage=60, stale-while-revalidate=3600")]
            ),
            "bext; fwd=bypass; detail=preview; would-store; ttl=60; swr=3600"
        );
    }

    #[test]
    fn what_production_would_not_store_says_why() {
        let cacheable = ("cache-control", "s-maxage=60");
        assert!(
            decide(&[], "GET", &[cacheable, ("set-cookie", "a=b")])
                .ends_with("; would-not-store=set-cookie")
        );
        assert!(
            decide(&[], "GET", &[("cache-control", "private, max-age=60")])
                .ends_with("; would-not-store=private")
        );
        assert!(decide(&[], "GET", &[]).ends_with("; would-not-store=no-lifetime"));
        assert!(decide(&[], "POST", &[cacheable]).ends_with("; would-bypass=method"));
        assert!(
            decide(
                &[("authorization", "Bearer x")],
                "GET",
                &[("cache-control", "max-age=60")]
            )
            .ends_with("; would-not-store=authorization")
        );
    }
}
