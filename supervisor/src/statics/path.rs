//! Turning a request path into path segments that are safe to open.
//!
//! The raw path is split on `/` *before* percent-decoding, so an encoded
//! slash can never create a segment boundary; then every segment is decoded
//! and checked. The kernel (openat2 with RESOLVE_BENEATH) enforces the rest,
//! including symlinks.

use percent_encoding::percent_decode;

/// Why a path is refused outright (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A `..` segment, plain or encoded.
    ParentSegment,
    /// `%2F` or `%5C` inside a segment.
    EncodedSeparator,
    /// A NUL byte, plain or encoded.
    Nul,
}

/// A decoded request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    pub segments: Vec<Vec<u8>>,
    /// The path ends in `/` (a directory request).
    pub trailing_slash: bool,
    /// Some segment starts with a dot (other than `.well-known`): never
    /// served from disk.
    pub hidden: bool,
}

/// Decodes `raw` (the path part of the request target).
pub fn decode(raw: &str) -> Result<RequestPath, Refusal> {
    let mut segments = Vec::new();
    let mut hidden = false;
    for part in raw.split('/') {
        if part.is_empty() || part == "." {
            continue;
        }
        let decoded: Vec<u8> = percent_decode(part.as_bytes()).collect();
        if decoded.contains(&0) {
            return Err(Refusal::Nul);
        }
        if decoded.contains(&b'/') || decoded.contains(&b'\\') {
            return Err(Refusal::EncodedSeparator);
        }
        if decoded == b".." {
            return Err(Refusal::ParentSegment);
        }
        if decoded == b"." {
            continue;
        }
        if decoded.first() == Some(&b'.') && decoded != b".well-known" {
            hidden = true;
        }
        segments.push(decoded);
    }
    Ok(RequestPath {
        segments,
        trailing_slash: raw.ends_with('/'),
        hidden,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(raw: &str) -> Vec<String> {
        decode(raw)
            .expect("accepted")
            .segments
            .into_iter()
            .map(|s| String::from_utf8(s).expect("utf8"))
            .collect()
    }

    #[test]
    fn plain_and_encoded_paths_decode() {
        assert_eq!(segs("/a/b%20c/./d.txt"), ["a", "b c", "d.txt"]);
        assert_eq!(segs("//a//"), ["a"]);
        assert!(decode("/a/").expect("ok").trailing_slash);
    }

    #[test]
    fn traversal_in_every_spelling_is_refused() {
        for raw in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/.%2e/x",
            "/%2e./x",
        ] {
            assert_eq!(decode(raw), Err(Refusal::ParentSegment), "{raw}");
        }
        for raw in ["/a%2f..%2fb", "/a%2F..", "/..%5c..%5cwin.ini"] {
            assert_eq!(decode(raw), Err(Refusal::EncodedSeparator), "{raw}");
        }
        assert_eq!(decode("/a%00.txt"), Err(Refusal::Nul));
    }

    #[test]
    fn dotfiles_are_hidden_but_well_known_is_not() {
        assert!(decode("/.env").expect("ok").hidden);
        assert!(decode("/a/.git/config").expect("ok").hidden);
        assert!(!decode("/.well-known/security.txt").expect("ok").hidden);
    }
}
