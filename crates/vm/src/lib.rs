//! VM backup jobs: the layer that turns "back up this VM" into a
//! changed-block-tracking plan (from `vbackup_core::cbt`), QEMU operations
//! (from `vbackup_qemu`) and an engine run (from `vbackup_core`).
//!
//! - [`offline`]: disk images of a stopped VM. qcow2 images carry
//!   vbackup's persistent dirty bitmaps (`qemu-img bitmap`), read through
//!   `qemu-nbd --bitmap`; other formats are read whole and deduplicated.
//! - [`live`]: a running QEMU or qemu-storage-daemon driven over QMP: one
//!   transaction freezes the point in time of all disks (image fleecing)
//!   and rotates their bitmaps; the point-in-time view is read over NBD.
//! - [`job`]: one request for both ([`job::VmSource`], [`job::backup`]),
//!   the `[vm.NAME]` sections of the configuration file (`vbackup-daemon`).
//!
//! Either way the order is the same, and it is what keeps tracking safe:
//! read (nothing recorded yet) → rotate bitmaps → record the snapshot. A
//! failure before the snapshot leaves the previous snapshot's bitmaps in
//! place, so the next incremental is still valid; a crash after the
//! rotation but before the snapshot only makes the next run fall back to a
//! full read, with its reason.
#![deny(missing_docs)]

pub mod boot;
pub mod definition;
mod error;
pub mod job;
pub mod live;
pub mod offline;
pub mod recover;
pub mod restore;
pub mod sentinel;
pub mod serve;

pub use error::{Error, Result};
pub use vbackup_core::cbt::Requested;
