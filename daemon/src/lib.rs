//! respwatchd: the node daemon. One module per pipeline stage:
//! capture → streams → (decode + correlate, in `respwatch-resp`) → enrich → aggregate → serve.
pub mod capture;
pub mod enrich;
pub mod pipeline;
pub mod sockets;
pub mod streams;
