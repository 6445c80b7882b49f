//! Turns `commands.tsv` (Redis' and Valkey's command metadata, vendored by
//! `scripts/command-table.py`) into the command table `src/command/table.rs` includes.
//!
//! Generated at build time rather than checked in: the TSV stays the one reviewed copy of the
//! table, so the Rust cannot drift from it and needs no test that it matches.

use std::{fmt::Write as _, path::PathBuf};

#[path = "src/command/name_hash.rs"]
mod name_hash;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0} is not set")]
    Env(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("commands.tsv line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("{0} commands do not fit a u16 id, or fill the lookup table more than half")]
    TooMany(usize),
}

fn main() -> Result<(), Error> {
    println!("cargo::rerun-if-changed=commands.tsv");
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").ok_or(Error::Env("CARGO_MANIFEST_DIR"))?;
    let out = std::env::var_os("OUT_DIR").ok_or(Error::Env("OUT_DIR"))?;
    let path = PathBuf::from(dir).join("commands.tsv");
    let tsv = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let rust = generate(&tsv)?;
    let path = PathBuf::from(out).join("commands.rs");
    std::fs::write(&path, rust).map_err(|source| Error::Io { path, source })
}

/// `static COMMANDS`, one [`CommandInfo`] per line of the file, in its (byte) order.
fn generate(tsv: &str) -> Result<String, Error> {
    let mut rows = String::new();
    let mut count = 0;
    let mut previous = "";
    let mut slots = vec![u16::MAX; name_hash::SLOTS];
    for (index, line) in tsv.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let problem = |problem: String| Error::Line {
            line: index + 1,
            problem,
        };
        let [name, arity, key, flags, servers] = line.split('\t').collect::<Vec<_>>()[..] else {
            return Err(problem("not 5 tab-separated fields".into()));
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase())
        {
            return Err(problem(format!("name {name:?} is not lower-case ASCII")));
        }
        // Sorted, so ids follow the names' order and a name appears once.
        if name <= previous {
            return Err(problem(format!(
                "{name:?} is not sorted after {previous:?}"
            )));
        }
        previous = name;
        let arity: i32 = arity
            .parse()
            .map_err(|_| problem(format!("arity {arity:?}")))?;
        let key = match key.split_once(':') {
            None if key == "-" => "KeySpec::None".to_owned(),
            None if key == "streams" => "KeySpec::AfterStreams".to_owned(),
            Some(("arg", i)) if i.parse::<usize>().is_ok() => format!("KeySpec::Arg({i})"),
            Some(("numkeys", i)) if i.parse::<usize>().is_ok() => {
                format!("KeySpec::Numkeys({i})")
            }
            _ => return Err(problem(format!("first key {key:?}"))),
        };
        let flags = match flags {
            "-" => "0".to_owned(),
            _ if flags
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b',') =>
            {
                flags
                    .split(',')
                    .map(|flag| format!("flag::{}", flag.to_ascii_uppercase()))
                    .collect::<Vec<_>>()
                    .join(" | ")
            }
            _ => return Err(problem(format!("flags {flags:?}"))),
        };
        if servers
            .split(',')
            .any(|server| !matches!(server, "redis" | "valkey"))
        {
            return Err(problem(format!("servers {servers:?}")));
        }
        let id = u16::try_from(count).map_err(|_| Error::TooMany(count))?;
        let mut slot = name_hash::name_hash(name.as_bytes()) as usize % name_hash::SLOTS;
        while slots[slot] != u16::MAX {
            slot = (slot + 1) % name_hash::SLOTS;
        }
        slots[slot] = id;
        let _ = writeln!(
            rows,
            "    CommandInfo {{ name: {name:?}, arity: {arity}, key: {key}, flags: {flags} }},"
        );
        count += 1;
    }
    if count > usize::from(u16::MAX) {
        return Err(Error::TooMany(count));
    }
    if count * 2 > name_hash::SLOTS {
        return Err(Error::TooMany(count));
    }
    let slots: Vec<String> = slots.iter().map(u16::to_string).collect();
    Ok(format!(
        "/// Every command of `commands.tsv`, sorted by name: a [`CommandId`] is an index.\n\
         static COMMANDS: [CommandInfo; {count}] = [\n{rows}];\n\
         /// Command ids by name hash (linear probing; `u16::MAX`: empty).\n\
         static BY_HASH: [u16; {}] = [{}];\n",
        name_hash::SLOTS,
        slots.join(",")
    ))
}
