//! Feeds arbitrary server bytes to the NBD client: the first byte picks the
//! handshake (option replies) or the transmission phase (simple replies and
//! structured chunks for reads, writes and block status). The client must
//! return an error, never panic, hang or allocate without bound.
//!
//! Run with `cargo +nightly fuzz run nbd_reply` from `crates/qemu`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_qemu::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        let _ = fuzzing::handshake(rest);
    } else {
        let _ = fuzzing::transmission(rest);
    }
});
