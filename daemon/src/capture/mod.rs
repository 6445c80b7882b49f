//! Capture stage: loads the packet-layer programs, attaches them to the cgroup v2 root, and reads
//! typed records from the record rings (one per CPU, up to [`RING_MAPS`]) in timestamp order.
//!
//! Minimum kernel: 5.10 (see the eBPF crate for the features it uses), cgroup v2. No syscall
//! tracepoint and no tracefs. Attached through bpf_links, so programs other agents attached to the
//! same cgroup keep running; dropping [`Capture`] detaches ours (so does the process dying: the
//! links are file descriptors, never pinned).
#[cfg(feature = "record-dump")]
mod dump;
mod links;
mod order;
mod preflight;
mod record;
mod ring;

use std::{
    cell::{Cell, RefCell},
    os::fd::AsFd,
    path::{Path, PathBuf},
    task::Poll,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps},
};
use respwatch_common::{CloseRecord, LOSS_REASONS, LossReason, RING_MAPS, kernel_counter};
use smallvec::SmallVec;
use tokio::io::unix::AsyncFd;

pub use preflight::CgroupRoot;
pub use record::{Close, Data, Open, Opener, Record, comm_str};

/// The eBPF object built from `daemon-ebpf` by the build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/respwatch"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Bench builds only: `$RESPWATCH_RECORD_DUMP` could not be created.
    #[cfg(feature = "record-dump")]
    #[error("creating the record dump ($RESPWATCH_RECORD_DUMP): {0}")]
    RecordDump(std::io::Error),
    #[error(
        "respwatchd needs root, or these capabilities it lacks: {}; CAP_SYS_ADMIN also does",
        missing.join(", ")
    )]
    NotPrivileged { missing: Vec<&'static str> },
    #[error(
        "no cgroup v2 file system is mounted (see /proc/self/mountinfo): mount one \
         (`mount -t cgroup2 none /sys/fs/cgroup`) or pass --cgroup-root"
    )]
    NoCgroup2,
    #[error("cgroup root {path}: {source}")]
    CgroupRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ring buffer size {bytes} must be a power of two and at least 4096 bytes")]
    BadRingSize { bytes: u32 },
    #[error(
        "loading the eBPF programs failed (respwatchd needs Linux >= 5.10 with BPF ring buffers, \
         BTF, socket-local storage and cgroup_skb/sockops programs): {source}"
    )]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no {what} named {name}")]
    Missing { what: &'static str, name: String },
    #[error("attaching {program} to {target} failed: {source}")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("reading {what}: {source}")]
    Proc {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting on the ring buffer: {0}")]
    Poll(#[source] std::io::Error),
    #[error("malformed ring buffer record ({len} bytes): {why}")]
    BadRecord { len: usize, why: &'static str },
    #[error(
        "the {program} program was detached from outside (its link points at no cgroup any \
         more): nothing is captured"
    )]
    Detached { program: &'static str },
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Bytes of the kernel-to-user data rings together (a power of two), split evenly between
    /// them; the control ring gets a sixteenth more.
    pub ring_bytes: u32,
    /// Only some namespaces are observed (`--namespaces`): cgroups handed to
    /// [`Capture::exclude_cgroup`] are then skipped in the kernel.
    pub scoped: bool,
    /// The cgroup v2 directory to attach to; `None`: the hierarchy's root, found in
    /// `/proc/self/mountinfo`.
    pub cgroup_root: Option<PathBuf>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            ring_bytes: 64 * 1024 * 1024,
            scoped: false,
            cgroup_root: None,
        }
    }
}

/// The kernel's counters: what it could not deliver, by [`LossReason`], and more.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub losses: [u64; LOSS_REASONS as usize],
    /// Payload bytes of the data records lost to a full ring.
    pub lost_bytes: u64,
    /// Close records that waited in the overflow map.
    pub closes_deferred: u64,
}

/// How long records may wait in the ring before the reader drains it anyway. The kernel wakes
/// the reader early only per [`wakeup_bytes_per_cpu`] bytes written, so this bounds the delay
/// under light traffic; timestamps come from the kernel and are not affected.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Bytes one CPU writes to its ring before it wakes the reader ahead of [`DRAIN_INTERVAL`]: an
/// eighth of the ring (at most 1 MiB), so a burst never fills it between two drains.
fn wakeup_bytes_per_cpu(bytes_per_ring: u32) -> u64 {
    (u64::from(bytes_per_ring) / 8).min(1024 * 1024)
}

/// The names of the data rings in the eBPF object, in the programs' order.
const RING_NAMES: [&str; RING_MAPS as usize] = ["RECORDS_0", "RECORDS_1", "RECORDS_2", "RECORDS_3"];

/// The ring of open and close records.
const CONTROL_RING: &str = "CONTROL";

/// Bytes of the control ring: a sixteenth of the data rings' (at least a page), room for
/// thousands of connections opening or closing between two drains.
fn control_ring_bytes(ring_bytes: u32, page_bytes: u32) -> u32 {
    (ring_bytes / 16).max(page_bytes)
}

/// How many record rings to use and the bytes of each: one per CPU up to [`RING_MAPS`], a
/// power of two so that `ring_bytes` splits into equal powers of two, and none smaller than a
/// page (a small `ring_bytes` gets fewer rings).
fn ring_layout(ring_bytes: u32, cpus: usize, page_bytes: u32) -> (u32, u32) {
    let mut rings = RING_MAPS
        .min(u32::try_from(cpus).unwrap_or(u32::MAX))
        .max(1);
    rings = 1 << rings.ilog2();
    while rings > 1 && ring_bytes / rings < page_bytes {
        rings /= 2;
    }
    (rings, ring_bytes / rings)
}

fn page_bytes() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(page).unwrap_or(4096)
}

/// CPUs the programs may run on. If sysfs cannot say, assume many: that only costs rings.
fn possible_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or_else(|(path, error)| {
        tracing::warn!(path, %error, "cannot count CPUs; using the most rings");
        RING_MAPS as usize
    })
}

/// Records read per ring per batch at most: the stages after capture work on a batch at a time,
/// and a batch that fits in the CPU cache is processed faster than one that does not.
const MAX_BATCH_PER_RING: usize = 4096;

/// The programs and their attachments, for status and the README's `bpftool` checks.
const PROGRAMS: [(&str, &str); 3] = [
    ("ingress", "cgroup_skb/ingress"),
    ("egress", "cgroup_skb/egress"),
    ("sock_events", "sockops"),
];

pub struct Capture {
    /// The data rings, then the control ring.
    rings: Vec<AsyncFd<ring::Ring>>,
    drain: tokio::time::Interval,
    /// The last batch stopped at [`MAX_BATCH_PER_RING`] on some ring: more records wait.
    more: Cell<bool>,
    /// Every record up to this time has been handed on.
    handed_on_up_to: Cell<u64>,
    late: Cell<u64>,
    out_of_scope: HashMap<MapData, u64, u8>,
    late_closes: HashMap<MapData, u64, CloseRecord>,
    untrack: HashMap<MapData, u64, u8>,
    /// Cgroups handed to the kernel (or that failed to be): each is tried once.
    exclusions_tried: std::collections::HashSet<u64>,
    excluded: usize,
    counters: PerCpuArray<MapData, u64>,
    attached: Vec<String>,
    /// Our programs' kernel ids, to check that their links stay attached.
    program_ids: Vec<(&'static str, u32)>,
    root: CgroupRoot,
    /// Holds the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    #[cfg(feature = "record-dump")]
    dump: Option<dump::RecordDump>,
    scratch: RefCell<BatchScratch>,
}

/// What [`Capture::read_batch`] works in: per ring the records it took, the rings whose batch
/// was cut short, which records stay in the batch, and the keys it is put in order by.
#[derive(Default)]
struct BatchScratch {
    ranges: Vec<std::ops::Range<usize>>,
    cut_short: Vec<u64>,
    keep: Vec<bool>,
    sort_keys: Vec<(u64, u32)>,
}

/// Records of one batch, borrowed from the rings: their space goes back to the kernel when the
/// batch is dropped, so the caller must be done with every record by then.
pub struct Batch<'a> {
    capture: &'a Capture,
    /// Per ring, how far its records were taken.
    positions: SmallVec<[u64; 8]>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        for (ring, position) in self.capture.rings.iter().zip(&self.positions) {
            ring.get_ref().release(*position);
        }
    }
}

impl Capture {
    /// Checks privileges and kernel features, loads every program and attaches it to the cgroup
    /// v2 root. Needs a tokio runtime.
    pub fn start(config: &CaptureConfig) -> Result<Self, CaptureError> {
        if !config.ring_bytes.is_power_of_two() || config.ring_bytes < 4096 {
            return Err(CaptureError::BadRingSize {
                bytes: config.ring_bytes,
            });
        }
        preflight::check_privileges()?;
        let root = preflight::cgroup_root(config.cgroup_root.as_deref())?;
        if !root.is_hierarchy_root {
            tracing::warn!(
                path = %root.path.display(),
                "attaching below the cgroup v2 root: only processes in this subtree are seen \
                 (mount the host's cgroup2 hierarchy, or pass --cgroup-root)"
            );
        }
        preflight::raise_memlock_limit();

        let self_tgid = std::process::id();
        let page = page_bytes();
        let (rings, bytes_per_ring) = ring_layout(config.ring_bytes, possible_cpus(), page);
        let control_bytes = control_ring_bytes(config.ring_bytes, page);
        let wakeup = wakeup_bytes_per_cpu(bytes_per_ring);
        let scoped = u8::from(config.scoped);
        let mut loader = EbpfLoader::new();
        loader
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("WAKEUP_BYTES_PER_CPU", &wakeup, true)
            .override_global("SCOPED", &scoped, true)
            .override_global("RINGS", &rings, true);
        for (index, name) in (0..).zip(RING_NAMES) {
            // Rings the programs do not use still need a valid size: the smallest.
            loader.map_max_entries(name, if index < rings { bytes_per_ring } else { page });
        }
        loader.map_max_entries(CONTROL_RING, control_bytes);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| CaptureError::Load {
                source: Box::new(source),
            })?;
        tracing::info!(
            rings,
            bytes_per_ring,
            control_bytes,
            root = %root.path.display(),
            "record rings"
        );

        let cgroup =
            std::fs::File::open(&root.path).map_err(|source| CaptureError::CgroupRoot {
                path: root.path.clone(),
                source,
            })?;
        // The ownership callbacks first: a connection established between two attachments must
        // not lose its owner. Then egress before ingress.
        attach_sockops(&mut ebpf, &cgroup, &root.path)?;
        for (program, attach_type) in [
            ("egress", CgroupSkbAttachType::Egress),
            ("ingress", CgroupSkbAttachType::Ingress),
        ] {
            attach_skb(&mut ebpf, program, attach_type, &cgroup, &root.path)?;
        }
        let attached = PROGRAMS
            .iter()
            .map(|(name, kind)| format!("{name}@{kind}:{}", root.path.display()))
            .collect();
        let program_ids = PROGRAMS
            .iter()
            .map(|(name, _)| {
                let program = ebpf.program(name).ok_or_else(|| missing("program", name))?;
                let info = program
                    .info()
                    .map_err(|source| attach_error(name, &root.path, source))?;
                Ok((*name, info.id()))
            })
            .collect::<Result<Vec<_>, CaptureError>>()?;

        let rings = RING_NAMES
            .into_iter()
            .take(rings as usize)
            .map(|name| (name, bytes_per_ring))
            .chain([(CONTROL_RING, control_bytes)])
            .map(|(name, bytes)| take_ring(&mut ebpf, name, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?)
            .map_err(map_error("COUNTERS"))?;
        let out_of_scope = HashMap::try_from(take_map(&mut ebpf, "OUT_OF_SCOPE")?)
            .map_err(map_error("OUT_OF_SCOPE"))?;
        let late_closes = HashMap::try_from(take_map(&mut ebpf, "LATE_CLOSES")?)
            .map_err(map_error("LATE_CLOSES"))?;
        let untrack =
            HashMap::try_from(take_map(&mut ebpf, "UNTRACK")?).map_err(map_error("UNTRACK"))?;
        let mut drain = tokio::time::interval(DRAIN_INTERVAL);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            rings,
            drain,
            more: Cell::new(false),
            handed_on_up_to: Cell::new(0),
            late: Cell::new(0),
            out_of_scope,
            late_closes,
            untrack,
            exclusions_tried: std::collections::HashSet::new(),
            excluded: 0,
            counters,
            attached,
            program_ids,
            root,
            _ebpf: ebpf,
            #[cfg(feature = "record-dump")]
            dump: dump::RecordDump::from_env().map_err(CaptureError::RecordDump)?,
            scratch: RefCell::default(),
        })
    }

    /// `program@attach-type:cgroup` for every attachment.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Fails once any of our programs is no longer attached (detached from outside): the
    /// daemon would otherwise go on serving as if it saw everything.
    pub fn check_attached(&self) -> Result<(), CaptureError> {
        let live = links::attached_program_ids().map_err(|source| CaptureError::Proc {
            what: "/proc/self/fdinfo",
            source,
        })?;
        match self.program_ids.iter().find(|(_, id)| !live.contains(id)) {
            Some((program, _)) => Err(CaptureError::Detached { program }),
            None => Ok(()),
        }
    }

    /// The cgroup v2 directory the programs are attached to.
    pub fn cgroup_root(&self) -> &Path {
        &self.root.path
    }

    /// Waits until records may be waiting: a kernel wakeup of any ring, or the drain timer
    /// (at once when the last batch stopped at its limit).
    pub async fn wait(&mut self) -> Result<(), CaptureError> {
        if !self.more.get() {
            tokio::select! {
                woken = any_ring_woken(&self.rings) => woken.map_err(CaptureError::Poll)?,
                _ = self.drain.tick() => {}
            }
        }
        Ok(())
    }

    /// Appends to `out`, oldest first and borrowed from the rings, every record that nothing
    /// older can still precede; later ones stay in their ring. Malformed records are an error
    /// for the caller to count; the rest of the batch is still delivered. `starts` is scratch
    /// space (where each record starts in its ring).
    pub fn read_batch<'a>(
        &'a self,
        out: &mut Vec<Record<'a>>,
        starts: &mut Vec<u64>,
        bad: &mut Vec<CaptureError>,
    ) -> Batch<'a> {
        // Everything committed before this instant is in the rings now.
        let drained_from = crate::pipeline::monotonic_ns();
        let first_watermark = order::watermark(drained_from, []);
        let base = out.len();
        starts.clear();
        // Kept across batches: a batch allocates nothing.
        let mut scratch = self.scratch.borrow_mut();
        let BatchScratch {
            ranges,
            cut_short,
            keep,
            sort_keys,
        } = &mut *scratch;
        ranges.clear();
        cut_short.clear();
        #[cfg(feature = "record-dump")]
        let mut raws = Vec::new();
        for ring in &self.rings {
            let ring = ring.get_ref();
            let from = out.len();
            let mut taken = 0;
            while let Some(slot) = ring.next() {
                if Record::timestamp(slot.bytes).is_some_and(|ts| ts > first_watermark) {
                    ring.rewind(slot.start);
                    break;
                }
                match Record::parse(slot.bytes) {
                    Ok(record) => {
                        out.push(record);
                        starts.push(slot.start);
                        #[cfg(feature = "record-dump")]
                        raws.push(slot.bytes);
                    }
                    Err(error) => bad.push(error),
                }
                taken += 1;
                if taken == MAX_BATCH_PER_RING {
                    if let Some(last) = out[from..].last() {
                        cut_short.push(last.ts_ns());
                    }
                    break;
                }
            }
            ranges.push(from..out.len());
        }
        self.more.set(!cut_short.is_empty());
        let watermark = order::watermark(drained_from, cut_short.iter().copied());
        // Records past the final watermark go back to their ring, with everything after them.
        keep.clear();
        keep.resize(out.len() - base, true);
        for (ring, range) in self.rings.iter().zip(ranges.iter()) {
            if let Some(first_late) = out[range.clone()]
                .iter()
                .position(|record| record.ts_ns() > watermark)
            {
                let at = range.start + first_late;
                ring.get_ref().rewind(starts[at - base]);
                keep[at - base..range.end - base].fill(false);
            }
        }
        #[cfg(feature = "record-dump")]
        if let Some(dump) = &self.dump {
            dump.write(
                raws.into_iter()
                    .zip(keep.iter())
                    .filter_map(|(raw, kept)| kept.then_some(raw))
                    .collect(),
            );
        }
        let mut index = 0;
        out.retain(|_| {
            let kept = index < base || keep[index - base];
            index += 1;
            kept
        });
        let handed_on_up_to = self.handed_on_up_to.get();
        let late = out[base..]
            .iter()
            .filter(|record| record.ts_ns() < handed_on_up_to)
            .count();
        self.late.set(self.late.get() + late as u64);
        self.handed_on_up_to.set(handed_on_up_to.max(watermark));
        order::merge(&mut out[base..], sort_keys);
        Batch {
            capture: self,
            positions: self
                .rings
                .iter()
                .map(|ring| ring.get_ref().position())
                .collect(),
        }
    }

    /// Records that arrived after newer ones had been handed on (a program preempted between
    /// reading the clock and committing): they were handed on out of order.
    pub fn late_records(&self) -> u64 {
        self.late.get()
    }

    /// Close records that did not fit in a ring and waited in the kernel's overflow map, taken
    /// out of it (oldest first).
    pub fn take_late_closes(&mut self, out: &mut Vec<Close>) {
        let start = out.len();
        for (cookie, close) in self.late_closes.iter().filter_map(Result::ok) {
            out.push(Close::from_kernel(&close));
            let _ = cookie;
        }
        for close in &out[start..] {
            let _ = self.late_closes.remove(&close.cookie);
        }
        out[start..].sort_by_key(|close| close.ts_ns);
    }

    /// Stops the kernel from tracking a connection joined mid-stream that turned out not to be
    /// RESP.
    pub fn untrack(&mut self, cookie: u64) -> Result<(), CaptureError> {
        self.untrack
            .insert(cookie, 1, 0)
            .map_err(map_error("UNTRACK"))
    }

    /// Stops the kernel from looking at sockets of this cgroup (it is outside `--namespaces`; has
    /// no effect without a scope). Returns how many cgroups are excluded so far.
    pub fn exclude_cgroup(&mut self, cgroup_id: u64) -> Result<usize, CaptureError> {
        if self.exclusions_tried.insert(cgroup_id) {
            self.out_of_scope
                .insert(cgroup_id, 1, 0)
                .map_err(map_error("OUT_OF_SCOPE"))?;
            self.excluded += 1;
        }
        Ok(self.excluded)
    }

    /// Totals of the kernel's per-CPU counters.
    pub fn kernel_counters(&self) -> Result<KernelCounters, CaptureError> {
        let total = |index: u32| -> Result<u64, CaptureError> {
            let per_cpu = self
                .counters
                .get(&index, 0)
                .map_err(map_error("COUNTERS"))?;
            Ok(per_cpu.iter().sum())
        };
        let mut counters = KernelCounters {
            lost_bytes: total(kernel_counter::RING_FULL_BYTES)?,
            closes_deferred: total(kernel_counter::CLOSE_DEFERRED)?,
            ..KernelCounters::default()
        };
        for reason in LossReason::ALL {
            counters.losses[reason as usize] = total(reason as u32)?;
        }
        Ok(counters)
    }
}

fn attach_sockops(
    ebpf: &mut Ebpf,
    cgroup: &std::fs::File,
    root: &Path,
) -> Result<(), CaptureError> {
    let program: &mut SockOps = ebpf
        .program_mut("sock_events")
        .ok_or_else(|| missing("program", "sock_events"))?
        .try_into()
        .map_err(|source| attach_error("sock_events", root, source))?;
    program
        .load()
        .map_err(|source| attach_error("sock_events", root, source))?;
    // `Single` passes no flags: the kernel rejects any flag on cgroup links, and links coexist
    // with other programs on the same cgroup anyway.
    program
        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
        .map_err(|source| attach_error("sock_events", root, source))?;
    Ok(())
}

fn attach_skb(
    ebpf: &mut Ebpf,
    name: &'static str,
    attach_type: CgroupSkbAttachType,
    cgroup: &std::fs::File,
    root: &Path,
) -> Result<(), CaptureError> {
    let program: &mut CgroupSkb = ebpf
        .program_mut(name)
        .ok_or_else(|| missing("program", name))?
        .try_into()
        .map_err(|source| attach_error(name, root, source))?;
    program
        .load()
        .map_err(|source| attach_error(name, root, source))?;
    program
        .attach(cgroup.as_fd(), attach_type, CgroupAttachMode::Single)
        .map_err(|source| attach_error(name, root, source))?;
    Ok(())
}

/// Waits until the kernel has woken the reader of at least one ring. The readiness of every
/// woken ring is cleared before the caller drains them all, so a wakeup that comes during the
/// drain is not lost.
fn any_ring_woken(rings: &[AsyncFd<ring::Ring>]) -> impl Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| {
        let mut woken = false;
        for ring in rings {
            match ring.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    woken = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
        }
        if woken {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, CaptureError> {
    ebpf.take_map(name).ok_or_else(|| missing("map", name))
}

/// Takes a record ring out of the object, maps it, and registers it with the runtime.
fn take_ring(
    ebpf: &mut Ebpf,
    name: &'static str,
    bytes: u32,
) -> Result<AsyncFd<ring::Ring>, CaptureError> {
    let Map::RingBuf(map) = take_map(ebpf, name)? else {
        return Err(missing("ring buffer", name));
    };
    let ring = ring::Ring::new(map, bytes, page_bytes() as usize).map_err(CaptureError::Poll)?;
    // SAFETY: the ring owns its map's fd and lives inside the AsyncFd, so the fd stays open for
    // as long as it is registered.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|error| CaptureError::Poll(error.into()))
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map {
        name,
        source: Box::new(source),
    }
}

fn missing(what: &'static str, name: &str) -> CaptureError {
    CaptureError::Missing {
        what,
        name: name.into(),
    }
}

fn attach_error(
    program: &'static str,
    root: &Path,
    source: aya::programs::ProgramError,
) -> CaptureError {
    CaptureError::Attach {
        program,
        target: root.display().to_string(),
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ring_per_cpu_up_to_the_maps_there_are() {
        assert_eq!(ring_layout(64 << 20, 1, 4096), (1, 64 << 20));
        assert_eq!(ring_layout(64 << 20, 2, 4096), (2, 32 << 20));
        assert_eq!(ring_layout(64 << 20, 3, 4096), (2, 32 << 20));
        assert_eq!(
            ring_layout(64 << 20, 96, 4096),
            (RING_MAPS, (64 << 20) / RING_MAPS)
        );
    }

    #[test]
    fn no_ring_is_smaller_than_a_page() {
        assert_eq!(ring_layout(4096, 8, 4096), (1, 4096));
        assert_eq!(ring_layout(8192, 8, 4096), (2, 4096));
        assert_eq!(ring_layout(64 << 10, 8, 64 << 10), (1, 64 << 10));
    }
}
