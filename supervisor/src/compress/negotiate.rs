//! `Accept-Encoding` (RFC 9110 §12.5.3): q-values, `*`, and `identity`.
//!
//! Written here rather than taken from a crate: the candidates on crates.io
//! are unmaintained or days old, and the grammar is one list of tokens with
//! a weight; what matters is the rules around it, which are tested below.

use http::{HeaderMap, HeaderValue, header};

/// The codings bext produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    pub const ALL: [Coding; 3] = [Coding::Zstd, Coding::Br, Coding::Gzip];

    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }

    /// Its place in [`Coding::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn from_token(token: &str) -> Option<Coding> {
        if token.eq_ignore_ascii_case("zstd") {
            Some(Coding::Zstd)
        } else if token.eq_ignore_ascii_case("br") {
            Some(Coding::Br)
        } else if token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip") {
            Some(Coding::Gzip)
        } else {
            None
        }
    }
}

/// What a client accepts: a weight in thousandths per coding bext makes,
/// and for identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepted {
    q: [u16; 3],
    /// `None`: not named (identity is then acceptable, with no weight to
    /// compare).
    identity: Option<u16>,
    /// The request said `Cache-Control: no-transform` (RFC 9111 §5.2.1.6).
    no_transform: bool,
    /// Its `If-None-Match` names a weak tag: the client may hold a copy
    /// bext compressed.
    weak_if_none_match: bool,
}

impl Accepted {
    /// Reads every `Accept-Encoding` line. No header: identity only (the
    /// RFC allows any coding then, but clients that send none are tools
    /// that would not decode it).
    pub fn parse(headers: &HeaderMap) -> Accepted {
        Self::parse_fields(&crate::fields::Fields::of(headers))
    }

    /// [`Accepted::parse`] of fields already looked over.
    pub fn parse_fields(fields: &crate::fields::Fields<'_>) -> Accepted {
        let no_transform = super::says_no_transform(fields.get_all(&header::CACHE_CONTROL));
        let mut lines = fields.get_all(&header::ACCEPT_ENCODING);
        let accepted = match (lines.next(), lines.next()) {
            (None, _) => Accepted::default(),
            // One line, as browsers send it: the same few strings over and
            // over, so the last one parsed on this thread is remembered.
            (Some(line), None) => LAST.with(|last| {
                let mut last = last.borrow_mut();
                match &*last {
                    Some((seen, accepted)) if seen == line => *accepted,
                    _ => {
                        let accepted = Self::parse_lines(fields.map());
                        *last = Some((line.clone(), accepted));
                        accepted
                    }
                }
            }),
            _ => Self::parse_lines(fields.map()),
        };
        let weak_if_none_match = fields
            .get(&header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes().windows(2).any(|w| w == b"W/"));
        Accepted {
            no_transform,
            weak_if_none_match,
            ..accepted
        }
    }

    fn parse_lines(headers: &HeaderMap) -> Accepted {
        let mut named: [Option<u16>; 3] = [None; 3];
        let mut identity = None;
        let mut star = None;
        for line in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(line) = line.to_str() else { continue };
            for item in line.split(',') {
                let mut parts = item.split(';');
                let token = parts.next().unwrap_or("").trim();
                if token.is_empty() {
                    continue;
                }
                let mut q = Some(1000);
                for param in parts {
                    let Some((name, value)) = param.split_once('=') else {
                        continue;
                    };
                    if name.trim().eq_ignore_ascii_case("q") {
                        q = qvalue(value.trim());
                    }
                }
                // A malformed weight drops the item, not the header.
                let Some(q) = q else { continue };
                let slot = if token == "*" {
                    &mut star
                } else if token.eq_ignore_ascii_case("identity") {
                    &mut identity
                } else if let Some(coding) = Coding::from_token(token) {
                    &mut named[coding.index()]
                } else {
                    continue;
                };
                slot.get_or_insert(q);
            }
        }
        Accepted {
            q: named.map(|q| q.or(star).unwrap_or(0)),
            identity: identity.or(star),
            no_transform: false,
            weak_if_none_match: false,
        }
    }

    /// The coding to send: the heaviest of those `offered` (ties: the
    /// first offered), unless none weighs more than zero or the client
    /// named identity with a greater weight.
    pub fn best_among(&self, offered: &[Coding]) -> Option<Coding> {
        let mut best: Option<(Coding, u16)> = None;
        for &coding in offered {
            let q = self.q[coding.index()];
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((coding, q));
            }
        }
        let (coding, q) = best?;
        match self.identity {
            Some(identity) if identity > q => None,
            _ => Some(coding),
        }
    }

    /// The client asked that nothing transform the answer.
    pub fn no_transform(&self) -> bool {
        self.no_transform
    }

    /// The request's `If-None-Match` names a weak tag.
    pub fn weak_if_none_match(&self) -> bool {
        self.weak_if_none_match
    }

    /// `identity;q=0`, or `*;q=0` without naming identity.
    pub fn identity_refused(&self) -> bool {
        self.identity == Some(0)
    }
}

thread_local! {
    /// The last single `Accept-Encoding` line parsed on this thread.
    static LAST: std::cell::RefCell<Option<(HeaderValue, Accepted)>> =
        const { std::cell::RefCell::new(None) };
}

/// RFC 9110 §12.4.2: `0[.ddd]` or `1[.000]`, in thousandths.
fn qvalue(text: &str) -> Option<u16> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}
