//! Redis 7 command semantics needed to report stats exactly like `INFO commandstats` and
//! `INFO errorstats`: command naming (`parent|sub`), first-key positions, and the
//! classification of error replies into rejected calls, failed calls and errors Redis counts
//! against no command at all.
//!
//! The rules mirror Redis 7.0's `processCommand`/`rejectCommand` (rejections: no `calls`,
//! `rejected_calls` += 1, and only when the command exists), `call` + `incrCommandStatsOnError`
//! (any error reply emitted while the command runs: `calls` and `failed_calls` += 1) and
//! `afterErrorReply` (the errorstats prefix). They were checked against redis-server 7.0.15.

use std::{borrow::Cow, cell::RefCell, collections::HashSet};

/// Container commands of Redis 7.0: their stats rows are `parent|subcommand`.
pub const CONTAINERS: [&str; 15] = [
    "acl", "client", "cluster", "command", "config", "function", "latency", "memory", "module",
    "object", "pubsub", "script", "slowlog", "xgroup", "xinfo",
];

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

const fn spec(arity: i32, key: KeySpec) -> CommandSpec {
    CommandSpec { arity, key }
}

/// One `match` arm per name, each yielding its own `'static` literal with its spec, so a name
/// read off the wire can be replaced by the table's copy instead of being allocated per command.
macro_rules! command_table {
    ($name:expr; $( $($literal:literal)|+ => $spec:expr ),* $(,)?) => {
        match $name {
            $( $( $literal => Some(($literal, $spec)), )+ )*
            _ => None,
        }
    };
}

/// Commands with a known spec, by stats name: the table's copy of the name and the spec.
fn known_command(name: &str) -> Option<(&'static str, CommandSpec)> {
    use KeySpec::{AfterStreams, Arg, None as N, Numkeys};
    command_table! { name;
        // strings
        "get" | "getdel" | "strlen" | "incr" | "decr" | "type" | "ttl" | "pttl" | "persist"
        | "dump" | "expiretime" | "pexpiretime" | "llen" | "hlen" | "hkeys" | "hvals"
        | "hgetall" | "smembers" | "scard" | "zcard" | "xlen" => spec(2, Arg(1)),
        "set" | "lpos" | "copy" | "expire" | "pexpire" | "expireat" | "pexpireat" | "lcs" => {
            spec(-3, Arg(1))
        },
        "setnx" | "getset" | "append" | "incrby" | "decrby" | "incrbyfloat" | "lindex"
        | "rename" | "renamenx" | "move" | "hget" | "hexists" | "hstrlen" | "sismember"
        | "zscore" | "zrank" | "zrevrank" | "getbit" | "rpoplpush" | "publish" | "spublish" => {
            spec(3, Arg(1))
        },
        "setex" | "psetex" | "getrange" | "setrange" | "substr" | "lrange" | "lset" | "lrem"
        | "ltrim" | "hsetnx" | "hincrby" | "hincrbyfloat" | "smove" | "zincrby" | "zcount"
        | "zlexcount" | "zremrangebyrank" | "zremrangebyscore" | "zremrangebylex" | "setbit"
        | "brpoplpush" => spec(4, Arg(1)),
        "getex" | "lpop" | "rpop" | "spop" | "srandmember" | "zpopmin" | "zpopmax"
        | "hrandfield" | "zrandmember" | "bitcount" | "bitfield" | "bitfield_ro" | "sort"
        | "sort_ro" | "pfadd" | "pfcount" | "pfmerge" | "geohash" | "geopos" | "watch" => {
            spec(-2, Arg(1))
        },
        "del" | "unlink" | "exists" | "touch" | "mget" | "sinter" | "sunion" | "sdiff" => {
            spec(-2, Arg(1))
        },
        "mset" | "msetnx" | "lpush" | "rpush" | "lpushx" | "rpushx" | "hmget" | "hdel" | "sadd"
        | "srem" | "smismember" | "zrem" | "zmscore" | "sinterstore" | "sunionstore"
        | "sdiffstore" | "hscan" | "sscan" | "zscan" | "xdel" | "blpop" | "brpop" | "bzpopmin"
        | "bzpopmax" | "bitpos" => spec(-3, Arg(1)),
        "hset" | "hmset" | "zadd" | "zrange" | "zrevrange" | "zrangebyscore"
        | "zrevrangebyscore" | "zrangebylex" | "zrevrangebylex" | "xrange" | "xrevrange"
        | "xack" | "xtrim" | "restore" | "geodist" => spec(-4, Arg(1)),
        "linsert" | "lmove" => spec(5, Arg(1)),
        "blmove" => spec(6, Arg(1)),
        "zunionstore" | "zinterstore" | "zdiffstore" => spec(-4, Arg(1)),
        "zrangestore" => spec(-5, Arg(1)),
        "xadd" | "geoadd" | "georadiusbymember" | "georadiusbymember_ro" => spec(-5, Arg(1)),
        "georadius" | "georadius_ro" | "xclaim" | "xautoclaim" => spec(-6, Arg(1)),
        "geosearch" => spec(-7, Arg(1)),
        "geosearchstore" => spec(-8, Arg(1)),
        "xpending" | "xsetid" => spec(-3, Arg(1)),
        "bitop" => spec(-4, Arg(2)),
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro" => {
            spec(-3, Numkeys(2))
        },
        "zunion" | "zinter" | "zdiff" | "zintercard" | "sintercard" => spec(-3, Numkeys(1)),
        "lmpop" | "zmpop" => spec(-4, Numkeys(1)),
        "blmpop" | "bzmpop" => spec(-5, Numkeys(2)),
        "xread" => spec(-4, AfterStreams),
        "xreadgroup" => spec(-7, AfterStreams),
        // pub/sub (channels are not keys)
        "subscribe" | "psubscribe" => spec(-2, N),
        "ssubscribe" => spec(-2, Arg(1)),
        "unsubscribe" | "punsubscribe" => spec(-1, N),
        "sunsubscribe" => spec(-1, Arg(1)),
        // keyless
        "ping" | "info" | "hello" | "flushdb" | "flushall" | "bgsave" | "shutdown" | "failover"
        | "lolwut" | "replconf" | "quit" | "command" => spec(-1, N),
        "multi" | "exec" | "discard" | "unwatch" | "randomkey" | "dbsize" | "save"
        | "bgrewriteaof" | "lastsave" | "time" | "role" | "monitor" | "sync" | "readonly"
        | "readwrite" | "asking" | "reset" => spec(1, N),
        "echo" | "select" | "keys" => spec(2, N),
        "auth" | "scan" | "debug" => spec(-2, N),
        "swapdb" | "slaveof" | "replicaof" | "wait" => spec(3, N),
        "psync" => spec(-3, N),
        // container subcommands
        "client|caching" | "client|no-evict" | "client|reply" | "client|setname" => spec(3, N),
        "client|getname"
        | "client|getredir"
        | "client|id"
        | "client|info"
        | "client|trackinginfo"
        | "client|unpause"
        | "client|help" => spec(2, N),
        "client|kill" | "client|pause" | "client|tracking" | "client|unblock" => spec(-3, N),
        "client|list" => spec(-2, N),
        "config|get" => spec(-3, N),
        "config|set" => spec(-4, N),
        "config|resetstat" | "config|rewrite" | "config|help" => spec(2, N),
        "object|encoding" | "object|freq" | "object|idletime" | "object|refcount" => {
            spec(3, Arg(2))
        },
        "memory|usage" => spec(-3, Arg(2)),
        "memory|doctor" | "memory|stats" | "memory|malloc-stats" | "memory|purge" => spec(2, N),
        "script|load" | "script|debug" => spec(3, N),
        "script|exists" => spec(-3, N),
        "script|flush" => spec(-2, N),
        "script|kill" => spec(2, N),
        "function|load" | "function|restore" => spec(-3, N),
        "function|delete" => spec(3, N),
        "function|flush" | "function|list" => spec(-2, N),
        "function|dump" | "function|stats" | "function|kill" => spec(2, N),
        "xinfo|stream" => spec(-3, Arg(2)),
        "xinfo|groups" => spec(3, Arg(2)),
        "xinfo|consumers" => spec(4, Arg(2)),
        "xgroup|create" | "xgroup|setid" => spec(-5, Arg(2)),
        "xgroup|createconsumer" | "xgroup|delconsumer" => spec(5, Arg(2)),
        "xgroup|destroy" => spec(4, Arg(2)),
        "acl|whoami" | "acl|list" | "acl|load" | "acl|save" | "acl|users" => spec(2, N),
        "acl|cat" | "acl|genpass" | "acl|log" => spec(-2, N),
        "acl|deluser" | "acl|setuser" => spec(-3, N),
        "acl|getuser" => spec(3, N),
        "acl|dryrun" => spec(-4, N),
        "command|count" => spec(2, N),
        "command|docs" | "command|info" | "command|list" => spec(-2, N),
        "command|getkeys" | "command|getkeysandflags" => spec(-3, N),
        "latency|doctor" | "latency|latest" => spec(2, N),
        "latency|graph" | "latency|history" => spec(3, N),
        "latency|histogram" | "latency|reset" => spec(-2, N),
        "pubsub|channels" | "pubsub|numsub" | "pubsub|shardchannels" | "pubsub|shardnumsub" => {
            spec(-2, N)
        },
        "pubsub|numpat" => spec(2, N),
        "slowlog|get" => spec(-2, N),
        "slowlog|len" | "slowlog|reset" => spec(2, N),
        "module|list" => spec(2, N),
        "module|load" | "module|loadex" => spec(-3, N),
        "module|unload" => spec(3, N),
        "cluster|info" | "cluster|nodes" | "cluster|slots" | "cluster|shards" | "cluster|myid"
        | "cluster|links" | "cluster|saveconfig" | "cluster|bumpepoch" | "cluster|flushslots" => {
            spec(2, N)
        },
        "cluster|keyslot"
        | "cluster|countkeysinslot"
        | "cluster|forget"
        | "cluster|replicate"
        | "cluster|replicas"
        | "cluster|slaves"
        | "cluster|set-config-epoch"
        | "cluster|count-failure-reports" => spec(3, N),
        "cluster|getkeysinslot" => spec(4, N),
        "cluster|addslots" | "cluster|delslots" => spec(-3, N),
        "cluster|meet" | "cluster|setslot" | "cluster|addslotsrange" | "cluster|delslotsrange" => {
            spec(-4, N)
        },
        "cluster|reset" | "cluster|failover" => spec(-2, N),
    }
}

/// Arity and key position of a command by its stats name (`get`, `config|get`).
/// `None` for commands this table does not know (modules, newer versions).
pub fn command_spec(name: &str) -> Option<CommandSpec> {
    match known_command(name) {
        Some((_, spec)) => Some(spec),
        None => unlisted_spec(name),
    }
}

/// Specs of names the table does not list one by one.
fn unlisted_spec(name: &str) -> Option<CommandSpec> {
    if name.ends_with("|help") {
        // any `help` subcommand
        Some(spec(2, KeySpec::None))
    } else if CONTAINERS.contains(&name) {
        // containers themselves (hit only when no subcommand was given)
        Some(spec(-2, KeySpec::None))
    } else {
        None
    }
}

/// A command as read off the wire: its stats name and, when known, its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    /// See [`identify`].
    pub name: Cow<'static, str>,
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

/// The name Redis 7 uses in `INFO commandstats` for a command with arguments `args` (kept
/// prefixes; `args[0]` is the command) and `argc` arguments in total: lower case, and
/// `parent|sub` for container commands given a subcommand. A container without subcommand is
/// reported as the container itself (Redis rejects it for arity against that row).
///
/// Names the command table knows come back borrowed from it, with their spec from the same
/// lookup: this runs for every command.
pub fn identify(args: &[&[u8]], argc: u64) -> Identified {
    let Some(first) = args.first() else {
        return Identified {
            name: Cow::Borrowed(""),
            spec: None,
        };
    };
    // `parent|sub`, on the stack.
    let mut buf = [0u8; 2 * MAX_NAME_LEN + 1];
    let mut len = lower_into(&mut buf, first);
    if argc >= 2
        && let Some(sub) = args.get(1)
        && CONTAINERS
            .iter()
            .any(|container| container.as_bytes() == &buf[..len])
    {
        buf[len] = b'|';
        len += 1;
        len += lower_into(&mut buf[len..], sub);
    }
    let name = &buf[..len];
    let unlisted = |text: &str| Identified {
        spec: unlisted_spec(text),
        name: unlisted_name(text),
    };
    match std::str::from_utf8(name) {
        Ok(text) => match known_command(text) {
            Some((known, spec)) => Identified {
                name: Cow::Borrowed(known),
                spec: Some(spec),
            },
            None => unlisted(text),
        },
        Err(_) => unlisted(&String::from_utf8_lossy(name)),
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
        }
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
