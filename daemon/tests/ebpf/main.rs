//! eBPF integration tests, in one process: the programs are loaded and attached once and every
//! test filters what it saw by its own redis-server and client processes.
mod capture;
mod commandstats;
#[path = "../ports/mod.rs"]
mod ports;
mod support;
