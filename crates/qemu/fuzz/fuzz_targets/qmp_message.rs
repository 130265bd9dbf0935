//! Feeds arbitrary bytes to the QMP message parser, as if QEMU's monitor
//! had sent them as one line. It must return an error, never panic.
//!
//! Run with `cargo +nightly fuzz run qmp_message` from `crates/qemu`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vbackup_qemu::qmp::parse_message(data);
});
