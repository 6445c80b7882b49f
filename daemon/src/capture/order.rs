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

/// Sorts a batch gathered ring after ring into one timeline. The stable sort merges the rings'
/// already sorted runs in linear time.
pub fn merge(records: &mut [Record<'_>]) {
    records.sort_by_key(Record::ts_ns);
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
        merge(&mut batch);
        let times: Vec<u64> = batch.iter().map(Record::ts_ns).collect();
        assert_eq!(times, [10, 20, 30, 40, 50]);
    }
}
