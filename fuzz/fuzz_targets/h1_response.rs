//! A worker's response, as bext's HTTP/1 client reads it: heads (interim
//! ones too) and then a chunked body, from bytes the app controls.
#![no_main]

use bext::pool::h1::{ChunkedDecoder, Decoded, parse_response};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = if selector & 1 == 0 {
        http::Method::GET
    } else {
        http::Method::HEAD
    };
    let mut buf = BytesMut::from(rest);
    // At most a few heads (1xx first), as the client would read them.
    for _ in 0..4 {
        match parse_response(&mut buf, &method) {
            Ok(Some(head)) if head.is_interim() => continue,
            Ok(Some(_)) => break,
            Ok(None) | Err(_) => return,
        }
    }
    let mut decoder = ChunkedDecoder::default();
    for _ in 0..1024 {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(_)) => {}
            Ok(Decoded::Incomplete) | Ok(Decoded::End) | Err(_) => return,
        }
    }
});
