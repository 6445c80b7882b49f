//! The product surface end to end: one real `respwatchd` (eBPF attached) serving gRPC and
//! `/metrics`, driven by real redis-server/redis-cli/redis-benchmark traffic and read with the
//! real `redisctl`, grpcurl, Prometheus and promtool.
mod api_support;
mod http;
mod ports;
mod redis;
mod redisctl_bin;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use api_support::*;
use respwatch_proto::v1::{self, watch_response::Kind};
use serde_json::Value;

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Runs `redisctl watch` subscriptions while `traffic` runs, then returns each one's stdout.
fn watch_during(watches: &[Vec<String>], traffic: impl FnOnce()) -> Vec<String> {
    let before = status().subscribers;
    let children: Vec<_> = watches
        .iter()
        .map(|args| {
            redisctl()
                .arg("watch")
                .args(args)
                .args(["--duration", "6s"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("redisctl watch")
        })
        .collect();
    wait_for_subscribers(before + watches.len() as u32);
    traffic();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("redisctl watch output");
            assert!(
                out.status.success(),
                "redisctl watch failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout(&out)
        })
        .collect()
}

/// (command, key, error prefix) of JSON events.
fn triples(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            let field = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
            (field("command"), field("key"), field("error_prefix"))
        })
        .collect()
}

#[test]
fn watch_filters_show_exactly_the_matching_commands() {
    let _turn = exclusive();
    daemon();
    let server = RedisServer::start(&[]);
    // The PING that checked the server was up is through the pipeline before anyone watches:
    // events reach Watch 10–15 ms after the command, and it is not one of the commands below.
    wait_for_server_calls(server.pid(), &[("ping", 1)]);
    let pid = server.pid().to_string();
    let watches: Vec<Vec<String>> = vec![
        vec![
            "--pid".into(),
            pid.clone(),
            "--role".into(),
            "server".into(),
            "-o".into(),
            "json".into(),
        ],
        vec![
            "--pid".into(),
            pid.clone(),
            "--command".into(),
            "get".into(),
        ],
        vec![
            "--pid".into(),
            pid.clone(),
            "--errors-only".into(),
            "-o".into(),
            "json".into(),
        ],
        vec![
            "-n".into(),
            String::new(),
            "--pid".into(),
            pid.clone(),
            "--command".into(),
            "SET".into(),
            "-o".into(),
            "json".into(),
        ],
        vec!["-n".into(), "shop".into(), "--pid".into(), pid.clone()],
        vec![
            "--pid".into(),
            pid.clone(),
            "--key-prefix".into(),
            "user:".into(),
            "-o".into(),
            "json".into(),
        ],
    ];
    let outputs = watch_during(&watches, || {
        for args in [
            &["SET", "a", "1"][..],
            &["GET", "a"],
            &["LPUSH", "a", "x"],
            &["GET", "user:42"],
            &["SET", "user:7", "v"],
        ] {
            assert!(server.cli(args).status.success());
        }
        wait_for_server_calls(server.pid(), &[("set", 2), ("get", 2), ("lpush", 1)]);
    });
    let all = json_lines(&outputs[0]);
    let s = |x: &str| x.to_owned();
    assert_eq!(
        triples(&all),
        vec![
            (s("set"), s("a"), s("")),
            (s("get"), s("a"), s("")),
            (s("lpush"), s("a"), s("WRONGTYPE")),
            (s("get"), s("user:42"), s("")),
            (s("set"), s("user:7"), s("")),
        ],
        "all server-side commands of the process, in order"
    );
    for event in &all {
        assert_eq!(event["pid"], server.pid());
        assert_eq!(event["role"], "server");
        assert_eq!(event["comm"], "redis-server");
        assert_eq!(event["node"], "api-test");
    }
    // Compact lines: time, who, role, command, key, latency, reply or error.
    let gets: Vec<Vec<&str>> = outputs[1]
        .lines()
        .map(|l| l.split("  ").collect())
        .collect();
    let who = format!("redis-server[{pid}]");
    let redis_cli = |cols: &Vec<&str>| cols[1].starts_with("redis-cli[");
    let server_gets: Vec<(&str, &str, &str, &str)> = gets
        .iter()
        .filter(|c| !redis_cli(c))
        .map(|c| (c[1], c[2], c[3], c[4]))
        .collect();
    assert_eq!(
        server_gets,
        vec![
            (who.as_str(), "server", "get", "a"),
            (who.as_str(), "server", "get", "user:42")
        ]
    );
    assert_eq!(
        gets.iter().map(|c| c[6]).filter(|r| !r.is_empty()).count(),
        gets.len(),
        "reply column"
    );
    let errors = json_lines(&outputs[2]);
    assert_eq!(triples(&errors), vec![(s("lpush"), s("a"), s("WRONGTYPE"))]);
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("wrong kind of value")
    );
    let host_sets = json_lines(&outputs[3]);
    assert_eq!(
        triples(&host_sets),
        vec![(s("set"), s("a"), s("")), (s("set"), s("user:7"), s(""))]
    );
    assert_eq!(host_sets[0]["namespace"], "");
    assert_eq!(outputs[4], "", "no pods of namespace shop on this node");
    let users = json_lines(&outputs[5]);
    assert_eq!(
        triples(&users),
        vec![
            (s("get"), s("user:42"), s("")),
            (s("set"), s("user:7"), s(""))
        ]
    );

    // --last replays the recent history, then goes live.
    let out = redisctl()
        .args([
            "watch",
            "--pid",
            &pid,
            "--last",
            "3",
            "--count",
            "3",
            "--duration",
            "10s",
            "-o",
            "json",
        ])
        .output()
        .expect("redisctl watch --last");
    assert!(out.status.success());
    assert_eq!(
        triples(&json_lines(&stdout(&out))),
        vec![
            (s("lpush"), s("a"), s("WRONGTYPE")),
            (s("get"), s("user:42"), s("")),
            (s("set"), s("user:7"), s(""))
        ]
    );
}

/// grpcurl's proto3 JSON (camelCase, 64-bit numbers as strings, enum names) → redisctl's JSON.
fn normalise_grpcurl_row(row: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (key, value) in row.as_object().expect("row object") {
        let snake: String = key
            .chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c.to_ascii_lowercase()]
                } else {
                    vec![c]
                }
            })
            .collect();
        let value = match (snake.as_str(), value) {
            ("role", Value::String(name)) => {
                Value::String(name.trim_start_matches("ROLE_").to_lowercase())
            }
            ("errors", Value::Object(map)) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            Value::from(
                                v.as_str().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0),
                            ),
                        )
                    })
                    .collect(),
            ),
            (_, Value::String(text))
                if text.parse::<u64>().is_ok() && snake != "command" && snake != "comm" =>
            {
                Value::from(text.parse::<u64>().unwrap_or_default())
            }
            (_, other) => other.clone(),
        };
        out.insert(snake, value);
    }
    out
}

fn normalise_row(row: &Value) -> BTreeMap<String, Value> {
    row.as_object()
        .expect("row object")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Keys and error texts are written by any pod. What `redisctl` prints of them for a terminal
/// carries no control byte and no bidirectional override, only visible escapes: a key cannot
/// rewrite the operator's screen or title.
#[test]
fn redisctl_prints_no_control_byte_from_the_wire() {
    let _turn = exclusive();
    let _d = daemon();
    let server = RedisServer::start(&[]);
    let pid = server.pid().to_string();
    let key = "\x1b]0;pwned\x07\x1b[2Jkey\u{202e}";
    let outputs = watch_during(&[vec!["--pid".into(), pid.clone()]], || {
        assert!(server.cli(&["SET", key, "v"]).status.success());
        server.cli(&[
            "EVAL",
            "return redis.error_reply(ARGV[1])",
            "0",
            "ERR \x1b[31mred\x1b[0m",
        ]);
        wait_for_server_calls(server.pid(), &[("set", 1), ("eval", 1)]);
    });
    let stats = stdout(
        &redisctl()
            .args(["stats", "--pid", &pid])
            .output()
            .expect("redisctl stats"),
    );
    for (what, text) in [("watch", &outputs[0]), ("stats", &stats)] {
        assert!(
            !text
                .chars()
                .any(|c| c != '\n' && c.is_control() || c == '\u{202e}'),
            "redisctl {what} printed a control character: {text:?}"
        );
    }
    let watch = &outputs[0];
    assert!(
        watch.contains(r"\x1b]0;pwned\x07\x1b[2Jkey\u{202e}"),
        "{watch}"
    );
    // The script's error text is not Redis' own: its prefix only, nothing of what it echoed.
    assert!(!watch.contains("31mred"), "{watch}");
    assert!(watch.lines().any(|l| l.ends_with("  ERR")), "{watch}");
}

/// Redis echoes its callers' bytes in errors, and values cross the wire in replies, MONITOR
/// lines and pub/sub messages. With a random marker as the secret in each of these paths,
/// nothing the daemon serves or logs holds it in any form: Watch events (redisctl JSON), GetStats
/// (redisctl JSON and gRPC), `/metrics`, and the daemon's own log at trace level. The errors are
/// seen all the same, as their prefix and Redis' fixed message with `…` for what it echoed.
#[test]
fn no_value_leaves_the_node_in_any_echo_path() {
    let _turn = exclusive();
    let d = daemon();
    let marker = format!(
        "m{}",
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .expect("uuid")
            .trim()
            .replace('-', "")
    );
    // `CONFIG` renamed away: `CONFIG SET requirepass <secret>` is then an unknown command,
    // and Redis echoes its arguments.
    let server = RedisServer::start(&["--rename-command", "CONFIG", ""]);
    let port = server.port.to_string();
    let pid = server.pid();
    let cli = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .expect("redis-cli")
    };
    let background = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-cli")
    };
    // Short enough to be taken as a prefix (Redis takes at most 31 bytes).
    let custom_prefix = marker[..17].to_uppercase();
    let user = format!("u{marker}");
    let outputs = watch_during(&[vec!["-o".into(), "json".into()]], || {
        let mut monitor = background(&["MONITOR"]);
        let mut subscriber = background(&["SUBSCRIBE", "news"]);
        wait_for("MONITOR and SUBSCRIBE", || {
            let calls = server_calls(pid);
            calls.contains_key("monitor") && calls.contains_key("subscribe")
        });
        let error_reply = "return redis.error_reply(ARGV[1])";
        for args in [
            vec!["CONFIG", "SET", "requirepass", &marker],
            vec!["EVAL", error_reply, "0", &format!("ERR {marker}")],
            vec!["EVAL", error_reply, "0", &format!("{custom_prefix} failed")],
            vec!["EVAL", error_reply, "0", &marker],
            vec!["ACL", "SETUSER", "alice", "on", &format!("bad{marker}")],
            vec!["ACL", "SETUSER", &user, "on", ">pw", "-@all"],
            vec!["AUTH", "default", &marker],
            vec!["HELLO", "3", "AUTH", "default", &marker],
            vec![
                "MIGRATE",
                "127.0.0.1",
                "1",
                "",
                "0",
                "100",
                "AUTH",
                &marker,
                "KEYS",
                "k",
            ],
            vec![
                "MIGRATE",
                "127.0.0.1",
                "1",
                "",
                "0",
                "100",
                "AUTH2",
                "u",
                &marker,
                "KEYS",
                "k",
            ],
            vec!["SET", "k", &marker],
            vec!["GET", "k"],
            vec!["PUBLISH", "news", &marker],
        ] {
            cli(&args);
        }
        // A user name is echoed in NOPERM errors.
        cli(&["--user", &user, "--pass", "pw", "GET", "k"]);
        wait_for_server_calls(
            pid,
            &[
                ("eval", 3),
                ("acl|setuser", 2),
                ("get", 1),
                ("publish", 1),
                ("migrate", 2),
            ],
        );
        for child in [&mut monitor, &mut subscriber] {
            let _ = child.kill();
            let _ = child.wait();
        }
    });
    let events = json_lines(&outputs[0]);
    let of_server: Vec<&Value> = events
        .iter()
        .filter(|e| e["pid"] == pid && e["role"] == "server")
        .collect();
    let errors: BTreeSet<(String, String)> = of_server
        .iter()
        .filter(|e| e["error_prefix"] != "")
        .map(|e| {
            let field = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
            (field("error_prefix"), field("error"))
        })
        .collect();
    // The errors are there, shown without what Redis echoed.
    for expected in [
        (
            "ERR",
            "ERR unknown command '…', with args beginning with: …",
        ),
        ("ERR", "ERR Error in ACL SETUSER modifier '…': …"),
        ("unknown", "unknown"),
        ("ERR", "ERR"),
        ("NOPERM", "NOPERM"),
    ] {
        assert!(
            errors.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} not among {errors:?}"
        );
    }
    let stats_json = stdout(
        &redisctl()
            .args(["stats", "-o", "json"])
            .output()
            .expect("stats"),
    );
    let stats_grpc = format!("{:?}", stats(v1::GetStatsRequest::default()));
    let metrics = http_get(&d.metrics, "/metrics");
    let log = std::fs::read_to_string(&d.log).expect("daemon log");
    let hex: String = marker.bytes().map(|b| format!("{b:02x}")).collect();
    let forms = [
        marker.clone(),
        custom_prefix.clone(),
        hex.clone(),
        hex.to_uppercase(),
        // Truncated: a kept prefix of it.
        marker[..12].to_owned(),
        custom_prefix[..12].to_owned(),
        hex[..24].to_owned(),
    ];
    for (place, text) in [
        ("watch", &outputs[0]),
        ("redisctl stats", &stats_json),
        ("GetStats", &stats_grpc),
        ("/metrics", &metrics),
        ("daemon log", &log),
    ] {
        for form in &forms {
            assert!(
                !text.contains(form.as_str()),
                "{place} holds the secret as {form:?}"
            );
        }
    }
}

/// Each Watch stream costs a filter pass per command and a queue: the daemon takes at most
/// `--max-subscribers` of them and refuses more with RESOURCE_EXHAUSTED, a place coming back when
/// a stream ends; and it refuses filter lists it would judge every event against without bound.
#[test]
fn the_api_bounds_watch_streams_and_filters() {
    let _turn = exclusive();
    let d = daemon();
    let open = status().subscribers;
    runtime().block_on(async {
        let mut client = client(&d.grpc).await.expect("connect");
        let mut streams = Vec::new();
        for _ in open..MAX_SUBSCRIBERS {
            let stream = client.watch(v1::WatchRequest::default()).await;
            streams.push(stream.expect("a free place").into_inner());
        }
        let refused = client
            .watch(v1::WatchRequest::default())
            .await
            .expect_err("one stream too many");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        drop(streams.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client.watch(v1::WatchRequest::default()).await {
                Ok(stream) => {
                    streams.push(stream.into_inner());
                    break;
                }
                Err(status) => assert!(
                    status.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline,
                    "the place of an ended stream never came back: {status}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let too_many = v1::GetStatsRequest {
            allow: vec![v1::Filter::default(); 33],
            ..Default::default()
        };
        let refused = client.get_stats(too_many).await.expect_err("33 filters");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        let huge = v1::WatchRequest {
            deny: vec![v1::Filter {
                labels: "a".repeat(5000),
                ..Default::default()
            }],
            ..Default::default()
        };
        let refused = client.watch(huge).await.expect_err("a 5 KB filter");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    });
}

#[test]
fn redisctl_stats_json_equals_get_stats_from_grpcurl() {
    let _turn = exclusive();
    let d = daemon();
    let server = RedisServer::start(&[]);
    for args in [
        &["SET", "k", "1"][..],
        &["GET", "k"],
        &["GET", "k"],
        &["INCR", "k"],
        &["HSET", "k", "f", "v"],
    ] {
        server.cli(args);
    }
    wait_for_server_calls(
        server.pid(),
        &[("set", 1), ("get", 2), ("incr", 1), ("hset", 1)],
    );
    let pid = server.pid().to_string();
    let out = redisctl()
        .args(["stats", "-o", "json", "--pid", &pid])
        .output()
        .expect("redisctl stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Value = serde_json::from_str(&stdout(&out)).expect("one JSON array");
    let request = format!("{{\"allow\": [{{\"pid\": {pid}}}]}}");
    let theirs: Value = serde_json::from_str(&stdout(&grpcurl(&[
        "-emit-defaults",
        "-d",
        &request,
        &d.grpc,
        "respwatch.v1.Observer/GetStats",
    ])))
    .expect("grpcurl JSON");
    let ours: BTreeSet<String> = ours
        .as_array()
        .expect("array")
        .iter()
        .map(|r| format!("{:?}", normalise_row(r)))
        .collect();
    let theirs: BTreeSet<String> = theirs["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| format!("{:?}", normalise_grpcurl_row(r)))
        .collect();
    assert_eq!(ours, theirs, "redisctl stats -o json vs grpcurl GetStats");
    // Both sides of each call: redis-cli (client) and redis-server (server) rows, with Redis'
    // own meaning: HSET on a string is a failed call with a WRONGTYPE error.
    let rows = stats(v1::GetStatsRequest {
        allow: vec![v1::Filter {
            pid: server.pid(),
            ..Default::default()
        }],
        group_by: vec![v1::GroupBy::Command as i32],
        ..Default::default()
    });
    let by_command: BTreeMap<&str, &v1::StatsRow> =
        rows.iter().map(|r| (r.command.as_str(), r)).collect();
    assert_eq!(by_command["get"].calls, 2);
    assert_eq!(by_command["hset"].failed_calls, 1);
    assert_eq!(by_command["hset"].errors.get("WRONGTYPE"), Some(&1));
    let info = server.info("commandstats");
    assert!(
        info["cmdstat_get"].starts_with("calls=2,"),
        "{:?}",
        info["cmdstat_get"]
    );
    assert_eq!(ours.len(), rows.len());
}

#[test]
fn prometheus_scrapes_the_same_totals_as_get_stats() {
    let _turn = exclusive();
    let d = daemon();
    let server = RedisServer::start(&[]);
    server.benchmark(&["-n", "500", "-c", "5", "-t", "set,get"]);
    server.cli(&["LPUSH", "key:__rand_int__", "x"]);
    let pid = server.pid();
    wait_for_server_calls(pid, &[("set", 500), ("get", 500), ("lpush", 1)]);
    std::thread::sleep(Duration::from_millis(300));
    let rows = server_rows(pid);
    let calls: u64 = rows.iter().map(|r| r.calls).sum();
    let failed: u64 = rows.iter().map(|r| r.failed_calls).sum();
    let bytes_in: u64 = rows.iter().map(|r| r.bytes_in).sum();
    assert_eq!(failed, 1, "LPUSH on a string key");

    // promtool accepts the exposition.
    let exposition = http_get(&d.metrics, "/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; run scripts/bootstrap.sh)");
    std::io::Write::write_all(
        promtool.stdin.as_mut().expect("stdin"),
        exposition.as_bytes(),
    )
    .expect("write");
    drop(promtool.stdin.take());
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A real Prometheus scraping every second.
    let dir = std::env::temp_dir().join(format!("respwatch-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: respwatch\n    static_configs:\n      - targets: ['{}']\n",
            d.metrics
        ),
    )
    .expect("config");
    let web = format!("127.0.0.1:{}", free_port());
    let mut prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package; run scripts/bootstrap.sh)"),
    );
    let query = |promql: &str| -> Option<f64> {
        let body = std::panic::catch_unwind(|| {
            http_get(&web, &format!("/api/v1/query?query={}", url_encode(promql)))
        })
        .ok()?;
        let value: Value = serde_json::from_str(&body).ok()?;
        value["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    let selector = format!("{{pid=\"{pid}\",role=\"server\"}}");
    let deadline = Instant::now() + WAIT;
    let mut seen = None;
    while Instant::now() < deadline {
        seen = query(&format!("sum(respwatch_commands_total{selector})"));
        if seen == Some(calls as f64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = prometheus.0.try_wait();
    assert_eq!(seen, Some(calls as f64), "PromQL total vs GetStats calls");
    assert_eq!(
        query(&format!("sum(respwatch_command_failed_total{selector})")),
        Some(failed as f64)
    );
    assert_eq!(
        query(&format!("sum(respwatch_command_in_bytes_total{selector})")),
        Some(bytes_in as f64)
    );
    assert_eq!(
        query(&format!(
            "sum(respwatch_errors_total{{pid=\"{pid}\",role=\"server\",prefix=\"WRONGTYPE\"}})"
        )),
        Some(1.0)
    );
    assert_eq!(
        query(&format!(
            "sum(respwatch_command_duration_seconds_count{selector})"
        )),
        Some(calls as f64)
    );
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_grpcurl_example_runs_green() {
    let _turn = exclusive();
    let d = daemon();
    let server = RedisServer::start(&[]);
    server.cli(&["SET", "s", "1"]);
    let examples = repo_root().join("grpcurl-examples");
    let run = |script: &str, args: &[&str]| {
        Command::new("bash")
            .arg(examples.join(script))
            .args(args)
            .env("SERVER", &d.grpc)
            .env("GRPCURL", grpcurl_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("example")
    };
    let finish = |child: std::process::Child, script: &str| {
        let out = child.wait_with_output().expect("example output");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    };
    let listed = finish(run("list-services.sh", &[]), "list-services.sh");
    for service in [
        "respwatch.v1.Observer",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} in {listed}"
        );
    }
    let described = finish(run("describe.sh", &[]), "describe.sh");
    assert!(described.contains(
        "rpc Watch ( .respwatch.v1.WatchRequest ) returns ( stream .respwatch.v1.WatchResponse )"
    ));
    assert!(described.contains("min_latency_usec"));
    assert_eq!(
        finish(run("health.sh", &[]), "health.sh")
            .matches("\"SERVING\"")
            .count(),
        2
    );
    assert!(finish(run("status.sh", &[]), "status.sh").contains("\"node\": \"api-test\""));
    let by_pod: Value =
        serde_json::from_str(&finish(run("stats-by-pod.sh", &[]), "stats-by-pod.sh"))
            .expect("json");
    assert!(
        by_pod["rows"]
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["command"] == "set"))
    );

    // The streaming ones, with traffic while they run.
    let before = status().subscribers;
    let host = run("watch-namespace.sh", &["", "4"]);
    let errors = run("errors-only.sh", &["4"]);
    let slow = run("slow-commands.sh", &["100000", "4"]);
    wait_for_subscribers(before + 3);
    server.cli(&["SET", "host-key", "1"]);
    server.cli(&["LPUSH", "host-key", "x"]);
    // DEBUG SLEEP 0.15: a 150 ms command, above the 100 ms threshold.
    server.cli(&["DEBUG", "SLEEP", "0.15"]);
    let host = finish(host, "watch-namespace.sh");
    assert!(host.contains("\"key\": \"host-key\""), "{host}");
    let errors = finish(errors, "errors-only.sh");
    assert!(
        errors.contains("\"errorPrefix\": \"WRONGTYPE\""),
        "{errors}"
    );
    assert!(
        !errors.contains("\"command\": \"set\""),
        "only errors: {errors}"
    );
    let slow = finish(slow, "slow-commands.sh");
    assert!(slow.contains("\"command\": \"debug\""), "{slow}");
    assert!(
        !slow.contains("\"command\": \"set\""),
        "only slow commands: {slow}"
    );
}

#[test]
fn a_stalled_subscriber_loses_exactly_counted_events_and_stalls_nobody() {
    let _turn = exclusive();
    let d = daemon();
    let server = RedisServer::start(&[]);
    const N: u64 = 30_000;
    let filter = v1::Filter {
        pid: server.pid(),
        role: v1::Role::Server as i32,
        command: "set".into(),
        ..Default::default()
    };
    let request = v1::WatchRequest {
        allow: vec![filter],
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (received, lost, sequences_ok, active) = runtime.block_on(async {
        let before = status_of(&d.grpc).await.subscribers;
        let mut stalled = narrow_client(&d.grpc)
            .await
            .watch(request.clone())
            .await
            .expect("watch")
            .into_inner();
        let mut reader = client(&d.grpc)
            .await
            .expect("connect")
            .watch(request)
            .await
            .expect("watch")
            .into_inner();
        // The active subscriber reads everything as it comes.
        let active = tokio::spawn(async move {
            let (mut events, mut lost) = (0u64, 0u64);
            while events + lost < N {
                match tokio::time::timeout(WAIT, reader.message()).await {
                    Ok(Ok(Some(message))) => match message.kind {
                        Some(Kind::Event(_)) => events += 1,
                        Some(Kind::LostEvents(l))
                            if l.source == v1::LossSource::SubscriberQueue as i32 =>
                        {
                            lost += l.count
                        }
                        _ => {}
                    },
                    _ => break,
                }
            }
            (events, lost)
        });
        let deadline = Instant::now() + WAIT;
        loop {
            if status_of(&d.grpc).await.subscribers >= before + 2 {
                break;
            }
            assert!(Instant::now() < deadline, "subscribers did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // N SETs while the stalled stream is not read at all.
        let port = server.port.to_string();
        let n = N.to_string();
        let bench = tokio::process::Command::new("redis-benchmark")
            .args(["-p", &port, "-q", "-n", &n, "-c", "10", "-t", "set"])
            .output()
            .await
            .expect("redis-benchmark");
        assert!(bench.status.success());
        // Capture kept up: the aggregation has every SET (the stalled stream did not slow it).
        let deadline = Instant::now() + WAIT;
        loop {
            let calls = tokio::task::spawn_blocking({
                let pid = server.pid();
                move || server_calls(pid).get("set").copied().unwrap_or_default()
            })
            .await
            .expect("stats");
            if calls == N {
                break;
            }
            assert!(
                calls <= N && Instant::now() < deadline,
                "set calls in stats: {calls}, expected {N}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let active = active.await.expect("active reader");
        // Now read the stalled stream: what it queued, then the loss notice.
        let (mut received, mut lost, mut expected_sequence, mut sequences_ok) =
            (0u64, 0u64, 1u64, true);
        while received + lost < N {
            match tokio::time::timeout(Duration::from_secs(5), stalled.message()).await {
                Ok(Ok(Some(message))) => {
                    sequences_ok &= message.sequence == expected_sequence;
                    expected_sequence += 1;
                    match message.kind {
                        Some(Kind::Event(_)) => received += 1,
                        Some(Kind::LostEvents(l)) => {
                            assert_eq!(l.source, v1::LossSource::SubscriberQueue as i32, "{l:?}");
                            lost += l.count;
                        }
                        None => {}
                    }
                }
                _ => break,
            }
        }
        (received, lost, sequences_ok, active)
    });
    assert_eq!(
        active,
        (N, 0),
        "the reading subscriber got every event and lost none"
    );
    assert!(
        lost > 0,
        "the stalled subscriber should have lost events (received {received})"
    );
    assert!(
        received >= WATCH_QUEUE as u64,
        "it still gets what was queued: {received}"
    );
    assert_eq!(
        received + lost,
        N,
        "received {received} + lost {lost} == generated"
    );
    assert!(
        sequences_ok,
        "sequence numbers are 1, 2, 3... over events and notices"
    );
    let drops = status()
        .losses
        .iter()
        .find(|l| l.reason == "dropped")
        .map(|l| l.count)
        .unwrap_or_default();
    assert!(
        drops >= lost,
        "status reports subscriber queue drops: {drops}"
    );
}

#[test]
fn top_once_and_status_show_the_traffic() {
    let _turn = exclusive();
    daemon();
    let server = RedisServer::start(&[]);
    server.benchmark(&["-n", "300", "-c", "3", "-t", "incr"]);
    wait_for("incr calls", || {
        server_calls(server.pid()).get("incr").copied() == Some(300)
    });
    let pid = server.pid().to_string();
    let out = redisctl()
        .args([
            "top", "--once", "--pid", &pid, "--role", "server", "--window", "60s",
        ])
        .output()
        .expect("top");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen = stdout(&out);
    eprintln!("--- redisctl top --once ---\n{screen}");
    let first = screen.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("respwatch top - node api-test"),
        "{first}"
    );
    let incr = screen
        .lines()
        .find(|l| l.contains(" incr "))
        .unwrap_or_else(|| panic!("incr row in {screen}"));
    let cols: Vec<&str> = incr.split_whitespace().collect();
    assert_eq!(
        &cols[..3],
        &[format!("redis-server[{pid}]").as_str(), "server", "incr"]
    );
    assert_eq!(cols[4], "300", "calls over the window");
    assert!(
        !screen.contains('\x1b'),
        "no colour or screen control when not a terminal"
    );

    let out = redisctl()
        .args(["status", "-o", "json"])
        .output()
        .expect("status");
    assert!(out.status.success());
    let status: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(status["node"], "api-test");
    assert_eq!(status["kubernetes_sync"], "disabled");
    assert_eq!(
        status["attached_programs"].as_array().map(Vec::len),
        Some(3),
        "cgroup_skb ingress and egress, sockops"
    );
    assert!(status["events"].as_u64().unwrap_or_default() >= 600);
    let sources: BTreeSet<&str> = status["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .filter_map(|l| l["source"].as_str())
        .collect();
    assert_eq!(
        sources,
        BTreeSet::from(["ring_buffer", "decoder_desync", "subscriber_queue"])
    );
}

#[test]
fn reflection_v1_and_health_answer() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let d = daemon();
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", d.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection v1")
            .into_inner();
        let response = responses
            .message()
            .await
            .expect("message")
            .expect("a response");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("{response:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"respwatch.v1.Observer".to_owned()),
            "{names:?}"
        );
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let check = tonic_health::pb::HealthCheckRequest {
            service: "respwatch.v1.Observer".into(),
        };
        let serving = health
            .check(check)
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(
            serving,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    });
}

#[test]
fn redisctl_says_clearly_when_the_daemon_is_unreachable() {
    let path = redisctl_path();
    let closed = format!("127.0.0.1:{}", free_port());
    for sub in [&["status"][..], &["stats"], &["watch"], &["top", "--once"]] {
        let out = Command::new(&path)
            .args(["--server", &closed])
            .args(sub)
            .output()
            .expect("redisctl");
        assert_eq!(out.status.code(), Some(1), "{sub:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("cannot reach respwatchd at {closed}"))
                && err.contains("--server"),
            "{err}"
        );
    }
    let socket = Path::new("/nonexistent/respwatch.sock");
    let out = Command::new(&path)
        .args(["--server", &format!("unix:{}", socket.display()), "status"])
        .output()
        .expect("redisctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot reach respwatchd at unix:/nonexistent/respwatch.sock")
    );
    // Bad flags: clap's usage errors (exit 2).
    for bad in [
        &["stats", "--sort", "fastest"][..],
        &["watch", "--min-latency", "5 parsecs"],
        &["watch", "--role", "proxy"],
        &["frobnicate"],
    ] {
        let out = Command::new(&path).args(bad).output().expect("redisctl");
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("error:"),
            "{bad:?}"
        );
    }
    let help = Command::new(&path)
        .args(["watch", "--help"])
        .output()
        .expect("help");
    assert!(stdout(&help).contains("Examples:"));
}

/// Server-role rows of one process by command: (calls, rejected, failed).
fn server_counts(pid: u32) -> BTreeMap<String, (u64, u64, u64)> {
    server_rows(pid)
        .into_iter()
        .map(|row| {
            (
                row.command,
                (row.calls, row.rejected_calls, row.failed_calls),
            )
        })
        .collect()
}

fn loss(status: &v1::GetStatusResponse, reason: &str) -> u64 {
    status
        .losses
        .iter()
        .filter(|l| l.reason == reason)
        .map(|l| l.count)
        .sum()
}

/// The burst that overflowed the old capture's ring, ten times in a row against the daemon as
/// shipped (default 64 MiB ring): redis-benchmark -P 16 over 14 tests, then 300 × 100 KB
/// values. Every run is exact against INFO commandstats, and no byte is lost.
#[test]
fn ten_bursts_in_a_row_stay_exact_on_the_default_ring() {
    let _turn = exclusive();
    daemon();
    let before = status();
    for run in 1..=10 {
        let server = RedisServer::start(&[]);
        server.benchmark(&[
            "-n",
            "20000",
            "-c",
            "20",
            "-P",
            "16",
            "-t",
            "set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,zadd,zpopmin,lrange_100,mset",
        ]);
        server.benchmark(&["-n", "300", "-c", "4", "-d", "100000", "-t", "set,get"]);
        let mut redis = server.command_counts();
        // The INFO call just made: Redis counts it after answering, the daemon sees it.
        redis.entry("info".to_owned()).or_default().0 += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ours = server_counts(server.pid());
            if ours == redis {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "burst {run} of 10: the daemon's rows differ from INFO commandstats\n\
                 redis {redis:?}\nours  {ours:?}\nstatus {:?}",
                status()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let after = status();
    assert_eq!(after.lost_bytes, before.lost_bytes, "stream bytes lost");
    assert_eq!(
        loss(&after, "ring_full"),
        loss(&before, "ring_full"),
        "records lost to a full ring"
    );
    assert_eq!(
        loss(&after, "desync"),
        loss(&before, "desync"),
        "decoder desyncs"
    );
}

/// Events reach a subscriber in time order, whichever CPU saw them: the server pinned to one
/// CPU, redis-benchmark to the other, 50,000 SETs watched on both sides (100,000 events).
#[test]
fn watch_delivers_events_of_both_cpus_in_time_order() {
    let _turn = exclusive();
    let d = daemon();
    let server = RedisServer::start(&[]);
    let pin = |cpu: &str, pid: u32| {
        let out = Command::new("taskset")
            .args(["-a", "-p", "-c", cpu, &pid.to_string()])
            .output()
            .expect("taskset");
        assert!(out.status.success(), "taskset: {out:?}");
    };
    pin("0", server.pid());
    const COMMANDS: usize = 50_000;
    let request = v1::WatchRequest {
        allow: vec![v1::Filter {
            key_prefix: "order:".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let runtime = runtime();
    let (times, lost) = runtime.block_on(async {
        let before = status_of(&d.grpc).await.subscribers;
        let mut stream = client(&d.grpc)
            .await
            .expect("connect")
            .watch(request)
            .await
            .expect("watch")
            .into_inner();
        let reader = tokio::spawn(async move {
            let (mut times, mut lost) = (Vec::with_capacity(2 * COMMANDS), 0u64);
            while times.len() as u64 + lost < 2 * COMMANDS as u64 {
                match tokio::time::timeout(Duration::from_secs(20), stream.message()).await {
                    Ok(Ok(Some(message))) => match message.kind {
                        Some(Kind::Event(event)) => {
                            let time = event.time.expect("event time");
                            times.push((time.seconds, time.nanos));
                        }
                        Some(Kind::LostEvents(notice)) => lost += notice.count,
                        _ => {}
                    },
                    _ => break,
                }
            }
            (times, lost)
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while status_of(&d.grpc).await.subscribers < before + 1 {
            assert!(Instant::now() < deadline, "the Watch never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let port = server.port.to_string();
        tokio::task::spawn_blocking(move || {
            let out = Command::new("taskset")
                .args(["-c", "1", "redis-benchmark", "-p", &port, "-q", "-c", "1"])
                .args([
                    "-n",
                    &COMMANDS.to_string(),
                    "SET",
                    "order:__rand_int__",
                    "v",
                ])
                .output()
                .expect("redis-benchmark");
            assert!(out.status.success(), "redis-benchmark: {out:?}");
        })
        .await
        .expect("benchmark");
        reader.await.expect("reader")
    });
    assert!(
        times.len() >= COMMANDS,
        "{} events and {lost} lost of {}",
        times.len(),
        2 * COMMANDS
    );
    let out_of_order = times.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(out_of_order, 0, "of {} events", times.len());
}

/// Readers never hold up capture: while redis-benchmark runs, one thread asks GetStats (all
/// rows, and a 60-second window) and scrapes `/metrics` in a loop, and two other scrapers ask
/// for `/metrics` and never read the answer (their receive windows are tiny). The daemon counts
/// every call as Redis does, loses no record and no stream byte, and its pipeline's lag (the
/// oldest record's age when its batch was handled) stays under a second.
#[test]
fn readers_and_stalled_scrapers_do_not_hold_up_capture() {
    use std::{
        io::Write,
        sync::atomic::{AtomicBool, Ordering},
    };
    let _turn = exclusive();
    let d = daemon();
    let before = status();
    let server = RedisServer::start(&[]);
    let stalled: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let socket = std::net::TcpStream::connect(&d.metrics).expect("connect");
            let rcvbuf: libc::c_int = 1024;
            // SAFETY: setsockopt on a socket this test owns, with a c_int option value.
            let set = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    std::ptr::addr_of!(rcvbuf).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(set, 0);
            (&socket)
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("ask");
            socket
        })
        .collect();
    let done = AtomicBool::new(false);
    let (reads, lag) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let (mut reads, mut lag) = (0u32, 0f64);
            while !done.load(Ordering::Relaxed) {
                stats(v1::GetStatsRequest::default());
                stats(v1::GetStatsRequest {
                    window_seconds: 60,
                    ..Default::default()
                });
                let text = http_get(&d.metrics, "/metrics");
                let seen = text
                    .lines()
                    .find_map(|line| line.strip_prefix("respwatch_pipeline_lag_seconds "))
                    .and_then(|value| value.parse::<f64>().ok())
                    .expect("respwatch_pipeline_lag_seconds");
                lag = lag.max(seen);
                reads += 1;
            }
            (reads, lag)
        });
        server.benchmark(&["-n", "100000", "-c", "20", "-P", "4", "-t", "set,get"]);
        done.store(true, Ordering::Relaxed);
        reader.join().expect("reader")
    });
    let mut redis = server.command_counts();
    // The INFO call just made: Redis counts it after answering, the daemon sees it.
    redis.entry("info".to_owned()).or_default().0 += 1;
    wait_for("every call counted as Redis counts it", || {
        server_counts(server.pid()) == redis
    });
    drop(stalled);
    let after = status();
    eprintln!("{reads} rounds of reads; the pipeline's largest lag {lag:.3} s");
    assert!(
        reads >= 5,
        "only {reads} rounds of reads while the benchmark ran"
    );
    assert!(lag < 1.0, "the pipeline lagged {lag} s behind the rings");
    assert_eq!(after.lost_bytes, before.lost_bytes, "stream bytes lost");
    assert_eq!(
        loss(&after, "ring_full"),
        loss(&before, "ring_full"),
        "records lost to a full ring"
    );
}
