//! Runs the stages in one task: capture → streams → decode/correlate → aggregate/broadcast.
//! Kept in one task so per-connection order is never lost between stages.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use respwatch_common::LOSS_REASONS;
use tokio::sync::watch;

use crate::{
    capture::{Capture, CaptureError},
    streams::{StreamEvent, Streams},
};

/// How often connections of exited processes are ended and kernel loss counters read.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Counters for status and metrics, updated by the pipeline task.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub records: AtomicU64,
    pub malformed_records: AtomicU64,
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    /// Bytes lost in the kernel (ring full), as reported on later chunks and closes.
    pub lost_bytes: AtomicU64,
    pub tracked_connections: AtomicU64,
    /// The kernel's loss counters by [`respwatch_common::LossReason`], refreshed periodically.
    pub kernel_losses: [AtomicU64; LOSS_REASONS as usize],
}

pub struct Pipeline {
    capture: Capture,
    streams: Streams,
    counters: Arc<PipelineCounters>,
}

impl Pipeline {
    pub fn new(capture: Capture) -> Self {
        Self { capture, streams: Streams::new(), counters: Arc::default() }
    }

    pub fn counters(&self) -> Arc<PipelineCounters> {
        Arc::clone(&self.counters)
    }

    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    /// Runs until `shutdown` turns true. `observe` sees every stream event before the later
    /// stages do (tests and debugging use it; the daemon passes a no-op).
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut observe: impl FnMut(&StreamEvent),
    ) -> Result<(), CaptureError> {
        let mut records = Vec::with_capacity(1024);
        let mut malformed = Vec::new();
        let mut events = Vec::with_capacity(1024);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                }
                _ = sweep.tick() => {
                    self.streams.sweep_exited(monotonic_ns(), &mut events);
                    self.refresh_kernel_losses();
                }
                batch = self.capture.next_batch(&mut records, &mut malformed) => batch?,
            }
            for error in malformed.drain(..) {
                self.counters.malformed_records.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "dropped a ring buffer record");
            }
            self.counters.records.fetch_add(records.len() as u64, Ordering::Relaxed);
            for record in records.drain(..) {
                self.streams.accept(record, &mut events);
            }
            for event in events.drain(..) {
                self.count(&event);
                observe(&event);
            }
            self.counters.tracked_connections.store(self.streams.tracked() as u64, Ordering::Relaxed);
        }
    }

    fn refresh_kernel_losses(&self) {
        match self.capture.kernel_losses() {
            Ok(losses) => {
                for (counter, value) in self.counters.kernel_losses.iter().zip(losses.counts) {
                    counter.store(value, Ordering::Relaxed);
                }
            }
            Err(error) => tracing::warn!(%error, "reading the kernel's loss counters"),
        }
    }

    fn count(&self, event: &StreamEvent) {
        match event {
            StreamEvent::Data(chunk) => {
                self.counters.chunks.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes.fetch_add(chunk.total_len(), Ordering::Relaxed);
                self.counters.lost_bytes.fetch_add(chunk.gap_before, Ordering::Relaxed);
            }
            StreamEvent::Closed { lost_ingress, lost_egress, .. } => {
                self.counters.lost_bytes.fetch_add(lost_ingress + lost_egress, Ordering::Relaxed);
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
