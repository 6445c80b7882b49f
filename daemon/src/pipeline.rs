//! Runs the stages in one task: capture → streams → decode/correlate → enrich → aggregate and
//! broadcast. One task, so per-connection order is never lost between stages; readers (gRPC,
//! metrics) see the results through [`Shared`].
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use respwatch_common::LOSS_REASONS;
use tokio::sync::{broadcast, watch};

use crate::{
    aggregate::{Aggregator, RowKey},
    capture::{Capture, CaptureError},
    decode::{DecodeCounters, DecodeStage},
    enrich::Attributor,
    event::{CommandEvent, KeyPolicy},
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
    /// Cgroups outside `--namespaces` whose I/O the kernel no longer looks at.
    pub excluded_cgroups: AtomicU64,
    /// The kernel's loss counters by [`respwatch_common::LossReason`], refreshed periodically.
    pub kernel_losses: [AtomicU64; LOSS_REASONS as usize],
    pub events: AtomicU64,
    pub desyncs: AtomicU64,
    pub desync_bytes: AtomicU64,
    pub pushes: AtomicU64,
    pub unanswered: AtomicU64,
    pub unmatched_replies: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub keys: KeyPolicy,
    /// Events kept for `Watch` requests that ask for recent history.
    pub history: usize,
    /// Capacity of each subscriber's queue before it gets a loss notice instead.
    pub subscriber_queue: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            keys: KeyPolicy::default(),
            history: 10_000,
            subscriber_queue: 16_384,
        }
    }
}

/// What the pipeline publishes, for the serving side.
pub struct Shared {
    pub counters: PipelineCounters,
    pub aggregator: Mutex<Aggregator>,
    pub history: Mutex<VecDeque<Arc<CommandEvent>>>,
    pub events: broadcast::Sender<Arc<CommandEvent>>,
    pub attributor: Attributor,
    pub config: PipelineConfig,
}

impl Shared {
    pub fn new(config: PipelineConfig, attributor: Attributor) -> Self {
        let (events, _) = broadcast::channel(config.subscriber_queue);
        Self {
            counters: PipelineCounters::default(),
            aggregator: Mutex::new(Aggregator::new()),
            history: Mutex::new(VecDeque::with_capacity(config.history)),
            events,
            attributor,
            config,
        }
    }

    pub fn row_key(&self, event: &CommandEvent) -> RowKey {
        self.attributor.row_key(event)
    }

    /// Hands a batch of events to the aggregator, the history and the subscribers.
    /// `out_of_scope` gets the cgroups of events that can never be in `--namespaces`' scope.
    pub fn publish(&self, events: &mut Vec<Arc<CommandEvent>>, out_of_scope: &mut Vec<u64>) {
        // `--namespaces`: out-of-scope events go no further; their cgroups are then skipped in
        // the kernel too, so they cost almost nothing from the next syscall on.
        events.retain(|event| {
            let keep = self.attributor.in_scope(event);
            if !keep && self.attributor.never_in_scope(&event.conn.process) {
                out_of_scope.push(event.conn.process.cgroup_id);
            }
            keep
        });
        if events.is_empty() {
            return;
        }
        self.counters
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        if let Ok(mut aggregator) = self.aggregator.lock() {
            aggregator.record_batch(events, |event| self.row_key(event));
        }
        if let Ok(mut history) = self.history.lock() {
            for event in events.iter() {
                if history.len() == self.config.history {
                    history.pop_front();
                }
                history.push_back(Arc::clone(event));
            }
        }
        for event in events.drain(..) {
            // No subscribers is fine; slow ones see `Lagged(n)` and report the loss.
            let _ = self.events.send(event);
        }
    }
}

pub struct Pipeline {
    capture: Capture,
    streams: Streams,
    decode: DecodeStage,
    shared: Arc<Shared>,
}

impl Pipeline {
    pub fn new(capture: Capture, config: PipelineConfig, attributor: Attributor) -> Self {
        Self {
            capture,
            streams: Streams::new(),
            decode: DecodeStage::new(config.keys, realtime_offset_ns()),
            shared: Arc::new(Shared::new(config, attributor)),
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    pub fn attached(&self) -> Vec<String> {
        self.capture.attached().to_vec()
    }

    /// Runs until `shutdown` turns true. `observe` sees every stream event before the later
    /// stages do (the capture tests use it; the daemon passes a no-op).
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut observe: impl FnMut(&StreamEvent),
    ) -> Result<(), CaptureError> {
        let mut records = Vec::with_capacity(1024);
        let mut malformed = Vec::new();
        let mut stream_events = Vec::with_capacity(1024);
        let mut command_events = Vec::with_capacity(1024);
        let mut out_of_scope = Vec::new();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                }
                _ = sweep.tick() => {
                    self.streams.sweep_exited(monotonic_ns(), &mut stream_events);
                    self.refresh_kernel_losses();
                }
                batch = self.capture.next_batch(&mut records, &mut malformed) => batch?,
            }
            let shared = Arc::clone(&self.shared);
            let counters = &shared.counters;
            for error in malformed.drain(..) {
                counters.malformed_records.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "dropped a ring buffer record");
            }
            counters
                .records
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            self.streams
                .accept_batch(records.drain(..), &mut stream_events);
            let mut tally = StreamTally::default();
            for event in stream_events.drain(..) {
                tally.count(&event);
                observe(&event);
                self.decode.accept(&event, &mut command_events);
            }
            tally.add_to(counters);
            shared.publish(&mut command_events, &mut out_of_scope);
            self.exclude_in_kernel(&mut out_of_scope);
            counters
                .tracked_connections
                .store(self.streams.tracked() as u64, Ordering::Relaxed);
            store_decode_counters(counters, self.decode.counters());
        }
    }

    fn exclude_in_kernel(&mut self, cgroups: &mut Vec<u64>) {
        for cgroup_id in cgroups.drain(..) {
            match self.capture.exclude_cgroup(cgroup_id) {
                Ok(excluded) => self
                    .shared
                    .counters
                    .excluded_cgroups
                    .store(excluded as u64, Ordering::Relaxed),
                // Full map: the events are still dropped in user space, only costlier. Each
                // cgroup is tried once, so this is logged once per cgroup.
                Err(error) => tracing::warn!(%error, cgroup_id, "excluding a cgroup in the kernel"),
            }
        }
    }

    fn refresh_kernel_losses(&self) {
        match self.capture.kernel_losses() {
            Ok(losses) => {
                for (counter, value) in self.shared.counters.kernel_losses.iter().zip(losses.counts)
                {
                    counter.store(value, Ordering::Relaxed);
                }
            }
            Err(error) => tracing::warn!(%error, "reading the kernel's loss counters"),
        }
    }
}

/// A batch's stream counts, added to the shared atomics once per batch rather than per chunk.
#[derive(Default)]
struct StreamTally {
    chunks: u64,
    bytes: u64,
    lost_bytes: u64,
}

impl StreamTally {
    fn count(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Data(chunk) => {
                self.chunks += 1;
                self.bytes += chunk.total_len();
                self.lost_bytes += chunk.gap_before;
            }
            StreamEvent::Closed {
                lost_ingress,
                lost_egress,
                ..
            } => self.lost_bytes += lost_ingress + lost_egress,
        }
    }

    fn add_to(&self, counters: &PipelineCounters) {
        counters.chunks.fetch_add(self.chunks, Ordering::Relaxed);
        counters.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        counters
            .lost_bytes
            .fetch_add(self.lost_bytes, Ordering::Relaxed);
    }
}

fn store_decode_counters(counters: &PipelineCounters, decode: &DecodeCounters) {
    counters.desyncs.store(decode.desyncs, Ordering::Relaxed);
    counters
        .desync_bytes
        .store(decode.desync_bytes, Ordering::Relaxed);
    counters.pushes.store(decode.pushes, Ordering::Relaxed);
    counters
        .unanswered
        .store(decode.unanswered, Ordering::Relaxed);
    counters
        .unmatched_replies
        .store(decode.unmatched_replies, Ordering::Relaxed);
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Wall clock minus monotonic clock, to date kernel timestamps.
fn realtime_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) as i128 - monotonic_ns() as i128
}
