//! How a backup cooperates with a concurrent prune, kept out of `backup.rs`
//! so the data path stays readable. The backup calls it in three places:
//!
//! 1. [`BackupGuard::start`] before anything else: writes the backup's lease
//!    (`locks/<id>`), *then* lists the locks and gives up (removing the
//!    lease) if a prune that needs the repository to itself is running
//!    (storage without atomic rename, see `prune_exclusive`); loads every
//!    prune list present (`prune/pending-*`, `prune/deleting-*`) and records
//!    their names in the lease.
//! 2. [`BackupGuard::reusable`] on the chunk listing made after the lease
//!    was written: chunks named in those lists are left out of the "already
//!    stored" set,
//!    so the backup uploads them again (a fresh object with a new
//!    modification time) instead of relying on a copy a prune may delete.
//!    An unchanged disk's previous index is reused only if all its chunks
//!    are in that set, so an index with pending chunks is not reused either.
//! 3. [`BackupGuard::before_snapshot`] just before the snapshot is written:
//!    checks that the lease never lapsed, reads the deletion logs present
//!    now and makes sure every chunk the snapshot needs that a sweep is
//!    deleting still exists, storing it again from the source if not.
//!
//! Why this is enough is argued in ARCHITECTURE.md ("Garbage collection").

use std::collections::HashSet;

use crate::commands::locks::{Lease, LeaseTiming};
use crate::commands::prune::{list_prune_lists, read_prune_list};
use crate::format::lifecycle::{LockKind, PruneListKind};
use crate::{ChunkId, Error, Repository, Result};

/// A running backup's lease and what it learnt from the prune lists.
pub(crate) struct BackupGuard {
    lease: Lease,
    /// Chunk ids named by the prune lists loaded at the start, sorted.
    pending: Vec<ChunkId>,
}

impl BackupGuard {
    /// Writes the lease, checks that no exclusive prune runs, then loads the
    /// prune lists and records their names.
    pub(crate) fn start(repo: &Repository) -> Result<Self> {
        let lease = Lease::start(repo, LockKind::Backup, LeaseTiming::default())?;
        if let Err(e) = refuse_during_exclusive_prune(repo, &lease) {
            lease.release()?;
            return Err(e);
        }
        let mut pending = Vec::new();
        let mut seen = Vec::new();
        for list in list_prune_lists(repo)? {
            // A list that vanished was swept meanwhile; an unreadable one is
            // not named as seen, so prune will not sweep it while we run.
            if let Ok(content) = read_prune_list(repo, &list.key) {
                pending.extend(content.chunks);
                seen.push(list.key);
            }
        }
        pending.sort_unstable();
        pending.dedup();
        lease.set_pending_seen(seen)?;
        Ok(Self { lease, pending })
    }

    /// Of the chunks listed after the lease was written, those a backup may
    /// reuse: all but the ones a prune may delete.
    pub(crate) fn reusable(&self, mut stored: HashSet<ChunkId>) -> HashSet<ChunkId> {
        if !self.pending.is_empty() {
            stored.retain(|id| self.pending.binary_search(id).is_err());
        }
        stored
    }

    /// Chunk ids named by the prune lists loaded at the start, sorted: a
    /// backup must not rely on stored copies of these.
    pub(crate) fn pending(&self) -> &[ChunkId] {
        &self.pending
    }

    /// Checks the lease and the chunks that running sweeps are deleting.
    /// `disks` are the snapshot's data chunks `(chunk number, id)` per
    /// disk; `store_again(disk, chunk)`
    /// reads that chunk from the source again, stores it and returns its id.
    /// Returns how many chunks were stored again.
    pub(crate) fn before_snapshot(
        &self,
        repo: &Repository,
        disks: &[Vec<(u64, ChunkId)>],
        store_again: &dyn Fn(usize, u64) -> Result<ChunkId>,
    ) -> Result<u64> {
        self.lease.check_fresh()?;
        let doomed = being_deleted(repo)?;
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut checked = HashSet::new();
        let mut stored = 0;
        for (disk, chunks) in disks.iter().enumerate() {
            for (i, id) in chunks {
                let (i, id) = (*i, *id);
                if !doomed.contains(&id) || !checked.insert(id) {
                    continue;
                }
                if repo.backend().stat(&Repository::chunk_key(&id))?.is_some() {
                    continue;
                }
                let again = store_again(disk, i)?;
                if again != id {
                    return Err(source_changed(&id));
                }
                stored += 1;
            }
        }
        Ok(stored)
    }

    /// Removes the lease (also done, best effort, when the guard is dropped).
    pub(crate) fn finish(self) -> Result<()> {
        self.lease.release()
    }
}

/// Fails when a live lock that excludes backups (an exclusive prune) is in
/// the repository. Called after the lease is written: an exclusive prune
/// writes its lock before it lists the leases, so either it sees this
/// backup's lease and gives up, or this listing sees its lock. Locks are
/// judged by the storage's clock, read through the backup's own lease.
fn refuse_during_exclusive_prune(repo: &Repository, lease: &Lease) -> Result<()> {
    let locks = lease.list_locks(repo, None)?;
    let Some(holder) = locks
        .iter()
        .find(|l| l.is_live() && l.kind().excludes_backups())
    else {
        return Ok(());
    };
    let (since, host, pid) = holder
        .lock
        .as_ref()
        .map(|l| (l.started.as_str(), l.host.as_str(), l.pid))
        .unwrap_or_default();
    Err(Error::Conflict(format!(
        "a prune that needs the repository to itself is running (since {since}, host '{host}', pid {pid}, lock {}, {}): the storage cannot move objects atomically or the repository keeps chunks in packs, so no backup can run until it ends; nothing was recorded — retry when it ends (if that prune is gone, `vbackup unlock --stale-only` removes its lock once it is stale, at most {} s after its last write; `vbackup locks` shows it, `vbackup unlock {}` removes it at once)",
        &holder.id[..holder.id.len().min(8)],
        crate::commands::describe_object(&crate::commands::with_writer(repo, &holder.object)),
        crate::commands::locks::MAX_STALE_AFTER.as_secs(),
        &holder.id[..holder.id.len().min(8)]
    )))
}

/// Chunk ids named by the deletion logs present now.
fn being_deleted(repo: &Repository) -> Result<HashSet<ChunkId>> {
    let mut doomed = HashSet::new();
    for list in list_prune_lists(repo)? {
        if let Ok(content) = read_prune_list(repo, &list.key) {
            if content.kind == PruneListKind::Deleting {
                doomed.extend(content.chunks);
            }
        }
    }
    Ok(doomed)
}

fn source_changed(id: &ChunkId) -> Error {
    Error::Conflict(format!(
        "chunk {} was deleted by a concurrent prune and the source no longer holds the same data (it changed during the backup); nothing was recorded — run the backup again",
        &id.to_hex()[..16]
    ))
}
