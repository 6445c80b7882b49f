//! Free loopback ports for test servers.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Ports already handed out in this test process.
///
/// Binding port 0 and closing the listener returns a port that is free *now*; the kernel may hand
/// the same one to the next caller (two listeners of one daemon, or a parallel test) before the
/// first one is bound. Remembering them rules that out within the process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("bind a loopback port");
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no loopback port left that this test process has not handed out already");
}
