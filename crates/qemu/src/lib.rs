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
//! - [`nbd::NbdServer`] serves any [`nbd::ExportDisk`] over NBD to QEMU
//!   and its tools (unix socket or TCP, many connections, requests in
//!   flight), on the same wire-format code as the client.
//! - [`img`] wraps `qemu-img` (info, create, compare, convert, and the
//!   persistent dirty bitmaps of images that no VM has open).
//! - **Running VMs**: [`qmp`] talks to QEMU or `qemu-storage-daemon`,
//!   [`live`] freezes a point in time of all disks at once (image fleecing
//!   plus dirty bitmap rotation in one QMP transaction) and exports it over
//!   NBD, [`qga`] asks the guest agent to freeze file systems around that
//!   instant (and runs commands in a guest, or powers it off). Dirty bitmaps, offline (`qemu-nbd --bitmap`) or live, are read
//!   as the `qemu:dirty-bitmap:NAME` metadata context and answer
//!   `DiskReader::changed`, which makes incremental backups read only what
//!   changed.
//!
//! qemu is the authority on image formats, so whenever it refuses something
//! its own words reach the user: errors carry qemu-img's / qemu-nbd's stderr
//! and name the image. The NBD server is treated as untrusted input: replies
//! are validated field by field and never cause a panic or an unbounded
//! allocation.
#![deny(missing_docs)]

mod disk;
mod error;
/// Entry points for the fuzz targets and property tests: only with the
/// `fuzzing` feature (never in the `vbackup` binary).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod img;
mod jsonline;
pub mod live;
pub mod nbd;
mod process;
mod qemu_nbd;
pub mod qga;
pub mod qmp;

pub use disk::{
    check_not_in_use, create_target, create_target_with, file_identity, open_disk,
    open_disk_inspected, open_disk_with, NbdExportOptions, NbdExportSource, NbdSource, NbdTarget,
    OpenDiskOptions, RawFileSource, RawFileTarget, DEFAULT_CONNECTIONS,
};
pub use error::{Error, Result};
pub use img::{image_info, ImageInfo};
pub use nbd::{ConnectOptions, NbdClient};
pub use qemu_nbd::{QemuNbd, QemuNbdOptions};
pub use qga::{ExecStatus, GuestAgent};
pub use qmp::QmpClient;
