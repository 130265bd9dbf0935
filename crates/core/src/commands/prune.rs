//! `vbackup prune`: delete the chunks and indexes no snapshot references,
//! safely while other processes back up into the same repository.
//!
//! Two phases, each run by every prune:
//!
//! - **mark**: list chunks and indexes, load every snapshot's indexes, and
//!   write the unreferenced objects not yet marked to a sealed pending list
//!   `prune/pending-<time>-<id>`. Nothing is deleted.
//! - **sweep**: for each pending list older than the grace period that every
//!   live backup lease has seen, re-list the snapshots (after listing the
//!   leases), drop the items referenced again, write a deletion log
//!   `prune/deleting-<time>-<id>`, then for each item move it to `trash/`
//!   (atomic rename), check its modification time, and delete it only if it
//!   was not written again after the list was made; else move it back.
//!
//! ARCHITECTURE.md ("Garbage collection") argues why no chunk that a
//! finished or running backup needs is ever deleted. Storage without
//! atomic rename gets the exclusive prune of `prune_exclusive` instead.
//!
//! Memory: 40 bytes per stored chunk (id and size, sorted) plus one bit for
//! "referenced", 32 bytes per id in pending lists; time: one listing of the
//! chunks, one read of each snapshot and index, three small operations per
//! deleted object.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use vbackup_storage::ObjectInfo;

use crate::commands::locks::{list_locks_by, Clock, Lease, LeaseTiming, LockInfo};
use crate::crypto::random_bytes;
use crate::format::lifecycle::{LockKind, PruneList, PruneListHeader, PruneListKind};
use crate::format::ObjectKind;
use crate::repo::{CHUNKS_PREFIX, INDEXES_PREFIX, PRUNE_PREFIX, SNAPSHOTS_PREFIX, TRASH_PREFIX};
use crate::{ChunkId, Error, Progress, Repository, Result};

/// Name prefix of pending lists.
pub const PENDING_PREFIX: &str = "prune/pending-";
/// Name prefix of deletion logs.
pub const DELETING_PREFIX: &str = "prune/deleting-";

/// The sweep runs at least this many workers: they wait on the storage's
/// metadata operations (rename, stat, delete), not on the CPU.
pub(super) const SWEEP_MIN_WORKERS: usize = 8;

/// How a prune runs.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Objects are deleted only from pending lists at least this old.
    pub grace: Duration,
    /// Report what would be marked and deleted, change nothing.
    pub dry_run: bool,
    /// Worker threads for the sweep (at least 8 are used: they mostly wait
    /// on the storage).
    pub threads: usize,
    /// Overrides the holders' own stale limits when judging leases (an
    /// exclusive prune, on storage without rename, only lets it lengthen them).
    pub stale_after: Option<Duration>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(30 * 60),
            dry_run: false,
            threads: crate::default_threads(),
            stale_after: None,
        }
    }
}

/// A pending list that this prune did not sweep, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeferredList {
    /// The list's object name.
    pub list: String,
    /// Why it waits.
    pub reason: String,
}

/// What a prune found and did (or, under `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Snapshots read.
    pub snapshots: usize,
    /// Chunk objects stored.
    pub chunks: u64,
    /// Index objects stored.
    pub indexes: u64,
    /// Chunks referenced by some snapshot.
    pub referenced_chunks: u64,
    /// Stored bytes of the referenced chunks and indexes: space held.
    pub referenced_bytes: u64,
    /// Chunks referenced by snapshots but not stored (see `check`).
    pub missing_chunks: u64,
    /// Chunks newly marked as unreferenced by this run.
    pub marked_chunks: u64,
    /// Indexes newly marked.
    pub marked_indexes: u64,
    /// Stored bytes newly marked.
    pub marked_bytes: u64,
    /// The pending list written by this run.
    pub pending_list: Option<String>,
    /// Pending lists swept (deleted after their items were handled).
    pub swept_lists: Vec<String>,
    /// Pending lists left for a later prune.
    pub deferred: Vec<DeferredList>,
    /// Chunks deleted (or that would be).
    pub deleted_chunks: u64,
    /// Indexes deleted (or that would be).
    pub deleted_indexes: u64,
    /// Bytes freed (or that would be).
    pub freed_bytes: u64,
    /// Marked items found referenced again by a newer snapshot: kept.
    pub kept_referenced: u64,
    /// Marked items written again by a backup after marking: kept.
    pub kept_rewritten: u64,
    /// Marked items that no longer existed.
    pub already_gone: u64,
    /// Marked items waiting in deferred or new lists.
    pub waiting_items: u64,
    /// Their stored bytes: space still held until a later prune.
    pub waiting_bytes: u64,
    /// Objects found in `trash/` (left by an interrupted sweep) and put back.
    pub trash_restored: u64,
    /// Stale locks found (ignored; `vbackup unlock` removes them).
    pub stale_locks: Vec<String>,
    /// The prune ran with the repository to itself (storage without atomic
    /// rename): unreferenced objects were deleted at once, with no pending
    /// list and no grace period, while no backup could run.
    pub exclusive: bool,
    /// Pending lists and deletion logs removed by an exclusive prune (left
    /// by a prune that ran elsewhere before; meaningless once everything
    /// unreferenced is deleted).
    pub lists_removed: u64,
    /// Packs stored (repositories with packs).
    pub packs: u64,
    /// Packs deleted because none of their chunks is referenced.
    pub deleted_packs: u64,
    /// Packs whose referenced chunks were copied into new packs, then deleted.
    pub repacked_packs: u64,
    /// New packs written by repacking.
    pub written_packs: u64,
    /// Their bytes.
    pub repacked_bytes: u64,
    /// Pack indexes written (the consolidated description of all packs).
    pub pack_indexes_written: u64,
    /// Old pack indexes removed after that.
    pub pack_indexes_removed: u64,
    /// Packs that were to be repacked but kept, because a referenced chunk
    /// in them could not be read or checked (`vbackup check` tells more).
    pub packs_kept_damaged: Vec<String>,
    /// Chunks whose copy in one pack failed to authenticate, now located
    /// at their good second copy (which this prune therefore kept).
    pub duplicates_settled: u64,
    /// Loose chunk objects found in a repository with packs (no vbackup
    /// writes them there; junk from a backup token, or leftovers), deleted.
    pub stray_loose_deleted: u64,
}

/// Runs a prune: mark, then sweep what is old enough.
///
/// On storage that cannot move objects atomically ([`Backend::can_rename`]
/// is false, e.g. plain S3), and in repositories with packs (whose chunks
/// cannot be moved one by one), the prune runs with the repository to
/// itself instead: see [`super::prune_exclusive`].
pub fn prune(
    repo: &Repository,
    options: &PruneOptions,
    progress: &Progress,
) -> Result<PruneReport> {
    if !repo.backend().can_rename() || repo.config().packs() {
        return super::prune_exclusive::prune_exclusive(repo, options, progress);
    }
    let lock = match options.dry_run {
        true => None,
        false => Some(Lease::exclusive(
            repo,
            LockKind::Prune,
            LeaseTiming::default(),
        )?),
    };
    let mut run = Run {
        repo,
        options,
        progress,
        lock: lock.as_ref(),
        report: PruneReport {
            dry_run: options.dry_run,
            ..Default::default()
        },
    };
    run.go()?;
    let report = run.report;
    if let Some(lock) = lock {
        lock.release()?;
    }
    Ok(report)
}

/// Stored objects of one kind, sorted by id, with a "referenced" bit each.
pub(super) struct Stored<K> {
    pub(super) items: Vec<(K, u64)>,
    referenced: Vec<u64>,
}

impl<K: Ord + Copy> Stored<K> {
    pub(super) fn new(mut items: Vec<(K, u64)>) -> Self {
        items.sort_unstable_by_key(|a| a.0);
        let referenced = vec![0u64; items.len().div_ceil(64)];
        Self { items, referenced }
    }

    pub(super) fn find(&self, id: &K) -> Option<usize> {
        self.items.binary_search_by(|(k, _)| k.cmp(id)).ok()
    }

    /// Marks `id` referenced; false when it is not stored.
    fn mark(&mut self, id: &K) -> bool {
        match self.find(id) {
            Some(i) => {
                self.referenced[i / 64] |= 1 << (i % 64);
                true
            }
            None => false,
        }
    }

    pub(super) fn is_referenced(&self, i: usize) -> bool {
        self.referenced[i / 64] & (1 << (i % 64)) != 0
    }

    fn unreferenced(&self) -> impl Iterator<Item = &(K, u64)> {
        self.items
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.is_referenced(*i))
            .map(|(_, item)| item)
    }

    pub(super) fn referenced_totals(&self) -> (u64, u64) {
        let mut totals = (0, 0);
        for (i, (_, size)) in self.items.iter().enumerate() {
            if self.is_referenced(i) {
                totals.0 += 1;
                totals.1 += size;
            }
        }
        totals
    }
}

/// A pending list with its name and the time its items were marked.
struct Pending {
    key: String,
    marked: SystemTime,
    list: PruneList,
}

/// One object to delete, small (16 bytes: a sweep may have millions):
/// its position among the stored chunks or indexes, and the pending list
/// that marked it.
#[derive(Clone, Copy)]
struct Candidate {
    pos: usize,
    is_chunk: bool,
    list: u32,
}

/// What the sweep needs to turn a [`Candidate`] into a name, a size and a
/// marking time.
struct Objects<'a> {
    chunks: &'a Stored<ChunkId>,
    indexes: &'a Stored<[u8; 32]>,
    pending: &'a [Pending],
}

impl Objects<'_> {
    fn key(&self, c: Candidate) -> String {
        match c.is_chunk {
            true => Repository::chunk_key(&self.chunks.items[c.pos].0),
            false => Repository::index_key(&self.indexes.items[c.pos].0),
        }
    }

    fn size(&self, c: Candidate) -> u64 {
        match c.is_chunk {
            true => self.chunks.items[c.pos].1,
            false => self.indexes.items[c.pos].1,
        }
    }

    fn marked(&self, c: Candidate) -> SystemTime {
        self.pending[c.list as usize].marked
    }
}

/// The state of one prune run.
struct Run<'a> {
    repo: &'a Repository,
    options: &'a PruneOptions,
    progress: &'a Progress,
    lock: Option<&'a Lease>,
    report: PruneReport,
}

impl Run<'_> {
    fn go(&mut self) -> Result<()> {
        if !self.options.dry_run {
            self.report.trash_restored = restore_trash(self.repo)?;
            remove_dead_logs(self.repo)?;
        }
        let mut chunks = Stored::new(list_chunk_sizes(self.repo)?);
        let mut indexes = Stored::new(list_index_sizes(self.repo)?);
        self.report.chunks = chunks.items.len() as u64;
        self.report.indexes = indexes.items.len() as u64;
        let mut refs = References::new(self.repo)?;
        self.load_references(&mut refs, &mut chunks, &mut indexes)?;
        let mut pending = read_pending_lists(self.repo, &mut self.report)?;
        if let Some(new) = self.mark(&chunks, &indexes, &pending)? {
            pending.push(new);
        }
        // Oldest first: an object named by two lists counts as marked at
        // the earlier time (more objects count as written again: safer).
        pending.sort_by_key(|p| p.marked);
        let sweepable = self.choose(&pending)?;
        // Snapshots written since the leases were listed are loaded now,
        // after that listing: see ARCHITECTURE.md.
        self.load_references(&mut refs, &mut chunks, &mut indexes)?;
        let objects = Objects {
            chunks: &chunks,
            indexes: &indexes,
            pending: &pending,
        };
        let candidates = self.candidates(&objects, &sweepable);
        self.count_waiting(&pending, &sweepable, &chunks, &indexes);
        let (held_chunks, held_chunk_bytes) = chunks.referenced_totals();
        let (_, held_index_bytes) = indexes.referenced_totals();
        self.report.referenced_chunks = held_chunks;
        self.report.referenced_bytes = held_chunk_bytes + held_index_bytes;
        self.sweep(&objects, &sweepable, &candidates)
    }

    fn load_references(
        &mut self,
        refs: &mut References,
        chunks: &mut Stored<ChunkId>,
        indexes: &mut Stored<[u8; 32]>,
    ) -> Result<()> {
        refs.load(self.progress, chunks, indexes)?;
        self.report.snapshots = refs.snapshots.len();
        self.report.missing_chunks = refs.missing_chunks;
        Ok(())
    }

    /// Writes the unreferenced objects that no pending list names yet.
    fn mark(
        &mut self,
        chunks: &Stored<ChunkId>,
        indexes: &Stored<[u8; 32]>,
        pending: &[Pending],
    ) -> Result<Option<Pending>> {
        let listed_chunks: HashSet<&ChunkId> =
            pending.iter().flat_map(|p| &p.list.chunks).collect();
        let listed_indexes: HashSet<&[u8; 32]> =
            pending.iter().flat_map(|p| &p.list.indexes).collect();
        let mut list = new_list(PruneListKind::Pending, Vec::new());
        for (id, size) in chunks
            .unreferenced()
            .filter(|(id, _)| !listed_chunks.contains(id))
        {
            list.chunks.push(*id);
            self.report.marked_bytes += size;
        }
        for (id, size) in indexes
            .unreferenced()
            .filter(|(id, _)| !listed_indexes.contains(id))
        {
            list.indexes.push(*id);
            self.report.marked_bytes += size;
        }
        self.report.marked_chunks = list.chunks.len() as u64;
        self.report.marked_indexes = list.indexes.len() as u64;
        if list.chunks.is_empty() && list.indexes.is_empty() {
            return Ok(None);
        }
        let key = list_name(PENDING_PREFIX)?;
        let marked = match self.options.dry_run {
            true => SystemTime::now(),
            false => write_prune_list(self.repo, &key, &list)?,
        };
        self.report.pending_list = (!self.options.dry_run).then(|| key.clone());
        Ok(Some(Pending { key, marked, list }))
    }

    /// The pending lists to sweep now: old enough and seen by every live
    /// backup lease. The others are reported as deferred.
    fn choose(&mut self, pending: &[Pending]) -> Result<HashSet<String>> {
        // The storage's clock, read through our own lock (a dry run holds
        // none and uses this host's).
        let clock = match self.lock {
            Some(lock) => lock.clock()?,
            None => Clock::host(),
        };
        let locks = list_locks_by(self.repo, self.options.stale_after, clock)?;
        self.report.stale_locks = describe_stale(&locks);
        // The grace period by the same clock as the marking times.
        let now = clock.now();
        let mut sweepable = HashSet::new();
        for p in pending {
            match self.blocker(p, &locks, now) {
                Some(reason) => self.report.deferred.push(DeferredList {
                    list: p.key.clone(),
                    reason,
                }),
                None => {
                    sweepable.insert(p.key.clone());
                }
            }
        }
        Ok(sweepable)
    }

    /// Why pending list `p` cannot be swept now, if it cannot.
    fn blocker(&self, p: &Pending, locks: &[LockInfo], now: SystemTime) -> Option<String> {
        let age = now.duration_since(p.marked).unwrap_or_default();
        if age < self.options.grace {
            return Some(format!(
                "marked {} s ago; the grace period is {} s",
                age.as_secs(),
                self.options.grace.as_secs()
            ));
        }
        let lease = locks.iter().find(|l| {
            l.is_live()
                && l.kind() == LockKind::Backup
                && !l
                    .lock
                    .as_ref()
                    .is_some_and(|f| f.pending_seen.contains(&p.key))
        })?;
        Some(format!(
            "the running backup ({}) started before this list was made",
            lease.describe()
        ))
    }

    /// The items of the sweepable lists that are stored and unreferenced,
    /// each once.
    fn candidates(&mut self, objects: &Objects, sweepable: &HashSet<String>) -> Vec<Candidate> {
        let (chunks, indexes) = (objects.chunks, objects.indexes);
        let mut taken_chunks = vec![0u64; chunks.items.len().div_ceil(64)];
        let mut taken_indexes = vec![0u64; indexes.items.len().div_ceil(64)];
        let mut chosen = Vec::new();
        for (list, p) in objects.pending.iter().enumerate() {
            if !sweepable.contains(&p.key) {
                continue;
            }
            let list = u32::try_from(list).unwrap_or(u32::MAX);
            for id in &p.list.chunks {
                let found = chunks.find(id).map(|i| (i, chunks.is_referenced(i)));
                self.consider(&mut chosen, &mut taken_chunks, found, true, list);
            }
            for id in &p.list.indexes {
                let found = indexes.find(id).map(|i| (i, indexes.is_referenced(i)));
                self.consider(&mut chosen, &mut taken_indexes, found, false, list);
            }
        }
        chosen
    }

    fn consider(
        &mut self,
        chosen: &mut Vec<Candidate>,
        taken: &mut [u64],
        found: Option<(usize, bool)>,
        is_chunk: bool,
        list: u32,
    ) {
        match found {
            None => self.report.already_gone += 1,
            Some((_, true)) => self.report.kept_referenced += 1,
            Some((pos, false)) if taken[pos / 64] & (1 << (pos % 64)) == 0 => {
                taken[pos / 64] |= 1 << (pos % 64);
                chosen.push(Candidate {
                    pos,
                    is_chunk,
                    list,
                });
            }
            Some(_) => {}
        }
    }

    /// Counts the unreferenced items of the lists that wait.
    fn count_waiting(
        &mut self,
        pending: &[Pending],
        sweepable: &HashSet<String>,
        chunks: &Stored<ChunkId>,
        indexes: &Stored<[u8; 32]>,
    ) {
        for p in pending.iter().filter(|p| !sweepable.contains(&p.key)) {
            for i in p.list.chunks.iter().filter_map(|id| chunks.find(id)) {
                self.report.waiting_items += 1;
                self.report.waiting_bytes += chunks.items[i].1;
            }
            for i in p.list.indexes.iter().filter_map(|id| indexes.find(id)) {
                self.report.waiting_items += 1;
                self.report.waiting_bytes += indexes.items[i].1;
            }
        }
    }

    /// Logs, then deletes the candidates; removes the swept lists.
    fn sweep(
        &mut self,
        objects: &Objects,
        sweepable: &HashSet<String>,
        candidates: &[Candidate],
    ) -> Result<()> {
        let mut swept: Vec<String> = sweepable.iter().cloned().collect();
        swept.sort();
        if self.options.dry_run {
            for c in candidates {
                self.count_deleted(c.is_chunk, objects.size(*c));
            }
            self.report.swept_lists = swept;
            return Ok(());
        }
        if swept.is_empty() {
            return Ok(());
        }
        let log_key = list_name(DELETING_PREFIX)?;
        let log = deletion_log(objects, candidates, &swept);
        write_prune_list(self.repo, &log_key, &log)?;
        drop(log);
        self.delete_all(objects, candidates)?;
        for key in &swept {
            self.repo.backend().delete(key)?;
        }
        self.repo.backend().delete(&log_key)?;
        self.report.swept_lists = swept;
        Ok(())
    }

    fn count_deleted(&mut self, is_chunk: bool, size: u64) {
        match is_chunk {
            true => self.report.deleted_chunks += 1,
            false => self.report.deleted_indexes += 1,
        }
        self.report.freed_bytes += size;
    }

    /// Deletes the candidates with the sweep workers.
    fn delete_all(&mut self, objects: &Objects, candidates: &[Candidate]) -> Result<()> {
        self.progress.add_total(candidates.len() as u64);
        let next = AtomicUsize::new(0);
        // Deleted chunks, deleted indexes, freed bytes, rewritten, gone.
        let counts: [AtomicU64; 5] = Default::default();
        let workers = self.options.threads.max(SWEEP_MIN_WORKERS);
        super::run_workers(workers, || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(candidate) = candidates.get(i) else {
                return Ok(());
            };
            self.keep_going(i)?;
            let key = objects.key(*candidate);
            match sweep_one(self.repo, &key, objects.marked(*candidate))? {
                Outcome::Deleted(size) => {
                    counts[usize::from(!candidate.is_chunk)].fetch_add(1, Ordering::Relaxed);
                    counts[2].fetch_add(size, Ordering::Relaxed);
                }
                Outcome::Rewritten => {
                    counts[3].fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Gone => {
                    counts[4].fetch_add(1, Ordering::Relaxed);
                }
            }
            self.progress.add_done(1);
        })?;
        let [chunks, indexes, bytes, rewritten, gone] = counts.map(AtomicU64::into_inner);
        self.report.deleted_chunks += chunks;
        self.report.deleted_indexes += indexes;
        self.report.freed_bytes += bytes;
        self.report.kept_rewritten += rewritten;
        self.report.already_gone += gone;
        Ok(())
    }

    /// Stops the sweep when cancelled, and when this prune's own lock
    /// lapsed (a paused prune must not go on deleting: others may have
    /// judged it dead and started a new prune).
    fn keep_going(&self, i: usize) -> Result<()> {
        if self.progress.is_cancelled() {
            return Err(Error::Interrupted);
        }
        match self.lock {
            Some(lock) if i & 255 == 0 => lock.check_fresh(),
            _ => Ok(()),
        }
    }
}

/// The stale locks among `locks`, described for the report.
pub(super) fn describe_stale(locks: &[LockInfo]) -> Vec<String> {
    locks
        .iter()
        .filter(|l| !l.is_live())
        .map(|l| {
            format!(
                "{} — stale: {}",
                l.describe(),
                l.stale.as_deref().unwrap_or("")
            )
        })
        .collect()
}

/// What happened to one candidate.
enum Outcome {
    /// Deleted; its size.
    Deleted(u64),
    /// Written again after it was marked: put back.
    Rewritten,
    /// Not there any more.
    Gone,
}

/// Moves object `key` to the trash, checks it was not written after it was
/// marked, and deletes it (or moves it back).
fn sweep_one(repo: &Repository, key: &str, marked: SystemTime) -> Result<Outcome> {
    let backend = repo.backend().as_ref();
    let trash = format!("{TRASH_PREFIX}{key}");
    match backend.rename(key, &trash) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(Outcome::Gone),
        Err(e) => return Err(e.into()),
    }
    let Some(info) = backend.stat(&trash)? else {
        return Ok(Outcome::Gone);
    };
    // No modification time means we cannot tell: keep it.
    if info.modified.is_none_or(|m| m >= marked) {
        put_back(repo, &trash, key)?;
        return Ok(Outcome::Rewritten);
    }
    backend.delete(&trash)?;
    Ok(Outcome::Deleted(info.size))
}

/// Moves a trashed object back to its name, unless a good new copy is
/// there. Trashed objects are chunks and indexes, named by their content,
/// so any *authentic* copy under the name is as good as another; but the
/// name was free while the object sat in the trash, and someone without the
/// key (a backup token) may have raced junk into it, so the copy found
/// there is authenticated first, and replaced when it fails. Storage that
/// cannot rename gets a copy and a delete instead (the caller then holds an
/// exclusive lock, so no sweep moves the object meanwhile).
fn put_back(repo: &Repository, trash: &str, key: &str) -> Result<()> {
    let backend = repo.backend().as_ref();
    if backend.stat(key)?.is_some() && object_authenticates(repo, key)? {
        backend.delete(trash)?;
    } else if backend.can_rename() {
        backend.rename(trash, key)?;
    } else {
        let bytes = backend.get(trash)?;
        backend.put(key, &bytes)?;
        backend.delete(trash)?;
    }
    Ok(())
}

/// Whether the chunk or index stored as `key` reads and authenticates.
/// Storage failures other than "not found" stop the caller.
fn object_authenticates(repo: &Repository, key: &str) -> Result<bool> {
    let read = match key.rsplit('/').next().and_then(ChunkId::from_hex) {
        Some(id) if key.starts_with(CHUNKS_PREFIX) => repo.read_chunk(&id).map(drop),
        _ => repo.read_index(key).map(drop),
    };
    crate::error::authenticated(read)
}

/// Puts back everything an interrupted sweep left in `trash/`; returns how
/// many objects there were. (The pending lists they came from are still
/// there, so the next sweep handles them again.)
pub(crate) fn restore_trash(repo: &Repository) -> Result<u64> {
    let backend = repo.backend().as_ref();
    let mut restored = 0;
    for object in backend.list(TRASH_PREFIX)? {
        let original = &object.key[TRASH_PREFIX.len()..];
        if original.starts_with(CHUNKS_PREFIX) || original.starts_with(INDEXES_PREFIX) {
            put_back(repo, &object.key, original)?;
            restored += 1;
        }
    }
    Ok(restored)
}

/// Removes deletion logs of sweeps that died (we hold the prune lock, so no
/// sweep is running).
fn remove_dead_logs(repo: &Repository) -> Result<()> {
    for list in list_prune_lists(repo)? {
        if list.key.starts_with(DELETING_PREFIX) {
            repo.backend().delete(&list.key)?;
        }
    }
    Ok(())
}

fn deletion_log(objects: &Objects, candidates: &[Candidate], sources: &[String]) -> PruneList {
    let mut list = new_list(PruneListKind::Deleting, sources.to_vec());
    for c in candidates {
        match c.is_chunk {
            true => list.chunks.push(objects.chunks.items[c.pos].0),
            false => list.indexes.push(objects.indexes.items[c.pos].0),
        }
    }
    list.chunks.sort_unstable();
    list.indexes.sort_unstable();
    list
}

fn new_list(kind: PruneListKind, sources: Vec<String>) -> PruneList {
    PruneList {
        kind,
        header: PruneListHeader {
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            host: crate::hostname(),
            sources,
        },
        chunks: Vec::new(),
        indexes: Vec::new(),
    }
}

/// `prune/pending-20261122T100000Z-<8 hex>` (or `deleting-`).
fn list_name(prefix: &str) -> Result<String> {
    let time = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    Ok(format!(
        "{prefix}{time}-{}",
        hex::encode(random_bytes::<4>()?)
    ))
}

/// Every pending list and deletion log in the repository.
pub(crate) fn list_prune_lists(repo: &Repository) -> Result<Vec<ObjectInfo>> {
    let mut lists: Vec<ObjectInfo> = repo
        .backend()
        .list(PRUNE_PREFIX)?
        .into_iter()
        .filter(|o| o.key.starts_with(PENDING_PREFIX) || o.key.starts_with(DELETING_PREFIX))
        .collect();
    lists.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(lists)
}

/// Reads and decodes one prune list.
pub(crate) fn read_prune_list(repo: &Repository, key: &str) -> Result<PruneList> {
    PruneList::decode(key, &repo.get_sealed(ObjectKind::PruneList, key)?)
}

/// Stores a prune list and returns its modification time as the storage
/// reports it (the marking time later compared with objects' times).
fn write_prune_list(repo: &Repository, key: &str, list: &PruneList) -> Result<SystemTime> {
    let payload = list.encode()?;
    let bytes =
        crate::format::seal_object(repo.crypto(), ObjectKind::PruneList, key, &payload, None)?;
    repo.backend().put(key, &bytes)?;
    let stat = repo.backend().stat(key)?;
    Ok(stat
        .and_then(|s| s.modified)
        .unwrap_or_else(SystemTime::now))
}

fn read_pending_lists(repo: &Repository, report: &mut PruneReport) -> Result<Vec<Pending>> {
    let mut pending = Vec::new();
    for object in list_prune_lists(repo)? {
        if !object.key.starts_with(PENDING_PREFIX) {
            continue;
        }
        match read_prune_list(repo, &object.key) {
            Ok(list) => pending.push(Pending {
                marked: object.modified.unwrap_or_else(|| created(&list)),
                key: object.key,
                list,
            }),
            Err(e) => report.deferred.push(DeferredList {
                list: object.key,
                reason: format!("unreadable, left alone: {e}"),
            }),
        }
    }
    Ok(pending)
}

fn created(list: &PruneList) -> SystemTime {
    chrono::DateTime::parse_from_rfc3339(&list.header.created).map_or(SystemTime::now(), |t| {
        SystemTime::from(t.with_timezone(&chrono::Utc))
    })
}

pub(super) fn list_chunk_sizes(repo: &Repository) -> Result<Vec<(ChunkId, u64)>> {
    let mut chunks = Vec::new();
    repo.backend().list_each(CHUNKS_PREFIX, &mut |o| {
        if let Some(id) = o.key.rsplit('/').next().and_then(ChunkId::from_hex) {
            chunks.push((id, o.size));
        }
    })?;
    Ok(chunks)
}

pub(super) fn list_index_sizes(repo: &Repository) -> Result<Vec<([u8; 32], u64)>> {
    let mut indexes = Vec::new();
    repo.backend().list_each(INDEXES_PREFIX, &mut |o| {
        if let Some(digest) = Repository::index_digest(&o.key) {
            indexes.push((digest, o.size));
        }
    })?;
    Ok(indexes)
}

/// The snapshots and indexes loaded so far, so a second load reads only
/// what is new.
pub(super) struct References<'a> {
    repo: &'a Repository,
    pub(super) snapshots: HashSet<String>,
    indexes: HashSet<String>,
    damaged: HashSet<String>,
    pub(super) missing_chunks: u64,
}

impl<'a> References<'a> {
    pub(super) fn new(repo: &'a Repository) -> Result<Self> {
        Ok(Self {
            repo,
            snapshots: HashSet::new(),
            indexes: HashSet::new(),
            damaged: super::repair::marked_snapshots(repo)?.into_iter().collect(),
            missing_chunks: 0,
        })
    }

    /// Reads the snapshots not read yet and marks what they reference.
    pub(super) fn load(
        &mut self,
        progress: &Progress,
        chunks: &mut Stored<ChunkId>,
        indexes: &mut Stored<[u8; 32]>,
    ) -> Result<()> {
        for object in self.repo.backend().list(SNAPSHOTS_PREFIX)? {
            let id = object.key[SNAPSHOTS_PREFIX.len()..].to_string();
            if self.snapshots.contains(&id) {
                continue;
            }
            let snapshot = match self.repo.read_snapshot(&id) {
                Ok(snapshot) => snapshot,
                Err(Error::Storage(e)) if e.is_not_found() => continue,
                Err(e) => {
                    let object = super::with_writer(self.repo, &object);
                    return Err(unreadable_snapshot(&object, &e));
                }
            };
            progress.add_total(snapshot.manifest.disks.len() as u64);
            for disk in &snapshot.manifest.disks {
                self.load_index(&id, &disk.index, chunks, indexes)?;
                progress.add_done(1);
            }
            self.snapshots.insert(id);
        }
        Ok(())
    }

    fn load_index(
        &mut self,
        snapshot: &str,
        key: &str,
        chunks: &mut Stored<ChunkId>,
        indexes: &mut Stored<[u8; 32]>,
    ) -> Result<()> {
        if let Some(digest) = Repository::index_digest(key) {
            indexes.mark(&digest);
        }
        if !self.indexes.insert(key.to_string()) {
            return Ok(());
        }
        match self.repo.read_index(key) {
            Ok(index) => {
                for id in index.ids() {
                    if !chunks.mark(id) {
                        self.missing_chunks += 1;
                    }
                }
                Ok(())
            }
            // Acknowledged by `repair`: its chunks cannot be known.
            Err(_) if self.damaged.contains(snapshot) => Ok(()),
            Err(e @ Error::Storage(_)) if !e.is_not_found() => Err(e),
            Err(e) => Err(unreadable_index(snapshot, key, &e)),
        }
    }
}

/// Prune's refusal over a snapshot manifest it cannot read: names the
/// object and the one command that clears it.
fn unreadable_snapshot(object: &vbackup_storage::ObjectInfo, error: &Error) -> Error {
    Error::Refused(format!(
        "snapshot manifest {} cannot be read ({error}); prune would delete the data only it references, so it refuses. If that object is junk or damaged, `vbackup repair` moves it to quarantine/ (`vbackup repair --dry-run` shows the plan first; `vbackup check` tells more), then prune runs",
        super::describe_object(object)
    ))
}

fn unreadable_index(snapshot: &str, key: &str, error: &Error) -> Error {
    Error::Refused(format!(
        "index '{key}' of snapshot {} cannot be read ({error}); prune would delete the chunks it lists. Run `vbackup check`, then `vbackup repair` (which marks the snapshot damaged) before pruning",
        &snapshot[..snapshot.len().min(8)]
    ))
}
