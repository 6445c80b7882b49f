//! Checks made before loading anything, so that a missing privilege or kernel feature ends
//! with a message that says what to do instead of a raw `EPERM` from deep inside the loader.
use std::path::Path;

use super::CaptureError;

/// Where the tracing filesystem is mounted on current kernels.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Capabilities the daemon needs (bit numbers from `linux/capability.h`).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub fn check_privileges() -> Result<(), CaptureError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| CaptureError::Proc {
            what: "/proc/self/status",
            source,
        })?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(CaptureError::NotPrivileged)
    }
}

/// Aya resolves tracepoint ids through tracefs, which a fresh machine may not have mounted.
pub fn ensure_tracefs() -> Result<(), CaptureError> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return Ok(());
    }
    tracing::info!(path = TRACEFS, "tracefs is not mounted; mounting it");
    mount_tracefs().map_err(|source| CaptureError::Tracefs { source })?;
    if events.is_dir() {
        Ok(())
    } else {
        Err(CaptureError::Tracefs {
            source: std::io::Error::other("mounted, but it has no events/ directory"),
        })
    }
}

fn mount_tracefs() -> std::io::Result<()> {
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: NUL-terminated constant strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The tracepoints every capture depends on; a kernel without `CONFIG_FTRACE_SYSCALLS` lacks them.
pub fn check_syscall_tracepoints(tracepoints: &[&str]) -> Result<(), CaptureError> {
    let syscalls = Path::new(TRACEFS).join("events/syscalls");
    let missing: Vec<String> = tracepoints
        .iter()
        .filter(|name| !syscalls.join(name).is_dir())
        .map(|name| (*name).to_owned())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::MissingTracepoints { missing })
    }
}

/// Before Linux 5.11 BPF memory counts against RLIMIT_MEMLOCK. Raising it is best effort: later
/// kernels charge the memory cgroup instead, and some sandboxes forbid raising it at all.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (not needed on Linux >= 5.11)"
        );
    }
}
