//! What the pipeline publishes: one event per command (with its reply), plus loss notices.
use std::{borrow::Cow, fmt, str::FromStr, sync::Arc};

use respwatch_resp::{
    correlate::{Outcome, ReplyKind, Role},
    decode::Kind,
    error_text::{ErrorTemplate, is_redis_prefix},
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
    /// The first key after the [`KeyPolicy`]; values are never kept. Only made when a watcher
    /// may want the event (see `decode::Detail`): the stats do not need it.
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
    /// Built for watchers: it has its key text and goes to subscribers and the history.
    pub detailed: bool,
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

/// An error reply, as far as it may leave the node: Redis echoes its callers' bytes in error
/// texts, so only its own fixed messages are shown, without the echoed parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventError {
    /// `INFO errorstats` name: `ERR`, `WRONGTYPE`, `OOM`... ([`UNKNOWN_ERROR_PREFIX`] for one
    /// Redis does not use, unless keys are shown in full). Borrowed from Redis' own table.
    pub prefix: Cow<'static, str>,
    /// Which of Redis' fixed messages it is; anything else shows its prefix only.
    pub template: Option<ErrorTemplate>,
}

impl EventError {
    /// The text to show: the fixed message with `…` for what Redis filled in, or the prefix.
    pub fn message(&self) -> String {
        match self.template {
            Some(template) => template.to_string(),
            None => self.prefix.to_string(),
        }
    }
}

/// Errorstats name shown for a prefix Redis itself does not use: a script's `error_reply` can
/// make one up from a value.
pub const UNKNOWN_ERROR_PREFIX: &str = "unknown";

/// The prefix as it may be shown under a key policy: a made-up one only when keys are shown in
/// full (the operator then sees every key name anyway).
pub fn shown_prefix(prefix: Cow<'static, str>, keys: KeyPolicy) -> Cow<'static, str> {
    if keys == KeyPolicy::Full || is_redis_prefix(&prefix) {
        prefix
    } else {
        Cow::Borrowed(UNKNOWN_ERROR_PREFIX)
    }
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
    /// A 64-bit keyed hash (HMAC-SHA256 with the operator's secret), so hot keys can be told
    /// apart without naming them, and nobody without the secret can hash a dictionary of
    /// likely keys to find them.
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

/// Bytes a key-hash secret has at least: a short one could be guessed.
pub const MIN_KEY_SECRET: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KeySecretError {
    #[error(
        "--keys hash needs a secret (--key-hash-secret-file): the same one on every node, so \
         that hashes agree across nodes and restarts"
    )]
    Missing,
    #[error("the key-hash secret has {0} bytes; it needs at least {MIN_KEY_SECRET}")]
    TooShort(usize),
}

/// The key policy with what applying it takes: for `hash`, the operator's secret.
#[derive(Clone, Debug, Default)]
pub struct KeyPrivacy {
    policy: KeyPolicy,
    secret: Option<ring::hmac::Key>,
}

impl KeyPrivacy {
    /// `secret` is used by `hash` only (surrounding whitespace, such as a file's last newline,
    /// is not part of it).
    pub fn new(policy: KeyPolicy, secret: Option<&[u8]>) -> Result<Self, KeySecretError> {
        let secret = match (policy, secret.map(<[u8]>::trim_ascii)) {
            (KeyPolicy::Hash, None) => return Err(KeySecretError::Missing),
            (KeyPolicy::Hash, Some(s)) if s.len() < MIN_KEY_SECRET => {
                return Err(KeySecretError::TooShort(s.len()));
            }
            (KeyPolicy::Hash, Some(s)) => Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s)),
            _ => None,
        };
        Ok(Self { policy, secret })
    }

    pub fn policy(&self) -> KeyPolicy {
        self.policy
    }

    pub fn apply(&self, key: &[u8]) -> Option<String> {
        match self.policy {
            KeyPolicy::Off => None,
            KeyPolicy::Full => Some(lossy_string(key)),
            KeyPolicy::Truncate(n) if key.len() <= n => Some(lossy_string(key)),
            KeyPolicy::Truncate(n) => {
                let mut text = String::from_utf8_lossy(&key[..n]).into_owned();
                text.push('…');
                Some(text)
            }
            KeyPolicy::Hash => {
                let secret = self.secret.as_ref()?;
                let tag = ring::hmac::sign(secret, key);
                let mut first = [0u8; 8];
                first.copy_from_slice(&tag.as_ref()[..8]);
                Some(format!("#{:016x}", u64::from_be_bytes(first)))
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

    fn shown(policy: &str, key: &[u8]) -> Option<String> {
        let secret: &[u8] = b"a secret of the operator's";
        KeyPrivacy::new(policy.parse().unwrap(), Some(secret))
            .unwrap()
            .apply(key)
    }

    #[test]
    fn key_policies() {
        assert_eq!(shown("full", b"user:42"), Some("user:42".into()));
        assert_eq!(shown("truncate:4", b"user:42"), Some("user…".into()));
        assert_eq!(shown("truncate:40", b"user:42"), Some("user:42".into()));
        assert_eq!(shown("off", b"user:42"), None);
        // Kept as-is up to the limit; bytes that are not UTF-8 are shown, not dropped.
        assert_eq!(shown("truncate:7", b"user:42"), Some("user:42".into()));
        assert_eq!(shown("full", b"k\xff"), Some("k\u{fffd}".into()));
        for bad in ["", "truncate:", "truncate:0", "truncate:x", "FULL", "cut:3"] {
            assert!(bad.parse::<KeyPolicy>().is_err(), "{bad}");
        }
    }

    /// Hashes agree wherever the secret is the same (nodes, restarts), and without the secret
    /// nobody can hash a dictionary of likely keys to match them.
    #[test]
    fn key_hashes_are_keyed_by_the_operators_secret() {
        let hashed = shown("hash", b"user:42").unwrap();
        assert_eq!(hashed.len(), 17);
        assert!(!hashed.contains("user"));
        assert_eq!(Some(hashed.clone()), shown("hash", b"user:42"));
        assert_ne!(Some(hashed.clone()), shown("hash", b"user:43"));
        let from_file = KeyPrivacy::new(KeyPolicy::Hash, Some(b"a secret of the operator's\n"));
        assert_eq!(from_file.unwrap().apply(b"user:42"), Some(hashed.clone()));
        let other = KeyPrivacy::new(KeyPolicy::Hash, Some(b"another secret, as long"));
        assert_ne!(other.unwrap().apply(b"user:42"), Some(hashed));
        assert!(matches!(
            KeyPrivacy::new(KeyPolicy::Hash, None),
            Err(KeySecretError::Missing)
        ));
        assert!(matches!(
            KeyPrivacy::new(KeyPolicy::Hash, Some(b"short\n")),
            Err(KeySecretError::TooShort(5))
        ));
    }
}
