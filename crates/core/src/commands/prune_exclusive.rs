//! `vbackup prune` on storage that cannot move objects atomically (plain
//! S3), and in repositories with packs: a "stop-the-world" prune that has
//! the repository to itself.
//!
//! The concurrent prune (`prune.rs`) keeps backups running by moving each
//! doomed object to `trash/` atomically and checking its modification time;
//! without an atomic rename that argument does not hold, so this prune
//! excludes backups instead:
//!
//! 1. Take a `prune-exclusive` lock: write it, *then* list the locks, and
//!    give up (removing it, naming the holders) if another live exclusive
//!    lock or any live backup lease exists ([`Lease::stop_the_world`];
//!    `--stale-after` can only lengthen the leases' limits here).
//!    Backups write their lease, *then* list the locks, and give up if they
//!    find a live `prune-exclusive` lock (`backup_guard`). With
//!    read-after-write and consistent listings, of a backup and a prune
//!    that start together at least one sees the other.
//! 2. Put back what an interrupted concurrent sweep left in `trash/` (by
//!    copy) and remove the pending lists and deletion logs a prune elsewhere
//!    left (they mean nothing once everything unreferenced is deleted, and
//!    backups would keep loading them).
//! 3. Mark: list the chunks and indexes, read every snapshot and each of
//!    their indexes once (the same code as the concurrent prune; unreadable
//!    snapshots or indexes make it refuse).
//! 4. In a repository with packs, repack and rewrite the pack indexes
//!    (`prune_packs`), then delete every unreferenced index, loose chunk
//!    and dropped pack at once: no trash, no pending list, no grace period,
//!    since nothing can start referencing them. Before each deletion the lock must still be fresh: a prune that
//!    was paused past its lock's stale limit may have lost the repository
//!    to a backup that judged the lock stale, and stops.
//! 5. Remove the lock.
//!
//! Killed at any point, it has deleted some objects that no snapshot
//! referenced and left the others: the repository stays consistent and no
//! prune list is left behind; its lock goes stale (at once for processes of
//! the same host, else after its limit) or is removed by `vbackup unlock`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::locks::{list_locks_carefully, Clock, Lease, LeaseTiming};
use super::prune::{
    describe_stale, list_index_sizes, list_prune_lists, restore_trash, PruneOptions, PruneReport,
    References, Stored, SWEEP_MIN_WORKERS,
};
use super::prune_packs::PackPlan;
use crate::packs::Location;
use crate::{ChunkId, Error, Progress, Repository, Result};

/// Runs a prune with the repository to itself; see the module docs.
/// `--dry-run` takes no lock and changes nothing.
pub(crate) fn prune_exclusive(
    repo: &Repository,
    options: &PruneOptions,
    progress: &Progress,
) -> Result<PruneReport> {
    let mut report = PruneReport {
        dry_run: options.dry_run,
        exclusive: true,
        ..PruneReport::default()
    };
    if options.dry_run {
        report.stale_locks = describe_stale(&list_locks_carefully(
            repo,
            options.stale_after,
            Clock::host(),
        )?);
        Exclusive {
            repo,
            options,
            progress,
            lock: None,
            report: &mut report,
        }
        .run()?;
        return Ok(report);
    }
    let (lock, locks) = Lease::stop_the_world(repo, LeaseTiming::default(), options.stale_after)?;
    report.stale_locks = describe_stale(&locks);
    // On failure the lease is dropped, which removes the lock.
    Exclusive {
        repo,
        options,
        progress,
        lock: Some(&lock),
        report: &mut report,
    }
    .run()?;
    lock.release()?;
    Ok(report)
}

/// One object to delete: its position among the stored chunks or indexes
/// (16 bytes: a prune may delete millions).
#[derive(Clone, Copy)]
struct Victim {
    pos: usize,
    is_chunk: bool,
}

fn loose_victims(victims: &[Victim]) -> u64 {
    victims.iter().filter(|v| v.is_chunk).count() as u64
}

/// The state of one exclusive prune.
struct Exclusive<'a> {
    repo: &'a Repository,
    options: &'a PruneOptions,
    progress: &'a Progress,
    /// `None` for a dry run.
    lock: Option<&'a Lease>,
    report: &'a mut PruneReport,
}

impl Exclusive<'_> {
    fn run(&mut self) -> Result<()> {
        if self.lock.is_some() {
            self.clean_up()?;
        }
        let mut map = self.repo.chunk_map()?;
        // Pack metadata of a newer format is not damage: its packs would be
        // misjudged. (Damaged pack indexes are replaced by the rewrite.)
        if let Some(newer) = map
            .problems
            .iter()
            .find(|e| matches!(e, Error::UnsupportedVersion { .. }))
        {
            return Err(Error::Refused(format!(
                "{newer}; this prune would misjudge what it describes, so it changes nothing"
            )));
        }
        let mut chunks = Stored::new(map.sizes().into_iter().collect());
        let mut indexes = Stored::new(list_index_sizes(self.repo)?);
        self.report.chunks = chunks.items.len() as u64;
        self.report.indexes = indexes.items.len() as u64;
        let mut refs = References::new(self.repo)?;
        refs.load(self.progress, &mut chunks, &mut indexes)?;
        self.report.duplicates_settled = map.settle_duplicates(self.repo, |id| {
            chunks.find(id).is_some_and(|i| chunks.is_referenced(i))
        })? as u64;
        self.report.snapshots = refs.snapshots.len();
        self.report.missing_chunks = refs.missing_chunks;
        let (held_chunks, held_chunk_bytes) = chunks.referenced_totals();
        let (_, held_index_bytes) = indexes.referenced_totals();
        self.report.referenced_chunks = held_chunks;
        self.report.referenced_bytes = held_chunk_bytes + held_index_bytes;

        // Indexes first: they are few, and an index without its chunks is
        // no more use than chunks without their index.
        let mut victims = Vec::new();
        for i in (0..indexes.items.len()).filter(|i| !indexes.is_referenced(*i)) {
            victims.push(Victim {
                pos: i,
                is_chunk: false,
            });
            self.report.marked_indexes += 1;
            self.report.marked_bytes += indexes.items[i].1;
        }
        let is_loose = |id: &ChunkId| matches!(map.chunks.get(id), Some(Location::Loose { .. }));
        for i in (0..chunks.items.len()).filter(|i| !chunks.is_referenced(*i)) {
            if !is_loose(&chunks.items[i].0) {
                continue;
            }
            victims.push(Victim {
                pos: i,
                is_chunk: true,
            });
            self.report.marked_chunks += 1;
            self.report.marked_bytes += chunks.items[i].1;
        }
        let packs = PackPlan::new(self.repo, &map, &chunks, self.report);
        match self.lock {
            None => {
                self.report.deleted_chunks = self.report.marked_chunks;
                self.report.deleted_indexes = self.report.marked_indexes;
                self.report.freed_bytes = self.report.marked_bytes;
                self.report.stray_loose_deleted = map.stray_loose.len() as u64;
                Ok(())
            }
            Some(lock) => {
                // New packs and their index first, then deletions.
                let threads = self.options.threads.max(1);
                packs.carry_out(self.repo, &map, lock, threads, self.progress, self.report)?;
                let dropped_blobs = self.report.marked_chunks - loose_victims(&victims);
                self.delete_all(lock, &victims, &chunks, &indexes)?;
                self.report.deleted_chunks += dropped_blobs;
                self.delete_strays(lock, &map.stray_loose)
            }
        }
    }

    /// Deletes the loose chunk objects of a repository with packs: nothing
    /// reads them, so they hold only space (and an attacker's hopes).
    fn delete_strays(
        &mut self,
        lock: &Lease,
        strays: &[vbackup_storage::ObjectInfo],
    ) -> Result<()> {
        for stray in strays {
            if self.progress.is_cancelled() {
                return Err(Error::Interrupted);
            }
            lock.check_fresh()?;
            match self.repo.backend().delete(&stray.key) {
                Err(e) if !e.is_not_found() => return Err(e.into()),
                _ => {}
            }
            self.report.stray_loose_deleted += 1;
            self.report.freed_bytes += stray.size;
        }
        Ok(())
    }

    /// Puts back what an interrupted concurrent sweep left in `trash/` and
    /// removes every pending list and deletion log.
    fn clean_up(&mut self) -> Result<()> {
        let backend = self.repo.backend().as_ref();
        self.report.trash_restored = restore_trash(self.repo)?;
        for list in list_prune_lists(self.repo)? {
            backend.delete(&list.key)?;
            self.report.lists_removed += 1;
        }
        Ok(())
    }

    /// Deletes the victims with the sweep workers, checking before each
    /// deletion that the prune was not cancelled and still holds its lock.
    fn delete_all(
        &mut self,
        lock: &Lease,
        victims: &[Victim],
        chunks: &Stored<ChunkId>,
        indexes: &Stored<[u8; 32]>,
    ) -> Result<()> {
        self.progress.add_total(victims.len() as u64);
        let next = AtomicUsize::new(0);
        // Deleted chunks, deleted indexes, freed bytes.
        let counts: [AtomicU64; 3] = Default::default();
        let backend = self.repo.backend().as_ref();
        let progress = self.progress;
        let workers = self.options.threads.max(SWEEP_MIN_WORKERS);
        let result = super::run_workers(workers, || loop {
            let Some(victim) = victims.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            if progress.is_cancelled() {
                return Err(Error::Interrupted);
            }
            lock.check_fresh()?;
            let (key, size) = match victim.is_chunk {
                true => {
                    let (id, size) = &chunks.items[victim.pos];
                    (Repository::chunk_key(id), *size)
                }
                false => {
                    let (digest, size) = &indexes.items[victim.pos];
                    (Repository::index_key(digest), *size)
                }
            };
            backend.delete(&key)?;
            counts[usize::from(!victim.is_chunk)].fetch_add(1, Ordering::Relaxed);
            counts[2].fetch_add(size, Ordering::Relaxed);
            progress.add_done(1);
        });
        let [deleted_chunks, deleted_indexes, freed] = counts.map(AtomicU64::into_inner);
        self.report.deleted_chunks += deleted_chunks;
        self.report.deleted_indexes += deleted_indexes;
        self.report.freed_bytes += freed;
        result
    }
}
