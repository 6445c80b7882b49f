//! One task per Watch subscriber: reads the pipeline's broadcast (never blocking the pipeline),
//! filters, and hands matching events to the subscriber's bounded queue. When the queue is
//! full the event is dropped and counted; the count goes out as one `lost_events` notice, in
//! stream order, as soon as there is room again. Kernel and decoder losses seen while the
//! stream is open are reported the same way, once a second.
use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use respwatch_proto::{timestamp, v1};
use tokio::sync::{
    broadcast::{self, error::RecvError},
    mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{ServeState, authz::Authorized, convert, filter::FilterSet, now_unix_ns};
use crate::{
    enrich::{Attributor, Process},
    event::CommandEvent,
    pipeline::{Shared, WatchInterest},
};

/// The filters of the open Watch streams, pushed down to the pipeline: it builds events only
/// for connections of processes one of them may want.
#[derive(Default)]
pub struct Watching(Mutex<WatchingSets>);

#[derive(Default)]
struct WatchingSets {
    next: u64,
    sets: BTreeMap<u64, FilterSet>,
}

impl Watching {
    fn start(&self, shared: &Shared, filters: &FilterSet) -> u64 {
        let mut watching = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let id = watching.next;
        watching.next += 1;
        watching.sets.insert(id, filters.clone());
        publish(shared, &watching.sets);
        id
    }

    fn end(&self, shared: &Shared, id: u64) {
        let mut watching = self.0.lock().unwrap_or_else(|p| p.into_inner());
        watching.sets.remove(&id);
        publish(shared, &watching.sets);
    }
}

/// Hands the pipeline the filters of the streams open now.
fn publish(shared: &Shared, sets: &BTreeMap<u64, FilterSet>) {
    shared.set_watch_interest(Some(Arc::new(Interest(sets.values().cloned().collect()))));
}

/// The open streams' filters, as the pipeline asks them.
struct Interest(Vec<FilterSet>);

impl WatchInterest for Interest {
    fn may_want(&self, process: &Process, attributor: &Attributor) -> bool {
        let key = attributor.process_key(process);
        self.0
            .iter()
            .any(|filters| filters.may_want_process(&key, attributor))
    }
}

/// A stream's place in [`Watching`], given up when the stream's task ends however it ends.
struct Registered {
    state: Arc<ServeState>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.state.watching.end(&self.state.shared, self.id);
    }
}

type Item = Result<v1::WatchResponse, Status>;

/// Subscribes now (so nothing published after this call is missed) and returns the stream.
pub fn subscribe(
    state: Arc<ServeState>,
    filters: FilterSet,
    authorized: Option<Authorized>,
    last: usize,
) -> ReceiverStream<Item> {
    // Its filters go to the pipeline first: events it may want are built from the next batch.
    let registered = Registered {
        id: state.watching.start(&state.shared, &filters),
        state: Arc::clone(&state),
    };
    let live = state.shared.events.subscribe();
    // Recent events, taken after subscribing: the ones also still on their way through the
    // broadcast are skipped there (by identity).
    let (recent, seen) = if last > 0 {
        let history: Vec<Arc<CommandEvent>> = state
            .shared
            .history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        let seen: HashSet<usize> = history.iter().map(|e| Arc::as_ptr(e) as usize).collect();
        let mut matching: Vec<Arc<CommandEvent>> = history
            .iter()
            .rev()
            .filter(|e| filters.allows_event(&state.shared.row_key(e), e, &state.shared.attributor))
            .take(last)
            .cloned()
            .collect();
        matching.reverse();
        (matching, seen)
    } else {
        (Vec::new(), HashSet::new())
    };
    // The caller has counted this subscriber in `state.subscribers`; it is uncounted on drop.
    let (tx, rx) = mpsc::channel(state.watch_queue);
    let subscriber = Subscriber {
        _registered: registered,
        state,
        filters,
        authorized,
        tx,
        sequence: 0,
        pending: None,
        history_seen: seen,
    };
    tokio::spawn(subscriber.run(live, recent));
    ReceiverStream::new(rx)
}

/// Matching events dropped since the last notice.
struct Pending {
    count: u64,
    first_ns: u64,
    last_ns: u64,
}

struct Subscriber {
    _registered: Registered,
    state: Arc<ServeState>,
    filters: FilterSet,
    /// With `--authz kubernetes`: checked again once per cache lifetime.
    authorized: Option<Authorized>,
    tx: mpsc::Sender<Item>,
    sequence: u64,
    pending: Option<Pending>,
    /// Events of the history snapshot, until the live stream has moved past them.
    history_seen: HashSet<usize>,
}

enum Wake {
    Room(Option<mpsc::OwnedPermit<Item>>),
    Event(Result<Arc<CommandEvent>, RecvError>),
    Tick,
    Closed,
}

enum Flow {
    Continue,
    Closed,
}

impl Subscriber {
    async fn run(
        mut self,
        mut live: broadcast::Receiver<Arc<CommandEvent>>,
        recent: Vec<Arc<CommandEvent>>,
    ) {
        let state = Arc::clone(&self.state);
        let counters = &state.shared.counters;
        let kernel_losses = || {
            counters
                .kernel_losses
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let mut reported_kernel = kernel_losses();
        let mut reported_desyncs = counters.desyncs.load(Ordering::Relaxed);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for event in recent {
            if let Flow::Closed = self.offer(&event) {
                return self.close();
            }
        }
        let closing = self.tx.clone();
        loop {
            let room = self.pending.is_some().then(|| self.tx.clone());
            let wake = tokio::select! {
                // Room again after drops: the notice goes out before any newer event.
                permit = async { room?.reserve_owned().await.ok() }, if self.pending.is_some() => Wake::Room(permit),
                received = live.recv() => Wake::Event(received),
                _ = tick.tick() => Wake::Tick,
                _ = closing.closed() => Wake::Closed,
            };
            let flow = match wake {
                Wake::Room(Some(permit)) => {
                    let notice = self.pending_notice();
                    permit.send(Ok(notice));
                    Flow::Continue
                }
                Wake::Room(None) | Wake::Closed | Wake::Event(Err(RecvError::Closed)) => {
                    Flow::Closed
                }
                Wake::Event(Ok(event)) => self.accept(&event),
                Wake::Event(Err(RecvError::Lagged(missed))) => {
                    // This task itself fell behind the broadcast: the missed events were not
                    // filtered, so the count may include events this stream would not show.
                    let now = now_unix_ns();
                    self.drop_events(missed, now, now);
                    Flow::Continue
                }
                Wake::Tick => {
                    if let Flow::Closed = self.recheck().await {
                        return self.close();
                    }
                    let kernel = kernel_losses();
                    let desyncs = counters.desyncs.load(Ordering::Relaxed);
                    if kernel > reported_kernel
                        && self.notify(v1::LossSource::RingBuffer, kernel - reported_kernel)
                    {
                        reported_kernel = kernel;
                    }
                    if desyncs > reported_desyncs
                        && self.notify(v1::LossSource::DecoderDesync, desyncs - reported_desyncs)
                    {
                        reported_desyncs = desyncs;
                    }
                    Flow::Continue
                }
            };
            if let Flow::Closed = flow {
                return self.close();
            }
        }
    }

    fn close(self) {
        self.state.subscribers.fetch_sub(1, Ordering::Relaxed);
    }

    /// The caller may see less now (or its token expired): narrower from here on, or the
    /// stream ends with the status that says why.
    async fn recheck(&mut self) -> Flow {
        let Some(authorized) = &mut self.authorized else {
            return Flow::Continue;
        };
        let state = &self.state;
        match authorized
            .recheck(self.filters.scope(), || state.known_namespaces())
            .await
        {
            Ok(Some(scope)) => self.filters.set_scope(scope),
            Ok(None) => {}
            Err(status) => {
                // Behind the queued events; a subscriber that reads nothing still loses its
                // stream (ended without the status) rather than its place being held.
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), self.tx.send(Err(status))).await;
                return Flow::Closed;
            }
        }
        Flow::Continue
    }

    fn accept(&mut self, event: &Arc<CommandEvent>) -> Flow {
        if !self.history_seen.is_empty() {
            if self.history_seen.contains(&(Arc::as_ptr(event) as usize)) {
                return Flow::Continue;
            }
            self.history_seen.clear();
        }
        if !self.filters.may_allow(event) {
            return Flow::Continue;
        }
        let key = self.state.shared.row_key(event);
        if !self
            .filters
            .allows_event(&key, event, &self.state.shared.attributor)
        {
            return Flow::Continue;
        }
        self.offer(event)
    }

    /// Queues a matching event, or counts it as dropped when the queue is full.
    fn offer(&mut self, event: &CommandEvent) -> Flow {
        if self.pending.is_some() {
            match self.tx.clone().try_reserve_owned() {
                Ok(permit) => {
                    let notice = self.pending_notice();
                    permit.send(Ok(notice));
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.drop_events(1, event.time_unix_ns, event.time_unix_ns);
                    return Flow::Continue;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Flow::Closed,
            }
        }
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => {
                let key = self.state.shared.row_key(event);
                let message = self.message(v1::watch_response::Kind::Event(convert::event(
                    &key,
                    event,
                    &self.state.shared.attributor,
                )));
                permit.send(Ok(message));
                Flow::Continue
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.drop_events(1, event.time_unix_ns, event.time_unix_ns);
                Flow::Continue
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Flow::Closed,
        }
    }

    fn drop_events(&mut self, count: u64, first_ns: u64, last_ns: u64) {
        self.state
            .subscriber_drops
            .fetch_add(count, Ordering::Relaxed);
        match &mut self.pending {
            Some(pending) => {
                pending.count += count;
                pending.first_ns = pending.first_ns.min(first_ns);
                pending.last_ns = pending.last_ns.max(last_ns);
            }
            None => {
                self.pending = Some(Pending {
                    count,
                    first_ns,
                    last_ns,
                })
            }
        }
    }

    fn pending_notice(&mut self) -> v1::WatchResponse {
        let pending = self.pending.take().unwrap_or(Pending {
            count: 0,
            first_ns: 0,
            last_ns: 0,
        });
        self.message(v1::watch_response::Kind::LostEvents(v1::LostEvents {
            source: v1::LossSource::SubscriberQueue as i32,
            count: pending.count,
            first: Some(timestamp(pending.first_ns)),
            last: Some(timestamp(pending.last_ns)),
        }))
    }

    /// Sends a loss notice of another source if there is room; false if not (retried later).
    fn notify(&mut self, source: v1::LossSource, count: u64) -> bool {
        let Ok(permit) = self.tx.clone().try_reserve_owned() else {
            return false;
        };
        let now = now_unix_ns();
        let message = self.message(v1::watch_response::Kind::LostEvents(v1::LostEvents {
            source: source as i32,
            count,
            first: None,
            last: Some(timestamp(now)),
        }));
        permit.send(Ok(message));
        true
    }

    fn message(&mut self, kind: v1::watch_response::Kind) -> v1::WatchResponse {
        self.sequence += 1;
        v1::WatchResponse {
            node: self.state.node.clone(),
            time: Some(timestamp(now_unix_ns())),
            sequence: self.sequence,
            kind: Some(kind),
        }
    }
}
