//! eBPF integration tests, in one process: the programs are loaded and attached once and every
//! test filters what it saw by its own redis-server and client processes.
mod capture;
mod commandstats;
#[path = "../kernel/mod.rs"]
mod kernel;
mod packets;
#[path = "../ports/mod.rs"]
mod ports;
#[path = "../redis/mod.rs"]
mod redis;
mod support;
