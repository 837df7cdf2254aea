//! Per-app rate limiting: `rate_limit.rpm` requests per minute per client
//! (GCRA: the full minute's allowance may come as a burst, then it refills
//! steadily). Refusals are 429s with `Retry-After` and the `RateLimit-*`
//! headers of the IETF draft.
//!
//! A client is its IPv4 address, or its IPv6 address cut to a prefix
//! (`/64` by default: one subscriber's whole network, not one of its 2^64
//! addresses), IPv4-mapped IPv6 counting as the IPv4 address.
//!
//! Not `governor`: its keyed store grows with every address ever seen and
//! can only be swept, not capped, so a flood of source addresses would grow
//! it without bound. Here each client's state is one atomic theoretical
//! arrival time in a `moka` cache, bounded to [`MAX_CLIENTS`] (the least
//! recently and frequently seen go first) and forgetting a client idle for
//! a minute — by then it is back to its full allowance, so forgetting it
//! loses nothing.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};

/// Clients one app's limiter remembers at most.
pub const MAX_CLIENTS: u64 = 100_000;
/// The IPv6 prefix length that makes one client, when not configured.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// How long it takes any client to get its whole allowance back.
const PERIOD: Duration = Duration::from_secs(60);

/// One app's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    rpm: NonZeroU32,
    ipv6_prefix: u8,
    /// Nanoseconds between two requests at the steady rate.
    interval: u64,
    /// How far ahead of now a client's arrival time may run (the burst).
    tolerance: u64,
    /// Per client: its theoretical arrival time, in ns after `epoch`.
    clients: moka::sync::Cache<IpAddr, Arc<AtomicU64>>,
    epoch: Instant,
    /// Edge mode: the limit is kept in Redis for every instance at once
    /// (this one's own count stands in while Redis does not answer).
    shared: Option<Arc<crate::cache::l2::L2>>,
}

/// What a request may carry: the `RateLimit-*` headers, or the refusal.
#[derive(Debug)]
pub enum Decision {
    Allowed { remaining: u32 },
    Limited { retry_after: Duration },
}

impl RateLimiter {
    pub fn per_minute(rpm: NonZeroU32) -> Self {
        Self::new(rpm, DEFAULT_IPV6_PREFIX, MAX_CLIENTS)
    }

    /// `ipv6_prefix` is clamped to 1..=128.
    pub fn new(rpm: NonZeroU32, ipv6_prefix: u8, max_clients: u64) -> Self {
        let period = PERIOD.as_nanos() as u64;
        let interval = period / u64::from(rpm.get());
        RateLimiter {
            rpm,
            ipv6_prefix: ipv6_prefix.clamp(1, 128),
            interval,
            tolerance: interval * u64::from(rpm.get()),
            clients: moka::sync::Cache::builder()
                .max_capacity(max_clients)
                .time_to_idle(PERIOD)
                .build(),
            epoch: Instant::now(),
            shared: None,
        }
    }

    /// Keeps the limit in Redis, fleet-wide (edge mode).
    pub fn shared(mut self, l2: Option<Arc<crate::cache::l2::L2>>) -> Self {
        self.shared = l2;
        self
    }

    /// Whether the limit is kept in Redis.
    /// The Redis link the limit is shared through, if any.
    pub fn l2(&self) -> Option<&Arc<crate::cache::l2::L2>> {
        self.shared.as_ref()
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// [`Self::check`], fleet-wide in edge mode: Redis decides for every
    /// instance at once; while it does not answer, this instance alone.
    pub async fn decide(&self, client: IpAddr) -> Decision {
        if let Some(l2) = &self.shared {
            let key = self.client_key(client).to_string();
            if let Some((allowed, value)) = l2
                .gcra(&key, self.interval / 1000, self.tolerance / 1000)
                .await
            {
                return if allowed {
                    Decision::Allowed {
                        remaining: u32::try_from(value).unwrap_or(u32::MAX),
                    }
                } else {
                    Decision::Limited {
                        retry_after: Duration::from_micros(value),
                    }
                };
            }
        }
        self.check(client)
    }

    pub fn rpm(&self) -> NonZeroU32 {
        self.rpm
    }

    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    /// The key a client address counts under.
    pub fn client_key(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix));
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }

    pub fn check(&self, client: IpAddr) -> Decision {
        let now = self
            .epoch
            .elapsed()
            .as_nanos()
            .min(u128::from(u64::MAX / 2)) as u64;
        let state = self
            .clients
            .get_with(self.client_key(client), || Arc::new(AtomicU64::new(0)));
        let mut tat = state.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            let ahead = next - now;
            if ahead > self.tolerance {
                return Decision::Limited {
                    retry_after: Duration::from_nanos(ahead - self.tolerance),
                };
            }
            match state.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    let remaining = (self.tolerance - ahead) / self.interval;
                    return Decision::Allowed {
                        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Clients remembered now (approximately).
    pub fn clients(&self) -> u64 {
        self.clients.run_pending_tasks();
        self.clients.entry_count()
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
        assert!(
            matches!(limiter.check("::ffff:10.0.0.2".parse().expect("ip")), Decision::Allowed { remaining } if remaining == 1),
            "an IPv4-mapped address is the IPv4 client"
        );
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

#[cfg(test)]
mod bounds {
    use super::*;

    /// Issue 11, fault 5: one IPv6 subscriber rotating through its /64 is
    /// one client.
    #[test]
    fn ipv6_clients_are_keyed_by_prefix() {
        let limiter = RateLimiter::per_minute(NonZeroU32::new(2).expect("2"));
        for host in 1..=2 {
            let ip: IpAddr = format!("2001:db8:1:2::{host}").parse().expect("ip");
            assert!(matches!(limiter.check(ip), Decision::Allowed { .. }));
        }
        let rotated: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        assert!(matches!(limiter.check(rotated), Decision::Limited { .. }));
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(matches!(limiter.check(other), Decision::Allowed { .. }));
        let narrow = RateLimiter::new(NonZeroU32::new(2).expect("2"), 128, 10);
        assert_ne!(
            narrow.client_key("2001:db8::1".parse().expect("ip")),
            narrow.client_key("2001:db8::2".parse().expect("ip"))
        );
    }

    /// Issue 11, fault 5: a flood of source addresses cannot grow the table
    /// past its bound.
    #[test]
    fn the_client_table_is_bounded() {
        let limiter = RateLimiter::new(NonZeroU32::new(10).expect("10"), 64, 1000);
        for i in 0..20_000u32 {
            let ip = IpAddr::V4(i.into());
            let _ = limiter.check(ip);
        }
        let remembered = limiter.clients();
        assert!(remembered <= 1000, "{remembered} clients remembered");
    }
}
