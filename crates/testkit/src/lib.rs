//! Test harnesses for vbackup's integration tests, in one crate that the
//! other crates use only as a dev-dependency, so nothing here ships in
//! the `vbackup` binary or in a production crate's public API.
//!
//! - [`qemu`]: a real `qemu-storage-daemon` or QEMU virtual machine
//!   serving qcow2 disks, and `qemu-img`/`qemu-io` helpers for images.
//! - [`guest`]: a real small Linux guest (kernel, initramfs, ext4 root
//!   disk with `qemu-ga`) built by `scripts/guest.sh`, booted in QEMU.
//! - [`garage`]: real Garage S3 servers on loopback.
//! - [`server`]: a real `vbackup server` process and its tokens.
//! - [`tls`]: raw TLS connections to a server with a pinned certificate,
//!   for requests the client never sends.
//! - [`memory`]: in-memory disks and restore targets for the engine.
//! - [`cli`]: a temporary repository, cache and passphrase for running
//!   the `vbackup` binary.
//! - [`util`]: small helpers the test files share (process output, data,
//!   folder walks).
//!
//! Everything here fails the calling test with a panic that says what
//! went wrong: that is how a harness reports a broken set-up.
#![deny(missing_docs)]

pub mod cli;
pub mod garage;
pub mod guest;
pub mod memory;
pub mod qemu;
pub mod server;
pub mod tls;
pub mod util;
