//! Arbitrary bytes, split at fuzzer-chosen points with fuzzer-chosen truncation and loss, must
//! never panic, must keep memory bounded and must account for every byte. Bytes that decode
//! without a desync when fed whole (where whole messages take the one-pass path) must decode to
//! the same frames fed one byte at a time (always the state machine).
#![no_main]

use libfuzzer_sys::fuzz_target;
use respwatch_resp::decode::{Decoded, Decoder, MAX_INLINE_LEN, MAX_ITEMS, MAX_TEXT};

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut rest = data;
    // Each chunk: [len, uncopied, flags] header bytes, then `len` bytes.
    while let [len, unc, flags, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        let unc = u64::from(*unc) * if flags & 1 == 1 { 1000 } else { 1 };
        if flags & 2 == 2 {
            d.lose(unc, &mut out);
            total += unc;
        } else {
            d.feed(chunk, unc, &mut out);
            total += chunk.len() as u64 + unc;
        }
        assert!(d.buffered() <= MAX_INLINE_LEN + MAX_ITEMS * MAX_TEXT + MAX_TEXT);
        rest = next;
    }
    let accounted: u64 = out
        .iter()
        .map(|o| match o {
            Decoded::Frame(f) => f.wire_len,
            Decoded::Desync(x) => x.skipped_bytes,
        })
        .sum();
    assert_eq!(accounted + d.pending_bytes(), total);

    let mut whole = Vec::new();
    Decoder::new().feed(data, 0, &mut whole);
    if whole.iter().all(|o| matches!(o, Decoded::Frame(_))) {
        let mut stepped_decoder = Decoder::new();
        let mut stepped = Vec::new();
        for byte in data.chunks(1) {
            stepped_decoder.feed(byte, 0, &mut stepped);
        }
        assert_eq!(stepped, whole);
    }
});
