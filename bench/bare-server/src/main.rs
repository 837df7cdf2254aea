//! `bare-server ADDR BODY_BYTES`: answers every request with BODY_BYTES of
//! `x` and the headers a bext cache hit carries (the response head of a
//! hit, without any of bext's work). Prints the bound address.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".to_string());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let body = Bytes::from(vec![b'x'; size]);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let response = Response::builder()
                    .header("content-type", "text/plain; charset=utf-8")
                    .header("cache-control", "public, max-age=3600")
                    .header("content-length", body.len())
                    .header("age", "12")
                    .header("x-bext-cache", "HIT")
                    .header("cache-status", "bext; hit; ttl=3588")
                    .header("x-request-id", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
                    .body(Full::new(body.clone()))
                    .expect("valid response");
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
