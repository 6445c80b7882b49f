//! Capture stage: loads and attaches the eBPF programs, seeds them with the sockets that already
//! exist, and reads typed records from the record rings (as many as CPUs, up to [`RING_MAPS`];
//! each process writes to one).
//!
//! Minimum kernel: 5.8 (BPF ring buffer); syscall tracepoints (`CONFIG_FTRACE_SYSCALLS`) and
//! tracefs. Programs are detached when [`Capture`] is dropped.
mod preflight;
mod record;
mod sockets;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use bytes::BytesMut;
use respwatch_common::{ConnKey, ConnState, LOSS_REASONS, LossReason, RING_MAPS};
use std::task::Poll;
use tokio::io::unix::AsyncFd;

pub use preflight::TRACEFS;
pub use record::{Chunk, ConnRef, Record, comm_str};

/// The eBPF object built from `daemon-ebpf` by the build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/respwatch"));

/// Which program serves which tracepoints, by category. Exit programs come first: an entry
/// attached before its exit would leave arguments behind for an unrelated later exit.
const ATTACHMENTS: &[(&str, &str, &[&str])] = &[
    (
        "sys_exit_io",
        SYSCALLS,
        &[
            "sys_exit_read",
            "sys_exit_readv",
            "sys_exit_recvfrom",
            "sys_exit_recvmsg",
            "sys_exit_write",
            "sys_exit_writev",
            "sys_exit_sendto",
            "sys_exit_sendmsg",
        ],
    ),
    (
        "sys_exit_new_socket",
        SYSCALLS,
        &["sys_exit_socket", "sys_exit_accept", "sys_exit_accept4"],
    ),
    ("sys_enter_read", SYSCALLS, &["sys_enter_read"]),
    ("sys_enter_readv", SYSCALLS, &["sys_enter_readv"]),
    ("sys_enter_recvfrom", SYSCALLS, &["sys_enter_recvfrom"]),
    ("sys_enter_recvmsg", SYSCALLS, &["sys_enter_recvmsg"]),
    ("sys_enter_write", SYSCALLS, &["sys_enter_write"]),
    ("sys_enter_writev", SYSCALLS, &["sys_enter_writev"]),
    ("sys_enter_sendto", SYSCALLS, &["sys_enter_sendto"]),
    ("sys_enter_sendmsg", SYSCALLS, &["sys_enter_sendmsg"]),
    ("sys_enter_close", SYSCALLS, &["sys_enter_close"]),
    (
        "sys_enter_accept",
        SYSCALLS,
        &["sys_enter_accept", "sys_enter_accept4"],
    ),
    ("sys_enter_connect", SYSCALLS, &["sys_enter_connect"]),
    ("sched_process_exit", "sched", &["sched_process_exit"]),
];

const SYSCALLS: &str = "syscalls";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "respwatchd needs root, or the capabilities CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), \
         to load eBPF programs"
    )]
    NotPrivileged,
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({source}); mount it with \
         `mount -t tracefs tracefs {TRACEFS}` (in a container: mount the host's {TRACEFS})"
    )]
    Tracefs { source: std::io::Error },
    #[error("the kernel has no syscall tracepoints {missing:?} (it needs CONFIG_FTRACE_SYSCALLS)")]
    MissingTracepoints { missing: Vec<String> },
    #[error("ring buffer size {bytes} must be a power of two and at least 4096 bytes")]
    BadRingSize { bytes: u32 },
    #[error(
        "loading the eBPF programs failed (respwatchd needs Linux >= 5.8 with BPF ring buffers \
         and BTF): {source}"
    )]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no {what} named {name}")]
    Missing { what: &'static str, name: String },
    #[error("attaching {program} to {tracepoint} failed: {source}")]
    Attach {
        program: String,
        tracepoint: String,
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
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Bytes of all kernel-to-user record rings together (a power of two), split evenly
    /// between them.
    pub ring_bytes: u32,
    /// Only some namespaces are observed (`--namespaces`): cgroups handed to
    /// [`Capture::exclude_cgroup`] are then skipped in the kernel.
    pub scoped: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            ring_bytes: 64 * 1024 * 1024,
            scoped: false,
        }
    }
}

/// Counters of what the kernel side could not deliver, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLosses {
    pub counts: [u64; LOSS_REASONS as usize],
}

/// How long records may wait in the ring before the reader drains it anyway. The kernel wakes
/// the reader early only per [`wakeup_bytes_per_cpu`] bytes written, so this bounds the delay
/// under light traffic; event timestamps come from the kernel and are not affected.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Bytes one CPU writes to the ring before it wakes the reader ahead of [`DRAIN_INTERVAL`]:
/// together the CPUs leave at most an eighth of the ring (and at most 1 MiB) unannounced, so a
/// burst never fills it between two drains.
fn wakeup_bytes_per_cpu(ring_bytes: u32, cpus: usize) -> u64 {
    (u64::from(ring_bytes) / 8).min(1024 * 1024) / cpus.max(1) as u64
}

/// The names of the record rings in the eBPF object, in the programs' order.
const RING_NAMES: [&str; RING_MAPS as usize] = ["RECORDS_0", "RECORDS_1", "RECORDS_2", "RECORDS_3"];

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

/// CPUs the programs may run on. If sysfs cannot say, assume many: that only wakes the reader
/// more often.
fn possible_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or_else(|(path, error)| {
        tracing::warn!(path, %error, "cannot count CPUs; waking the reader more often");
        ASSUMED_CPUS
    })
}

const ASSUMED_CPUS: usize = 256;

/// Records handed on per batch at most: the stages after capture work on a batch at a time,
/// and a batch that fits in the CPU cache is processed faster than one that does not.
const MAX_BATCH: usize = 4096;

/// Room for the copied bytes of a typical batch: later stages hold a chunk only while its batch
/// is processed, so the buffer is freed (or reused) soon after.
const BATCH_BYTES: usize = 256 * 1024;

pub struct Capture {
    /// Each connection's records are in one ring, in order; across rings there is no order.
    rings: Vec<AsyncFd<RingBuf<MapData>>>,
    /// The ring a drain starts with, rotated so that a busy ring cannot starve the others.
    first_ring: usize,
    drain: tokio::time::Interval,
    /// The last batch stopped at [`MAX_BATCH`]: more records are waiting.
    more: bool,
    /// Holds the copied bytes of a batch's records (see [`Record::parse`]).
    batch_bytes: BytesMut,
    out_of_scope: HashMap<MapData, u64, u8>,
    /// Cgroups handed to the kernel (or that failed to be): each is tried once.
    exclusions_tried: std::collections::HashSet<u64>,
    excluded: usize,
    losses: PerCpuArray<MapData, u64>,
    attached: Vec<String>,
    /// Holds the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
}

impl Capture {
    /// Checks privileges and kernel features, loads and attaches every program, and seeds the
    /// kernel with the sockets that were already open. Needs a tokio runtime.
    pub fn start(config: &CaptureConfig) -> Result<Self, CaptureError> {
        if !config.ring_bytes.is_power_of_two() || config.ring_bytes < 4096 {
            return Err(CaptureError::BadRingSize {
                bytes: config.ring_bytes,
            });
        }
        preflight::check_privileges()?;
        preflight::ensure_tracefs()?;
        let tracepoints: Vec<&str> = ATTACHMENTS
            .iter()
            .filter(|(_, category, _)| *category == SYSCALLS)
            .flat_map(|(_, _, tps)| tps.iter().copied())
            .collect();
        preflight::check_syscall_tracepoints(&tracepoints)?;
        preflight::raise_memlock_limit();

        let self_tgid = std::process::id();
        let cpus = possible_cpus();
        let page = page_bytes();
        let (rings, bytes_per_ring) = ring_layout(config.ring_bytes, cpus, page);
        let wakeup = wakeup_bytes_per_cpu(bytes_per_ring, cpus);
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
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| CaptureError::Load {
                source: Box::new(source),
            })?;
        tracing::info!(rings, bytes_per_ring, "record rings");

        let mut attached = Vec::new();
        for (program_name, category, tracepoints) in ATTACHMENTS {
            let program: &mut TracePoint = ebpf
                .program_mut(program_name)
                .ok_or_else(|| CaptureError::Missing {
                    what: "program",
                    name: (*program_name).into(),
                })?
                .try_into()
                .map_err(|source| attach_error(program_name, "-", source))?;
            program
                .load()
                .map_err(|source| attach_error(program_name, "-", source))?;
            for tracepoint in *tracepoints {
                let name = format!("{category}:{tracepoint}");
                program
                    .attach(category, tracepoint)
                    .map_err(|source| attach_error(program_name, &name, source))?;
                attached.push(format!("{program_name}@{name}"));
            }
        }

        // Attached first, seeded second: a socket opened in between is seen by the programs.
        let mut conns: HashMap<_, ConnKey, ConnState> = HashMap::try_from(
            ebpf.map_mut("CONNS").ok_or_else(|| missing_map("CONNS"))?,
        )
        .map_err(|source| CaptureError::Map {
            name: "CONNS",
            source: Box::new(source),
        })?;
        let seeded = sockets::seed_existing_sockets(&mut conns, self_tgid);
        tracing::info!(
            sockets = seeded,
            "seeded sockets that were open before attach"
        );

        let rings = RING_NAMES
            .into_iter()
            .take(rings as usize)
            .map(|name| take_ring(&mut ebpf, name))
            .collect::<Result<Vec<_>, _>>()?;
        let losses = PerCpuArray::try_from(
            ebpf.take_map("LOSSES")
                .ok_or_else(|| missing_map("LOSSES"))?,
        )
        .map_err(|source| CaptureError::Map {
            name: "LOSSES",
            source: Box::new(source),
        })?;
        let out_of_scope = HashMap::try_from(
            ebpf.take_map("OUT_OF_SCOPE")
                .ok_or_else(|| missing_map("OUT_OF_SCOPE"))?,
        )
        .map_err(|source| CaptureError::Map {
            name: "OUT_OF_SCOPE",
            source: Box::new(source),
        })?;
        let mut drain = tokio::time::interval(DRAIN_INTERVAL);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            rings,
            first_ring: 0,
            drain,
            more: false,
            batch_bytes: BytesMut::new(),
            out_of_scope,
            exclusions_tried: std::collections::HashSet::new(),
            excluded: 0,
            losses,
            attached,
            _ebpf: ebpf,
        })
    }

    /// `program@category:tracepoint` for every attachment.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Waits for records (a kernel wakeup of any ring, or the drain timer) and appends every
    /// one that is ready. Malformed records are an error for the caller to count; the rest of
    /// the batch is still delivered.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Record>,
        bad: &mut Vec<CaptureError>,
    ) -> Result<(), CaptureError> {
        if !self.more {
            tokio::select! {
                woken = any_ring_woken(&mut self.rings) => woken.map_err(CaptureError::Poll)?,
                _ = self.drain.tick() => {}
            }
        }
        self.more = self.drain_rings(out, bad);
        Ok(())
    }

    /// Reads up to [`MAX_BATCH`] records from the rings, starting with a different ring each
    /// time; true when it stopped at the limit.
    fn drain_rings(&mut self, out: &mut Vec<Record>, bad: &mut Vec<CaptureError>) -> bool {
        self.batch_bytes.reserve(BATCH_BYTES);
        let count = self.rings.len();
        let mut taken = 0;
        for offset in 0..count {
            let ring = self.rings[(self.first_ring + offset) % count].get_mut();
            while taken < MAX_BATCH
                && let Some(item) = ring.next()
            {
                match Record::parse(&item, &mut self.batch_bytes) {
                    Ok(record) => out.push(record),
                    Err(error) => bad.push(error),
                }
                taken += 1;
            }
        }
        self.first_ring = (self.first_ring + 1) % count;
        taken == MAX_BATCH
    }

    /// Stops the kernel from looking at I/O of this cgroup (it is outside `--namespaces`; has
    /// no effect without a scope). Returns how many cgroups are excluded so far.
    pub fn exclude_cgroup(&mut self, cgroup_id: u64) -> Result<usize, CaptureError> {
        if self.exclusions_tried.insert(cgroup_id) {
            self.out_of_scope
                .insert(cgroup_id, 1, 0)
                .map_err(|source| CaptureError::Map {
                    name: "OUT_OF_SCOPE",
                    source: Box::new(source),
                })?;
            self.excluded += 1;
        }
        Ok(self.excluded)
    }

    /// Totals of the kernel's per-CPU loss counters.
    pub fn kernel_losses(&self) -> Result<KernelLosses, CaptureError> {
        let mut losses = KernelLosses::default();
        for reason in LossReason::ALL {
            let per_cpu =
                self.losses
                    .get(&(reason as u32), 0)
                    .map_err(|source| CaptureError::Map {
                        name: "LOSSES",
                        source: Box::new(source),
                    })?;
            losses.counts[reason as usize] = per_cpu.iter().sum();
        }
        Ok(losses)
    }
}

/// Waits until the kernel has woken the reader of at least one ring. The readiness of every
/// woken ring is cleared before the caller drains them all, so a wakeup that comes during the
/// drain is not lost.
fn any_ring_woken(
    rings: &mut [AsyncFd<RingBuf<MapData>>],
) -> impl Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| {
        let mut woken = false;
        for ring in rings.iter_mut() {
            match ring.poll_read_ready_mut(cx) {
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

/// Takes a record ring out of the object and registers it with the runtime.
fn take_ring(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<AsyncFd<RingBuf<MapData>>, CaptureError> {
    let ring = RingBuf::try_from(ebpf.take_map(name).ok_or_else(|| missing_map(name))?).map_err(
        |source| CaptureError::Map {
            name,
            source: Box::new(source),
        },
    )?;
    // SAFETY: the ring buffer owns its map fd and lives inside the AsyncFd, so the fd stays
    // open for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|error| CaptureError::Poll(error.into()))
}

fn missing_map(name: &str) -> CaptureError {
    CaptureError::Missing {
        what: "map",
        name: name.into(),
    }
}

fn attach_error(
    program: &str,
    tracepoint: &str,
    source: aya::programs::ProgramError,
) -> CaptureError {
    CaptureError::Attach {
        program: program.into(),
        tracepoint: tracepoint.into(),
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
