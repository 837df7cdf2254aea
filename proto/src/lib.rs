//! The gRPC contract between `bextctl` and the bext supervisor: the only
//! crate both sides link. Generated from `proto/bext.proto` at build time.

#![allow(
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    reason = "generated code"
)]

pub mod control {
    pub mod v1 {
        tonic::include_proto!("bext.control.v1");
    }
}

#[cfg(test)]
mod tests {
    use super::control::v1::{StatusReply, WorkerStatus};
    use prost::Message;

    #[test]
    fn messages_round_trip() {
        let reply = StatusReply {
            apps: vec![super::control::v1::AppStatus {
                name: "blog".into(),
                framework: "hono".into(),
                workers: vec![WorkerStatus {
                    index: 0,
                    pid: 42,
                    state: "ready".into(),
                    inflight: 1,
                    rss_bytes: 0,
                }],
                restarts: 3,
                ..Default::default()
            }],
        };
        let bytes = reply.encode_to_vec();
        assert_eq!(
            StatusReply::decode(bytes.as_slice()).expect("decode"),
            reply
        );
    }
}
