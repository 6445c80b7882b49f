use super::*;

fn decode_all(chunks: &[&[u8]]) -> Vec<Decoded> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for c in chunks {
        d.feed(c, 0, &mut out);
    }
    out
}

fn frames(out: &[Decoded]) -> Vec<&Frame> {
    out.iter()
        .filter_map(|d| match d {
            Decoded::Frame(f) => Some(f),
            Decoded::Desync(_) => None,
        })
        .collect()
}

fn desyncs(out: &[Decoded]) -> Vec<Desync> {
    out.iter()
        .filter_map(|d| match d {
            Decoded::Desync(x) => Some(*x),
            Decoded::Frame(_) => None,
        })
        .collect()
}

#[test]
fn command_array_keeps_bounded_args() {
    let out = decode_all(&[b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"]);
    let f = frames(&out);
    assert_eq!(f.len(), 1);
    assert!(f[0].is_command());
    assert_eq!(f[0].len, 3);
    assert_eq!(f[0].arg(0), Some(&b"SET"[..]));
    assert_eq!(f[0].arg(1), Some(&b"key"[..]));
    assert_eq!(f[0].wire_len, 33);
}

#[test]
fn long_args_are_truncated_and_later_args_not_kept() {
    let big = vec![b'x'; 1000];
    let mut msg = b"*6\r\n$4\r\nMSET\r\n$1000\r\n".to_vec();
    msg.extend_from_slice(&big);
    msg.extend_from_slice(b"\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n");
    let out = decode_all(&[&msg]);
    let f = frames(&out);
    assert_eq!(f[0].arg(1).map(<[u8]>::len), Some(MAX_ELEMENT_TEXT));
    assert_eq!(
        f[0].arg(5),
        None,
        "only the first {MAX_KEPT_ELEMENTS} args are kept"
    );
    assert_eq!(f[0].len, 6);
    assert_eq!(f[0].wire_len, msg.len() as u64);
}

#[test]
fn replies_of_every_type() {
    let out = decode_all(&[
        b"+OK\r\n-WRONGTYPE Operation against a key\r\n:-42\r\n$-1\r\n*-1\r\n_\r\n#t\r\n,3.14\r\n(12345678901234567890\r\n!5\r\nERR x\r\n=7\r\ntxt:abc\r\n%1\r\n+a\r\n:1\r\n~2\r\n:1\r\n:2\r\n*0\r\n",
    ]);
    let f = frames(&out);
    let kinds: Vec<Kind> = f.iter().map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Kind::SimpleString,
            Kind::Error,
            Kind::Integer,
            Kind::BulkString,
            Kind::Array,
            Kind::Null,
            Kind::Boolean,
            Kind::Double,
            Kind::BigNumber,
            Kind::BulkError,
            Kind::VerbatimString,
            Kind::Map,
            Kind::Set,
            Kind::Array
        ]
    );
    assert_eq!(f[0].text.as_deref(), Some(&b"OK"[..]));
    assert_eq!(
        f[1].error_text(),
        Some(&b"WRONGTYPE Operation against a key"[..])
    );
    assert_eq!(f[2].integer, Some(-42));
    assert!(f[3].null && f[4].null && f[5].null);
    assert_eq!(f[9].error_text(), Some(&b"ERR x"[..]));
    assert_eq!(f[11].items.len(), 2);
    assert!(!f[13].is_command(), "*0 is not a command");
    assert!(desyncs(&out).is_empty());
}

#[test]
fn nested_aggregates_and_exec_items() {
    // EXEC result: +OK, -WRONGTYPE..., nested array, -ERR...
    let out = decode_all(&[b"*4\r\n+OK\r\n-WRONGTYPE bad\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n-ERR value is not an integer or out of range\r\n"]);
    let f = frames(&out);
    assert_eq!(f.len(), 1);
    let items = &f[0].items;
    assert_eq!(items.len(), 4);
    assert_eq!(items[1].kind, Kind::Error);
    assert_eq!(items[1].text.as_deref(), Some(&b"WRONGTYPE bad"[..]));
    assert_eq!(items[2].kind, Kind::Array);
    assert_eq!(items[2].len, 2);
    assert_eq!(
        items[3].text.as_deref(),
        Some(&b"ERR value is not an integer or out of range"[..])
    );
    assert!(!f[0].is_command());
}

#[test]
fn attribute_is_counted_not_a_frame() {
    let msg = b"|1\r\n+key-popularity\r\n*2\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2\r\n:3\r\n";
    let out = decode_all(&[msg]);
    let f = frames(&out);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].attributes, 1);
    assert_eq!(f[0].kind, Kind::Array);
    assert_eq!(f[0].wire_len, msg.len() as u64);
    assert_eq!(f[0].items.len(), 2);
}

#[test]
fn inline_commands() {
    let out = decode_all(&[b"PING\r\n\r\nset \"a b\" 'c'\n  \r\n"]);
    let f = frames(&out);
    assert_eq!(f.len(), 4);
    assert_eq!(f[0].kind, Kind::Inline);
    assert_eq!(f[0].arg(0), Some(&b"PING"[..]));
    assert!(!f[1].is_command(), "empty line is ignored by Redis");
    assert_eq!(f[2].len, 3);
    assert_eq!(f[2].arg(1), Some(&b"a b"[..]));
    assert_eq!(f[2].arg(2), Some(&b"c"[..]));
    assert_eq!(f[3].len, 0);
}

#[test]
fn split_anywhere_gives_same_frames() {
    let msg: &[u8] = b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n+OK\r\n$5\r\nhello\r\n";
    let whole = decode_all(&[msg]);
    for i in 0..msg.len() {
        for j in i..msg.len() {
            let got = decode_all(&[&msg[..i], &msg[i..j], &msg[j..]]);
            assert_eq!(got, whole, "split at {i},{j}");
        }
    }
}

#[test]
fn uncopied_bytes_inside_bulk_body_are_skipped() {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    // 1 MiB GET reply of which the kernel copied only the first 10 bytes.
    d.feed(b"$1048576\r\nab", (1 << 20) - 2 + 2, &mut out);
    d.feed(b"+OK\r\n", 0, &mut out);
    let f = frames(&out);
    assert_eq!(f.len(), 2, "{out:?}");
    assert_eq!(f[0].kind, Kind::BulkString);
    assert_eq!(f[0].wire_len, 10 + (1 << 20) + 2);
    assert!(desyncs(&out).is_empty());
    assert_eq!(d.buffered(), 0);
}

#[test]
fn uncopied_header_is_a_desync_then_resync_at_next_chunk() {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    d.feed(b"*3\r\n$3\r\nSET\r\n$1\r\n", 100, &mut out);
    assert_eq!(
        desyncs(&out),
        vec![Desync {
            reason: DesyncReason::Truncated,
            skipped_bytes: 17 + 100
        }]
    );
    assert!(d.is_resyncing());
    // Next chunk starts mid-value: discarded whole.
    d.feed(b"\x00\x01garbage\r\n", 0, &mut out);
    assert_eq!(desyncs(&out)[1].reason, DesyncReason::NoMessageStart);
    assert_eq!(desyncs(&out)[1].skipped_bytes, 11);
    d.feed(b"*1\r\n$4\r\nPING\r\n", 0, &mut out);
    assert_eq!(frames(&out).len(), 1);
    assert_eq!(frames(&out)[0].arg(0), Some(&b"PING"[..]));
}

#[test]
fn lose_inside_body_is_not_a_desync() {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    d.feed(b"$100\r\n0123456789", 0, &mut out);
    d.lose(50, &mut out);
    d.feed(&[b'z'; 40], 0, &mut out);
    d.feed(b"\r\n:7\r\n", 0, &mut out);
    assert!(desyncs(&out).is_empty(), "{out:?}");
    let f = frames(&out);
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].wire_len, 108);
    assert_eq!(f[1].integer, Some(7));
}

#[test]
fn lose_outside_body_is_a_desync() {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    d.feed(b"+OK\r\n*2\r\n", 0, &mut out);
    d.lose(30, &mut out);
    assert_eq!(
        desyncs(&out),
        vec![Desync {
            reason: DesyncReason::Lost,
            skipped_bytes: 4 + 30
        }]
    );
    d.feed(b"+OK\r\n", 0, &mut out);
    assert_eq!(frames(&out).len(), 2);
}

#[test]
fn limits_are_desyncs() {
    let cases: [(&[u8], DesyncReason); 7] = [
        (b"$536870913\r\n", DesyncReason::BulkTooLong(536_870_913)),
        (
            b"*2147483648\r\n",
            DesyncReason::TooManyElements(2_147_483_648),
        ),
        (b"$-2\r\n", DesyncReason::BadLength),
        (b"*?\r\n", DesyncReason::StreamedUnsupported),
        (
            b"$12345678901234567890123456789012345\r\n",
            DesyncReason::HeaderTooLong,
        ),
        (b"$3\r\nabcXY", DesyncReason::BadBulkTerminator),
        (b"#x\r\n", DesyncReason::BadValue),
    ];
    for (input, reason) in cases {
        let out = decode_all(&[input]);
        assert_eq!(
            desyncs(&out).first().map(|d| d.reason),
            Some(reason),
            "{input:?}"
        );
    }
    let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
    assert_eq!(
        desyncs(&decode_all(&[&deep]))[0].reason,
        DesyncReason::TooDeep
    );
    let long_inline = vec![b'a'; MAX_INLINE_LEN + 1];
    assert_eq!(
        desyncs(&decode_all(&[&long_inline]))[0].reason,
        DesyncReason::InlineTooLong
    );
}

#[test]
fn long_simple_lines_stream_without_buffering() {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    d.feed(
        b"+1700000000.123456 [0 127.0.0.1:5000] \"set\" \"",
        0,
        &mut out,
    );
    for _ in 0..100 {
        d.feed(&[b'v'; 10_000], 0, &mut out);
        assert!(d.buffered() <= MAX_TEXT);
    }
    d.feed(b"\"\r\n", 0, &mut out);
    let f = frames(&out);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].text.as_ref().map(|text| text.len()), Some(MAX_TEXT));
}

#[test]
fn cr_lf_split_across_chunks() {
    let out = decode_all(&[b"-ERR x\r", b"\n:1\r", b"\n"]);
    assert_eq!(frames(&out).len(), 2);
    assert!(desyncs(&out).is_empty());
    let bad = decode_all(&[b"+OK\n"]);
    assert_eq!(desyncs(&bad)[0].reason, DesyncReason::BadLineEnding);
}

#[test]
fn mid_stream_decoder_waits_for_plausible_chunk() {
    let mut d = Decoder::mid_stream();
    let mut out = Vec::new();
    d.feed(b"\r\nrest of a value\r\n", 0, &mut out);
    // A chunk boundary inside a value of letters is no inline command.
    d.feed(
        b"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        0,
        &mut out,
    );
    d.feed(b"$5 \r\n", 0, &mut out);
    assert_eq!(frames(&out).len(), 0);
    // Bytes before the first message are skipped joining the stream, not a loss of sync.
    assert!(
        desyncs(&out)
            .iter()
            .all(|d| d.reason == DesyncReason::JoiningMidStream),
        "{out:?}"
    );
    d.feed(b"*1\r\n$4\r\nPING\r\n", 0, &mut out);
    assert_eq!(frames(&out).len(), 1);
}

#[test]
fn resyncing_needs_a_whole_first_line() {
    for start in [
        &b"*3\r\n$3\r\nSET"[..],
        b"$-1\r\n",
        b"+OK\r\n",
        b"-ERR no\r\n",
        b":42",
        b"_\r\n",
        b"#t\r\n",
        b"%2\r\n",
    ] {
        assert!(plausible_start(start), "{start:?}");
    }
    for start in [
        &b"PING\r\n"[..],
        b"bbbbbbbb",
        b"*x\r\n",
        b"*3\rx",
        b"$",
        b"+\r\n",
        b"-err\r\n",
        b"#x\r\n",
        b"+\x01\x02",
    ] {
        assert!(!plausible_start(start), "{start:?}");
    }
}

/// What a master sends a replica on a full resync: `+FULLRESYNC`, keepalive newlines while the
/// snapshot is prepared, the snapshot (no CRLF after it), then propagated commands.
fn full_resync(snapshot: &[u8]) -> Vec<u8> {
    let mut stream = b"+FULLRESYNC 8371b4fb1155b71f4a04d3e1bc3e18c4a990aeeb 0\r\n\n\n".to_vec();
    stream.extend_from_slice(snapshot);
    stream.extend_from_slice(b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n");
    stream
}

/// Every split of `stream` into two chunks decodes to the same frames and accounts for every
/// byte.
fn assert_decodes_at_every_split(stream: &[u8], expect: &[Kind]) {
    for split in 0..=stream.len() {
        let out = decode_all(&[&stream[..split], &stream[split..]]);
        assert!(desyncs(&out).is_empty(), "split {split}: {out:?}");
        let kinds: Vec<Kind> = frames(&out).iter().map(|f| f.kind).collect();
        assert_eq!(kinds, expect, "split {split}");
        let wire: u64 = frames(&out).iter().map(|f| f.wire_len).sum();
        assert_eq!(wire, stream.len() as u64, "split {split}");
    }
}

#[test]
fn a_disk_snapshot_is_skipped_by_its_length_without_a_trailing_crlf() {
    // The payload contains what looks like RESP and CRLFs: its length decides, not its bytes.
    let mut snapshot = b"$30\r\nREDIS0011\xfa\t*3\r\n$3\r\nSET\r\n\r\n".to_vec();
    snapshot.resize(5 + 30, b'x');
    let stream = full_resync(&snapshot);
    assert_decodes_at_every_split(
        &stream,
        &[Kind::SimpleString, Kind::Snapshot, Kind::Array, Kind::Array],
    );
}

#[test]
fn a_diskless_snapshot_ends_at_its_mark_even_split_across_chunks() {
    let mark = b"0123456789abcdef0123456789abcdef01234567";
    let mut snapshot = b"$EOF:".to_vec();
    snapshot.extend_from_slice(mark);
    snapshot.extend_from_slice(b"\r\nREDIS0011 payload with 0123456789abc (a partial mark) ");
    snapshot.extend_from_slice(mark);
    let stream = full_resync(&snapshot);
    assert_decodes_at_every_split(
        &stream,
        &[Kind::SimpleString, Kind::Snapshot, Kind::Array, Kind::Array],
    );
    // One byte at a time, too.
    let chunks: Vec<&[u8]> = stream.chunks(1).collect();
    let out = decode_all(&chunks);
    assert!(desyncs(&out).is_empty());
    assert_eq!(frames(&out).len(), 4);
}

#[test]
fn fullresync_text_elsewhere_announces_no_snapshot() {
    // Inside an array (a client's echo of it), a FULLRESYNC string is just text.
    let out = decode_all(&[b"*1\r\n+FULLRESYNC x 0\r\n$3\r\nabc\r\n"]);
    assert!(desyncs(&out).is_empty());
    let kinds: Vec<Kind> = frames(&out).iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [Kind::Array, Kind::BulkString]);
}
