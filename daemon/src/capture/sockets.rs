//! The kernel only looks at plain `read`/`write` on fds it knows are sockets: those created
//! after attach, and the ones this scan finds open before it.
use std::fs;

use aya::maps::{HashMap, MapData};
use respwatch_common::{ConnKey, ConnState, PeerAddr};

/// `BPF_NOEXIST`: never overwrite what the programs already learned about a socket.
const BPF_NOEXIST: u64 = 1;

/// Registers every socket fd of every process (but this one) as a socket to classify. Processes
/// that exit during the scan are skipped. Returns how many sockets were registered.
pub fn seed_existing_sockets(
    conns: &mut HashMap<&mut MapData, ConnKey, ConnState>,
    self_tgid: u32,
) -> usize {
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    let probing = ConnState::probing(0, PeerAddr::UNKNOWN);
    let mut seeded = 0;
    for entry in procs.flatten() {
        let Some(tgid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if tgid == self_tgid {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd_entry in fds.flatten() {
            let Some(fd) = fd_entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
            else {
                continue;
            };
            let is_socket = fs::read_link(fd_entry.path())
                .map(|target| target.to_string_lossy().starts_with("socket:["))
                .unwrap_or(false);
            if is_socket
                && conns
                    .insert(ConnKey { tgid, fd }, probing, BPF_NOEXIST)
                    .is_ok()
            {
                seeded += 1;
            }
        }
    }
    seeded
}
