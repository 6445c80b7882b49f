//! A BPF ring buffer read in place. Records are borrowed from the ring's memory for as long as
//! the daemon works on them and the space is handed back to the kernel afterwards, so a payload
//! that is only skipped (the body of a large value) is never copied in user space.
//!
//! Layout (kernel/bpf/ringbuf.c): a consumer-position page the reader writes, then a producer
//! page and the data pages, mapped twice in a row so that a record that wraps around the end is
//! contiguous. Each record starts with an 8-byte header: its length, with a busy bit (not yet
//! committed) and a discard bit, and is padded to 8 bytes.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: u64 = 8;

/// One mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: libc::c_int,
        offset: usize,
    ) -> std::io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: a fresh shared mapping of the ring's fd; the kernel checks the bounds.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("null mapping"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

pub struct Ring {
    consumer: Mapping,
    /// Producer page, then the data pages twice.
    producer: Mapping,
    page: usize,
    mask: u64,
    /// Position up to which records were handed out (read, not yet released).
    read: AtomicU64,
    /// Owns the map's fd (the mappings stay valid without it, but readiness needs it).
    map: MapData,
}

// SAFETY: the mappings are plain shared memory that the kernel writes concurrently anyway;
// every position is accessed atomically, and record bytes are only read.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

/// A record read from a ring: its bytes, and where it starts in the ring.
pub struct Slot<'a> {
    pub bytes: &'a [u8],
    pub start: u64,
}

impl Ring {
    pub fn new(map: MapData, byte_size: u32, page: usize) -> std::io::Result<Self> {
        let consumer = Mapping::new(
            map.fd().as_fd(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            0,
        )?;
        let data = usize::try_from(byte_size).map_err(std::io::Error::other)?;
        let producer = Mapping::new(map.fd().as_fd(), page + 2 * data, libc::PROT_READ, page)?;
        let ring = Self {
            consumer,
            producer,
            page,
            mask: u64::from(byte_size) - 1,
            read: AtomicU64::new(0),
            map,
        };
        ring.read.store(
            ring.consumer_pos().load(Ordering::Acquire),
            Ordering::Relaxed,
        );
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the consumer page, page-aligned, shared with the kernel.
        unsafe { self.consumer.ptr.cast::<AtomicU64>().as_ref() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the producer page, page-aligned, shared with the kernel.
        unsafe { self.producer.ptr.cast::<AtomicU64>().as_ref() }
    }

    /// Where reading goes on: the first record not handed out yet.
    pub fn position(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Rewinds reading to `position`: the records from there on are read again next time (they
    /// stay in the ring until released).
    pub fn rewind(&self, position: u64) {
        self.read.store(position, Ordering::Relaxed);
    }

    /// The next committed record, borrowed from the ring: the caller must not release its space
    /// while it uses it.
    pub fn next(&self) -> Option<Slot<'_>> {
        loop {
            let start = self.read.load(Ordering::Relaxed);
            let produced = self.producer_pos().load(Ordering::Acquire);
            if start >= produced {
                return None;
            }
            let offset = (start & self.mask) as usize;
            // SAFETY: the data pages follow the producer page and are mapped twice, so a record
            // header and body starting inside the first copy are readable contiguously.
            let header = unsafe {
                self.producer
                    .ptr
                    .add(self.page + offset)
                    .cast::<AtomicU32>()
                    .as_ref()
            }
            .load(Ordering::Acquire);
            if header & BUSY != 0 {
                return None;
            }
            let len = header & !(BUSY | DISCARD);
            self.read.store(
                start + (HEADER + u64::from(len)).next_multiple_of(8),
                Ordering::Relaxed,
            );
            if header & DISCARD != 0 {
                continue;
            }
            // SAFETY: as above; `len` bytes of the committed record follow its header, inside
            // the double mapping (a record is never longer than the ring).
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    self.producer
                        .ptr
                        .as_ptr()
                        .add(self.page + offset + HEADER as usize),
                    len as usize,
                )
            };
            return Some(Slot { bytes, start });
        }
    }

    /// Hands the space before `position` back to the kernel: the caller is done with every
    /// record there.
    pub fn release(&self, position: u64) {
        self.consumer_pos().store(position, Ordering::Release);
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
