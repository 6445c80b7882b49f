//! Redis 7 command semantics needed to report stats exactly like `INFO commandstats` and
//! `INFO errorstats`: command naming (`parent|sub`), first-key positions, and the
//! classification of error replies into rejected calls, failed calls and errors Redis counts
//! against no command at all.
//!
//! The rules mirror Redis 7.0's `processCommand`/`rejectCommand` (rejections: no `calls`,
//! `rejected_calls` += 1, and only when the command exists), `call` + `incrCommandStatsOnError`
//! (any error reply emitted while the command runs: `calls` and `failed_calls` += 1) and
//! `afterErrorReply` (the errorstats prefix). They were checked against redis-server 7.0.15.
//!
//! Commands are identified through a table of every command Redis and Valkey define, generated
//! from their own command metadata (see `commands.tsv`): arity, first key and flags by id.

use std::{borrow::Cow, cell::RefCell, collections::HashSet};

mod name_hash;
mod table;

pub use table::{CommandId, CommandInfo, flag};

/// Where a command's first key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpec {
    /// No key (PING, INFO, MULTI...).
    None,
    /// Argument index (0 is the command name).
    Arg(usize),
    /// `numkeys` at this index, first key right after it when `numkeys > 0` (EVAL, FCALL,
    /// ZUNION, LMPOP...).
    Numkeys(usize),
    /// First argument after the `STREAMS` keyword (XREAD, XREADGROUP).
    AfterStreams,
}

/// What respwatch knows about a command: Redis' arity (negative: at least `-arity`
/// arguments including the name) and its first key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// Redis arity.
    pub arity: i32,
    /// First key position.
    pub key: KeySpec,
}

/// Arity and key position of a command by its stats name (`get`, `config|get`).
/// `None` for commands the table does not have (modules', a typo).
pub fn command_spec(name: &str) -> Option<CommandSpec> {
    CommandId::lookup(name.as_bytes()).map(|id| id.info().spec())
}

/// A command as read off the wire: its stats name and, when the table has it, its id and spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    /// See [`identify`].
    pub name: Cow<'static, str>,
    /// The table's entry for `name`.
    pub id: Option<CommandId>,
    /// As [`command_spec`] gives it for `name`, found by the same lookup.
    pub spec: Option<CommandSpec>,
}

/// Longest command name/subcommand kept (longer names are truncated).
pub const MAX_NAME_LEN: usize = 64;

/// Writes `s`, cut to [`MAX_NAME_LEN`] bytes and lower-cased, to the start of `dst` (at least
/// that long); returns its length.
fn lower_into(dst: &mut [u8], s: &[u8]) -> usize {
    let len = s.len().min(MAX_NAME_LEN);
    for (to, from) in dst.iter_mut().zip(&s[..len]) {
        *to = from.to_ascii_lowercase();
    }
    len
}

/// The name Redis uses in `INFO commandstats` for a command with arguments `args` (kept
/// prefixes; `args[0]` is the command) and `argc` arguments in total: lower case, and
/// `parent|sub` for container commands given a subcommand. A container without subcommand is
/// reported as the container itself (Redis rejects it for arity against that row).
///
/// Names the command table has come back borrowed from it, with their id and spec from the same
/// lookup: this runs for every command.
pub fn identify(args: &[&[u8]], argc: u64) -> Identified {
    let Some(first) = args.first() else {
        return Identified {
            name: Cow::Borrowed(""),
            id: None,
            spec: None,
        };
    };
    // `parent|sub`, on the stack.
    let mut buf = [0u8; 2 * MAX_NAME_LEN + 1];
    let mut len = lower_into(&mut buf, first);
    let mut id = CommandId::lookup(&buf[..len]);
    if argc >= 2
        && let Some(sub) = args.get(1)
        && id.is_some_and(|id| id.info().has(flag::CONTAINER))
    {
        buf[len] = b'|';
        len += 1;
        len += lower_into(&mut buf[len..], sub);
        id = CommandId::lookup(&buf[..len]);
    }
    if let Some(id) = id {
        let info = id.info();
        return Identified {
            name: Cow::Borrowed(info.name),
            id: Some(id),
            spec: Some(info.spec()),
        };
    }
    let name = &buf[..len];
    Identified {
        name: match std::str::from_utf8(name) {
            Ok(text) => unlisted_name(text),
            Err(_) => unlisted_name(&String::from_utf8_lossy(name)),
        },
        id: None,
        spec: None,
    }
}

/// Names not in the command table kept per thread, each copied once.
const MAX_UNLISTED_NAMES: usize = 1024;

thread_local! {
    static UNLISTED_NAMES: RefCell<HashSet<&'static str>> = RefCell::new(HashSet::new());
}

/// A name the command table does not have (a newer server's command, a module's, a typo):
/// copied once and borrowed from then on, so traffic that repeats it allocates nothing. Past
/// [`MAX_UNLISTED_NAMES`] different ones (bounded memory, whatever clients send), each use is a
/// copy of its own.
fn unlisted_name(text: &str) -> Cow<'static, str> {
    UNLISTED_NAMES
        .try_with(|names| {
            let mut names = names.borrow_mut();
            if let Some(known) = names.get(text) {
                return Some(Cow::Borrowed(*known));
            }
            (names.len() < MAX_UNLISTED_NAMES).then(|| {
                let kept: &'static str = Box::leak(text.to_owned().into_boxed_str());
                names.insert(kept);
                Cow::Borrowed(kept)
            })
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Cow::Owned(text.to_owned()))
}

/// Where the first key of a command with `spec` is among its kept argument prefixes, when it
/// lies within them.
pub fn first_key_index(spec: CommandSpec, args: &[&[u8]]) -> Option<usize> {
    let idx = match spec.key {
        KeySpec::None => return None,
        KeySpec::Arg(i) => i,
        KeySpec::Numkeys(i) => {
            let numkeys = std::str::from_utf8(args.get(i)?)
                .ok()?
                .parse::<u64>()
                .ok()?;
            if numkeys == 0 {
                return None;
            }
            i + 1
        }
        KeySpec::AfterStreams => {
            let pos = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"streams"))?;
            pos + 1
        }
    };
    (idx < args.len()).then_some(idx)
}

/// Whether `argc` violates Redis' arity check for a command with `arity`.
pub fn arity_violated(arity: i32, argc: u64) -> bool {
    let need = u64::from(arity.unsigned_abs());
    if arity < 0 { argc < need } else { argc != need }
}

/// The `INFO errorstats` name of an error reply, as Redis' `afterErrorReply` derives it: the
/// first word when a space occurs within the first 32 bytes of `-<text>`, `ERR` otherwise.
/// `text` excludes the leading `-`.
///
/// Prefixes Redis itself uses come back borrowed (this runs for every error reply); only
/// made-up ones (a script's `error_reply`) are copied.
pub fn error_prefix(text: &[u8]) -> Cow<'static, str> {
    let window = &text[..text.len().min(31)];
    match window.iter().position(|&b| b == b' ') {
        Some(0) | None => Cow::Borrowed("ERR"),
        Some(p) => {
            let prefix = String::from_utf8_lossy(&text[..p]);
            match crate::error_text::redis_prefix(&prefix) {
                Some(known) => Cow::Borrowed(known),
                None => Cow::Owned(prefix.into_owned()),
            }
        }
    }
}

/// How Redis counts a command that got an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Counted in errorstats only: Redis found no command (unknown command or subcommand,
    /// protocol error), so no commandstats row changes.
    NotCounted,
    /// Refused before running: `rejected_calls` += 1, `calls` unchanged.
    Rejected,
    /// Ran and replied an error: `calls` += 1 and `failed_calls` += 1.
    Failed,
}

/// Errorstats prefixes that `processCommand` uses to refuse a command before running it.
const REJECTION_PREFIXES: [&str; 14] = [
    "NOAUTH",
    "NOPERM",
    "OOM",
    "READONLY",
    "MISCONF",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "NOREPLICAS",
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CROSSSLOT",
    "CLUSTERDOWN",
];

/// Classify error reply `text` (without `-`) to command `name` sent with `argc` arguments.
pub fn classify_error(name: &str, argc: u64, text: &[u8]) -> ErrorClass {
    let starts =
        |p: &str| text.len() >= p.len() && text[..p.len()].eq_ignore_ascii_case(p.as_bytes());
    if starts("ERR unknown command")
        || starts("ERR unknown subcommand")
        || starts("ERR Protocol error")
    {
        return ErrorClass::NotCounted;
    }
    if starts("ERR wrong number of arguments") {
        // Redis' own arity check rejects; commands that check their arguments themselves
        // (MSET with an odd count...) fail instead. Unknown arity: assume Redis' check.
        return match command_spec(name) {
            Some(s) if !arity_violated(s.arity, argc) => ErrorClass::Failed,
            _ => ErrorClass::Rejected,
        };
    }
    if starts("EXECABORT Transaction discarded because of:") {
        // EXEC itself refused (execCommandAbort wraps the rejection).
        return ErrorClass::Rejected;
    }
    if starts("ERR Can't execute")
        || starts("ERR Command not allowed inside a transaction")
        || (starts("ERR") && contains(text, b"command not allowed. If the enable-"))
    {
        return ErrorClass::Rejected;
    }
    let prefix = error_prefix(text);
    if REJECTION_PREFIXES.contains(&&*prefix) {
        return ErrorClass::Rejected;
    }
    ErrorClass::Failed
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_name(args: &[&[u8]], argc: u64) -> Cow<'static, str> {
        identify(args, argc).name
    }

    #[test]
    fn identify_finds_the_spec_command_spec_gives() {
        for args in [
            &[&b"GET"[..], b"k"][..],
            &[b"CLIENT", b"help"],
            &[b"CLIENT"],
            &[b"CONFIG", b"GET", b"x"],
            &[b"JSON.SET", b"k"],
        ] {
            let found = identify(args, args.len() as u64);
            assert_eq!(found.spec, command_spec(&found.name), "{:?}", found.name);
            let id = CommandId::lookup(found.name.as_bytes());
            assert_eq!(found.id, id, "{:?}", found.name);
            assert_eq!(found.spec, id.map(|id| id.info().spec()));
        }
    }

    #[test]
    fn identifies_newer_and_valkey_commands() {
        // Redis 7.4's hash field expiry, Valkey 8's CLIENT CAPA, a sentinel's own container.
        for (args, name) in [
            (&[&b"HEXPIRE"[..], b"h", b"10"][..], "hexpire"),
            (&[b"client", b"CAPA", b"redirect"], "client|capa"),
            (&[b"SENTINEL", b"masters"], "sentinel|masters"),
        ] {
            let found = identify(args, args.len() as u64);
            assert_eq!(found.name, name);
            assert!(found.id.is_some(), "{name}");
        }
        assert_eq!(identify(&[b"JSON.SET", b"k"], 2).id, None);
    }

    #[test]
    fn names_containers_and_plain_commands() {
        assert_eq!(stats_name(&[b"GET", b"k"], 2), "get");
        assert_eq!(
            stats_name(&[b"CLIENT", b"SetName", b"x"], 3),
            "client|setname"
        );
        assert_eq!(
            stats_name(&[b"config", b"GET", b"maxmemory"], 3),
            "config|get"
        );
        assert_eq!(stats_name(&[b"CONFIG"], 1), "config");
        assert_eq!(stats_name(&[b"DEBUG", b"sleep", b"0"], 3), "debug");
        assert_eq!(stats_name(&[b"XINFO", b"STREAM", b"s"], 3), "xinfo|stream");
    }

    #[test]
    fn names_the_table_does_not_know() {
        // Module commands and unknown subcommands keep their own (lower-cased) names.
        assert_eq!(stats_name(&[b"JSON.SET", b"k"], 2), "json.set");
        assert_eq!(stats_name(&[b"CLIENT", b"Bogus"], 2), "client|bogus");
        // Cut to MAX_NAME_LEN per part; bytes that are not UTF-8 become U+FFFD.
        let long = [b'A'; MAX_NAME_LEN + 10];
        assert_eq!(
            stats_name(&[b"CLIENT", &long], 2),
            format!("client|{}", "a".repeat(MAX_NAME_LEN))
        );
        assert_eq!(stats_name(&[b"G\xffT"], 1), "g\u{fffd}t");
        assert_eq!(stats_name(&[], 0), "");
    }

    #[test]
    fn first_keys() {
        let first_key = |name, args: &[&[u8]]| {
            let spec = command_spec(name)?;
            first_key_index(spec, args).map(|index| args[index].to_vec())
        };
        assert_eq!(first_key("get", &[b"GET", b"k1"]), Some(b"k1".to_vec()));
        assert_eq!(first_key("ping", &[b"PING"]), None);
        assert_eq!(
            first_key("eval", &[b"EVAL", b"return 1", b"1", b"key"]),
            Some(b"key".to_vec())
        );
        assert_eq!(first_key("eval", &[b"EVAL", b"return 1", b"0"]), None);
        assert_eq!(
            first_key("object|encoding", &[b"OBJECT", b"ENCODING", b"k"]),
            Some(b"k".to_vec())
        );
        assert_eq!(
            first_key("memory|usage", &[b"MEMORY", b"USAGE", b"k"]),
            Some(b"k".to_vec())
        );
        assert_eq!(
            first_key("xread", &[b"XREAD", b"STREAMS", b"s1", b"0"]),
            Some(b"s1".to_vec())
        );
        assert_eq!(
            first_key("bitop", &[b"BITOP", b"AND", b"dest", b"a"]),
            Some(b"dest".to_vec())
        );
        assert_eq!(
            first_key("blpop", &[b"BLPOP", b"q", b"0"]),
            Some(b"q".to_vec())
        );
        assert_eq!(
            first_key("lmpop", &[b"LMPOP", b"2", b"a", b"b"]),
            Some(b"a".to_vec())
        );
        assert_eq!(first_key("unknowncmd", &[b"X", b"y"]), None);
    }

    #[test]
    fn errorstats_prefix_follows_redis() {
        assert_eq!(
            error_prefix(b"WRONGTYPE Operation against a key holding the wrong kind of value"),
            "WRONGTYPE"
        );
        assert_eq!(error_prefix(b"ERR syntax error"), "ERR");
        assert_eq!(error_prefix(b"MY_ERR_CODE custom msg"), "MY_ERR_CODE");
        // No space in the first 32 bytes of "-<text>": Redis falls back to ERR.
        assert_eq!(
            error_prefix(b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ x"),
            "ERR"
        );
        assert_eq!(error_prefix(b"NOSPACE"), "ERR");
        assert_eq!(
            error_prefix(b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCD x"),
            "ABCDEFGHIJKLMNOPQRSTUVWXYZABCD"
        );
    }

    #[test]
    fn classification_matches_redis_7() {
        use ErrorClass::*;
        assert_eq!(
            classify_error(
                "foo",
                1,
                b"ERR unknown command 'FOO', with args beginning with: "
            ),
            NotCounted
        );
        assert_eq!(
            classify_error(
                "config|foo",
                2,
                b"ERR unknown subcommand 'FOO'. Try CONFIG HELP."
            ),
            NotCounted
        );
        assert_eq!(
            classify_error("set", 2, b"ERR wrong number of arguments for 'set' command"),
            Rejected
        );
        assert_eq!(
            classify_error(
                "config",
                1,
                b"ERR wrong number of arguments for 'config' command"
            ),
            Rejected
        );
        // MSET checks pairs itself: a failed call, not a rejection (verified on 7.0.15).
        assert_eq!(
            classify_error(
                "mset",
                4,
                b"ERR wrong number of arguments for 'mset' command"
            ),
            Failed
        );
        assert_eq!(
            classify_error(
                "mset",
                2,
                b"ERR wrong number of arguments for 'mset' command"
            ),
            Rejected
        );
        assert_eq!(
            classify_error(
                "set",
                3,
                b"OOM command not allowed when used memory > 'maxmemory'."
            ),
            Rejected
        );
        assert_eq!(
            classify_error("get", 2, b"NOAUTH Authentication required."),
            Rejected
        );
        assert_eq!(
            classify_error("get", 2, b"MOVED 3999 127.0.0.1:6381"),
            Rejected
        );
        assert_eq!(
            classify_error(
                "lpush",
                3,
                b"WRONGTYPE Operation against a key holding the wrong kind of value"
            ),
            Failed
        );
        assert_eq!(
            classify_error("incr", 2, b"ERR value is not an integer or out of range"),
            Failed
        );
        assert_eq!(
            classify_error("restore", 4, b"BUSYKEY Target key name already exists."),
            Failed
        );
        assert_eq!(
            classify_error(
                "exec",
                1,
                b"EXECABORT Transaction discarded because of previous errors."
            ),
            Failed
        );
        assert_eq!(
            classify_error(
                "exec",
                1,
                b"EXECABORT Transaction discarded because of: NOAUTH Authentication required."
            ),
            Rejected
        );
        assert_eq!(classify_error("get", 2, b"ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"), Rejected);
        assert_eq!(
            classify_error("multi", 1, b"ERR MULTI calls can not be nested"),
            Failed
        );
    }

    #[test]
    fn arity() {
        assert!(arity_violated(2, 1));
        assert!(arity_violated(2, 3));
        assert!(!arity_violated(2, 2));
        assert!(arity_violated(-3, 2));
        assert!(!arity_violated(-3, 5));
    }
}
