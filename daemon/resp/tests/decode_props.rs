//! Property tests of the streaming decoder: chunking and truncation invariance, and bounded,
//! panic-free behaviour on arbitrary bytes.

use proptest::prelude::*;
use respwatch_resp::decode::{Decoded, Decoder, Frame, MAX_INLINE_LEN, MAX_ITEMS, MAX_TEXT};

#[derive(Debug, Clone)]
enum Val {
    Simple(String),
    Err(String),
    Int(i64),
    Bulk(usize, u8),
    NullBulk,
    Arr(Vec<Val>),
    Map(Vec<(Val, Val)>),
    Set(Vec<Val>),
    Push(Vec<Val>),
    Bool(bool),
    Double(String),
    Null,
    Attr(Vec<(Val, Val)>, Box<Val>),
}

fn val() -> impl Strategy<Value = Val> {
    let leaf = prop_oneof![
        "[a-zA-Z0-9 ]{0,20}".prop_map(Val::Simple),
        "[A-Z]{1,8} [a-z ]{0,20}".prop_map(Val::Err),
        any::<i64>().prop_map(Val::Int),
        (0usize..3000, any::<u8>()).prop_map(|(n, b)| Val::Bulk(n, b)),
        Just(Val::NullBulk),
        any::<bool>().prop_map(Val::Bool),
        "-?[0-9]{1,5}\\.[0-9]{1,5}".prop_map(Val::Double),
        Just(Val::Null),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Val::Arr),
            prop::collection::vec((inner.clone(), inner.clone()), 0..3).prop_map(Val::Map),
            prop::collection::vec(inner.clone(), 0..4).prop_map(Val::Set),
            prop::collection::vec(inner.clone(), 1..4).prop_map(Val::Push),
            (
                prop::collection::vec((inner.clone(), inner.clone()), 1..2),
                inner
            )
                .prop_map(|(a, v)| Val::Attr(a, Box::new(v))),
        ]
    })
}

/// Status and error lines longer than what is kept of them.
fn long_line() -> impl Strategy<Value = Val> {
    prop_oneof![
        "[a-z ]{200,600}".prop_map(Val::Simple),
        "[A-Z]{1,8} [a-z ]{200,600}".prop_map(Val::Err),
    ]
}

fn command() -> impl Strategy<Value = Val> {
    prop::collection::vec((0usize..2000, 97u8..123), 1..6)
        .prop_map(|args| Val::Arr(args.into_iter().map(|(n, b)| Val::Bulk(n, b)).collect()))
}

/// Serialise `v`, recording the byte ranges of bulk bodies (with their CRLF).
fn ser(v: &Val, out: &mut Vec<u8>, bodies: &mut Vec<(usize, usize)>) {
    match v {
        Val::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Val::Err(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
        Val::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Val::Bulk(n, b) => {
            out.extend_from_slice(format!("${n}\r\n").as_bytes());
            let start = out.len();
            out.extend(std::iter::repeat_n(*b, *n));
            out.extend_from_slice(b"\r\n");
            bodies.push((start, out.len()));
        }
        Val::NullBulk => out.extend_from_slice(b"$-1\r\n"),
        Val::Bool(b) => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
        Val::Double(d) => out.extend_from_slice(format!(",{d}\r\n").as_bytes()),
        Val::Null => out.extend_from_slice(b"_\r\n"),
        Val::Arr(xs) | Val::Set(xs) | Val::Push(xs) => {
            let t = match v {
                Val::Arr(_) => '*',
                Val::Set(_) => '~',
                _ => '>',
            };
            out.extend_from_slice(format!("{t}{}\r\n", xs.len()).as_bytes());
            for x in xs {
                ser(x, out, bodies);
            }
        }
        Val::Map(kv) | Val::Attr(kv, _) => {
            let t = if matches!(v, Val::Map(_)) { '%' } else { '|' };
            out.extend_from_slice(format!("{t}{}\r\n", kv.len()).as_bytes());
            for (k, x) in kv {
                ser(k, out, bodies);
                ser(x, out, bodies);
            }
            if let Val::Attr(_, inner) = v {
                ser(inner, out, bodies);
            }
        }
    }
}

fn frames(out: Vec<Decoded>) -> Vec<Frame> {
    out.into_iter()
        .map(|d| match d {
            Decoded::Frame(f) => f,
            Decoded::Desync(d) => panic!("unexpected desync {d:?}"),
        })
        .collect()
}

/// Frames with kept texts cleared, for comparing against truncated captures.
fn shape(f: &Frame) -> Frame {
    let mut f = f.clone();
    for it in &mut f.items {
        it.text = None;
    }
    f
}

fn is_prefix(short: Option<&[u8]>, long: Option<&[u8]>) -> bool {
    match (short, long) {
        (None, None) => true,
        (Some(s), Some(l)) => l.starts_with(s),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_split_and_body_truncation_decodes_the_same(
        msgs in prop::collection::vec(prop_oneof![val(), command()], 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        truncs in prop::collection::vec(any::<prop::sample::Index>(), 12),
    ) {
        let mut bytes = Vec::new();
        let mut bodies = Vec::new();
        for m in &msgs {
            ser(m, &mut bytes, &mut bodies);
        }
        let mut whole_out = Vec::new();
        Decoder::new().feed(&bytes, 0, &mut whole_out);
        let whole = frames(whole_out);
        prop_assert_eq!(whole.len(), msgs.len());
        prop_assert_eq!(whole.iter().map(|f| f.wire_len).sum::<u64>(), bytes.len() as u64);

        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        points.dedup();
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for (k, w) in points.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            // Truncate the chunk's tail when that tail lies inside one bulk body.
            let c = a + truncs[k % truncs.len()].index(b - a + 1);
            let inside_body = c == b || bodies.iter().any(|&(s, e)| s <= c && b <= e);
            let c = if inside_body { c } else { b };
            d.feed(&bytes[a..c], (b - c) as u64, &mut out);
            prop_assert!(d.buffered() <= MAX_INLINE_LEN + MAX_ITEMS * MAX_TEXT);
        }
        let split = frames(out);
        prop_assert_eq!(split.len(), whole.len());
        for (s, w) in split.iter().zip(&whole) {
            prop_assert_eq!(shape(s), shape(w));
            for (si, wi) in s.items.iter().zip(&w.items) {
                prop_assert!(is_prefix(si.text.as_deref(), wi.text.as_deref()));
            }
        }
        prop_assert_eq!(d.pending_bytes(), 0);
    }

    /// One byte per chunk, no message is ever whole in a chunk: the state machine decodes all of
    /// it, and must build exactly the frames the one-pass decoding of whole messages builds.
    #[test]
    fn one_byte_chunks_decode_exactly_like_whole_messages(
        msgs in prop::collection::vec(prop_oneof![val(), command(), long_line()], 1..8),
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            ser(m, &mut bytes, &mut Vec::new());
        }
        let mut whole_out = Vec::new();
        Decoder::new().feed(&bytes, 0, &mut whole_out);
        let mut d = Decoder::new();
        let mut split_out = Vec::new();
        for byte in bytes.chunks(1) {
            d.feed(byte, 0, &mut split_out);
        }
        prop_assert_eq!(frames(split_out), frames(whole_out));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_every_byte_is_accounted(
        chunks in prop::collection::vec(
            (prop::collection::vec(prop_oneof![
                any::<u8>(),
                prop::sample::select(b"*$+-:\r\n0123456789%>|~_#,(!=?".to_vec()),
            ], 0..200), 0u64..50, any::<bool>()),
            0..30,
        ),
    ) {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let mut total = 0u64;
        for (bytes, unc, lost) in &chunks {
            if *lost {
                d.lose(*unc, &mut out);
                total += unc;
            } else {
                d.feed(bytes, *unc, &mut out);
                total += bytes.len() as u64 + unc;
            }
            prop_assert!(d.buffered() <= MAX_INLINE_LEN + MAX_ITEMS * MAX_TEXT + MAX_TEXT);
        }
        let accounted: u64 = out.iter().map(|o| match o {
            Decoded::Frame(f) => f.wire_len,
            Decoded::Desync(x) => x.skipped_bytes,
        }).sum();
        prop_assert_eq!(accounted + d.pending_bytes(), total);
    }
}
