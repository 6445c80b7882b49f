//! Checks made before loading anything, so that a missing privilege or kernel feature ends
//! with a message that says what to do instead of a raw `EPERM` from deep inside the loader.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::CaptureError;

/// Capabilities the daemon needs (bit numbers from `linux/capability.h`), each with what needs it.
const REQUIRED: [(u32, &str); 3] = [
    (CAP_BPF, "CAP_BPF (load programs, create maps)"),
    (
        CAP_PERFMON,
        "CAP_PERFMON (read the owning process in socket callbacks)",
    ),
    (
        CAP_NET_ADMIN,
        "CAP_NET_ADMIN (load and attach cgroup_skb and sockops programs)",
    ),
];
/// Capabilities without which the daemon runs, but finds no process for connections that were
/// open before it started (see `sockets`): their owners are looked up in other processes'
/// `/proc/<pid>/fd` and `/proc/<pid>/ns/net`.
const FOR_OLDER_CONNECTIONS: [(u32, &str); 2] = [
    (
        CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE (read /proc/<pid>/fd of processes of other users or with more capabilities)",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "CAP_DAC_READ_SEARCH (list other users' /proc/<pid>/fd directories)",
    ),
];
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails when capabilities of [`REQUIRED`] are missing from the effective set (CAP_SYS_ADMIN
/// stands in for all of them, as it does in the kernel); warns about those of
/// [`FOR_OLDER_CONNECTIONS`], whose lack costs attribution only.
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
    let missing = missing_capabilities(effective);
    if !missing.is_empty() {
        return Err(CaptureError::NotPrivileged { missing });
    }
    let lacking = missing_for_older_connections(effective);
    if !lacking.is_empty() {
        tracing::warn!(
            missing = %lacking.join(", "),
            "connections open before respwatchd started will be attributed to their cgroup \
             (container, pod) but not to their process: respwatchd lacks these capabilities"
        );
    }
    Ok(())
}

fn missing_for_older_connections(effective: u64) -> Vec<&'static str> {
    lacking(&FOR_OLDER_CONNECTIONS, effective)
}

fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    if effective & (1u64 << CAP_SYS_ADMIN) != 0 {
        return Vec::new();
    }
    lacking(&REQUIRED, effective)
}

/// What the capabilities of `wanted` missing from `effective` are needed for.
fn lacking(wanted: &[(u32, &'static str)], effective: u64) -> Vec<&'static str> {
    wanted
        .iter()
        .filter(|(cap, _)| effective & (1u64 << cap) == 0)
        .map(|(_, what)| *what)
        .collect()
}

/// Where the programs attach: `explicit` (`--cgroup-root`) or the cgroup v2 mount in
/// `/proc/self/mountinfo`, preferring the root of the hierarchy (directory inode 1) when several
/// are mounted, as in a container that has the host's hierarchy mounted beside its own.
pub fn cgroup_root(explicit: Option<&Path>) -> Result<CgroupRoot, CaptureError> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
                CaptureError::Proc {
                    what: "/proc/self/mountinfo",
                    source,
                }
            })?;
            let mounts = cgroup2_mounts(&mountinfo);
            mounts
                .iter()
                .find(|path| is_hierarchy_root(path))
                .or_else(|| mounts.first())
                .cloned()
                .ok_or(CaptureError::NoCgroup2)?
        }
    };
    let meta = std::fs::metadata(&path).map_err(|source| CaptureError::CgroupRoot {
        path: path.clone(),
        source,
    })?;
    Ok(CgroupRoot {
        is_hierarchy_root: meta.ino() == HIERARCHY_ROOT_INODE,
        path,
    })
}

/// The cgroup v2 root directory's inode number: the id of the root cgroup.
const HIERARCHY_ROOT_INODE: u64 = 1;

fn is_hierarchy_root(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.ino() == HIERARCHY_ROOT_INODE)
}

/// A cgroup v2 directory the programs attach to.
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    pub path: PathBuf,
    /// Whether it is the root of the hierarchy; below it, only the processes under it are seen.
    pub is_hierarchy_root: bool,
}

/// Mount points of cgroup v2 file systems, in mountinfo order.
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent major:minor root mount-point options [optional…] - fstype source …`
            let (before, after) = line.split_once(" - ")?;
            if after.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mount_point = before.split_whitespace().nth(4)?;
            Some(PathBuf::from(unescape_octal(mount_point)))
        })
        .collect()
}

/// Mountinfo escapes spaces, tabs, newlines and backslashes as `\ooo`.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = text.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(octal, 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_in_hybrid_and_unified_layouts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mounts(hybrid),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        let container = "600 500 0:30 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
601 500 0:30 /../../.. /host\\040cgroup ro - cgroup2 cgroup rw
";
        assert_eq!(
            cgroup2_mounts(container),
            [
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/host cgroup")
            ]
        );
        assert!(cgroup2_mounts("22 1 0:21 / /proc rw - proc proc rw\n").is_empty());
    }

    #[test]
    fn names_each_missing_capability() {
        let all = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert!(missing_capabilities(all).is_empty());
        assert!(missing_capabilities(1 << CAP_SYS_ADMIN).is_empty());
        let missing = missing_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON));
        assert_eq!(missing.len(), 1);
        assert!(missing[0].starts_with("CAP_NET_ADMIN"), "{missing:?}");
        assert_eq!(missing_capabilities(0).len(), 3);
        assert!(missing_for_older_connections(u64::MAX).is_empty());
        let lacking = missing_for_older_connections(1 << CAP_SYS_PTRACE);
        assert_eq!(lacking.len(), 1);
        assert!(lacking[0].starts_with("CAP_DAC_READ_SEARCH"), "{lacking:?}");
    }
}
