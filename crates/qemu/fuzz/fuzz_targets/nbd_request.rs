//! Feeds arbitrary client bytes to the NBD server's `serve_connection`
//! over a scripted stream, with in-memory exports: the first byte picks a
//! canned handshake (none, structured, simple, read-only) that the rest
//! follows, so the requests are reached too. The server must return, never
//! panic, hang or allocate without bound.
//!
//! Run with `cargo +nightly fuzz run nbd_request` from `crates/qemu`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_qemu::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::server(data);
});
