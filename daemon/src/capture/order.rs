//! Records from several rings, put back in timestamp order.
//!
//! Each CPU writes to its own ring, so one ring is in time order but two are not: a server's
//! reply (one CPU) can be read before the request it answers (another CPU). A batch therefore
//! takes, from every ring, only records stamped up to a point in time before which nothing can
//! still arrive — the reader drained every ring after it (less the microseconds between a
//! program reading the clock and committing its record) — and sorts them. Later records stay in
//! their ring for the next batch.

use super::record::Record;

/// Time between a program reading the clock and its record becoming visible in the ring: the
/// program's own run (microseconds), or longer if the task running it is preempted. Records
/// that come later still are handed on at once and counted as late.
pub const COMMIT_SLACK_NS: u64 = 2_000_000;

/// Every record stamped at or before the returned time is in hand: `drained_from` is when the
/// reader started draining (less [`COMMIT_SLACK_NS`]), and a ring whose read stopped at the
/// batch limit, with records left, is complete only up to the last record read from it.
pub fn watermark(drained_from: u64, cut_short: impl IntoIterator<Item = u64>) -> u64 {
    cut_short
        .into_iter()
        .fold(drained_from.saturating_sub(COMMIT_SLACK_NS), u64::min)
}

/// Sorts a batch gathered ring after ring into one timeline, keeping the order of records
/// stamped alike. `keys` is scratch kept across batches: a batch allocates nothing (a stable
/// sort would allocate its own scratch every batch).
pub fn merge(records: &mut [Record<'_>], keys: &mut Vec<(u64, u32)>) {
    keys.clear();
    keys.extend(
        records
            .iter()
            .enumerate()
            .map(|(at, record)| (record.ts_ns(), at as u32)),
    );
    // Unstable but total: no two keys are equal.
    keys.sort_unstable();
    // Each record moves to its place along the permutation's cycles; a done place is marked by
    // pointing at itself.
    for start in 0..keys.len() {
        let mut at = start;
        loop {
            let from = keys[at].1 as usize;
            keys[at].1 = at as u32;
            if from == start || from == at {
                break;
            }
            records.swap(at, from);
            at = from;
        }
    }
}

#[cfg(test)]
mod tests {
    use respwatch_common::Direction;

    use super::*;
    use crate::capture::record::Data;

    fn data(ts_ns: u64) -> Record<'static> {
        Record::Data(Data {
            cookie: 1,
            ts_ns,
            direction: Direction::Ingress,
            seq: 0,
            len: 0,
            bytes: &[],
            packet_start: true,
        })
    }

    #[test]
    fn the_watermark_trails_the_drain_and_a_ring_cut_short() {
        assert_eq!(watermark(10_000_000, []), 8_000_000);
        assert_eq!(watermark(10_000_000, [9_000_000]), 8_000_000);
        assert_eq!(watermark(10_000_000, [5_000_000, 7_000_000]), 5_000_000);
        assert_eq!(watermark(1_000, []), 0);
    }

    #[test]
    fn rings_interleave_by_time() {
        // Ring 0 then ring 1, each in order.
        let mut batch: Vec<Record<'_>> = [10, 30, 50, 20, 40].into_iter().map(data).collect();
        merge(&mut batch, &mut Vec::new());
        let times: Vec<u64> = batch.iter().map(Record::ts_ns).collect();
        assert_eq!(times, [10, 20, 30, 40, 50]);
    }

    /// Any number of rings, any interleaving, records stamped alike: the result is what a
    /// stable sort by time gives (records told apart by their sequence numbers).
    #[test]
    fn the_merge_is_a_stable_sort_by_time() {
        let mut keys = Vec::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..200 {
            let mut batch: Vec<Record<'_>> = Vec::new();
            for ring in 0..(round % 5 + 1) {
                let mut ts = 0;
                for _ in 0..(round * 7 + ring) % 50 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ts += state % 3;
                    let mut record = data(ts);
                    if let Record::Data(data) = &mut record {
                        data.seq = batch.len() as u32;
                    }
                    batch.push(record);
                }
            }
            let seq = |record: &Record<'_>| match record {
                Record::Data(data) => (data.ts_ns, data.seq),
                _ => (0, 0),
            };
            let mut expected: Vec<(u64, u32)> = batch.iter().map(seq).collect();
            expected.sort_by_key(|(ts, _)| *ts);
            merge(&mut batch, &mut keys);
            let merged: Vec<(u64, u32)> = batch.iter().map(seq).collect();
            assert_eq!(merged, expected, "round {round}");
        }
    }
}
