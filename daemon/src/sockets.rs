//! Socket addresses of a connection, from `/proc/<pid>/fd` and `/proc/<pid>/net/*`.
use std::{
    collections::HashMap,
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use respwatch_common::PeerAddr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddrs {
    Tcp { local: SocketAddr, peer: SocketAddr },
    Unix { path: String },
}

impl SocketAddrs {
    /// `None` when unknown (Unix sockets; a connection gone before `/proc` could show it).
    pub fn local_port(&self) -> Option<u16> {
        match self {
            SocketAddrs::Tcp { local, .. } => Some(local.port()).filter(|port| *port != 0),
            SocketAddrs::Unix { .. } => None,
        }
    }

    pub fn peer(&self) -> Option<SocketAddr> {
        match self {
            SocketAddrs::Tcp { peer, .. } => Some(*peer),
            SocketAddrs::Unix { .. } => None,
        }
    }
}

impl fmt::Display for SocketAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddrs::Tcp { local, peer } => write!(f, "{local}->{peer}"),
            SocketAddrs::Unix { path } if path.is_empty() => write!(f, "unix"),
            SocketAddrs::Unix { path } => write!(f, "unix:{path}"),
        }
    }
}

/// The socket tables of each network namespace, read at most once per batch of records.
/// Reading `/proc/<pid>/net/tcp` walks the namespace's whole connection table, so a burst of
/// new connections (a client pool connecting) must not read it once per connection. Every
/// socket of a batch existed before the batch was drained, so one read per batch sees them all.
#[derive(Default)]
pub struct SocketTables {
    by_netns: HashMap<u64, HashMap<u64, SocketAddrs>>,
}

impl SocketTables {
    /// Forgets what was read: the next batch reads the tables afresh.
    pub fn clear(&mut self) {
        self.by_netns.clear();
    }

    /// The connection's addresses. The peer the kernel saw at connect/accept is authoritative;
    /// the local address comes from `/proc`, and only when `/proc` still shows that same peer
    /// on this fd (by the time the daemon looks, the fd may already be a newer connection).
    pub fn resolve(&mut self, tgid: u32, fd: i32, kernel_peer: &PeerAddr) -> Option<SocketAddrs> {
        let from_proc = self.lookup_proc(tgid, fd);
        let Some(peer) = peer_addr(kernel_peer) else {
            return from_proc;
        };
        let local = match from_proc {
            Some(SocketAddrs::Tcp { local, peer: seen }) if same_endpoint(seen, peer) => local,
            _ => SocketAddr::new(unspecified_like(peer.ip()), 0),
        };
        Some(SocketAddrs::Tcp { local, peer })
    }

    /// Looks the socket up by its inode in the process's network namespace tables.
    fn lookup_proc(&mut self, tgid: u32, fd: i32) -> Option<SocketAddrs> {
        let inode = link_inode(&format!("/proc/{tgid}/fd/{fd}"), "socket:[")?;
        let netns = link_inode(&format!("/proc/{tgid}/ns/net"), "net:[")?;
        self.by_netns
            .entry(netns)
            .or_insert_with(|| read_tables(tgid))
            .get(&inode)
            .cloned()
    }
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

/// Every TCP and Unix socket of the process's network namespace, by inode.
fn read_tables(tgid: u32) -> HashMap<u64, SocketAddrs> {
    let mut sockets = HashMap::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{tgid}/net/{table}")) {
            sockets.extend(tcp_sockets(&text));
        }
    }
    if let Ok(text) = fs::read_to_string(format!("/proc/{tgid}/net/unix")) {
        sockets.extend(unix_sockets(&text));
    }
    sockets
}

fn peer_addr(peer: &PeerAddr) -> Option<SocketAddr> {
    let ip = match peer.family {
        PeerAddr::AF_INET => IpAddr::V4(Ipv4Addr::new(
            peer.addr[0],
            peer.addr[1],
            peer.addr[2],
            peer.addr[3],
        )),
        PeerAddr::AF_INET6 => {
            let v6 = Ipv6Addr::from(peer.addr);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, peer.port))
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_loopback() && b.ip().is_loopback())
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// The sockets in the text of `/proc/net/tcp` or `/proc/net/tcp6`, by inode.
fn tcp_sockets(table: &str) -> impl Iterator<Item = (u64, SocketAddrs)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let inode = fields.get(9)?.parse::<u64>().ok()?;
        let addrs = SocketAddrs::Tcp {
            local: parse_hex_addr(fields.get(1)?)?,
            peer: parse_hex_addr(fields.get(2)?)?,
        };
        Some((inode, addrs))
    })
}

/// The sockets in the text of `/proc/net/unix`, by inode; the path is that of the listening
/// side.
fn unix_sockets(table: &str) -> impl Iterator<Item = (u64, SocketAddrs)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let inode = fields.get(6)?.parse::<u64>().ok()?;
        let path = fields.get(7).map(|p| (*p).to_owned()).unwrap_or_default();
        Some((inode, SocketAddrs::Unix { path }))
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
    fn finds_tcp_connection_by_inode() {
        let sockets: HashMap<_, _> = tcp_sockets(TCP).collect();
        let found = sockets[&31337].clone();
        assert_eq!(
            found,
            SocketAddrs::Tcp {
                local: "127.0.0.1:6379".parse().unwrap(),
                peer: "127.0.0.1:54514".parse().unwrap()
            }
        );
        assert_eq!(sockets.get(&4242), None);
    }

    #[test]
    fn kernel_peer_wins_over_a_reused_fd() {
        let peer = PeerAddr {
            family: PeerAddr::AF_INET,
            port: 6379,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        assert_eq!(peer_addr(&peer), Some("127.0.0.1:6379".parse().unwrap()));
        // No such process: the peer still stands, the local side is unknown.
        let resolved = SocketTables::default().resolve(u32::MAX, 3, &peer).unwrap();
        assert_eq!(resolved.peer(), Some("127.0.0.1:6379".parse().unwrap()));
        assert_eq!(resolved.local_port(), None);
        assert_eq!(peer_addr(&PeerAddr::UNKNOWN), None);
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
    fn finds_unix_socket_path() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/redis.sock
0000000000000000: 00000003 00000000 00000000 0001 03 4243
";
        let sockets: HashMap<_, _> = unix_sockets(table).collect();
        assert_eq!(
            sockets.get(&4242).cloned(),
            Some(SocketAddrs::Unix {
                path: "/run/redis.sock".into()
            })
        );
        assert_eq!(
            sockets.get(&4243).cloned(),
            Some(SocketAddrs::Unix {
                path: String::new()
            })
        );
    }
}
