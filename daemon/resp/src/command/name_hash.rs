//! The hash of a command name that places it in the lookup table: compiled into the crate and
//! into its build script, so the table is laid out with the very function that searches it.

/// Slots of the lookup table: a power of two, under half full with ~400 commands, so a lookup
/// compares one name, rarely two.
pub const SLOTS: usize = 1024;

/// FNV-1a (32 bits) of `name`.
pub const fn name_hash(name: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut at = 0;
    while at < name.len() {
        hash ^= name[at] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        at += 1;
    }
    hash
}
