//! vbackup's core: on-disk formats, crypto, the chunk store and the
//! commands: backup, restore, check/verify, stats, forget, prune, repair,
//! locks and the stored retention policy.
//!
//! This crate has no async runtime, no network code and no CLI: storage comes
//! in through [`vbackup_storage::Backend`], disks through the traits of
//! [`source`]. Work is spread over plain threads with bounded queues, so
//! memory stays proportional to the number of workers times the chunk size,
//! whatever the size of the disks.
//!
//! The data path of a backup: a worker takes the next chunk number, asks its
//! reader which parts of the chunk hold data, reads only those, skips
//! all-zero chunks (holes), names the chunk by its keyed digest, and — only
//! if the repository does not have it yet — compresses, seals and stores it
//! (as its own object, or appended to a pack that is uploaded when full: see
//! [`packs`]).
//! The snapshot (indexes, then manifest) is written last, so an interrupted
//! backup records nothing but leaves its chunks for the next run to reuse.
#![deny(missing_docs)]

pub mod boot_report;
pub mod cbt;
pub mod client_state;
mod compress;
pub mod crypto;
mod error;
pub mod format;
pub mod overlay;
pub mod packs;
mod progress;
pub mod reader;
mod repo;
pub mod source;
pub mod speed;
pub mod trust;

mod commands;

pub use commands::backup::{
    backup, backup_prepare, backup_prepare_started, BackupDisk, BackupOptions, BackupStart,
    BaseIndex, PreparedBackup,
};
pub use commands::check::{check, CheckOptions, CheckReport, Notice, ReadData};
pub use commands::forget::{
    emptied_vms, forget, plan, plan_at, plan_ids, render_plan, Decision, Emptying, ForgetGroup,
    ForgetOptions, ForgetReport,
};
pub use commands::locks::{
    list_locks, read_lock, unlock, Lease, LeaseTiming, LockInfo, CLOCK_SKEW, MAX_STALE_AFTER,
};
pub use commands::policy::{clear_policy, read_policy, set_policy};
pub use commands::prune::{prune, DeferredList, PruneOptions, PruneReport};
pub use commands::repair::{marked_snapshots, read_marker, repair, RepairOptions, RepairReport};
pub use commands::restore::{restore_disk, restore_disk_to_writer, RestoreStats};
pub use commands::stats::{stats, RepoStats};
pub use commands::verify::{verify, AffectedDisk, ChunkProblem, ProblemKind, VerifyReport};
pub use error::{Classified, Error, ErrorClass, Result};
pub use progress::Progress;
pub use repo::{InitOptions, KeyInfo, Repository, Snapshot, FUTURE_SKEW_MINUTES};
pub use source::{DiskReader, DiskSource, DiskTarget, DiskWriter, Extent, ExtentKind};
pub use trust::OpenOptions;

/// The name of a chunk: the keyed digest of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Lower-case hex, as used in object names.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(Self(id))
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// This machine's host name, recorded in snapshots and keys.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// The user running vbackup, recorded in keys: `$USER` when set and not
/// empty (cron and systemd units often leave it unset), else the name of
/// the process's uid in the user database, else the uid number.
pub fn user_name() -> String {
    if let Some(user) = std::env::var("USER").ok().filter(|u| !u.is_empty()) {
        return user;
    }
    let uid = current_uid();
    uid_name(uid).unwrap_or_else(|| uid.to_string())
}

#[allow(unsafe_code)]
fn current_uid() -> libc::uid_t {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The user database's name for `uid` (`getpwuid_r`), if it has one.
#[allow(unsafe_code)]
fn uid_name(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is a plain C struct for which all-zero bytes are a
    // valid (empty) value; getpwuid_r only writes into it.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, `buf.len()` is the
    // buffer's real size, and getpwuid_r is the thread-safe variant.
    let rc = unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || entry.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside
    // `buf`, which is still alive.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    Some(name.to_string_lossy().into_owned()).filter(|n| !n.is_empty())
}

/// The number of worker threads to use when the user does not say.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 32)
        + 2
}

/// True when every byte of `data` is zero; vectorizes well.
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    let wide = words.all(|w| w.iter().fold(0u8, |acc, b| acc | b) == 0);
    wide && words.remainder().iter().all(|b| *b == 0)
}

/// Runs `f` over `items` on up to `workers` scoped threads and returns the
/// results in the order of `items` (for metadata reads, where each item is
/// one request to remote storage).
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let workers = workers.min(items.len());
    if workers <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                let result = f(item);
                *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            });
        }
    });
    slots
        .into_iter()
        .filter_map(|s| s.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}
