//! QEMU integration for vbackup: reading and writing virtual disks of any
//! format qemu knows.
//!
//! Why this shape: the backup engine (`vbackup_core`) only sees the
//! [`DiskSource`](vbackup_core::source::DiskSource) /
//! [`DiskTarget`](vbackup_core::source::DiskTarget) traits. This crate
//! implements them:
//!
//! - **Raw images and block devices** are read and written directly with
//!   positional I/O; holes come from `SEEK_DATA` / `SEEK_HOLE`. No process,
//!   no copy.
//! - **Every other format** (qcow2, vmdk, vhdx, vdi, vpc, qed, ...) is served
//!   by a private `qemu-nbd` on a unix socket in a fresh temporary directory,
//!   and read by our own synchronous [`nbd`] client — one connection per
//!   worker thread, sparseness from the `base:allocation` metadata context.
//!   The same client will later read `qemu:dirty-bitmap:NAME` contexts from a
//!   running VM for incremental backups.
//! - [`img`] wraps `qemu-img` (info, create, compare, convert).
//!
//! qemu is the authority on image formats, so whenever it refuses something
//! its own words reach the user: errors carry qemu-img's / qemu-nbd's stderr
//! and name the image. The NBD server is treated as untrusted input: replies
//! are validated field by field and never cause a panic or an unbounded
//! allocation.
#![deny(missing_docs)]

mod disk;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod img;
pub mod nbd;
mod process;
mod qemu_nbd;

pub use disk::{
    create_target, create_target_with, file_identity, open_disk, open_disk_with, NbdSource,
    NbdTarget, OpenDiskOptions, RawFileSource, RawFileTarget, DEFAULT_CONNECTIONS,
};
pub use error::{Error, Result};
pub use img::{image_info, ImageInfo};
pub use nbd::{ConnectOptions, NbdClient};
pub use qemu_nbd::{QemuNbd, QemuNbdOptions};
