//! Pure, streaming RESP2/RESP3 decoding and request/reply correlation for respwatch.
//!
//! The crate is deliberately free of I/O, clocks, globals and threads: the capture layer hands it
//! bytes (plus the exact number of bytes it could not copy) and timestamps, and it hands back
//! bounded summaries. That keeps every protocol decision host-testable and fuzzable.
//!
//! - [`decode`]: one [`decode::Decoder`] per connection direction turns a byte stream into
//!   bounded [`decode::Frame`] summaries, skipping bulk bodies by length and resynchronising
//!   explicitly (never silently) after loss.
//! - [`command`]: Redis 7 command naming (`client|setname`), the command table (ids, arity,
//!   first keys, flags) generated from Redis' and Valkey's command metadata, and the
//!   rejected/failed classification of error replies used by `INFO commandstats`.
//! - [`correlate`]: one [`correlate::Correlator`] per connection pairs requests with replies
//!   through pipelining, MULTI/EXEC, pub/sub, RESP3 pushes, `CLIENT REPLY`, MONITOR and loss.
//! - [`error_text`]: which error texts are Redis' own fixed messages (and may be shown, without
//!   what Redis echoed of its caller), and which prefixes Redis itself uses.

pub mod command;
pub mod correlate;
pub mod decode;
// Generated (scripts/error-templates.py): kept one template per line, as written.
#[rustfmt::skip]
mod error_templates;
pub mod error_text;
