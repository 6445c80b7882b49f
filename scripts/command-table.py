#!/usr/bin/env python3
"""Writes daemon/resp/commands.tsv: every command Redis and Valkey define, by the name
`INFO commandstats` gives it (`get`, `client|kill`), with its arity, where its first key is and
the flags respwatch reads. daemon/resp/build.rs turns the file into the crate's command table.

Rerun when vendoring newer sources:

    scripts/command-table.py REDIS_GIT_DIR VALKEY_GIT_DIR > daemon/resp/commands.tsv

Each argument is a clone (or bare git directory) of redis/redis and valkey-io/valkey; the
`src/commands/*.json` of the committed tree at `--redis-rev`/`--valkey-rev` (default HEAD) is
read, and the version in its `src/version.h` and the commit are recorded in the header.

Both servers' commands are kept. When they disagree on a command's arity or first key, Redis'
row wins and the disagreement is printed to stderr and listed in the header. The script stops
on metadata it cannot express (a first-key rule respwatch has no form for, a flag rule that no
longer matches any command) rather than writing a table that is quietly wrong.
"""
import argparse
import json
import re
import subprocess
import sys

# Redis' command_flags respwatch keeps, by the name used in the file.
METADATA_FLAGS = {
    "WRITE": "write",
    "READONLY": "readonly",
    "ADMIN": "admin",
    "PUBSUB": "pubsub",
    "BLOCKING": "blocking",
    "NO_MULTI": "no_multi",
    "FAST": "fast",
}
# Flags for how a connection's replies are paired, by the function implementing the command:
# the metadata has no flag for them, and the functions are shared by both servers.
FUNCTION_FLAGS = {
    "subscribeCommand": "subscribe",
    "psubscribeCommand": "subscribe",
    "ssubscribeCommand": "subscribe",
    "unsubscribeCommand": "unsubscribe",
    "punsubscribeCommand": "unsubscribe",
    "sunsubscribeCommand": "unsubscribe",
    "multiCommand": "multi",
    "execCommand": "exec",
    "discardCommand": "discard",
    "resetCommand": "reply_mode",
}
# CLIENT REPLY shares clientCommand with every CLIENT subcommand: named here.
NAME_FLAGS = {"client|reply": "reply_mode"}


def git(repo, *args):
    return subprocess.run(
        ["git", "-C", repo, *args], check=True, capture_output=True, text=True
    ).stdout


def fail(message):
    sys.exit(f"command-table.py: {message}")


def source(repo, rev, project):
    """(header line, {stats name: metadata}) of one server's sources at `rev`."""
    commit = git(repo, "rev-parse", f"{rev}^{{commit}}").strip()
    date = git(repo, "show", "-s", "--format=%cs", commit).strip()
    version_h = git(repo, "show", f"{commit}:src/version.h")
    found = re.search(r'#define (?:VALKEY|REDIS)_VERSION "([^"]+)"', version_h)
    if not found:
        fail(f"no version in {project} src/version.h")
    version = found.group(1)
    when = f"unstable, {date}" if version == "255.255.255" else date
    commands = {}
    for path in git(repo, "ls-tree", "--name-only", commit, "src/commands/").split():
        if not path.endswith(".json"):
            continue
        for name, meta in json.loads(git(repo, "show", f"{commit}:{path}")).items():
            if "container" in meta:
                name = f"{meta['container']}|{name}"
            commands[name.lower()] = meta
    return f"{project} src/commands at {version} ({when}) ({commit})", commands


def first_key(name, meta):
    """The first key's position in the file's form: `-`, `arg:I`, `numkeys:I`, `streams`."""
    specs = meta.get("key_specs") or []
    if not specs:
        return "-"
    begin, find = specs[0]["begin_search"], specs[0]["find_keys"]
    if "index" in begin and "range" in find:
        return f"arg:{begin['index']['pos']}"
    if "index" in begin and "keynum" in find:
        keynum = find["keynum"]
        # numkeys at pos + keynumidx, keys from pos + firstkey: respwatch reads the first key
        # right after numkeys.
        if keynum["firstkey"] != keynum["keynumidx"] + 1:
            fail(f"{name}: first key not right after numkeys: {keynum}")
        return f"numkeys:{begin['index']['pos'] + keynum['keynumidx']}"
    if begin.get("keyword", {}).get("keyword") == "STREAMS" and "range" in find:
        return "streams"
    fail(f"{name}: no form for its first key: {begin} {find}")


def flags(name, meta, containers):
    found = {METADATA_FLAGS[f] for f in meta.get("command_flags", []) if f in METADATA_FLAGS}
    if meta.get("function") in FUNCTION_FLAGS:
        found.add(FUNCTION_FLAGS[meta["function"]])
    if name in NAME_FLAGS:
        found.add(NAME_FLAGS[name])
    if name in containers:
        found.add("container")
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("redis", help="redis/redis clone or git directory")
    parser.add_argument("valkey", help="valkey-io/valkey clone or git directory")
    parser.add_argument("--redis-rev", default="HEAD")
    parser.add_argument("--valkey-rev", default="HEAD")
    args = parser.parse_args()
    servers = [
        ("redis", *source(args.redis, args.redis_rev, "redis/redis")),
        ("valkey", *source(args.valkey, args.valkey_rev, "valkey-io/valkey")),
    ]
    rows = {}
    conflicts = []
    for server, _, commands in servers:
        containers = {name.split("|")[0] for name in commands if "|" in name}
        for name, meta in commands.items():
            row = [meta["arity"], first_key(name, meta), flags(name, meta, containers)]
            if name not in rows:
                rows[name] = (row, [server])
                continue
            kept, seen_in = rows[name]
            if kept[:2] != row[:2]:
                conflicts.append(f"{name}: redis {kept[0]} {kept[1]}, {server} {row[0]} {row[1]}")
            seen_in.append(server)
    used = {flag for row, _ in rows.values() for flag in row[2]}
    missing = {*METADATA_FLAGS.values(), *FUNCTION_FLAGS.values(), *NAME_FLAGS.values()} - used
    if missing:
        fail(f"flags no command has any more: {sorted(missing)}")
    for conflict in conflicts:
        print(f"conflict (redis kept): {conflict}", file=sys.stderr)

    out = sys.stdout
    out.write("# Written by scripts/command-table.py: rerun it on newer sources instead of editing.\n")
    for _, header, _ in servers:
        out.write(f"# Generated from {header}.\n")
    out.write(f"# Conflicts (Redis' row kept): {'; '.join(conflicts) or 'none'}.\n")
    out.write(
        "# Columns: stats name; arity; first key (- none, arg:I argument I, numkeys:I the key\n"
        "# count at I and the keys after it, streams the argument after STREAMS); flags; servers.\n"
    )
    for name in sorted(rows, key=lambda n: n.encode()):
        (arity, key, found), seen_in = rows[name]
        out.write(f"{name}\t{arity}\t{key}\t{','.join(sorted(found)) or '-'}\t{','.join(seen_in)}\n")


if __name__ == "__main__":
    main()
