//! respwatchd: the node daemon. One module per pipeline stage:
//! capture → streams → decode (+ correlate, in `respwatch-resp`) → enrich → aggregate →
//! serve, run by `pipeline`.
pub mod aggregate;
pub mod capture;
pub mod decode;
pub mod enrich;
pub mod event;
pub mod kube;
pub mod pipeline;
pub mod serve;
pub mod sockets;
pub mod streams;
#[cfg(test)]
mod test_support;
