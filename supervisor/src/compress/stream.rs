//! A body compressed as it streams.
//!
//! async-compression's encoders read what the app has sent so far and flush
//! the compressor whenever the app pauses (its stream answers "pending"
//! after some input): a burst of chunks is compressed as one, and an SSE
//! event, or the first part of a streamed page, leaves at once.

use async_compression::Level;
use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use futures_util::{StreamExt, TryStreamExt};
use http_body::Frame;
use http_body_util::{BodyDataStream, StreamBody};
use tokio::io::AsyncRead;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::io::{ReaderStream, StreamReader};

use super::{Coding, Levels, STREAM_WINDOW_LOG};
use crate::body::{self, Body, BoxError};

/// Largest frame the compressed body yields.
const OUT_CHUNK: usize = 16 * 1024;

/// `body`, compressed with `coding` at `levels` (trailers are dropped: a
/// compressed HTTP/1 response to a client carries none).
/// `slot` ([`super::stream_slot`]) is held until the body ends.
pub fn stream(body: Body, coding: Coding, levels: &Levels, slot: OwnedSemaphorePermit) -> Body {
    body::boxed(body::WithGuard::new(encoded(body, coding, levels), slot))
}

fn encoded(body: Body, coding: Coding, levels: &Levels) -> Body {
    let reader = StreamReader::new(BodyDataStream::new(body).map_err(std::io::Error::other));
    match coding {
        Coding::Zstd => frames(ZstdEncoder::with_quality_and_params(
            reader,
            Level::Precise(levels.zstd),
            &[async_compression::zstd::CParameter::window_log(
                STREAM_WINDOW_LOG,
            )],
        )),
        Coding::Br => frames(BrotliEncoder::with_params(
            reader,
            async_compression::brotli::EncoderParams::default()
                .quality(Level::Precise(levels.br as i32))
                .window_size(STREAM_WINDOW_LOG as i32),
        )),
        Coding::Gzip => frames(GzipEncoder::with_quality(
            reader,
            Level::Precise(levels.gzip as i32),
        )),
    }
}

fn frames<R: AsyncRead + Send + Sync + 'static>(reader: R) -> Body {
    let frames = ReaderStream::with_capacity(reader, OUT_CHUNK)
        .map(|chunk| chunk.map(Frame::data).map_err(|e| Box::new(e) as BoxError));
    body::boxed(StreamBody::new(frames))
}
