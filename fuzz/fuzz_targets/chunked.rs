//! A chunked body arriving in pieces of any size: the decoder must give the
//! same data whatever the split, and never panic.
#![no_main]

use bext::pool::h1::{ChunkedDecoder, Decoded};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fn decode_in_pieces(data: &[u8], piece: usize) -> (Vec<u8>, bool) {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => out.extend_from_slice(&d),
                Ok(Decoded::Incomplete) => break,
                Ok(Decoded::End) => return (out, true),
                Err(_) => return (out, false),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let whole = decode_in_pieces(body, body.len());
    let pieces = decode_in_pieces(body, usize::from(split % 7) + 1);
    if whole.1 && pieces.1 {
        assert_eq!(whole.0, pieces.0, "the split changed the data");
    }
});
