//! Timing shared by the `cargo bench` targets (each includes this file with `#[path]`).
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The fastest of `rounds` runs (at least one), with its result: the run least disturbed by the
/// rest of a noisy machine.
pub fn fastest<T>(rounds: usize, mut run: impl FnMut() -> T) -> (Duration, T) {
    let mut timed = || {
        let start = Instant::now();
        let result = black_box(run());
        (start.elapsed(), result)
    };
    let mut best = timed();
    for _ in 1..rounds {
        let next = timed();
        if next.0 < best.0 {
            best = next;
        }
    }
    best
}
