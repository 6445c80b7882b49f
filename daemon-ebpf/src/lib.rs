//! Empty library target: lets the daemon name this crate as a build dependency, so cargo
//! rebuilds the daemon (and with it the eBPF object) when this crate changes.
#![no_std]
