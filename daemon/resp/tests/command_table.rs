//! The command table against a real redis-server: every command and subcommand the server
//! reports has an id, with the server's arity and first key (but for the changes Redis made
//! since that server's version, listed below).

use std::{
    io::{BufRead, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use respwatch_resp::command::{CommandId, KeySpec};

/// Arities the table has from a newer Redis than some servers the test may meet: the command,
/// its arity before, and the first version with the table's.
const ARITY_CHANGES: [(&str, i64, (u32, u32)); 4] = [
    // ZRANK/ZREVRANK ... WITHSCORE
    ("zrank", 3, (7, 2)),
    ("zrevrank", 3, (7, 2)),
    // A regression of 7.0 (a command without arguments was refused), fixed in 7.2.
    ("command|getkeys", -4, (7, 2)),
    ("command|getkeysandflags", -4, (7, 2)),
];

#[test]
fn every_command_of_a_real_server_has_an_id_arity_and_first_key() {
    let Some(server) = Server::start() else {
        eprintln!("skipped: redis-server is not on PATH");
        return;
    };
    let mut conn = server.connect();
    let version = conn.version();
    // COMMAND LIST names subcommands too (`client|kill`).
    let listed = conn.call(&["COMMAND", "LIST"]);
    let mut unknown: Vec<&str> = array(&listed)
        .iter()
        .map(text)
        .filter(|name| CommandId::lookup(name.as_bytes()).is_none())
        .collect();
    let all = conn.call(&["COMMAND"]);
    let top = array(&all);
    // Subcommands come with their container's reply, in the same shape.
    let commands: Vec<&[Value]> = top
        .iter()
        .chain(top.iter().flat_map(|reply| array(&array(reply)[9])))
        .map(array)
        .collect();
    assert_eq!(
        commands.len(),
        array(&listed).len(),
        "COMMAND and COMMAND LIST"
    );
    let mut mismatches = Vec::new();
    for reply in &commands {
        let name = text(&reply[0]);
        let Some(id) = CommandId::lookup(name.as_bytes()) else {
            unknown.push(name);
            continue;
        };
        let info = id.info();
        let arity = int(&reply[1]);
        let changed = ARITY_CHANGES
            .iter()
            .any(|&(changed, before, since)| changed == name && before == arity && version < since);
        if arity != i64::from(info.arity) && !changed {
            mismatches.push(format!("{name}: arity {arity}, table {}", info.arity));
        }
        let key = first_key(array(&reply[8]).first());
        if key != info.key {
            mismatches.push(format!("{name}: first key {key:?}, table {:?}", info.key));
        }
    }
    unknown.sort();
    unknown.dedup();
    assert_eq!(unknown, Vec::<&str>::new(), "names without an id");
    assert_eq!(mismatches, Vec::<String>::new(), "redis {version:?}");
    // Redis 7.0 has 240 commands and 126 subcommands.
    assert!(commands.len() > 300, "{} commands", commands.len());
}

/// The first key as the server's first key spec gives it: the rules scripts/command-table.py
/// applies to the JSON metadata.
fn first_key(spec: Option<&Value>) -> KeySpec {
    let Some(spec) = spec else {
        return KeySpec::None;
    };
    let spec = array(spec);
    let part = |name| {
        let part = array(field(spec, name));
        (text(field(part, "type")), array(field(part, "spec")))
    };
    let position = |args: &[Value], name| usize::try_from(int(field(args, name))).expect("index");
    match (part("begin_search"), part("find_keys")) {
        (("index", begin), ("range", _)) => KeySpec::Arg(position(begin, "index")),
        (("index", begin), ("keynum", find)) => {
            assert_eq!(
                int(field(find, "firstkey")),
                int(field(find, "keynumidx")) + 1
            );
            KeySpec::Numkeys(position(begin, "index") + position(find, "keynumidx"))
        }
        (("keyword", begin), ("range", _)) if text(field(begin, "keyword")) == "STREAMS" => {
            KeySpec::AfterStreams
        }
        other => panic!("no first-key form for {other:?}"),
    }
}

/// A redis-server of its own on a Unix socket in a directory of its own, killed on drop.
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Server {
    /// `None` when there is no redis-server to run.
    fn start() -> Option<Self> {
        let dir =
            std::env::temp_dir().join(format!("respwatch-command-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("server directory");
        let spawned = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(dir.join("redis.sock"))
            .arg("--dir")
            .arg(&dir)
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => Some(Self { child, dir }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => panic!("redis-server: {error}"),
        }
    }

    fn connect(&self) -> Connection {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(self.dir.join("redis.sock")) {
                Ok(stream) => {
                    return Connection {
                        reader: BufReader::new(stream.try_clone().expect("clone")),
                        writer: stream,
                    };
                }
                Err(error) => assert!(Instant::now() < deadline, "redis-server: {error}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    fn call(&mut self, args: &[&str]) -> Value {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request += &format!("${}\r\n{arg}\r\n", arg.len());
        }
        self.writer.write_all(request.as_bytes()).expect("send");
        read(&mut self.reader)
    }

    /// (major, minor) of the server's `redis_version`.
    fn version(&mut self) -> (u32, u32) {
        let info = self.call(&["INFO", "server"]);
        let version = text(&info)
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .expect("redis_version");
        let mut parts = version.trim().split('.').map(|part| part.parse().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) => (major, minor),
            _ => panic!("redis_version {version:?}"),
        }
    }
}

/// A RESP2 reply.
#[derive(Debug)]
enum Value {
    Text(String),
    Int(i64),
    Array(Vec<Value>),
    Nil,
}

fn read(reader: &mut impl BufRead) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).expect("reply");
    let line = line.trim_end_matches("\r\n");
    let number = || line[1..].parse::<i64>().expect("length");
    match line.as_bytes().first() {
        Some(b'+') => Value::Text(line[1..].to_owned()),
        Some(b'-') => panic!("error reply: {line}"),
        Some(b':') => Value::Int(number()),
        Some(b'$') => match usize::try_from(number()) {
            Ok(len) => {
                let mut body = vec![0; len + 2];
                reader.read_exact(&mut body).expect("bulk");
                body.truncate(len);
                Value::Text(String::from_utf8(body).expect("UTF-8"))
            }
            Err(_) => Value::Nil,
        },
        Some(b'*') => match usize::try_from(number()) {
            Ok(len) => Value::Array((0..len).map(|_| read(reader)).collect()),
            Err(_) => Value::Nil,
        },
        _ => panic!("not RESP2: {line:?}"),
    }
}

fn text(value: &Value) -> &str {
    match value {
        Value::Text(text) => text,
        other => panic!("not text: {other:?}"),
    }
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(int) => *int,
        other => panic!("not an integer: {other:?}"),
    }
}

fn array(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        other => panic!("not an array: {other:?}"),
    }
}

/// The value after `name` in a RESP2 map (a flat array of names and values).
fn field<'a>(map: &'a [Value], name: &str) -> &'a Value {
    map.chunks_exact(2)
        .find(|pair| matches!(&pair[0], Value::Text(key) if key == name))
        .map(|pair| &pair[1])
        .unwrap_or_else(|| panic!("no {name} in {map:?}"))
}
