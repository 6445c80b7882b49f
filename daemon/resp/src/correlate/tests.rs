use super::*;
use Direction::{Egress, Ingress};

/// Server-side correlator fed request/reply pairs: `(dir, bytes)` at increasing timestamps.
fn run(steps: &[(Direction, &[u8])]) -> (Correlator, Vec<Output>) {
    let mut c = Correlator::new();
    let mut out = Vec::new();
    for (i, (dir, bytes)) in steps.iter().enumerate() {
        c.feed(*dir, (i as u64 + 1) * 1000, bytes, 0, &mut out);
    }
    (c, out)
}

fn exchanges(out: &[Output]) -> Vec<&Exchange> {
    out.iter()
        .filter_map(|o| match o {
            Output::Exchange(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn summary(out: &[Output]) -> Vec<(String, Outcome, bool)> {
    exchanges(out)
        .iter()
        .map(|e| (e.command.to_string(), e.outcome, e.counted))
        .collect()
}

fn s(name: &str, o: Outcome, c: bool) -> (String, Outcome, bool) {
    (name.to_owned(), o, c)
}

#[test]
fn simple_server_exchange_with_latency_and_key() {
    let (c, out) = run(&[
        (Ingress, b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n"),
        (Egress, b"$3\r\nbar\r\n"),
    ]);
    assert_eq!(c.role(), Some(Role::Server));
    let e = exchanges(&out);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].command, "get");
    assert_eq!(e[0].first_key.as_deref(), Some(&b"foo"[..]));
    assert_eq!((e[0].request_ts_ns, e[0].reply_ts_ns), (1000, 2000));
    assert_eq!((e[0].request_bytes, e[0].reply_bytes), (22, 9));
    assert_eq!(e[0].outcome, Outcome::Ok);
}

#[test]
fn client_role_detected_from_reply_direction() {
    let (c, out) = run(&[(Egress, b"*1\r\n$4\r\nPING\r\n"), (Ingress, b"+PONG\r\n")]);
    assert_eq!(c.role(), Some(Role::Client));
    assert_eq!(summary(&out), vec![s("ping", Outcome::Ok, true)]);
}

#[test]
fn role_waits_while_both_sides_look_like_commands() {
    // LRANGE-like reply of bulk strings is command-shaped: not enough to decide.
    let (c, out) = run(&[(Egress, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")]);
    assert_eq!(c.role(), None);
    assert!(out.is_empty());
}

#[test]
fn command_shaped_replies_decide_by_who_spoke_first() {
    // LRANGE's reply is an array of bulk strings too; the request came first.
    let lrange: &[u8] = b"*4\r\n$6\r\nLRANGE\r\n$1\r\nl\r\n$1\r\n0\r\n$1\r\n1\r\n";
    let reply: &[u8] = b"*2\r\n$3\r\nxxx\r\n$3\r\nyyy\r\n";
    let (server, out) = run(&[(Ingress, lrange), (Egress, reply)]);
    assert_eq!(server.role(), Some(Role::Server));
    assert_eq!(summary(&out), vec![s("lrange", Outcome::Ok, true)]);
    let (client, out) = run(&[
        (Egress, lrange),
        (Ingress, reply),
        (Egress, lrange),
        (Ingress, reply),
    ]);
    assert_eq!(client.role(), Some(Role::Client));
    assert_eq!(
        summary(&out),
        vec![
            s("lrange", Outcome::Ok, true),
            s("lrange", Outcome::Ok, true)
        ]
    );
}

#[test]
fn pipelining_pairs_in_order() {
    let (_, out) = run(&[
        (Ingress, b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*2\r\n$4\r\nINCR\r\n$1\r\na\r\n*2\r\n$5\r\nLPUSH\r\n$1\r\na\r\n"),
        (Egress, b"+OK\r\n:2\r\n-ERR wrong number of arguments for 'lpush' command\r\n"),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("set", Outcome::Ok, true),
            s("incr", Outcome::Ok, true),
            s("lpush", Outcome::Rejected, true)
        ]
    );
    let depths: Vec<u32> = exchanges(&out).iter().map(|e| e.pipeline_depth).collect();
    assert_eq!(depths, vec![1, 2, 3]);
}

#[test]
fn multi_exec_emits_each_queued_command_with_its_outcome() {
    // Bytes as redis-server 7.0.15 sends them.
    let (_, out) = run(&[
        (Ingress, b"*1\r\n$5\r\nMULTI\r\n"),
        (Egress, b"+OK\r\n"),
        (Ingress, b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\nb\r\n"),
        (Egress, b"+QUEUED\r\n"),
        (Ingress, b"*3\r\n$5\r\nLPUSH\r\n$1\r\na\r\n$1\r\nx\r\n"),
        (Egress, b"+QUEUED\r\n"),
        (Ingress, b"*2\r\n$4\r\nINCR\r\n$1\r\na\r\n"),
        (Egress, b"+QUEUED\r\n"),
        (Ingress, b"*1\r\n$4\r\nEXEC\r\n"),
        (Egress, b"*3\r\n+OK\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n-ERR value is not an integer or out of range\r\n"),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("multi", Outcome::Ok, true),
            s("set", Outcome::Ok, true),
            s("lpush", Outcome::Failed, true),
            s("incr", Outcome::Failed, true),
            s("exec", Outcome::Ok, true),
        ]
    );
    let e = exchanges(&out);
    assert!(e[1].in_transaction && e[3].in_transaction && !e[4].in_transaction);
    assert_eq!(e[2].error.as_ref().map(|x| &*x.prefix), Some("WRONGTYPE"));
    assert_eq!(e[3].reply_ts_ns, 10_000);
}

#[test]
fn execabort_counts_like_redis() {
    // Verified on 7.0.15: set rejected (arity), unknown command only in errorstats,
    // the queued SET is never counted, EXEC is a failed call.
    let (_, out) = run(&[
        (Ingress, b"MULTI\r\nSET k\r\nFOO\r\nSET a b\r\nEXEC\r\n"),
        (Egress, b"+OK\r\n-ERR wrong number of arguments for 'set' command\r\n-ERR unknown command 'FOO', with args beginning with: \r\n+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n"),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("multi", Outcome::Ok, true),
            s("set", Outcome::Rejected, true),
            s("foo", Outcome::Rejected, false),
            s("set", Outcome::Discarded, false),
            s("exec", Outcome::Failed, true),
        ]
    );
}

#[test]
fn watch_abort_and_discard_discard_queued_commands() {
    let (_, out) = run(&[
        (
            Ingress,
            b"MULTI\r\nINCR a\r\nEXEC\r\nMULTI\r\nINCR b\r\nDISCARD\r\n",
        ),
        (
            Egress,
            b"+OK\r\n+QUEUED\r\n*-1\r\n+OK\r\n+QUEUED\r\n+OK\r\n",
        ),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("multi", Outcome::Ok, true),
            s("incr", Outcome::Discarded, false),
            s("exec", Outcome::Ok, true),
            s("multi", Outcome::Ok, true),
            s("incr", Outcome::Discarded, false),
            s("discard", Outcome::Ok, true),
        ]
    );
}

#[test]
fn subscribe_confirmations_and_pushed_messages() {
    let (_, out) = run(&[
        (Ingress, b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n"),
        (Egress, b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"),
        (Egress, b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"),
        (Egress, b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n"),
        (Ingress, b"*1\r\n$4\r\nPING\r\n"),
        (Egress, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
        (Ingress, b"*1\r\n$11\r\nUNSUBSCRIBE\r\n"),
        (Egress, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n"),
        (Ingress, b"*1\r\n$11\r\nUNSUBSCRIBE\r\n"),
        (Egress, b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("subscribe", Outcome::Ok, true),
            s("ping", Outcome::Ok, true),
            s("unsubscribe", Outcome::Ok, true),
            s("unsubscribe", Outcome::Ok, true),
        ]
    );
    let e = exchanges(&out);
    assert_eq!(e[0].reply_kind, ReplyKind::Confirmations(2));
    assert_eq!(e[0].reply_ts_ns, 3000);
    assert_eq!(e[2].reply_kind, ReplyKind::Confirmations(2));
    let pushes: Vec<&Push> = out
        .iter()
        .filter_map(|o| match o {
            Output::Push(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].kind, PushKind::Message);
    assert_eq!(pushes[0].channel.as_deref(), Some(&b"a"[..]));
}

#[test]
fn resp3_push_frames_are_never_replies() {
    let (_, out) = run(&[
        (Ingress, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"),
        (Egress, b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
        (Ingress, b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        (Egress, b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n"),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("hello", Outcome::Ok, true),
            s("subscribe", Outcome::Ok, true),
            s("get", Outcome::Ok, true)
        ]
    );
    assert_eq!(
        exchanges(&out)[2].reply_kind,
        ReplyKind::Frame(Kind::BulkString)
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Push(p) if p.kind == PushKind::Message))
    );
}

#[test]
fn client_reply_off_and_skip() {
    let (_, out) = run(&[
        (Ingress, b"CLIENT REPLY SKIP\r\nSET a 1\r\nGET a\r\n"),
        (Egress, b"$1\r\n1\r\n"),
        (
            Ingress,
            b"CLIENT REPLY OFF\r\nSET a 2\r\nCLIENT REPLY ON\r\n",
        ),
        (Egress, b"+OK\r\n"),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("client|reply", Outcome::Unknown, true),
            s("set", Outcome::Unknown, true),
            s("get", Outcome::Ok, true),
            s("client|reply", Outcome::Unknown, true),
            s("set", Outcome::Unknown, true),
            s("client|reply", Outcome::Ok, true),
        ]
    );
    assert_eq!(exchanges(&out)[1].reply_kind, ReplyKind::NoReply);
}

#[test]
fn monitor_output_is_push() {
    let (_, out) = run(&[
        (Ingress, b"MONITOR\r\n"),
        (
            Egress,
            b"+OK\r\n+1700000000.123456 [0 127.0.0.1:5000] \"get\" \"k\"\r\n",
        ),
        (Ingress, b"RESET\r\n"),
        (
            Egress,
            b"+1700000000.223456 [0 127.0.0.1:5000] \"ping\"\r\n+RESET\r\n",
        ),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("monitor", Outcome::Ok, true),
            s("reset", Outcome::Ok, true)
        ]
    );
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::Push(p) if p.kind == PushKind::Monitor))
            .count(),
        2
    );
}

#[test]
fn unknown_subcommand_not_counted() {
    let (_, out) = run(&[
        (Ingress, b"CONFIG FOO\r\nCONFIG\r\n"),
        (Egress, b"-ERR unknown subcommand 'FOO'. Try CONFIG HELP.\r\n-ERR wrong number of arguments for 'config' command\r\n"),
    ]);
    assert_eq!(
        summary(&out),
        vec![
            s("config|foo", Outcome::Rejected, false),
            s("config", Outcome::Rejected, true)
        ]
    );
}

#[test]
fn close_reports_unanswered() {
    let (mut c, mut out) = run(&[
        (Ingress, b"BLPOP q 0\r\n"),
        (Egress, b"+OK\r\n"),
        (Ingress, b"BLPOP q 0\r\n"),
    ]);
    c.close(9000, &mut out);
    let un: Vec<&Unanswered> = out
        .iter()
        .filter_map(|o| match o {
            Output::Unanswered(u) => Some(u),
            _ => None,
        })
        .collect();
    assert_eq!(un.len(), 1);
    assert_eq!(un[0].command, "blpop");
    assert_eq!(un[0].reason, UnansweredReason::Closed);
}

#[test]
fn desync_flushes_and_pairing_recovers() {
    let mut c = Correlator::new();
    let mut out = Vec::new();
    c.feed(Ingress, 1, b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n", 0, &mut out);
    c.feed(Egress, 2, b"$5\r\nhello\r\n", 0, &mut out);
    c.feed(Ingress, 3, b"*2\r\n$3\r\nGET\r\n$1\r\nb\r\n", 0, &mut out);
    c.lose(Egress, 4, 100, &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Desync { dir: Egress, .. }))
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Unanswered(u) if u.reason == UnansweredReason::Desync))
    );
    c.feed(Egress, 5, b"$3\r\nold\r\n", 0, &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::UnmatchedReply { .. }))
    );
    c.feed(Ingress, 6, b"*1\r\n$4\r\nPING\r\n", 0, &mut out);
    c.feed(Egress, 7, b"+PONG\r\n", 0, &mut out);
    let names: Vec<String> = exchanges(&out)
        .iter()
        .map(|e| e.command.to_string())
        .collect();
    assert_eq!(names, vec!["get", "ping"]);
}

#[test]
fn mid_stream_attach_does_not_pair_old_replies() {
    let mut c = Correlator::mid_stream();
    let mut out = Vec::new();
    c.feed(Egress, 10, b"$3\r\nold\r\n", 0, &mut out);
    c.feed(Egress, 11, b"+OK\r\n", 0, &mut out);
    c.feed(Ingress, 12, b"*1\r\n$4\r\nPING\r\n", 0, &mut out);
    c.feed(Egress, 13, b"+PONG\r\n", 0, &mut out);
    assert_eq!(summary(&out), vec![s("ping", Outcome::Ok, true)]);
}

/// A replica's link to its master, seen from the master (server role): the handshake is
/// request/reply, then the master's side is the replication stream and the replica's
/// `REPLCONF ACK`s get no reply.
#[test]
fn a_replication_link_counts_the_handshake_and_acks_but_not_the_stream() {
    let mut stream = b"+FULLRESYNC 8371b4fb1155b71f4a04d3e1bc3e18c4a990aeeb 0\r\n\n".to_vec();
    stream.extend_from_slice(b"$EOF:0123456789abcdef0123456789abcdef01234567\r\nREDIS...");
    stream.extend_from_slice(b"0123456789abcdef0123456789abcdef01234567");
    stream.extend_from_slice(
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
    );
    let (c, out) = run(&[
        (Ingress, b"*1\r\n$4\r\nPING\r\n"),
        (Egress, b"+PONG\r\n"),
        (
            Ingress,
            b"*3\r\n$8\r\nREPLCONF\r\n$14\r\nlistening-port\r\n$4\r\n6380\r\n",
        ),
        (Egress, b"+OK\r\n"),
        (Ingress, b"*3\r\n$5\r\nPSYNC\r\n$1\r\n?\r\n$2\r\n-1\r\n"),
        (Egress, &stream),
        (
            Ingress,
            b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$3\r\n123\r\n",
        ),
        (Egress, b"*1\r\n$4\r\nPING\r\n"),
    ]);
    assert_eq!(c.role(), Some(Role::Server));
    assert_eq!(
        summary(&out),
        vec![
            s("ping", Outcome::Ok, true),
            s("replconf", Outcome::Ok, true),
            s("psync", Outcome::Ok, true),
            s("replconf", Outcome::Unknown, true),
        ]
    );
    let replicated: Vec<Option<&str>> = out
        .iter()
        .filter_map(|o| match o {
            Output::Replication { command, .. } => Some(command.as_deref()),
            _ => None,
        })
        .collect();
    assert_eq!(
        replicated,
        [None, Some("select"), Some("set"), Some("ping")],
        "the snapshot, then the propagated commands"
    );
    assert!(
        !out.iter().any(|o| matches!(
            o,
            Output::Desync { .. } | Output::UnmatchedReply { .. } | Output::Unanswered(_)
        )),
        "{out:?}"
    );
}

fn unanswered_for(out: &[Output], reason: UnansweredReason) -> usize {
    out.iter()
        .filter(|o| matches!(o, Output::Unanswered(u) if u.reason == reason))
        .count()
}

/// MULTI without EXEC cannot grow a connection without bound: past the limit, queued commands
/// are reported, and EXEC still pairs its first results with the kept ones.
#[test]
fn a_transaction_queue_is_bounded_and_exec_still_pairs_what_it_kept() {
    let queued = (MAX_OUTSTANDING / 11 + 1) * 11;
    let over = queued - MAX_OUTSTANDING;
    let mut c = Correlator::new();
    let mut out = Vec::new();
    c.feed(Ingress, 1, b"*1\r\n$5\r\nMULTI\r\n", 0, &mut out);
    c.feed(Egress, 2, b"+OK\r\n", 0, &mut out);
    // In rounds, as a client that reads its replies sends them.
    let requests = b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n".repeat(queued / 11);
    let replies = b"+QUEUED\r\n".repeat(queued / 11);
    for _ in 0..11 {
        c.feed(Ingress, 3, &requests, 0, &mut out);
        c.feed(Egress, 4, &replies, 0, &mut out);
    }
    assert_eq!(c.pending(), MAX_OUTSTANDING);
    assert_eq!(unanswered_for(&out, UnansweredReason::QueueOverflow), over);
    out.clear();
    c.feed(Ingress, 5, b"*1\r\n$4\r\nEXEC\r\n", 0, &mut out);
    let mut reply = format!("*{queued}\r\n").into_bytes();
    reply.extend(b":1\r\n".repeat(queued));
    c.feed(Egress, 6, &reply, 0, &mut out);
    // Every kept one ran (results past the summarised ones count as calls of unknown outcome).
    let incr = summary(&out)
        .iter()
        .filter(|(name, outcome, counted)| {
            name == "incr" && *counted && matches!(outcome, Outcome::Ok | Outcome::Unknown)
        })
        .count();
    assert_eq!(incr, MAX_OUTSTANDING);
    assert_eq!(summary(&out).last(), Some(&s("exec", Outcome::Ok, true)));
    assert_eq!(c.pending(), 0);
}

/// A caller over its memory budget drops what a connection holds; the dropped requests are
/// counted, and the connection pairs again from its next request on.
#[test]
fn dropping_pending_requests_reports_each_and_pairing_resumes() {
    let (mut c, mut out) = run(&[(Ingress, b"*1\r\n$4\r\nPING\r\n"), (Egress, b"+PONG\r\n")]);
    out.clear();
    c.feed(
        Ingress,
        1,
        &b"*1\r\n$4\r\nPING\r\n".repeat(1000),
        0,
        &mut out,
    );
    assert_eq!(c.pending(), 1000);
    c.drop_pending(&mut out);
    assert_eq!(c.pending(), 0);
    assert!(matches!(out[..], [Output::Dropped { requests: 1000 }]));
    out.clear();
    // Replies of the dropped requests are orphans; then a new request pairs.
    c.feed(Egress, 2, &b"+PONG\r\n".repeat(1000), 0, &mut out);
    c.feed(Ingress, 3, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 0, &mut out);
    c.feed(Egress, 4, b"$-1\r\n", 0, &mut out);
    assert_eq!(summary(&out), vec![s("get", Outcome::Ok, true)]);
}

/// Dropped inside a transaction, a connection stays in it: the commands queued after the drop
/// are not counted as calls when their QUEUED replies come, and EXEC pairs their results by
/// position, after the dropped ones.
#[test]
fn dropping_pending_inside_a_transaction_keeps_it_one() {
    let (mut c, mut out) = run(&[
        (Ingress, b"*1\r\n$5\r\nMULTI\r\n"),
        (Egress, b"+OK\r\n"),
        (
            Ingress,
            b"*2\r\n$4\r\nINCR\r\n$1\r\na\r\n*2\r\n$4\r\nINCR\r\n$1\r\nb\r\n",
        ),
        (Egress, b"+QUEUED\r\n+QUEUED\r\n"),
    ]);
    out.clear();
    c.drop_pending(&mut out);
    assert!(matches!(out[..], [Output::Dropped { requests: 2 }]));
    out.clear();
    c.feed(
        Ingress,
        10_000,
        b"*2\r\n$3\r\nGET\r\n$1\r\nc\r\n",
        0,
        &mut out,
    );
    c.feed(Egress, 11_000, b"+QUEUED\r\n", 0, &mut out);
    assert!(exchanges(&out).is_empty(), "a queued GET is no call yet");
    c.feed(Ingress, 12_000, b"*1\r\n$4\r\nEXEC\r\n", 0, &mut out);
    c.feed(
        Egress,
        13_000,
        b"*3\r\n:1\r\n:1\r\n-WRONGTYPE x\r\n",
        0,
        &mut out,
    );
    assert_eq!(
        summary(&out),
        vec![
            s("get", Outcome::Failed, true),
            s("exec", Outcome::Ok, true)
        ]
    );
}

/// MULTI and the commands after it may still await their replies when they are dropped: the
/// transaction is entered anyway, so the QUEUED replies that follow are no calls.
#[test]
fn a_multi_in_flight_when_dropped_still_opens_the_transaction() {
    let (mut c, mut out) = run(&[(Ingress, b"*1\r\n$4\r\nPING\r\n"), (Egress, b"+PONG\r\n")]);
    c.feed(
        Ingress,
        10_000,
        b"*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n$1\r\na\r\n",
        0,
        &mut out,
    );
    c.drop_pending(&mut out);
    out.clear();
    c.feed(Egress, 11_000, b"+OK\r\n+QUEUED\r\n", 0, &mut out);
    c.feed(
        Ingress,
        12_000,
        b"*2\r\n$4\r\nINCR\r\n$1\r\nb\r\n",
        0,
        &mut out,
    );
    c.feed(Egress, 13_000, b"+QUEUED\r\n", 0, &mut out);
    assert!(exchanges(&out).is_empty(), "queued commands are no calls");
    c.feed(Ingress, 14_000, b"*1\r\n$4\r\nEXEC\r\n", 0, &mut out);
    c.feed(Egress, 15_000, b"*2\r\n:1\r\n:7\r\n", 0, &mut out);
    assert_eq!(
        summary(&out),
        vec![s("incr", Outcome::Ok, true), s("exec", Outcome::Ok, true)]
    );
}

/// A client that pipelines more requests than the undecided frames before the first reply
/// loses none of them when its end is known from the handshake, MULTI included.
#[test]
fn a_known_role_pairs_a_long_pipeline_from_its_first_request() {
    let mut c = Correlator::with_role(Role::Client);
    let mut out = Vec::new();
    let mut requests = b"*1\r\n$5\r\nMULTI\r\n".to_vec();
    requests.extend(b"*1\r\n$4\r\nPING\r\n".repeat(1000));
    requests.extend(b"*1\r\n$4\r\nEXEC\r\n");
    c.feed(Egress, 1, &requests, 0, &mut out);
    let mut replies = b"+OK\r\n".to_vec();
    replies.extend(b"+QUEUED\r\n".repeat(1000));
    replies.extend(b"*1000\r\n");
    replies.extend(b"+PONG\r\n".repeat(1000));
    c.feed(Ingress, 2, &replies, 0, &mut out);
    let calls = summary(&out);
    assert_eq!(calls.len(), 1002, "MULTI, 1000 PINGs, EXEC");
    assert_eq!(calls[0], s("multi", Outcome::Ok, true));
    assert!(
        calls
            .iter()
            .all(|(_, outcome, counted)| *counted && *outcome == Outcome::Ok)
    );
}
