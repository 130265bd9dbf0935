//! Feeds arbitrary bytes to the parser of `qemu-img info --output=json`.
//! The JSON comes from qemu-img, but describes an image that may be hostile
//! (a guest's disk, a file from elsewhere): bitmap names, formats and sizes
//! are the image's own. The parser must return an error, never panic.
//!
//! Run with `cargo +nightly fuzz run image_info` from `crates/qemu`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = vbackup_qemu::img::parse_info_json(data) {
        for bitmap in &info.bitmaps {
            let _ = (bitmap.is_recording(), bitmap.is_consistent());
        }
    }
});
