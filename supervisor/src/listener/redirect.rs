//! The plain-HTTP listener beside an HTTPS one: every request is sent to
//! the same host, path and query over `https://` (308, which keeps the
//! method and body); ACME HTTP-01 challenges of bext's own orders are
//! answered here. A challenge token bext did not ask for is redirected
//! only for the apps' own domains (an app may renew a certificate of its
//! own that way); for any other name it gets 404, so no app can pass a
//! CA's validation for a name it does not have (the validator would follow
//! the redirect to whichever app answers unknown names).

use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};

use super::tls::Certificates;
use super::{Handler, Peer};
use crate::body::{self, Body};

/// Redirects to the HTTPS listener on `https_port`.
#[derive(Debug)]
pub struct ToHttps {
    /// Left out of the `Location` when it is 443.
    https_port: u16,
    /// The apps' domains and the pending challenges (multi-app mode).
    certificates: Option<Arc<Certificates>>,
}

/// Where ACME validators ask for HTTP-01 key authorizations.
const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

impl ToHttps {
    pub fn new(https_port: u16, certificates: Option<Arc<Certificates>>) -> Self {
        ToHttps {
            https_port,
            certificates,
        }
    }

    /// The key authorization for `req`, when it asks for a pending
    /// HTTP-01 challenge's token.
    fn challenge<B>(&self, req: &Request<B>) -> Option<String> {
        let token = req.uri().path().strip_prefix(CHALLENGE_PATH)?;
        if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
            return None;
        }
        self.certificates.as_ref()?.challenges().http01(token)
    }

    /// Whether `req` asks for an HTTP-01 token under a name no app has.
    fn unclaimed_challenge<B>(&self, req: &Request<B>) -> bool {
        let Some(certificates) = &self.certificates else {
            return false;
        };
        if !req.uri().path().starts_with(CHALLENGE_PATH) {
            return false;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host())
            .map(crate::router::normalize)
            .unwrap_or_default();
        !certificates.claims(&host)
    }

    /// `https://host[:port]/path?query` for `req`, or `None` when its host
    /// is unusable.
    fn location<B>(&self, req: &Request<B>) -> Option<HeaderValue> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host())?;
        let host = crate::router::normalize(host);
        if host.is_empty() || host.contains(['/', '\\', '@', '?', '#']) {
            return None;
        }
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        // (`OPTIONS *` and other non-path targets go to `/`.)
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|t| t.starts_with('/'))
            .unwrap_or("/");
        let location = if self.https_port == 443 {
            format!("https://{host}{target}")
        } else {
            format!("https://{host}:{}{target}", self.https_port)
        };
        HeaderValue::from_str(&location).ok()
    }
}

impl Handler for ToHttps {
    async fn handle(self: Arc<Self>, req: Request<Body>, _peer: Peer) -> Response<Body> {
        if let Some(key_authorization) = self.challenge(&req) {
            let mut response = Response::new(body::full(key_authorization));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return response;
        }
        if self.unclaimed_challenge(&req) {
            let mut response = Response::new(body::full("no such challenge\n"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            return response;
        }
        match self.location(&req) {
            Some(location) => {
                let mut response = Response::new(body::empty());
                *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
                response.headers_mut().insert(header::LOCATION, location);
                response
            }
            None => {
                let mut response = Response::new(body::full("a Host is required\n"));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                response
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(port: u16, host: &str, target: &str) -> Option<String> {
        let req = Request::get(target)
            .header(header::HOST, host)
            .body(())
            .expect("request");
        ToHttps::new(port, None)
            .location(&req)
            .map(|v| v.to_str().expect("ascii").to_string())
    }

    #[test]
    fn the_same_host_path_and_query_over_https() {
        assert_eq!(
            location(443, "Example.COM:80", "/a/b?c=d&e").as_deref(),
            Some("https://example.com/a/b?c=d&e")
        );
        assert_eq!(
            location(8443, "example.com", "/").as_deref(),
            Some("https://example.com:8443/")
        );
        assert_eq!(
            location(443, "[::1]:80", "/x").as_deref(),
            Some("https://[::1]/x")
        );
    }

    #[test]
    fn only_a_pending_token_is_answered() {
        let certificates = Arc::new(
            Certificates::load(vec![crate::listener::tls::CertSource {
                app: "a".into(),
                domains: vec!["a.test".into()],
                origin: crate::listener::tls::Origin::Acme,
                default: false,
            }])
            .expect("loads"),
        );
        let challenges = Arc::clone(certificates.challenges());
        challenges.set_http01("tok3n", Some("tok3n.thumb".to_string()));
        let to_https = ToHttps::new(443, Some(Arc::clone(&certificates)));
        let get = |method: http::Method, target: &str| {
            let req = Request::builder()
                .method(method)
                .uri(target)
                .header(header::HOST, "a.test")
                .body(())
                .expect("request");
            to_https.challenge(&req)
        };
        assert_eq!(
            get(http::Method::GET, "/.well-known/acme-challenge/tok3n").as_deref(),
            Some("tok3n.thumb")
        );
        assert_eq!(
            get(http::Method::GET, "/.well-known/acme-challenge/other"),
            None
        );
        assert_eq!(
            get(http::Method::POST, "/.well-known/acme-challenge/tok3n"),
            None
        );
        challenges.set_http01("tok3n", None);
        assert_eq!(
            get(http::Method::GET, "/.well-known/acme-challenge/tok3n"),
            None
        );
    }

    #[test]
    fn an_unknown_token_is_redirected_only_for_the_apps_domains() {
        use crate::listener::tls::{CertSource, Origin};
        let source = |app: &str, domain: &str| CertSource {
            app: app.into(),
            domains: vec![domain.into()],
            origin: Origin::Acme,
            default: false,
        };
        let certificates = Arc::new(
            Certificates::load(vec![source("a", "a.test"), source("w", "*.w.test")])
                .expect("loads"),
        );
        let to_https = ToHttps::new(443, Some(certificates));
        let unclaimed = |host: &str, target: &str| {
            let req = Request::get(target)
                .header(header::HOST, host)
                .body(())
                .expect("request");
            to_https.unclaimed_challenge(&req)
        };
        let path = "/.well-known/acme-challenge/t0ken";
        assert!(!unclaimed("a.test", path));
        assert!(!unclaimed("A.test:80", path));
        assert!(!unclaimed("x.w.test", path));
        assert!(unclaimed("w.test", path));
        assert!(unclaimed("other.test", path));
        assert!(unclaimed("", path));
        // Other paths of unknown names are redirected as always.
        assert!(!unclaimed("other.test", "/"));
        // Single-app mode (no certificates): the one app has every name.
        let single = ToHttps::new(443, None);
        let req = Request::get(path)
            .header(header::HOST, "other.test")
            .body(())
            .expect("request");
        assert!(!single.unclaimed_challenge(&req));
    }

    #[test]
    fn a_host_that_would_redirect_elsewhere_is_refused() {
        assert_eq!(location(443, "evil.test/x", "/"), None);
        assert_eq!(location(443, "a@evil.test", "/"), None);
        assert_eq!(location(443, "", "/"), None);
    }
}
