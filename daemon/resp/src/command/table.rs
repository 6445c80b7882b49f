//! The command table: every command Redis and Valkey define (`daemon/resp/commands.tsv`,
//! derived from their `src/commands/*.json` by `scripts/command-table.py`), with the arity,
//! first key and flags their metadata gives. `build.rs` turns the file into `COMMANDS`.

use super::{
    CommandSpec, KeySpec,
    name_hash::{SLOTS, name_hash},
};

/// Bits of [`CommandInfo::flags`]. The first ones are Redis' own command flags; the others say
/// how replies to the command are paired, which the metadata has no flag for.
pub mod flag {
    /// Redis' `WRITE`: may modify the dataset.
    pub const WRITE: u16 = 1 << 0;
    /// Redis' `READONLY`: only reads keys.
    pub const READONLY: u16 = 1 << 1;
    /// Redis' `ADMIN`: administrative.
    pub const ADMIN: u16 = 1 << 2;
    /// Redis' `PUBSUB`: a pub/sub command.
    pub const PUBSUB: u16 = 1 << 3;
    /// Redis' `BLOCKING`: may block the client.
    pub const BLOCKING: u16 = 1 << 4;
    /// Redis' `NO_MULTI`: refused inside MULTI.
    pub const NO_MULTI: u16 = 1 << 5;
    /// Redis' `FAST`: O(1) or O(log N).
    pub const FAST: u16 = 1 << 6;
    /// Has subcommands: its stats rows are `name|subcommand`.
    pub const CONTAINER: u16 = 1 << 7;
    /// SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE: one confirmation per channel instead of a reply.
    pub const SUBSCRIBE: u16 = 1 << 8;
    /// UNSUBSCRIBE, PUNSUBSCRIBE, SUNSUBSCRIBE: one confirmation per channel, or per current
    /// subscription when none is named.
    pub const UNSUBSCRIBE: u16 = 1 << 9;
    /// MULTI: starts queueing.
    pub const MULTI: u16 = 1 << 10;
    /// EXEC: runs the queue, one reply for all of it.
    pub const EXEC: u16 = 1 << 11;
    /// DISCARD: drops the queue.
    pub const DISCARD: u16 = 1 << 12;
    /// CLIENT REPLY and RESET: change whether the connection's next commands get replies.
    pub const REPLY_MODE: u16 = 1 << 13;
}

/// A command of the table (its index there): what a command read off the wire is identified as,
/// so later decisions test an integer instead of comparing names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandId(u16);

/// What the table holds about one command.
#[derive(Debug)]
pub struct CommandInfo {
    /// Stats name: lower case, `parent|sub` for subcommands.
    pub name: &'static str,
    /// Redis arity (negative: at least `-arity` arguments including the name).
    pub arity: i32,
    /// First key position.
    pub key: KeySpec,
    /// [`flag`] bits.
    pub flags: u16,
}

include!(concat!(env!("OUT_DIR"), "/commands.rs"));

impl CommandId {
    /// The command named `name` (a stats name, already lower case): one hash of the name and,
    /// nearly always, one comparison.
    pub fn lookup(name: &[u8]) -> Option<Self> {
        let mut slot = name_hash(name) as usize % SLOTS;
        loop {
            let id = *BY_HASH.get(slot)?;
            let command = COMMANDS.get(usize::from(id))?;
            if command.name.as_bytes() == name {
                return Some(Self(id));
            }
            slot = (slot + 1) % SLOTS;
        }
    }

    /// The table's entry for this command.
    pub fn info(self) -> &'static CommandInfo {
        &COMMANDS[usize::from(self.0)]
    }
}

impl CommandInfo {
    /// Arity and first key.
    pub fn spec(&self) -> CommandSpec {
        CommandSpec {
            arity: self.arity,
            key: self.key,
        }
    }

    /// Whether all of `flags` ([`flag`] bits) are set.
    pub fn has(&self, flags: u16) -> bool {
        self.flags & flags == flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> &'static CommandInfo {
        CommandId::lookup(name.as_bytes())
            .unwrap_or_else(|| panic!("{name} is in the table"))
            .info()
    }

    #[test]
    fn lookup_finds_every_name_and_only_those() {
        for (index, command) in COMMANDS.iter().enumerate() {
            let id = CommandId::lookup(command.name.as_bytes()).expect("listed name");
            assert_eq!(usize::from(id.0), index);
            assert_eq!(id.info().name, command.name);
        }
        for name in [
            "",
            "ge",
            "gett",
            "GET",
            "zzz",
            "client|",
            "client|bogus",
            "json.set",
        ] {
            assert_eq!(CommandId::lookup(name.as_bytes()), None, "{name}");
        }
    }

    #[test]
    fn containers_are_the_commands_with_subcommands() {
        let mut containers: Vec<&str> = COMMANDS
            .iter()
            .filter_map(|command| Some(command.name.split_once('|')?.0))
            .collect();
        containers.dedup();
        for command in &COMMANDS {
            assert_eq!(
                command.has(flag::CONTAINER),
                containers.contains(&command.name),
                "{}",
                command.name
            );
        }
        // Redis 7.0's fifteen and SENTINEL (a sentinel's own).
        assert_eq!(containers.len(), 16, "{containers:?}");
    }

    #[test]
    fn reply_pairing_flags() {
        let having = |flags| {
            COMMANDS
                .iter()
                .filter(|command| command.has(flags))
                .map(|command| command.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            having(flag::SUBSCRIBE),
            ["psubscribe", "ssubscribe", "subscribe"]
        );
        assert_eq!(
            having(flag::UNSUBSCRIBE),
            ["punsubscribe", "sunsubscribe", "unsubscribe"]
        );
        assert_eq!(having(flag::MULTI), ["multi"]);
        assert_eq!(having(flag::EXEC), ["exec"]);
        assert_eq!(having(flag::DISCARD), ["discard"]);
        assert_eq!(having(flag::REPLY_MODE), ["client|reply", "reset"]);
        assert!(info("blpop").has(flag::BLOCKING | flag::WRITE));
        assert!(info("get").has(flag::READONLY | flag::FAST));
        assert!(info("publish").has(flag::PUBSUB));
        assert!(info("sync").has(flag::NO_MULTI));
        assert!(info("config|set").has(flag::ADMIN));
    }

    /// The hand-written table the generated one replaced (Redis 7.0 names), group by group as
    /// it was written: every entry is reproduced but the ones `changed` lists.
    #[test]
    #[rustfmt::skip]
    fn reproduces_the_redis_7_0_table() {
        use KeySpec::{AfterStreams, Arg, None as N, Numkeys};
        let changed: [(&str, i32, KeySpec); 3] = [
            // Redis 7.2 added ZRANK/ZREVRANK ... WITHSCORE.
            ("zrank", -3, Arg(1)),
            ("zrevrank", -3, Arg(1)),
            // A channel, not a key: PUBLISH has no key spec (the old table listed it with
            // SPUBLISH, whose shard channel Redis' metadata does give as its first key).
            ("publish", 3, N),
        ];
        let old: &[(&[&str], i32, KeySpec)] = &[
            (&[
                "get", "getdel", "strlen", "incr", "decr", "type", "ttl", "pttl", "persist", "dump",
                "expiretime", "pexpiretime", "llen", "hlen", "hkeys", "hvals", "hgetall",
                "smembers", "scard", "zcard", "xlen"
            ], 2, Arg(1)),
            (&[
                "set", "lpos", "copy", "expire", "pexpire", "expireat", "pexpireat", "lcs"
            ], -3, Arg(1)),
            (&[
                "setnx", "getset", "append", "incrby", "decrby", "incrbyfloat", "lindex", "rename",
                "renamenx", "move", "hget", "hexists", "hstrlen", "sismember", "zscore", "zrank",
                "zrevrank", "getbit", "rpoplpush", "publish", "spublish"
            ], 3, Arg(1)),
            (&[
                "setex", "psetex", "getrange", "setrange", "substr", "lrange", "lset", "lrem",
                "ltrim", "hsetnx", "hincrby", "hincrbyfloat", "smove", "zincrby", "zcount",
                "zlexcount", "zremrangebyrank", "zremrangebyscore", "zremrangebylex", "setbit",
                "brpoplpush"
            ], 4, Arg(1)),
            (&[
                "getex", "lpop", "rpop", "spop", "srandmember", "zpopmin", "zpopmax", "hrandfield",
                "zrandmember", "bitcount", "bitfield", "bitfield_ro", "sort", "sort_ro", "pfadd",
                "pfcount", "pfmerge", "geohash", "geopos", "watch"
            ], -2, Arg(1)),
            (&[
                "del", "unlink", "exists", "touch", "mget", "sinter", "sunion", "sdiff"
            ], -2, Arg(1)),
            (&[
                "mset", "msetnx", "lpush", "rpush", "lpushx", "rpushx", "hmget", "hdel", "sadd",
                "srem", "smismember", "zrem", "zmscore", "sinterstore", "sunionstore", "sdiffstore",
                "hscan", "sscan", "zscan", "xdel", "blpop", "brpop", "bzpopmin", "bzpopmax",
                "bitpos"
            ], -3, Arg(1)),
            (&[
                "hset", "hmset", "zadd", "zrange", "zrevrange", "zrangebyscore", "zrevrangebyscore",
                "zrangebylex", "zrevrangebylex", "xrange", "xrevrange", "xack", "xtrim", "restore",
                "geodist"
            ], -4, Arg(1)),
            (&["linsert", "lmove"], 5, Arg(1)),
            (&["blmove"], 6, Arg(1)),
            (&["zunionstore", "zinterstore", "zdiffstore"], -4, Arg(1)),
            (&["zrangestore"], -5, Arg(1)),
            (&["xadd", "geoadd", "georadiusbymember", "georadiusbymember_ro"], -5, Arg(1)),
            (&["georadius", "georadius_ro", "xclaim", "xautoclaim"], -6, Arg(1)),
            (&["geosearch"], -7, Arg(1)),
            (&["geosearchstore"], -8, Arg(1)),
            (&["xpending", "xsetid"], -3, Arg(1)),
            (&["bitop"], -4, Arg(2)),
            (&["eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"], -3, Numkeys(2)),
            (&["zunion", "zinter", "zdiff", "zintercard", "sintercard"], -3, Numkeys(1)),
            (&["lmpop", "zmpop"], -4, Numkeys(1)),
            (&["blmpop", "bzmpop"], -5, Numkeys(2)),
            (&["xread"], -4, AfterStreams),
            (&["xreadgroup"], -7, AfterStreams),
            (&["subscribe", "psubscribe"], -2, N),
            (&["ssubscribe"], -2, Arg(1)),
            (&["unsubscribe", "punsubscribe"], -1, N),
            (&["sunsubscribe"], -1, Arg(1)),
            (&[
                "ping", "info", "hello", "flushdb", "flushall", "bgsave", "shutdown", "failover",
                "lolwut", "replconf", "quit", "command"
            ], -1, N),
            (&[
                "multi", "exec", "discard", "unwatch", "randomkey", "dbsize", "save",
                "bgrewriteaof", "lastsave", "time", "role", "monitor", "sync", "readonly",
                "readwrite", "asking", "reset"
            ], 1, N),
            (&["echo", "select", "keys"], 2, N),
            (&["auth", "scan", "debug"], -2, N),
            (&["swapdb", "slaveof", "replicaof", "wait"], 3, N),
            (&["psync"], -3, N),
            (&["client|caching", "client|no-evict", "client|reply", "client|setname"], 3, N),
            (&[
                "client|getname", "client|getredir", "client|id", "client|info",
                "client|trackinginfo", "client|unpause", "client|help"
            ], 2, N),
            (&["client|kill", "client|pause", "client|tracking", "client|unblock"], -3, N),
            (&["client|list"], -2, N),
            (&["config|get"], -3, N),
            (&["config|set"], -4, N),
            (&["config|resetstat", "config|rewrite", "config|help"], 2, N),
            (&["object|encoding", "object|freq", "object|idletime", "object|refcount"], 3, Arg(2)),
            (&["memory|usage"], -3, Arg(2)),
            (&["memory|doctor", "memory|stats", "memory|malloc-stats", "memory|purge"], 2, N),
            (&["script|load", "script|debug"], 3, N),
            (&["script|exists"], -3, N),
            (&["script|flush"], -2, N),
            (&["script|kill"], 2, N),
            (&["function|load", "function|restore"], -3, N),
            (&["function|delete"], 3, N),
            (&["function|flush", "function|list"], -2, N),
            (&["function|dump", "function|stats", "function|kill"], 2, N),
            (&["xinfo|stream"], -3, Arg(2)),
            (&["xinfo|groups"], 3, Arg(2)),
            (&["xinfo|consumers"], 4, Arg(2)),
            (&["xgroup|create", "xgroup|setid"], -5, Arg(2)),
            (&["xgroup|createconsumer", "xgroup|delconsumer"], 5, Arg(2)),
            (&["xgroup|destroy"], 4, Arg(2)),
            (&["acl|whoami", "acl|list", "acl|load", "acl|save", "acl|users"], 2, N),
            (&["acl|cat", "acl|genpass", "acl|log"], -2, N),
            (&["acl|deluser", "acl|setuser"], -3, N),
            (&["acl|getuser"], 3, N),
            (&["acl|dryrun"], -4, N),
            (&["command|count"], 2, N),
            (&["command|docs", "command|info", "command|list"], -2, N),
            // -4 on Redis 7.0 servers, a regression 7.2 fixed: this table already had 7.2's.
            (&["command|getkeys", "command|getkeysandflags"], -3, N),
            (&["latency|doctor", "latency|latest"], 2, N),
            (&["latency|graph", "latency|history"], 3, N),
            (&["latency|histogram", "latency|reset"], -2, N),
            (&[
                "pubsub|channels", "pubsub|numsub", "pubsub|shardchannels", "pubsub|shardnumsub"
            ], -2, N),
            (&["pubsub|numpat"], 2, N),
            (&["slowlog|get"], -2, N),
            (&["slowlog|len", "slowlog|reset"], 2, N),
            (&["module|list"], 2, N),
            (&["module|load", "module|loadex"], -3, N),
            (&["module|unload"], 3, N),
            (&[
                "cluster|info", "cluster|nodes", "cluster|slots", "cluster|shards", "cluster|myid",
                "cluster|links", "cluster|saveconfig", "cluster|bumpepoch", "cluster|flushslots"
            ], 2, N),
            (&[
                "cluster|keyslot", "cluster|countkeysinslot", "cluster|forget", "cluster|replicate",
                "cluster|replicas", "cluster|slaves", "cluster|set-config-epoch",
                "cluster|count-failure-reports"
            ], 3, N),
            (&["cluster|getkeysinslot"], 4, N),
            (&["cluster|addslots", "cluster|delslots"], -3, N),
            (&[
                "cluster|meet", "cluster|setslot", "cluster|addslotsrange", "cluster|delslotsrange"
            ], -4, N),
            (&["cluster|reset", "cluster|failover"], -2, N),
        ];
        let (mut checked, mut changes) = (0, 0);
        for &(names, arity, key) in old {
            for &name in names {
                let (now, was) = (info(name).spec(), CommandSpec { arity, key });
                match changed.iter().find(|(changed, ..)| *changed == name) {
                    Some(&(_, arity, key)) => {
                        assert_ne!(now, was, "{name} is listed as changed");
                        assert_eq!(now, CommandSpec { arity, key }, "{name}");
                        changes += 1;
                    }
                    None => assert_eq!(now, was, "{name}"),
                }
                checked += 1;
            }
        }
        assert_eq!((checked, changes), (335, changed.len()));
    }
}
