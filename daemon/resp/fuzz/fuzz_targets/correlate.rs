//! Both directions of a connection fed arbitrary chunks: the correlator must never panic and
//! its outstanding queue stays bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use respwatch_resp::correlate::{Correlator, Direction, MAX_OUTSTANDING};

fuzz_target!(|data: &[u8]| {
    let mut c = Correlator::new();
    let mut out = Vec::new();
    let mut ts = 0u64;
    let mut rest = data;
    while let [len, unc, flags, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        let dir = if flags & 1 == 1 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        ts += u64::from(*flags >> 2);
        if flags & 2 == 2 {
            c.lose(dir, ts, u64::from(*unc), &mut out);
        } else {
            c.feed(dir, ts, chunk, u64::from(*unc) & 0x0f, &mut out);
        }
        assert!(c.outstanding() <= MAX_OUTSTANDING);
        out.clear();
        rest = next;
    }
    c.close(ts, &mut out);
});
