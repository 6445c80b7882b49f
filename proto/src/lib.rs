//! The `respwatch.v1` gRPC API (`respwatch/v1/respwatch.proto`), generated with tonic for the
//! daemon (server) and `redisctl` (client).
#![allow(
    clippy::unwrap_used,
    clippy::large_enum_variant,
    reason = "generated code"
)]

pub mod v1 {
    tonic::include_proto!("respwatch.v1");

    /// The encoded file descriptor set of `respwatch.v1` and its imports, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/respwatch_descriptor.bin"));
}

pub use prost_types::Timestamp;

/// A [`Timestamp`] from Unix nanoseconds.
pub fn timestamp(unix_ns: u64) -> Timestamp {
    Timestamp {
        seconds: (unix_ns / 1_000_000_000) as i64,
        nanos: (unix_ns % 1_000_000_000) as i32,
    }
}

/// Unix nanoseconds of a [`Timestamp`] (0 for times before 1970).
pub fn unix_ns(time: &Timestamp) -> u64 {
    (time.seconds.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(time.nanos.max(0) as u64)
}

impl v1::Role {
    /// `client`, `server`, or `` for unspecified.
    pub fn short_name(self) -> &'static str {
        match self {
            v1::Role::Client => "client",
            v1::Role::Server => "server",
            v1::Role::Unspecified => "",
        }
    }
}

impl v1::LossSource {
    /// `ring_buffer`, `decoder_desync`, `subscriber_queue`.
    pub fn short_name(self) -> &'static str {
        match self {
            v1::LossSource::RingBuffer => "ring_buffer",
            v1::LossSource::DecoderDesync => "decoder_desync",
            v1::LossSource::SubscriberQueue => "subscriber_queue",
            v1::LossSource::Unspecified => "unspecified",
        }
    }
}
