//! What the pipeline publishes: one event per command (with its reply), plus loss notices.
use std::{borrow::Cow, fmt, str::FromStr, sync::Arc};

use respwatch_resp::{
    correlate::{Outcome, ReplyKind, Role},
    decode::Kind,
};

use crate::streams::ConnMeta;

/// A command and its reply, attributed to a process (and, on Kubernetes, a pod).
#[derive(Clone, Debug)]
pub struct CommandEvent {
    /// Wall-clock time the exchange completed (reply written or read), Unix nanoseconds.
    pub time_unix_ns: u64,
    pub role: Role,
    pub conn: Arc<ConnMeta>,
    /// Redis' stats name: `get`, `client|setname`; `unknown` for commands Redis does not know.
    /// Borrowed from the command table when it knows the name.
    pub command: Cow<'static, str>,
    /// The first key after the [`KeyPolicy`]; values are never kept.
    pub key: Option<String>,
    pub argc: u32,
    pub request_bytes: u64,
    pub reply_bytes: u64,
    pub reply: &'static str,
    pub error: Option<EventError>,
    pub outcome: Outcome,
    /// Whether Redis counts it in `INFO commandstats`.
    pub counted: bool,
    /// Server role: request fully read → reply written. Client role: request written → reply read.
    pub latency_ns: u64,
    pub pipeline_depth: u32,
    pub in_transaction: bool,
}

impl CommandEvent {
    /// Bytes the traced process read for this command, and wrote.
    pub fn bytes_in_out(&self) -> (u64, u64) {
        match self.role {
            Role::Server => (self.request_bytes, self.reply_bytes),
            Role::Client => (self.reply_bytes, self.request_bytes),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventError {
    /// `INFO errorstats` name: `ERR`, `WRONGTYPE`, `OOM`...
    pub prefix: String,
    /// The error text, bounded.
    pub message: String,
}

/// Stats name for commands Redis has no commandstats row for (unknown command/subcommand).
pub const UNKNOWN_COMMAND: &str = "unknown";

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Server => "server",
        Role::Client => "client",
    }
}

pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Rejected => "rejected",
        Outcome::Failed => "failed",
        Outcome::Unknown => "no_reply",
        Outcome::Discarded => "discarded",
    }
}

pub fn reply_name(reply: ReplyKind) -> &'static str {
    match reply {
        ReplyKind::Frame(kind) | ReplyKind::TransactionElement(kind) => kind_name(kind),
        ReplyKind::NoReply => "none",
        ReplyKind::Confirmations(_) => "confirmations",
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::SimpleString => "simple",
        Kind::Error | Kind::BulkError => "error",
        Kind::Integer => "integer",
        Kind::BulkString | Kind::VerbatimString => "bulk",
        Kind::Array => "array",
        Kind::Null => "null",
        Kind::Boolean => "boolean",
        Kind::Double => "double",
        Kind::BigNumber => "bignumber",
        Kind::Map => "map",
        Kind::Set => "set",
        Kind::Push => "push",
        Kind::Inline => "inline",
        Kind::Snapshot => "snapshot",
    }
}

/// Where data went missing, for loss notices and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LossSource {
    /// The kernel ring buffer was full.
    RingBuffer,
    /// A copy window cut a message header, or bytes were lost: the decoder resynchronised.
    DecoderDesync,
    /// A subscriber read too slowly and its queue overflowed.
    SubscriberQueue,
}

impl LossSource {
    pub fn name(self) -> &'static str {
        match self {
            LossSource::RingBuffer => "ring_buffer",
            LossSource::DecoderDesync => "decoder_desync",
            LossSource::SubscriberQueue => "subscriber_queue",
        }
    }
}

/// How much of a key name is kept. Values are never kept, whatever the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPolicy {
    Full,
    /// The first N bytes.
    Truncate(usize),
    /// A stable 64-bit hash (FNV-1a), so hot keys can be told apart without naming them.
    Hash,
    Off,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy::Truncate(64)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid key policy {0:?}: expected full, truncate:N, hash or off")]
pub struct KeyPolicyError(String);

impl FromStr for KeyPolicy {
    type Err = KeyPolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "full" => Ok(KeyPolicy::Full),
            "hash" => Ok(KeyPolicy::Hash),
            "off" => Ok(KeyPolicy::Off),
            "truncate" => Ok(KeyPolicy::default()),
            other => other
                .strip_prefix("truncate:")
                .and_then(|n| n.parse().ok())
                .filter(|n: &usize| *n > 0)
                .map(KeyPolicy::Truncate)
                .ok_or_else(|| KeyPolicyError(other.to_owned())),
        }
    }
}

impl fmt::Display for KeyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPolicy::Full => write!(f, "full"),
            KeyPolicy::Truncate(n) => write!(f, "truncate:{n}"),
            KeyPolicy::Hash => write!(f, "hash"),
            KeyPolicy::Off => write!(f, "off"),
        }
    }
}

impl KeyPolicy {
    pub fn apply(self, key: &[u8]) -> Option<String> {
        match self {
            KeyPolicy::Off => None,
            KeyPolicy::Full => Some(lossy_string(key)),
            KeyPolicy::Truncate(n) if key.len() <= n => Some(lossy_string(key)),
            KeyPolicy::Truncate(n) => {
                let mut text = String::from_utf8_lossy(&key[..n]).into_owned();
                text.push('…');
                Some(text)
            }
            KeyPolicy::Hash => {
                let hash = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
                    (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
                });
                Some(format!("#{hash:016x}"))
            }
        }
    }
}

/// `from_utf8_lossy` walks the bytes in chunks even when they are valid; keys almost always
/// are, and this runs for every command.
fn lossy_string(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_policies() {
        assert_eq!(
            "full".parse::<KeyPolicy>().unwrap().apply(b"user:42"),
            Some("user:42".into())
        );
        assert_eq!(
            "truncate:4".parse::<KeyPolicy>().unwrap().apply(b"user:42"),
            Some("user…".into())
        );
        assert_eq!(
            "truncate:40"
                .parse::<KeyPolicy>()
                .unwrap()
                .apply(b"user:42"),
            Some("user:42".into())
        );
        assert_eq!("off".parse::<KeyPolicy>().unwrap().apply(b"user:42"), None);
        // Kept as-is up to the limit; bytes that are not UTF-8 are shown, not dropped.
        assert_eq!(
            KeyPolicy::Truncate(7).apply(b"user:42"),
            Some("user:42".into())
        );
        assert_eq!(KeyPolicy::Full.apply(b"k\xff"), Some("k\u{fffd}".into()));
        let hashed = KeyPolicy::Hash.apply(b"user:42").unwrap();
        assert_eq!(hashed.len(), 17);
        assert_ne!(hashed, KeyPolicy::Hash.apply(b"user:43").unwrap());
        assert!(!hashed.contains("user"));
        for bad in ["", "truncate:", "truncate:0", "truncate:x", "FULL", "cut:3"] {
            assert!(bad.parse::<KeyPolicy>().is_err(), "{bad}");
        }
    }
}
