//! Which of the request fields the answer path asks about a request
//! carries, found in one pass over its names, as nginx fills its
//! `headers_in` slots while it reads a head. Asking about an absent one
//! (most of them, for most requests) is then a bit test instead of a
//! hashed lookup of about a hundred instructions; a present one is looked
//! up as before.
//!
//! A question about a name this does not track is always asked of the map.

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::proxy::headers::X_REQUEST_ID;

/// A request's fields, and which of the tracked ones it has.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    map: &'a HeaderMap,
    present: u16,
    /// The first `Host` value (every request asks for it, twice).
    host: Option<&'a HeaderValue>,
}

/// [`bit`] of `Host`.
const HOST: u16 = 1;

/// The bit of a tracked name (0: not tracked).
fn bit(name: &HeaderName) -> u16 {
    match *name {
        header::HOST => HOST,
        header::AUTHORIZATION => 1 << 1,
        header::IF_NONE_MATCH => 1 << 2,
        header::IF_MODIFIED_SINCE => 1 << 3,
        header::UPGRADE => 1 << 4,
        header::CACHE_CONTROL => 1 << 5,
        header::ACCEPT_ENCODING => 1 << 6,
        header::COOKIE => 1 << 7,
        // (Not a standard name: compared as bytes, after the length.)
        _ if name.as_str() == X_REQUEST_ID.as_str() => 1 << 8,
        _ => 0,
    }
}

impl<'a> Fields<'a> {
    /// One pass over `map`'s names.
    pub fn of(map: &'a HeaderMap) -> Fields<'a> {
        let (mut present, mut host) = (0, None);
        for (name, value) in map {
            let bit = bit(name);
            if bit == HOST && host.is_none() {
                host = Some(value);
            }
            present |= bit;
        }
        Fields { map, present, host }
    }

    /// The first `Host` value: `get(&HOST)` without the lookup.
    pub fn host(&self) -> Option<&'a HeaderValue> {
        self.host
    }

    /// Might the request have `name`? False only for a tracked name it
    /// does not have.
    fn may_have(&self, name: &HeaderName) -> bool {
        let bit = bit(name);
        bit == 0 || self.present & bit != 0
    }

    pub fn get(&self, name: &HeaderName) -> Option<&'a HeaderValue> {
        if self.may_have(name) {
            self.map.get(name)
        } else {
            None
        }
    }

    pub fn contains(&self, name: &HeaderName) -> bool {
        self.may_have(name) && self.map.contains_key(name)
    }

    /// Every value of `name`, in order.
    pub fn get_all(&self, name: &HeaderName) -> impl Iterator<Item = &'a HeaderValue> + use<'a> {
        self.may_have(name)
            .then(|| self.map.get_all(name).iter())
            .into_iter()
            .flatten()
    }

    /// The whole map, for what is not tracked.
    pub fn map(&self) -> &'a HeaderMap {
        self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every answer is the map's own, for tracked names present and
    /// absent, repeated, and for names not tracked.
    #[test]
    fn every_answer_is_the_maps() {
        let tracked = [
            header::HOST,
            header::AUTHORIZATION,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::UPGRADE,
            header::CACHE_CONTROL,
            header::ACCEPT_ENCODING,
            header::COOKIE,
            X_REQUEST_ID,
        ];
        let bits: Vec<u16> = tracked.iter().map(bit).collect();
        assert!(bits.iter().all(|b| b.count_ones() == 1), "{bits:?}");
        let all = bits.iter().fold(0, |a, b| a | b);
        assert_eq!(all.count_ones() as usize, tracked.len(), "one bit each");
        let untracked = [
            header::ACCEPT,
            header::USER_AGENT,
            header::RANGE,
            HeaderName::from_static("x-request-idx"),
            HeaderName::from_static("rsc"),
        ];
        assert!(untracked.iter().all(|n| bit(n) == 0));

        let asked: Vec<HeaderName> = tracked.iter().chain(&untracked).cloned().collect();
        // Each name alone, each pair, and all of them (with repeats).
        let mut maps = vec![HeaderMap::new()];
        for (i, a) in asked.iter().enumerate() {
            for b in &asked[i..] {
                let mut map = HeaderMap::new();
                map.append(a.clone(), HeaderValue::from_static("1"));
                map.append(b.clone(), HeaderValue::from_static("2"));
                maps.push(map);
            }
        }
        let mut every = HeaderMap::new();
        for name in &asked {
            every.append(name.clone(), HeaderValue::from_static("1"));
            every.append(name.clone(), HeaderValue::from_static("2"));
        }
        maps.push(every);
        for map in &maps {
            let fields = Fields::of(map);
            assert_eq!(fields.host(), map.get(header::HOST));
            for name in &asked {
                assert_eq!(fields.get(name), map.get(name), "{name} in {map:?}");
                assert_eq!(fields.contains(name), map.contains_key(name), "{name}");
                assert!(
                    fields.get_all(name).eq(map.get_all(name).iter()),
                    "{name} in {map:?}"
                );
            }
        }
    }
}
