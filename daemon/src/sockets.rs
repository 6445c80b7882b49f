//! Connection addresses, and the owner of a socket the kernel could not attribute.
//!
//! The kernel names a connection's process at connect() or listen() (accepted sockets inherit
//! their listener's). Sockets that connected or listened before the daemon started have no
//! owner there; for those, the process is found once in `/proc`: the socket's inode in its
//! network namespace's TCP table, then the process of the socket's cgroup that holds it (for an
//! accepted socket not yet accepted by the application: the one that holds the listener). That
//! needs to read other processes' `/proc/<pid>/fd` and `/proc/<pid>/ns/net`: CAP_SYS_PTRACE
//! (the kernel's ptrace access check: other users' processes, and root's when ours has fewer
//! capabilities, as in a container) and CAP_DAC_READ_SEARCH (other users' `fd` directories are
//! mode 0500); without them, such connections keep their cgroup (container, pod) and pid 0.
use std::{
    collections::HashMap,
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use crate::capture::Opener;

/// The two ends of a TCP connection, seen from the traced socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAddrs {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl SocketAddrs {
    pub fn local_port(&self) -> Option<u16> {
        Some(self.local.port()).filter(|port| *port != 0)
    }

    pub fn peer(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }
}

impl fmt::Display for SocketAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.local, self.peer)
    }
}

/// `st` of a TCP table line.
const TCP_LISTEN: u8 = 0x0a;

/// Owners of sockets the kernel could not attribute, found in `/proc`.
pub struct Owners {
    cgroup_root: PathBuf,
    /// Listener owner by (cgroup, local port): every connection a pre-existing listener
    /// accepts asks the same question.
    listeners: HashMap<(u64, u16), Option<(u32, String)>>,
}

impl Owners {
    pub fn new(cgroup_root: PathBuf) -> Self {
        Self {
            cgroup_root,
            listeners: HashMap::new(),
        }
    }

    /// The pid and comm of the process that holds the socket `local`→`remote` of cgroup
    /// `cgroup_id` (whose path, relative to the cgroup root, is `cgroup_path` when known).
    pub fn find(
        &mut self,
        cgroup_id: u64,
        cgroup_path: Option<&str>,
        local: SocketAddr,
        remote: SocketAddr,
        opener: Option<Opener>,
    ) -> Option<(u32, String)> {
        if opener == Some(Opener::Passive)
            && let Some(known) = self.listeners.get(&(cgroup_id, local.port()))
            && known
                .as_ref()
                .is_none_or(|(pid, _)| crate::enrich::process_alive(*pid))
        {
            return known.clone();
        }
        let pids = self.candidates(cgroup_path);
        let mut tables: HashMap<u64, Vec<TcpSocket>> = HashMap::new();
        for pid in &pids {
            if let Some(netns) = link_inode(&format!("/proc/{pid}/ns/net"), "net:[") {
                tables.entry(netns).or_insert_with(|| read_tcp_tables(*pid));
            }
        }
        let sockets: Vec<&TcpSocket> = tables.values().flatten().collect();
        let connection = sockets
            .iter()
            .find(|s| s.state != TCP_LISTEN && same(s.local, local) && same(s.peer, remote))
            .map(|s| s.inode);
        let listener = sockets
            .iter()
            .find(|s| s.state == TCP_LISTEN && s.local.port() == local.port())
            .map(|s| s.inode);
        let owner_of = |inode: Option<u64>| {
            let inode = inode?;
            let target = format!("socket:[{inode}]");
            pids.iter()
                .find(|pid| holds(**pid, &target))
                .map(|pid| (*pid, comm_of(*pid)))
        };
        if let Some(owner) = owner_of(connection) {
            return Some(owner);
        }
        let owner = owner_of(listener);
        if owner.is_none() {
            tracing::debug!(
                %local,
                %remote,
                candidates = pids.len(),
                connection,
                listener,
                "no process found holding a socket older than the daemon"
            );
        }
        if opener == Some(Opener::Passive) {
            self.listeners
                .insert((cgroup_id, local.port()), owner.clone());
        }
        owner
    }

    /// The processes of the socket's cgroup, or every process when the cgroup is unknown.
    fn candidates(&self, cgroup_path: Option<&str>) -> Vec<u32> {
        let from_cgroup = cgroup_path.and_then(|path| {
            let procs = self
                .cgroup_root
                .join(path.trim_start_matches('/'))
                .join("cgroup.procs");
            fs::read_to_string(procs).ok()
        });
        match from_cgroup {
            Some(text) => text
                .lines()
                .filter_map(|line| line.trim().parse().ok())
                .collect(),
            None => fs::read_dir("/proc")
                .map(|entries| {
                    entries
                        .flatten()
                        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Whether one of `pid`'s file descriptors is `target` (`socket:[inode]`).
fn holds(pid: u32, target: &str) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target))
}

fn comm_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim_end().to_owned())
        .unwrap_or_default()
}

/// Addresses equal, or both loopback addresses of the same port (a socket bound to 127.0.0.1
/// shows it; a packet to it may carry 127.0.0.1 or ::ffff:127.0.0.1).
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_loopback() && b.ip().is_loopback())
}

/// The inode in a `/proc` link such as `socket:[1234]` or `net:[4026531840]`.
fn link_inode(path: &str, prefix: &str) -> Option<u64> {
    fs::read_link(path)
        .ok()?
        .to_str()?
        .strip_prefix(prefix)?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TcpSocket {
    local: SocketAddr,
    peer: SocketAddr,
    state: u8,
    inode: u64,
}

/// Every TCP socket of the process's network namespace.
fn read_tcp_tables(pid: u32) -> Vec<TcpSocket> {
    let mut sockets = Vec::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            sockets.extend(tcp_sockets(&text));
        }
    }
    sockets
}

/// The sockets in the text of `/proc/net/tcp` or `/proc/net/tcp6`.
fn tcp_sockets(table: &str) -> impl Iterator<Item = TcpSocket> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        Some(TcpSocket {
            local: parse_hex_addr(fields.get(1)?)?,
            peer: parse_hex_addr(fields.get(2)?)?,
            state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
            inode: fields.get(9)?.parse().ok()?,
        })
    })
}

/// `0100007F:1F90` (IPv4, or 32 hex digits for IPv6, both in host-order 32-bit words).
fn parse_hex_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (word, chunk) in bytes.chunks_mut(4).enumerate() {
                let hex = addr.get(word * 8..word * 8 + 8)?;
                chunk.copy_from_slice(&u32::from_str_radix(hex, 16).ok()?.to_le_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   100        0 25816 1 0000000000000000 100 0 0 10 0
   1: 0100007F:18EB 0100007F:D4F2 01 00000000:00000000 00:00000000 00000000   100        0 31337 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn reads_connections_and_listeners_of_a_tcp_table() {
        let sockets: Vec<TcpSocket> = tcp_sockets(TCP).collect();
        assert_eq!(
            sockets,
            [
                TcpSocket {
                    local: "127.0.0.1:6379".parse().unwrap(),
                    peer: "0.0.0.0:0".parse().unwrap(),
                    state: TCP_LISTEN,
                    inode: 25816
                },
                TcpSocket {
                    local: "127.0.0.1:6379".parse().unwrap(),
                    peer: "127.0.0.1:54514".parse().unwrap(),
                    state: 1,
                    inode: 31337
                }
            ]
        );
    }

    #[test]
    fn parses_ipv6_and_mapped_ipv4() {
        assert_eq!(
            parse_hex_addr("00000000000000000000000001000000:18EB"),
            Some("[::1]:6379".parse().unwrap())
        );
        assert_eq!(
            parse_hex_addr("0000000000000000FFFF00000100007F:18EB"),
            Some("127.0.0.1:6379".parse().unwrap())
        );
        assert_eq!(parse_hex_addr("zz:18EB"), None);
    }

    #[test]
    fn finds_the_owner_of_its_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let mut owners = Owners::new(PathBuf::from("/nonexistent"));
        let found = owners.find(
            0,
            None,
            client.local_addr().unwrap(),
            client.peer_addr().unwrap(),
            None,
        );
        assert_eq!(found.map(|(pid, _)| pid), Some(std::process::id()));
    }
}
