//! `vbackup backup`: read disks, store new chunks, record a snapshot.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::backup_guard::BackupGuard;
use super::backup_plan::{
    data_chunks, dirty_chunks, window_end, ALLOCATION_WINDOW, CHANGES_WINDOW, MAX_PLAN_EXTENTS,
};
use crate::format::delta::Delta;
use crate::format::{
    BackupStats, DiskIndex, DiskRecord, ReadScope, SnapshotManifest, SNAPSHOT_VERSION,
};
use crate::packs::{read_located, write_pack_indexes, ChunkMap, PackWriter};
use crate::source::{DiskReader, DiskSource, Extent, ExtentKind};
use crate::{is_all_zero, ChunkId, Error, Progress, Repository, Result, Snapshot};

/// One disk to back up.
pub struct BackupDisk {
    /// Name of the disk inside the VM (unique within the snapshot).
    pub name: String,
    /// Where it comes from, for the record (a path, a QMP node name).
    pub source_label: String,
    /// The data.
    pub source: Box<dyn DiskSource>,
    /// For changed-block tracking: the snapshot whose index supplies the
    /// chunks the source's `DiskReader::changed` reports unchanged. Without
    /// it, or when the source does not track changes, everything is read.
    pub base: Option<BaseIndex>,
}

/// The index of an earlier snapshot of the same disk, trusted for the
/// chunks a dirty bitmap says did not change.
#[derive(Debug, Clone)]
pub struct BaseIndex {
    /// The snapshot it belongs to.
    pub snapshot: String,
    /// Its chunk list; must have the disk's size and the repository's chunk size.
    pub index: DiskIndex,
}

/// What a backup records besides the data.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The VM's name.
    pub vm: String,
    /// Tags for the snapshot.
    pub tags: Vec<String>,
    /// Host name to record (defaults to this machine's).
    pub host: Option<String>,
    /// Worker threads.
    pub threads: usize,
    /// Reuse the previous snapshot's index for disks whose source
    /// fingerprint is unchanged (see `DiskSource::identity`) instead of
    /// reading them.
    pub skip_unchanged: bool,
}

/// Counters shared by the workers.
#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    bytes_new: AtomicU64,
    bytes_stored: AtomicU64,
    chunks_new: AtomicU64,
    chunks_reused: AtomicU64,
    chunks_hole: AtomicU64,
    disks_unchanged: AtomicU64,
    chunks_unchanged: AtomicU64,
}

impl Counters {
    fn into_stats(self, duration_secs: f64) -> BackupStats {
        BackupStats {
            bytes_read: self.bytes_read.into_inner(),
            bytes_new: self.bytes_new.into_inner(),
            bytes_stored: self.bytes_stored.into_inner(),
            chunks_new: self.chunks_new.into_inner(),
            chunks_reused: self.chunks_reused.into_inner(),
            chunks_hole: self.chunks_hole.into_inner(),
            disks_unchanged: self.disks_unchanged.into_inner(),
            chunks_unchanged: self.chunks_unchanged.into_inner(),
            duration_secs,
        }
    }
}

/// One chunk a worker reads: a chunk the source says holds data (with
/// the extents it described, when known), changed, or a base chunk that
/// cannot be reused.
struct Task {
    disk: usize,
    chunk: u64,
    /// The chunk's extents, from the query that planned it; `None` means
    /// the worker asks the source.
    extents: Option<Vec<Extent>>,
    /// For a changed chunk of which only small parts changed: how to store
    /// it as a delta instead of reading all of it.
    delta: Option<DeltaPlan>,
}

/// A changed chunk that may be stored as a delta (issue 12): the dirty
/// bitmap says only `dirty` changed since the base snapshot.
struct DeltaPlan {
    /// The full chunk the delta patches: the base snapshot's chunk, or the
    /// base of the base snapshot's delta (so the depth stays 1).
    base: ChunkId,
    /// The base snapshot's entry when it is itself a delta on `base`: its
    /// patches are carried into the new delta, under the new ones.
    previous: Option<ChunkId>,
    /// The changed byte ranges `(start, end)` inside the chunk.
    dirty: Vec<(u64, u64)>,
}

/// The most a delta may replace of its chunk: beyond a quarter, the chunk
/// is read and stored whole (the delta would cost nearly as much, and its
/// restore a second object for little gain).
const MAX_DELTA_SHARE: u64 = 4;

/// The part of the disks not planned yet, and the chunks planned but not
/// taken by a worker. Workers refill it a window (many GiB) at a time.
#[derive(Default)]
struct Plan {
    /// The disk being planned.
    disk: usize,
    /// Its first byte not planned yet (a chunk boundary).
    offset: u64,
    queue: VecDeque<Task>,
}

/// State shared by all workers of one backup.
struct Job<'a> {
    repo: &'a Repository,
    disks: &'a [BackupDisk],
    chunk_size: u32,
    plan: Mutex<Plan>,
    stop: AtomicBool,
    known: Mutex<HashSet<ChunkId>>,
    /// Chunks whose stored copy may be reused without reading it: those
    /// the base indexes (authenticated) reference, and those this backup
    /// stored or authenticated itself. Any other stored copy is read and
    /// authenticated once before its first reuse (see
    /// [`Job::authenticate_stored`]).
    vouched: Mutex<HashSet<ChunkId>>,
    /// Chunks named by prune lists at the start: never taken as present.
    pending: &'a [ChunkId],
    /// Per disk: its data chunks so far, in the order they were found.
    indexes: Vec<Mutex<Vec<(u64, ChunkId)>>>,
    /// Per disk: `(chunk number, base id)` of its chunks stored as deltas.
    deltas: Vec<Mutex<Vec<(u64, ChunkId)>>>,
    /// Whether changed chunks may be stored as deltas (version 3
    /// repositories).
    use_deltas: bool,
    /// Where stored chunks are, in a repository with packs.
    map: Option<ChunkMap>,
    /// Per disk: the previous snapshot's index, reused as it is (written
    /// back in its own version, so under its own name), if the disk is
    /// skipped.
    reused: Vec<Option<DiskIndex>>,
    /// Per disk: the snapshot whose index was reused, if the disk is skipped.
    unchanged_since: Vec<Option<String>>,
    counters: Counters,
    progress: &'a Progress,
    /// Gathers new chunks into packs, in repositories that use them.
    packer: Option<PackWriter<'a>>,
}

/// Backs up `disks` as one snapshot of `options.vm` and returns it.
///
/// Chunks already in the repository are neither compressed nor written
/// again. Nothing is recorded unless every disk was read completely.
pub fn backup(
    repo: &Repository,
    disks: &[BackupDisk],
    options: &BackupOptions,
    progress: &Progress,
) -> Result<Snapshot> {
    backup_prepare(repo, disks, options, progress)?.commit(repo)
}

/// A backup whose chunks and indexes are stored but whose snapshot is not
/// written yet. It holds the backup's lease, so a concurrent prune keeps
/// everything it references, until [`PreparedBackup::commit`] (or drop,
/// which records nothing).
pub struct PreparedBackup {
    /// The manifest to be written; callers may complete it (tracking,
    /// consistency, definition) before committing.
    pub manifest: SnapshotManifest,
    guard: BackupGuard,
}

impl PreparedBackup {
    /// Writes the snapshot and releases the lease.
    pub fn commit(self, repo: &Repository) -> Result<Snapshot> {
        // A manifest readers would refuse (a configuration file name with
        // a '/', say) is never written.
        crate::format::check_manifest_names(&self.manifest).map_err(Error::InvalidInput)?;
        let id = repo.write_snapshot(&self.manifest)?;
        self.guard.finish()?;
        Ok(Snapshot {
            id,
            manifest: self.manifest,
        })
    }
}

/// The first step of a backup, taken before planning it: the backup's
/// lease is written (so a concurrent prune keeps what the backup may
/// reuse) and the stored chunks are listed once. Changed-block tracking
/// checks its base snapshots against [`BackupStart::stored`] — the same
/// listing the backup then works from, instead of a second one of a
/// repository that may hold millions of chunks. Dropping it removes the
/// lease.
pub struct BackupStart {
    guard: BackupGuard,
    stored: HashSet<ChunkId>,
    /// Where the stored chunks are, in a repository with packs that takes
    /// deltas (a changed chunk's previous delta is read through it).
    map: Option<ChunkMap>,
    /// Every readable snapshot not dated in the future, oldest first, read
    /// once for planning, the unchanged-file shortcut and the caller's own
    /// use.
    snapshots: Vec<Snapshot>,
}

impl BackupStart {
    /// Writes the lease, loads the prune lists, lists the stored chunks
    /// and reads the snapshots.
    pub fn begin(repo: &Repository) -> Result<Self> {
        let guard = BackupGuard::start(repo)?;
        let map = repo.chunk_map()?;
        let stored = map.sizes().into_keys().collect();
        let config = repo.config();
        let map = (config.packs() && config.deltas()).then_some(map);
        let (mut snapshots, _) = repo.list_snapshots_checked()?;
        // Never a base: a snapshot dated ahead of this clock would be
        // "the latest" for as long as its date lies in the future.
        let now = chrono::Utc::now();
        snapshots.retain(|s| !s.is_future_dated(now));
        Ok(Self {
            guard,
            stored,
            map,
            snapshots,
        })
    }

    /// Every readable snapshot when the backup began, oldest first, less
    /// those dated in the future (see [`crate::FUTURE_SKEW_MINUTES`]).
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The newest snapshot of `vm` when the backup began.
    pub fn latest_of(&self, vm: &str) -> Option<&Snapshot> {
        self.snapshots.iter().rev().find(|s| s.manifest.vm == vm)
    }

    /// Every chunk stored when the backup began (also those a prune may be
    /// deleting, which the backup stores again rather than reuse).
    pub fn stored(&self) -> &HashSet<ChunkId> {
        &self.stored
    }
}

/// Does all of [`backup`] but writing the snapshot: stores the chunks and
/// indexes and returns them with the lease, so a caller can finish its own
/// work (rotate dirty bitmaps, record the VM definition) before committing.
/// No chunk is stored after this returns, which is what keeps the prune
/// checks made here valid until the commit.
pub fn backup_prepare(
    repo: &Repository,
    disks: &[BackupDisk],
    options: &BackupOptions,
    progress: &Progress,
) -> Result<PreparedBackup> {
    backup_prepare_started(repo, BackupStart::begin(repo)?, disks, options, progress)
}

/// [`backup_prepare`] for a backup whose lease was taken (and chunks
/// listed) by [`BackupStart::begin`] before it was planned.
pub fn backup_prepare_started(
    repo: &Repository,
    start: BackupStart,
    disks: &[BackupDisk],
    options: &BackupOptions,
    progress: &Progress,
) -> Result<PreparedBackup> {
    check_disk_names(disks)?;
    check_bases(repo, disks)?;
    let history: Vec<Snapshot> = match options.skip_unchanged {
        true => start
            .snapshots
            .iter()
            .filter(|s| s.manifest.vm == options.vm)
            .cloned()
            .collect(),
        false => Vec::new(),
    };
    let BackupStart {
        guard, stored, map, ..
    } = start;
    let known = guard.reusable(stored);
    let started = Instant::now();
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut job = Job::new(repo, disks, &history, &guard, known, progress)?;
    job.map = map;
    super::run_workers(options.threads, || job.worker()).inspect_err(|_| job.index_uploaded())?;
    if progress.is_cancelled() {
        return Err(Error::Interrupted);
    }
    guard.before_snapshot(repo, &job.chunk_lists(), &|disk, chunk| {
        job.store_again(disk, chunk)
    })?;
    job.finish_packs()?;
    let records = job.write_indexes()?;
    let manifest = SnapshotManifest {
        version: SNAPSHOT_VERSION,
        vm: options.vm.clone(),
        host: options.host.clone().unwrap_or_else(crate::hostname),
        time,
        tags: options.tags.clone(),
        disks: records,
        stats: job.counters.into_stats(started.elapsed().as_secs_f64()),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        backup_type: crate::format::BackupType::Full,
        consistency: None,
        consistency_note: None,
        definition: None,
        canary: None,
    };
    Ok(PreparedBackup { manifest, guard })
}

/// Refuses base indexes that do not fit their disk: trusting one would
/// produce a wrong snapshot.
fn check_bases(repo: &Repository, disks: &[BackupDisk]) -> Result<()> {
    for disk in disks {
        let Some(base) = &disk.base else { continue };
        let size = disk.source.virtual_size();
        if base.index.virtual_size != size || base.index.chunk_size != repo.config().chunk_size {
            return Err(Error::InvalidInput(format!(
                "the base snapshot {} of disk '{}' has a different disk or chunk size",
                base.snapshot, disk.name
            )));
        }
    }
    Ok(())
}

fn check_disk_names(disks: &[BackupDisk]) -> Result<()> {
    if disks.is_empty() {
        return Err(Error::InvalidInput("no disks to back up".to_string()));
    }
    let mut seen = HashSet::new();
    for disk in disks {
        crate::format::check_file_name("disk name", &disk.name).map_err(Error::InvalidInput)?;
        if !seen.insert(disk.name.as_str()) {
            return Err(Error::InvalidInput(format!(
                "two disks are named '{}'; disk names must be unique within a VM",
                disk.name
            )));
        }
    }
    Ok(())
}

impl<'a> Job<'a> {
    fn new(
        repo: &'a Repository,
        disks: &'a [BackupDisk],
        history: &[Snapshot],
        guard: &'a BackupGuard,
        known: HashSet<ChunkId>,
        progress: &'a Progress,
    ) -> Result<Self> {
        let chunk_size = repo.config().chunk_size;
        let counters = Counters::default();
        let mut reused = Vec::with_capacity(disks.len());
        let mut unchanged_since = Vec::with_capacity(disks.len());
        for disk in disks {
            let size = disk.source.virtual_size();
            progress.add_total(size);
            let previous = history.last();
            let index =
                previous.and_then(|p| reusable_index(repo, p, history, disk, chunk_size, &known));
            if let Some(index) = &index {
                counters.disks_unchanged.fetch_add(1, Ordering::Relaxed);
                let data = index.data_chunks();
                counters.chunks_reused.fetch_add(data, Ordering::Relaxed);
                counters
                    .chunks_hole
                    .fetch_add(index.count() - data, Ordering::Relaxed);
                progress.add_done(size);
            }
            unchanged_since.push(index.as_ref().and(previous).map(|p| p.id.clone()));
            reused.push(index);
        }
        let reused_ids: Vec<ChunkId> = reused
            .iter()
            .flatten()
            .flat_map(|i| i.ids())
            .copied()
            .collect();
        Ok(Self {
            repo,
            disks,
            chunk_size,
            plan: Mutex::new(Plan::default()),
            stop: AtomicBool::new(false),
            known: Mutex::new(known),
            vouched: Mutex::new(vouched_by_bases(disks, &reused_ids)),
            pending: guard.pending(),
            indexes: disks.iter().map(|_| Mutex::new(Vec::new())).collect(),
            deltas: disks.iter().map(|_| Mutex::new(Vec::new())).collect(),
            use_deltas: repo.config().deltas(),
            map: None,
            reused,
            unchanged_since,
            counters,
            progress,
            packer: repo.config().packs().then(|| PackWriter::new(repo)),
        })
    }

    /// Uploads the last pack and writes the index of this backup's packs:
    /// after it, every chunk the backup stored can be found, and the disk
    /// indexes may name them.
    fn finish_packs(&self) -> Result<()> {
        let Some(packer) = &self.packer else {
            return Ok(());
        };
        let packs = packer.finish()?;
        write_pack_indexes(self.repo, &packs)?;
        Ok(())
    }

    /// After a failure: indexes the packs uploaded so far, best effort, so
    /// the next backup finds their chunks without reading their trailers.
    fn index_uploaded(&self) {
        if let Some(packer) = &self.packer {
            let _ = write_pack_indexes(self.repo, &packer.take_uploaded());
        }
    }

    /// Stores an encoded chunk: into the current pack, or as its own object.
    fn put_encoded(&self, id: &ChunkId, encoded: &[u8]) -> Result<()> {
        match &self.packer {
            Some(packer) => packer.add(id, encoded),
            None => self.repo.put_chunk(id, encoded),
        }
    }

    fn worker(&self) -> Result<()> {
        let result = self.worker_loop();
        if result.is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        result
    }

    fn worker_loop(&self) -> Result<()> {
        let mut readers: Vec<Option<Box<dyn DiskReader>>> =
            self.disks.iter().map(|_| None).collect();
        let mut buf = vec![0u8; self.chunk_size as usize];
        loop {
            if self.stop.load(Ordering::Relaxed) || self.progress.is_cancelled() {
                return Ok(());
            }
            let Some(task) = self.next_task(&mut readers)? else {
                return Ok(());
            };
            let reader = self.reader(&mut readers, task.disk)?;
            let entry = match &task.delta {
                Some(plan) => self.process_delta(&task, plan, reader, &mut buf)?,
                None => self.process_chunk(&task, reader, &mut buf)?,
            };
            if let Some(id) = entry {
                self.lock_index(task.disk).push((task.chunk, id));
            }
        }
    }

    /// This worker's reader of `disk`, opened on first use.
    fn reader<'r>(
        &self,
        readers: &'r mut [Option<Box<dyn DiskReader>>],
        disk: usize,
    ) -> Result<&'r mut dyn DiskReader> {
        Ok(match &mut readers[disk] {
            Some(reader) => reader.as_mut(),
            slot => slot.insert(self.open_reader(disk)?).as_mut(),
        })
    }

    /// The next chunk to read, planning windows of the disks (with this
    /// worker's readers) until one yields work; `None` when all is done.
    fn next_task(&self, readers: &mut [Option<Box<dyn DiskReader>>]) -> Result<Option<Task>> {
        let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(task) = plan.queue.pop_front() {
                return Ok(Some(task));
            }
            if self.stop.load(Ordering::Relaxed) || self.progress.is_cancelled() {
                return Ok(None);
            }
            let Some(disk) = self.disks.get(plan.disk) else {
                return Ok(None);
            };
            if self.reused[plan.disk].is_some() || plan.offset >= disk.source.virtual_size() {
                plan.disk += 1;
                plan.offset = 0;
                continue;
            }
            let reader = self.reader(readers, plan.disk)?;
            self.plan_window(&mut plan, reader)?;
        }
    }

    /// Plans the next window of the current disk: from its dirty bitmap
    /// when it has a base, else from its allocation.
    fn plan_window(&self, plan: &mut Plan, reader: &mut dyn DiskReader) -> Result<()> {
        let disk = plan.disk;
        if self.disks[disk].base.is_some() {
            let size = self.disks[disk].source.virtual_size();
            let length = CHANGES_WINDOW.min(size - plan.offset);
            let changed = reader
                .changed_ranges(plan.offset, length, u64::from(self.chunk_size))
                .map_err(|e| self.source_error(disk, e))?;
            if let Some(ranges) = changed {
                self.plan_changes(plan, plan.offset + length, &ranges);
                plan.offset += length;
                return Ok(());
            }
        }
        self.plan_allocation(plan, reader)
    }

    /// Queues the chunks of the window that hold data; counts the others
    /// as holes without touching them one by one.
    fn plan_allocation(&self, plan: &mut Plan, reader: &mut dyn DiskReader) -> Result<()> {
        let (disk, offset) = (plan.disk, plan.offset);
        let size = self.disks[disk].source.virtual_size();
        let chunk = u64::from(self.chunk_size);
        let length = ALLOCATION_WINDOW.min(size - offset);
        let extents = reader
            .extents_from(offset, length, MAX_PLAN_EXTENTS)
            .map_err(|e| self.source_error(disk, e))?;
        let Some(end) = window_end(&extents, offset, size, chunk) else {
            // Not even one chunk described: its worker asks about it alone.
            plan.queue.push_back(Task {
                disk,
                chunk: offset / chunk,
                extents: None,
                delta: None,
            });
            plan.offset = (offset + chunk).min(size);
            return Ok(());
        };
        let tasks = data_chunks(&extents, offset, end, chunk);
        let data_bytes: u64 = tasks.iter().map(|(c, _)| self.chunk_length(disk, *c)).sum();
        let chunks = (end - offset).div_ceil(chunk);
        self.counters
            .chunks_hole
            .fetch_add(chunks - tasks.len() as u64, Ordering::Relaxed);
        self.progress.add_done(end - offset - data_bytes);
        plan.queue
            .extend(tasks.into_iter().map(|(chunk, extents)| Task {
                disk,
                chunk,
                extents: Some(extents),
                delta: None,
            }));
        plan.offset = end;
        Ok(())
    }

    /// For a disk with a base, the window `[plan.offset, end)`: changed
    /// chunks are queued, the base's entries for the others are taken as
    /// they are (those a prune may be deleting are queued to be read and
    /// stored again), and the base's holes cost nothing per chunk.
    fn plan_changes(&self, plan: &mut Plan, end: u64, ranges: &[(u64, u64)]) {
        let disk = plan.disk;
        let chunk = u64::from(self.chunk_size);
        let Some(base) = &self.disks[disk].base else {
            return;
        };
        let (first, stop) = (plan.offset / chunk, end.div_ceil(chunk));
        let dirty = dirty_chunks(ranges, chunk);
        let is_dirty = |c: u64| {
            let at = dirty.partition_point(|(_, e)| *e <= c);
            dirty.get(at).is_some_and(|(s, _)| *s <= c)
        };
        let mut read: Vec<u64> = dirty
            .iter()
            .flat_map(|(s, e)| (*s).max(first)..(*e).min(stop))
            .collect();
        let mut copied = 0u64;
        for (c, id) in base.index.data_in(first, stop) {
            if is_dirty(*c) {
                continue;
            }
            let full = base.index.base_of(*c);
            if self.is_known(id) && full.as_ref().is_none_or(|f| self.is_known(f)) {
                self.lock_index(disk).push((*c, *id));
                if let Some(full) = full {
                    self.lock_deltas(disk).push((*c, full));
                }
                copied += 1;
            } else {
                read.push(*c);
            }
        }
        read.sort_unstable();
        let read_bytes: u64 = read.iter().map(|c| self.chunk_length(disk, *c)).sum();
        let unchanged = stop - first - read.len() as u64;
        debug_assert!(unchanged >= copied);
        self.counters
            .chunks_unchanged
            .fetch_add(unchanged, Ordering::Relaxed);
        self.progress.add_done(end - plan.offset - read_bytes);
        plan.queue.extend(read.into_iter().map(|chunk| {
            Task {
                disk,
                chunk,
                extents: None,
                delta: is_dirty(chunk)
                    .then(|| self.delta_plan(disk, chunk, &base.index, ranges))
                    .flatten(),
            }
        }));
    }

    /// How changed chunk `chunk` may be stored as a delta on the base
    /// snapshot's chunk there, when the repository takes deltas, the base
    /// has data there whose full chunk may be relied on, and less than
    /// [`MAX_DELTA_SHARE`] of it changed.
    fn delta_plan(
        &self,
        disk: usize,
        chunk: u64,
        base: &DiskIndex,
        ranges: &[(u64, u64)],
    ) -> Option<DeltaPlan> {
        if !self.use_deltas {
            return None;
        }
        let previous = base.get(chunk)?;
        let (full, previous) = match base.base_of(chunk) {
            Some(full) => (full, Some(previous)),
            None => (previous, None),
        };
        let relied_on = |id: &ChunkId| self.is_known(id) && self.is_vouched(id);
        if !relied_on(&full) || !previous.as_ref().is_none_or(relied_on) {
            return None;
        }
        let length = self.chunk_length(disk, chunk);
        let start = chunk * u64::from(self.chunk_size);
        let dirty = ranges_in(ranges, start, start + length);
        let changed: u64 = dirty.iter().map(|(s, e)| e - s).sum();
        (changed * MAX_DELTA_SHARE <= length).then_some(DeltaPlan {
            base: full,
            previous,
            dirty,
        })
    }

    /// Whether `id` may be reused without reading it (see `vouched`).
    fn is_vouched(&self, id: &ChunkId) -> bool {
        self.vouched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(id)
    }

    /// Stores changed chunk `task.chunk` as a delta on `plan.base`: reads
    /// from the source only the ranges that changed since the base
    /// snapshot; when the base snapshot's entry is itself a delta, its
    /// patches are taken from that (small) object and the new ranges laid
    /// over them, so the new delta replaces it and the depth stays 1.
    /// Falls back to reading the whole chunk when the delta would replace
    /// more than [`MAX_DELTA_SHARE`] of it.
    fn process_delta(
        &self,
        task: &Task,
        plan: &DeltaPlan,
        reader: &mut dyn DiskReader,
        buf: &mut [u8],
    ) -> Result<Option<ChunkId>> {
        let length = self.chunk_length(task.disk, task.chunk);
        let old = match &plan.previous {
            Some(previous) => self.previous_patches(previous, plan.base, length)?,
            None => Vec::new(),
        };
        let old_ranges = old
            .iter()
            .map(|(at, b)| (u64::from(*at), *at as u64 + b.len() as u64));
        let union = merge_ranges(plan.dirty.iter().copied().chain(old_ranges).collect());
        let patched: u64 = union.iter().map(|(s, e)| e - s).sum();
        if patched * MAX_DELTA_SHARE > length {
            return self.process_chunk(task, reader, buf);
        }
        let offset = task.chunk * u64::from(self.chunk_size);
        // The old patches first: the bytes read now win where they overlap.
        let mut patches = old;
        for (start, end) in &plan.dirty {
            let mut bytes = vec![0u8; (end - start) as usize];
            reader
                .read_exact_at(&mut bytes, offset + start)
                .map_err(|e| self.source_error(task.disk, e))?;
            self.counters
                .bytes_read
                .fetch_add(end - start, Ordering::Relaxed);
            patches.push((*start as u32, bytes));
        }
        let delta = Delta::new(plan.base, length as u32, patches)?;
        let id = self.store_if_new(&delta.encode())?;
        self.lock_deltas(task.disk).push((task.chunk, plan.base));
        self.progress.add_done(length);
        Ok(Some(id))
    }

    /// The patches of the base snapshot's delta `previous` (on `base`, of a
    /// chunk of `length` bytes): the bytes it replaced then, which the
    /// source still holds where the bitmap says nothing changed since.
    fn previous_patches(
        &self,
        previous: &ChunkId,
        base: ChunkId,
        length: u64,
    ) -> Result<Vec<(u32, Vec<u8>)>> {
        let key = Repository::chunk_key(previous);
        let data = read_located(self.repo, self.map.as_ref(), previous)?;
        let old = Delta::decode(&key, &data)?;
        if old.base != base || u64::from(old.chunk_len) != length {
            return Err(Error::corrupt(
                &key,
                "is a delta on another base or chunk than its index names",
            ));
        }
        Ok(old.patches().to_vec())
    }

    /// The length of chunk `chunk` of `disk` (the last one may be short).
    fn chunk_length(&self, disk: usize, chunk: u64) -> u64 {
        let size = self.disks[disk].source.virtual_size();
        let offset = chunk * u64::from(self.chunk_size);
        (size - offset).min(u64::from(self.chunk_size))
    }

    /// Whether a stored chunk may be taken as present (a prune is not
    /// deleting it).
    fn is_known(&self, id: &ChunkId) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(id)
    }

    fn open_reader(&self, disk: usize) -> Result<Box<dyn DiskReader>> {
        self.disks[disk]
            .source
            .open_reader()
            .map_err(|e| self.source_error(disk, e))
    }

    fn source_error(&self, disk: usize, source: std::io::Error) -> Error {
        Error::Source {
            disk: self.disks[disk].name.clone(),
            source,
        }
    }

    fn lock_index(&self, disk: usize) -> std::sync::MutexGuard<'_, Vec<(u64, ChunkId)>> {
        self.indexes[disk]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads one chunk and stores it if new; returns its index entry
    /// (`None` for a chunk that turned out to hold only zeros).
    fn process_chunk(
        &self,
        task: &Task,
        reader: &mut dyn DiskReader,
        buf: &mut [u8],
    ) -> Result<Option<ChunkId>> {
        let offset = task.chunk * u64::from(self.chunk_size);
        let length = self.chunk_length(task.disk, task.chunk) as usize;
        let data = &mut buf[..length];
        let read = match &task.extents {
            Some(extents) => read_extents(reader, extents, offset, data),
            None => read_allocated(reader, offset, data),
        }
        .map_err(|e| self.source_error(task.disk, e))?;
        self.counters.bytes_read.fetch_add(read, Ordering::Relaxed);
        let entry = if read == 0 || is_all_zero(data) {
            self.counters.chunks_hole.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            Some(self.store_if_new(data)?)
        };
        self.progress.add_done(length as u64);
        Ok(entry)
    }

    fn store_if_new(&self, data: &[u8]) -> Result<ChunkId> {
        let id = self.repo.crypto().chunk_id(data);
        let is_new = self
            .known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id);
        // Vouched for at once: workers meeting it later reuse this upload.
        let first_to_vouch = is_new && self.vouch(id);
        let stored_elsewhere = first_to_vouch && self.stored_meanwhile(&id)?;
        if !is_new || stored_elsewhere {
            let check = stored_elsewhere || self.vouch(id);
            if check && self.authenticate_stored(&id, data)? {
                return Ok(id);
            }
            self.counters.chunks_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(id);
        }
        self.store_new(&id, data)?;
        Ok(id)
    }

    /// Marks `id` as vouched for; true if it was not yet (the caller is the
    /// one to store or authenticate it).
    fn vouch(&self, id: ChunkId) -> bool {
        self.vouched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id)
    }

    /// Before a stored copy that nothing vouches for is reused: reads and
    /// authenticates it. Someone without the key (a backup token on the
    /// server, the storage) may have stored junk under a chunk's name after
    /// a prune deleted the real one; reusing it would save a snapshot that
    /// does not restore. A copy that fails is replaced by this backup's
    /// data and read again; if the storage keeps the bad copy (the backup
    /// server never lets a backup token overwrite an object), the backup
    /// fails, naming the object. Returns true when it stored the chunk
    /// itself (counted as new). Repositories with packs need none of this:
    /// their chunks are located through sealed pack indexes and trailers,
    /// which no one without the key can forge.
    fn authenticate_stored(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        if self.packer.is_some() || self.stored_copy_is_good(id)? {
            return Ok(false);
        }
        self.store_new(id, data)?;
        if self.stored_copy_is_good(id)? {
            return Ok(true);
        }
        Err(Error::Refused(format!(
            "{} does not authenticate and the storage kept it when this backup wrote the chunk again (someone without the key stored it, or it is damaged); nothing was recorded. Run `vbackup repair` (with an admin token on a server) to quarantine it, then back up again",
            Repository::chunk_key(id)
        )))
    }

    /// Whether the stored loose copy of `id` reads, authenticates and has
    /// the right digest. Storage failures other than "not found" stop the
    /// backup.
    fn stored_copy_is_good(&self, id: &ChunkId) -> Result<bool> {
        crate::error::authenticated(self.repo.read_chunk(id).map(drop))
    }

    /// Compresses, seals and stores a chunk, and counts it.
    fn store_new(&self, id: &ChunkId, data: &[u8]) -> Result<()> {
        let encoded = self.repo.encode_chunk(id, data)?;
        self.put_encoded(id, &encoded)?;
        self.counters.chunks_new.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_new
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.counters
            .bytes_stored
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        self.progress.add_stored(encoded.len() as u64);
        Ok(())
    }

    /// Whether the backend says it holds a chunk that was not listed at the
    /// start (another client stored it since): the chunk-presence query
    /// that keeps a remote backup from sending it again. Backends that
    /// cannot tell cheaply answer "missing" without a request. Chunks that
    /// a prune may be deleting are always sent (see `backup_guard`); one
    /// that a prune starts deleting later is caught before the snapshot.
    fn stored_meanwhile(&self, id: &ChunkId) -> Result<bool> {
        // Chunks in packs have no object of their own to ask about.
        if self.packer.is_some() || self.pending.binary_search(id).is_ok() {
            return Ok(false);
        }
        let key = [Repository::chunk_key(id)];
        Ok(self.repo.backend().missing(&key)?.is_empty())
    }

    /// A copy of every disk's data chunks so far, `(chunk number, id)`,
    /// with the bases of its deltas as entries of their chunks (a base a
    /// sweep deleted cannot be stored again from the source, which holds
    /// the patched chunk: the backup then fails, recording nothing).
    fn chunk_lists(&self) -> Vec<Vec<(u64, ChunkId)>> {
        (0..self.disks.len())
            .map(|i| match &self.reused[i] {
                Some(index) => index.data().iter().chain(index.deltas()).copied().collect(),
                None => {
                    let mut list = self.lock_index(i).clone();
                    list.extend(self.lock_deltas(i).iter().copied());
                    list
                }
            })
            .collect()
    }

    fn lock_deltas(&self, disk: usize) -> std::sync::MutexGuard<'_, Vec<(u64, ChunkId)>> {
        self.deltas[disk]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads chunk `chunk` of `disk` from the source again and stores it
    /// (a concurrent prune deleted the stored copy); returns its id.
    fn store_again(&self, disk: usize, chunk: u64) -> Result<ChunkId> {
        let size = self.disks[disk].source.virtual_size();
        let offset = chunk * u64::from(self.chunk_size);
        let length = (size - offset).min(u64::from(self.chunk_size)) as usize;
        let mut data = vec![0u8; length];
        let mut reader = self.open_reader(disk)?;
        read_allocated(reader.as_mut(), offset, &mut data)
            .map_err(|e| self.source_error(disk, e))?;
        let id = self.repo.crypto().chunk_id(&data);
        self.put_encoded(&id, &self.repo.encode_chunk(&id, &data)?)?;
        Ok(id)
    }

    fn write_indexes(&self) -> Result<Vec<DiskRecord>> {
        let mut records = Vec::with_capacity(self.disks.len());
        for (i, disk) in self.disks.iter().enumerate() {
            let index = match &self.reused[i] {
                Some(index) => index.clone(),
                None => {
                    let data = std::mem::take(&mut *self.lock_index(i));
                    let deltas = std::mem::take(&mut *self.lock_deltas(i));
                    DiskIndex::from_data(disk.source.virtual_size(), self.chunk_size, data)?
                        .with_deltas(deltas)?
                }
            };
            let data_chunks = index.data_chunks();
            records.push(DiskRecord {
                name: disk.name.clone(),
                source: disk.source_label.clone(),
                format: disk.source.format().to_string(),
                virtual_size: index.virtual_size,
                chunk_size: self.chunk_size,
                index: self.repo.write_index(&index)?,
                data_chunks,
                source_identity: disk.source.identity(),
                read: match (&self.unchanged_since[i], &disk.base) {
                    (Some(_), _) => ReadScope::None,
                    (None, Some(_)) => ReadScope::Changed,
                    (None, None) => ReadScope::All,
                },
                base_snapshot: disk.base.as_ref().map(|b| b.snapshot.clone()),
                unchanged_since: self.unchanged_since[i].clone(),
                fallback_reason: None,
                tracking: None,
            });
        }
        Ok(records)
    }
}

/// The chunks the backup may reuse unread: those the base indexes of its
/// disks reference (authenticated indexes of snapshots this VM's own
/// tracking produced, checked complete against the listing) and those of
/// reused unchanged indexes.
fn vouched_by_bases(disks: &[BackupDisk], reused: &[ChunkId]) -> HashSet<ChunkId> {
    disks
        .iter()
        .filter_map(|d| d.base.as_ref())
        .flat_map(|b| b.index.ids().copied())
        .chain(reused.iter().copied())
        .collect()
}

/// The previous snapshot's index for `disk`, if the disk's source is
/// provably unchanged since then and every chunk of that index is stored.
/// Every snapshot of the VM (`history`) that records the same source
/// fingerprint for this disk must name the same index: a forged or
/// replayed manifest copying the fingerprint with another index makes the
/// claim ambiguous, and the disk is read.
fn reusable_index(
    repo: &Repository,
    previous: &Snapshot,
    history: &[Snapshot],
    disk: &BackupDisk,
    chunk_size: u32,
    known: &HashSet<ChunkId>,
) -> Option<DiskIndex> {
    let identity = disk.source.identity()?;
    let record = previous
        .manifest
        .disks
        .iter()
        .find(|d| d.name == disk.name)?;
    let unambiguous = history
        .iter()
        .flat_map(|s| &s.manifest.disks)
        .filter(|d| d.name == disk.name && d.source_identity.as_deref() == Some(&identity))
        .all(|d| d.index == record.index);
    let same = record.source_identity.as_deref() == Some(identity.as_str())
        && unambiguous
        && record.virtual_size == disk.source.virtual_size()
        && record.chunk_size == chunk_size;
    let index = repo.read_index(&record.index).ok().filter(|_| same)?;
    let complete =
        index.virtual_size == record.virtual_size && index.ids().all(|id| known.contains(id));
    complete.then_some(index)
}

/// The parts of the sorted byte ranges `ranges` inside `[start, end)`,
/// relative to `start`.
fn ranges_in(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let from = ranges.partition_point(|(_, e)| *e <= start);
    ranges[from..]
        .iter()
        .take_while(|(s, _)| *s < end)
        .map(|(s, e)| ((*s).max(start) - start, (*e).min(end) - start))
        .filter(|(s, e)| e > s)
        .collect()
}

/// `ranges` `(start, end)` sorted, with overlapping and touching ones
/// merged.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Fills `buf` with the disk's bytes at `offset`, reading only the extents
/// that hold data; returns how many bytes were read.
fn read_allocated(
    reader: &mut dyn DiskReader,
    offset: u64,
    buf: &mut [u8],
) -> std::io::Result<u64> {
    let extents = reader.extents(offset, buf.len() as u64)?;
    read_extents(reader, &extents, offset, buf)
}

/// Fills `buf` with the disk's bytes at `offset` as `extents` describe
/// them (which must cover it exactly): data extents are read, zero ones
/// filled; returns how many bytes were read.
fn read_extents(
    reader: &mut dyn DiskReader,
    extents: &[Extent],
    offset: u64,
    buf: &mut [u8],
) -> std::io::Result<u64> {
    let end = offset + buf.len() as u64;
    let mut covered = offset;
    let mut read = 0;
    for extent in extents
        .iter()
        .filter(|e| e.end() > offset && e.offset < end)
    {
        let start = extent.offset.max(offset);
        let stop = extent.end().min(end);
        if start != covered || stop <= start {
            return Err(std::io::Error::other(format!(
                "the source described the range at {offset} with gaps or overlaps (extent at {})",
                extent.offset
            )));
        }
        let slice = &mut buf[(start - offset) as usize..(stop - offset) as usize];
        match extent.kind {
            ExtentKind::Data => {
                reader.read_exact_at(slice, start)?;
                read += slice.len() as u64;
            }
            ExtentKind::Zero => slice.fill(0),
        }
        covered = stop;
    }
    if covered != end {
        return Err(std::io::Error::other(format!(
            "the source did not describe all of the range at {offset}"
        )));
    }
    Ok(read)
}
