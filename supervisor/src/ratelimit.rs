//! Per-app rate limiting: `rate_limit.rpm` requests per minute per client
//! IP (a GCRA limiter from `governor`: the full minute's allowance may come
//! as a burst, then it refills steadily). Refusals are 429s with
//! `Retry-After` and the `RateLimit-*` headers of the IETF draft.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter as Gcra};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};

type Keyed = Gcra<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// One app's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    rpm: NonZeroU32,
    limiter: Keyed,
}

/// What a request may carry: the `RateLimit-*` headers, or the refusal.
#[derive(Debug)]
pub enum Decision {
    Allowed { remaining: u32 },
    Limited { retry_after: Duration },
}

impl RateLimiter {
    pub fn per_minute(rpm: NonZeroU32) -> Self {
        let limiter =
            Gcra::keyed(Quota::per_minute(rpm)).with_middleware::<StateInformationMiddleware>();
        RateLimiter { rpm, limiter }
    }

    pub fn rpm(&self) -> NonZeroU32 {
        self.rpm
    }

    pub fn check(&self, client: IpAddr) -> Decision {
        match self.limiter.check_key(&client) {
            Ok(state) => Decision::Allowed {
                remaining: state.remaining_burst_capacity(),
            },
            Err(not_until) => Decision::Limited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            },
        }
    }

    /// Forgets clients that are back to a full allowance (call now and
    /// then, so the table does not grow with every address ever seen).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Headers on an allowed response.
    pub fn annotate(&self, headers: &mut HeaderMap, remaining: u32) {
        headers.insert("ratelimit-limit", HeaderValue::from(self.rpm.get()));
        headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
        headers.insert(
            "ratelimit-reset",
            HeaderValue::from(self.seconds_to_full(remaining)),
        );
    }

    /// Seconds until a client with `remaining` requests left is back to
    /// the full allowance (GCRA refills one request every 60/rpm s).
    fn seconds_to_full(&self, remaining: u32) -> u64 {
        let rpm = u64::from(self.rpm.get());
        let used = rpm.saturating_sub(u64::from(remaining));
        (used * 60).div_ceil(rpm)
    }

    /// The 429.
    pub fn refusal(&self, retry_after: Duration) -> Response<Body> {
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let seconds = seconds.max(1);
        let mut response = Response::new(body::full("429 too many requests\n"));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        headers.insert("ratelimit-limit", HeaderValue::from(self.rpm.get()));
        headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
        headers.insert("ratelimit-reset", HeaderValue::from(seconds));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_its_own_allowance() {
        let limiter = RateLimiter::per_minute(NonZeroU32::new(3).expect("3"));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        for expected in [2, 1, 0] {
            assert!(
                matches!(limiter.check(a), Decision::Allowed { remaining } if remaining == expected)
            );
        }
        let Decision::Limited { retry_after } = limiter.check(a) else {
            panic!("limited")
        };
        assert!(
            retry_after > Duration::ZERO && retry_after <= Duration::from_secs(20),
            "{retry_after:?}"
        );
        assert!(
            matches!(limiter.check(b), Decision::Allowed { .. }),
            "another client is not affected"
        );
        assert_eq!(limiter.seconds_to_full(3), 0);
        assert_eq!(
            limiter.seconds_to_full(2),
            20,
            "one used: one refill of 20 s"
        );
        assert_eq!(limiter.seconds_to_full(0), 60);
        let refusal = limiter.refusal(retry_after);
        assert_eq!(refusal.status(), 429);
        assert!(
            refusal.headers()[header::RETRY_AFTER]
                .to_str()
                .expect("ascii")
                .parse::<u64>()
                .expect("secs")
                >= 1
        );
    }
}
