//! Random access to a snapshot's disk: the *snapshot disk reader*.
//!
//! A restore streams every chunk once, in order. Serving a disk to a
//! running guest (an NBD export for instant recovery, file-level restore,
//! a FUSE mount) reads small pieces anywhere, again and again. Without a
//! cache, every 4 KiB guest read would fetch, authenticate and decompress
//! a whole 4 MiB chunk. So the reader keeps:
//!
//! - the disk's index (its chunk map: holes cost nothing);
//! - a [`ChunkCache`] of decoded chunks, least-recently-used first out,
//!   bounded in bytes and shared by every disk and connection of a
//!   process (chunks are content-addressed, so two disks or two snapshots
//!   that share a chunk share its cache entry). Concurrent readers of a
//!   chunk that is being fetched wait for that one fetch;
//! - read-ahead: a read that continues where an earlier one ended (a
//!   guest booting, `qemu-img convert`, a block-stream job) queues the
//!   next chunks for a few prefetch threads, so sequential readers find
//!   them decoded.
//!
//! Every chunk is authenticated and digest-checked as it is read
//! ([`Repository::read_chunk`] and the pack reader do that), and a delta
//! chunk is applied to its base: what the reader returns is exactly what
//! the backup read, or an error naming the damaged object.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use lru::LruCache;

use crate::commands::restore::{check_length, missing_is_damage, resolve_chunk};
use crate::format::{DiskIndex, DiskRecord};
use crate::packs::{read_located, ChunkMap};
use crate::{ChunkId, Error, Repository, Result};

/// The default size of a [`ChunkCache`]: 64 chunks of 4 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// The default read-ahead, in chunks past the end of a sequential read.
pub const DEFAULT_READAHEAD: usize = 4;
/// Recent read ends remembered per disk to recognise sequential readers
/// (several at once: `qemu-img convert -m 4`, a guest and a block job).
const STREAMS: usize = 8;

/// What a cache holds and did, for `--json` reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that fetched their chunk from the repository.
    pub misses: u64,
    /// Bytes of decoded chunks held.
    pub bytes: u64,
    /// Chunks held.
    pub chunks: u64,
}

/// Decoded chunks by id, bounded in bytes, least recently used evicted
/// first; shared by all readers of a process.
pub struct ChunkCache {
    capacity: u64,
    state: Mutex<CacheState>,
    loaded: Condvar,
}

struct CacheState {
    entries: LruCache<ChunkId, Arc<[u8]>>,
    bytes: u64,
    /// Chunks some thread is fetching now; others wait instead of
    /// fetching them again.
    loading: HashSet<ChunkId>,
    hits: u64,
    misses: u64,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ChunkCache {
    /// A cache holding at most `capacity` bytes of decoded chunks (0 keeps
    /// nothing, but concurrent reads of one chunk still share one fetch).
    pub fn new(capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            state: Mutex::new(CacheState {
                entries: LruCache::unbounded(),
                bytes: 0,
                loading: HashSet::new(),
                hits: 0,
                misses: 0,
            }),
            loaded: Condvar::new(),
        })
    }

    /// The cache's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Hits, misses and what is held now.
    pub fn stats(&self) -> CacheStats {
        let state = self.lock();
        CacheStats {
            hits: state.hits,
            misses: state.misses,
            bytes: state.bytes,
            chunks: state.entries.len() as u64,
        }
    }

    /// Whether chunk `id` is held or being fetched (read-ahead skips it).
    fn has(&self, id: &ChunkId) -> bool {
        let state = self.lock();
        state.entries.contains(id) || state.loading.contains(id)
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // A panic while holding the lock leaves nothing half-done that
        // later readers could trip over: use the state as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunk `id` from the cache, or from `load` (run once however many
    /// threads ask at the same time); what `load` returns is kept. When
    /// `load` fails, the error goes to its caller and waiting threads try
    /// for themselves.
    pub fn get_or_load(
        &self,
        id: &ChunkId,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<[u8]>> {
        let mut state = self.lock();
        loop {
            if let Some(data) = state.entries.get(id) {
                let data = Arc::clone(data);
                state.hits += 1;
                return Ok(data);
            }
            if !state.loading.contains(id) {
                break;
            }
            state = self.loaded.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.loading.insert(*id);
        state.misses += 1;
        drop(state);
        let loaded = load().map(Arc::<[u8]>::from);
        let mut state = self.lock();
        state.loading.remove(id);
        if let Ok(data) = &loaded {
            self.insert(&mut state, id, data);
        }
        drop(state);
        self.loaded.notify_all();
        loaded
    }

    /// Keeps `data`, evicting the least recently used chunks beyond the
    /// capacity; a chunk larger than the whole cache is not kept.
    fn insert(&self, state: &mut CacheState, id: &ChunkId, data: &Arc<[u8]>) {
        let size = data.len() as u64;
        if size > self.capacity {
            return;
        }
        if let Some(old) = state.entries.put(*id, Arc::clone(data)) {
            state.bytes -= old.len() as u64;
        }
        state.bytes += size;
        while state.bytes > self.capacity {
            match state.entries.pop_lru() {
                Some((_, old)) => state.bytes -= old.len() as u64,
                None => break,
            }
        }
    }
}

/// How a [`SnapshotDiskReader`] reads ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Chunks fetched ahead of a sequential reader (0: none).
    pub readahead: usize,
    /// Threads fetching them.
    pub prefetch_threads: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            readahead: DEFAULT_READAHEAD,
            prefetch_threads: 2,
        }
    }
}

/// One region of a disk as its index describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// Whether chunks are stored there (`false`: a hole, reads as zeros).
    pub data: bool,
}

/// Random-access reads of one disk of one snapshot, through a shared
/// [`ChunkCache`], with read-ahead. Cheap to share between threads
/// (`&self` everywhere); dropping it stops its prefetch threads.
pub struct SnapshotDiskReader {
    shared: Arc<Shared>,
    prefetch: Option<Sender<u64>>,
    workers: Vec<JoinHandle<()>>,
}

/// What the reader and its prefetch threads share.
struct Shared {
    repo: Arc<Repository>,
    map: Option<Arc<ChunkMap>>,
    index: DiskIndex,
    name: String,
    cache: Arc<ChunkCache>,
    /// Chunk after the last one of recent reads, one slot per stream.
    streams: [AtomicU64; STREAMS],
    next_stream: AtomicU64,
    readahead: usize,
}

impl std::fmt::Debug for SnapshotDiskReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotDiskReader")
            .field("disk", &self.shared.name)
            .field("size", &self.shared.index.virtual_size)
            .finish()
    }
}

/// Where a repository's chunks are: `None` for loose chunks, the pack
/// indexes read once for a repository with packs. Shared by all the
/// readers of one repository, so it is read once per process.
pub fn chunk_locations(repo: &Repository) -> Result<Option<Arc<ChunkMap>>> {
    match repo.config().packs() {
        true => Ok(Some(Arc::new(repo.chunk_map()?))),
        false => Ok(None),
    }
}

impl SnapshotDiskReader {
    /// Opens `disk` of a snapshot: reads and checks its index. `map` is
    /// [`chunk_locations`] of `repo`.
    pub fn open(
        repo: Arc<Repository>,
        map: Option<Arc<ChunkMap>>,
        disk: &DiskRecord,
        cache: Arc<ChunkCache>,
        options: ReaderOptions,
    ) -> Result<Self> {
        let index = crate::commands::restore::load_index(&repo, disk)?;
        let shared = Arc::new(Shared {
            repo,
            map,
            index,
            name: disk.name.clone(),
            cache,
            streams: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            next_stream: AtomicU64::new(0),
            readahead: options.readahead,
        });
        let mut reader = Self {
            shared,
            prefetch: None,
            workers: Vec::new(),
        };
        if options.readahead > 0 && options.prefetch_threads > 0 {
            reader.start_prefetch(options)?;
        }
        Ok(reader)
    }

    fn start_prefetch(&mut self, options: ReaderOptions) -> Result<()> {
        let capacity = NonZeroUsize::new(options.readahead * 2).map_or(1, NonZeroUsize::get);
        let (tx, rx) = bounded::<u64>(capacity);
        for n in 0..options.prefetch_threads {
            let (shared, rx) = (Arc::clone(&self.shared), rx.clone());
            let worker = std::thread::Builder::new()
                .name(format!("prefetch-{n}"))
                .spawn(move || prefetch_worker(&shared, &rx))
                .map_err(|e| Error::internal(format!("cannot start a prefetch thread: {e}")))?;
            self.workers.push(worker);
        }
        self.prefetch = Some(tx);
        Ok(())
    }

    /// The disk's name in the snapshot.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.index.virtual_size
    }

    /// The disk's index.
    pub fn index(&self) -> &DiskIndex {
        &self.shared.index
    }

    /// The cache this reader uses.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.shared.cache
    }

    /// Fills `buf` with the disk's bytes at `offset` (holes read as
    /// zeros). Fails on a range past the end, or on a chunk that is
    /// missing or damaged (naming it); nothing unchecked is returned.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let index = &self.shared.index;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= index.virtual_size)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "a read of {} bytes at {offset} goes past the end of disk '{}' ({} bytes)",
                    buf.len(),
                    self.shared.name,
                    index.virtual_size
                ))
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let size = u64::from(index.chunk_size);
        let (first, last) = (offset / size, (end - 1) / size);
        for i in first..=last {
            let (start, length) = index.chunk_range(i);
            let from = offset.max(start);
            let to = end.min(start + length as u64);
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match self.shared.chunk(i)? {
                Some(data) => {
                    out.copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
                }
                None => out.fill(0),
            }
        }
        self.read_ahead(first, last);
        Ok(())
    }

    /// The regions of `[offset, offset + length)` (clipped to the disk) as
    /// the index has them: data chunks and holes, neighbours of one kind
    /// merged, at most `max_regions` (the last may end early). Answered
    /// from the index alone: no chunk is read.
    pub fn regions(&self, offset: u64, length: u64, max_regions: usize) -> Vec<Region> {
        let index = &self.shared.index;
        let end = offset.saturating_add(length).min(index.virtual_size);
        let max = max_regions.max(1);
        let mut regions: Vec<Region> = Vec::new();
        if offset >= end {
            return regions;
        }
        let size = u64::from(index.chunk_size);
        let mut pos = offset;
        for (i, _) in index.data_in(offset / size, (end - 1) / size + 1) {
            let (start, length) = index.chunk_range(*i);
            let (from, to) = (start.max(pos), (start + length as u64).min(end));
            push_region(&mut regions, pos, from, false);
            push_region(&mut regions, from, to, true);
            pos = to;
            if regions.len() > max {
                regions.truncate(max);
                return regions;
            }
        }
        push_region(&mut regions, pos, end, false);
        regions.truncate(max);
        regions
    }

    /// Queues the chunks after `last` when the read starting at chunk
    /// `first` continues an earlier one.
    fn read_ahead(&self, first: u64, last: u64) {
        let Some(queue) = &self.prefetch else { return };
        let shared = &self.shared;
        let continues = shared.streams.iter().position(|s| {
            let next = s.load(Ordering::Relaxed);
            next == first || next == first + 1 || (next > 0 && next - 1 == first)
        });
        let slot = match continues {
            Some(slot) => slot,
            None => {
                let slot = shared.next_stream.fetch_add(1, Ordering::Relaxed) as usize % STREAMS;
                shared.streams[slot].store(last + 1, Ordering::Relaxed);
                return;
            }
        };
        shared.streams[slot].store(last + 1, Ordering::Relaxed);
        let end = (last + 1 + shared.readahead as u64).min(shared.index.count());
        for i in last + 1..end {
            let Some(id) = shared.index.get(i) else {
                continue;
            };
            if shared.cache.has(&id) {
                continue;
            }
            if queue.try_send(i).is_err() {
                break;
            }
        }
    }
}

impl Drop for SnapshotDiskReader {
    fn drop(&mut self) {
        // Closing the queue ends the prefetch threads after their fetch.
        self.prefetch = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Appends `[from, to)` to `regions`, merged with the last one when it
/// is of the same kind and ends at `from`; an empty range adds nothing.
fn push_region(regions: &mut Vec<Region>, from: u64, to: u64, data: bool) {
    if to <= from {
        return;
    }
    match regions.last_mut() {
        Some(last) if last.data == data && last.offset + last.length == from => {
            last.length = to - last.offset;
        }
        _ => regions.push(Region {
            offset: from,
            length: to - from,
            data,
        }),
    }
}

/// Fetches queued chunks into the cache until the queue closes; a failed
/// fetch is left for the reader that needs the chunk to report.
fn prefetch_worker(shared: &Shared, queue: &Receiver<u64>) {
    while let Ok(i) = queue.recv() {
        let _ = shared.chunk(i);
    }
}

impl Shared {
    /// Chunk `i` decoded (through the cache), `None` for a hole.
    fn chunk(&self, i: u64) -> Result<Option<Arc<[u8]>>> {
        let Some(id) = self.index.get(i) else {
            return Ok(None);
        };
        self.cache.get_or_load(&id, || self.fetch(i, &id)).map(Some)
    }

    /// Reads chunk `i` (object `id`) from the repository, checked, and of
    /// the length the disk needs; a delta is applied to its base, which is
    /// read through the cache (many deltas share one base).
    fn fetch(&self, i: u64, id: &ChunkId) -> Result<Vec<u8>> {
        let read = |id: &ChunkId| {
            read_located(&self.repo, self.map.as_deref(), id).map_err(missing_is_damage)
        };
        let data = resolve_chunk(&self.index, i, id, read(id)?, |base| {
            self.cache.get_or_load(base, || read(base))
        })?;
        check_length(&self.index, i, id, &data)?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_beyond_its_capacity() {
        let cache = ChunkCache::new(3 * 10);
        for n in 1..=3 {
            cache.get_or_load(&id(n), || Ok(vec![n; 10])).unwrap();
        }
        // Touch 1, so 2 is the least recently used.
        cache.get_or_load(&id(1), || panic!("1 is cached")).unwrap();
        cache.get_or_load(&id(4), || Ok(vec![4; 10])).unwrap();
        assert!(cache.has(&id(1)) && cache.has(&id(3)) && cache.has(&id(4)));
        assert!(!cache.has(&id(2)), "2 was evicted");
        let stats = cache.stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.bytes, stats.chunks),
            (1, 4, 30, 3)
        );
    }

    #[test]
    fn a_chunk_larger_than_the_cache_is_returned_not_kept() {
        let cache = ChunkCache::new(5);
        let data = cache.get_or_load(&id(1), || Ok(vec![1; 10])).unwrap();
        assert_eq!(data.len(), 10);
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn a_failed_load_is_not_kept_and_the_next_reader_tries_again() {
        let cache = ChunkCache::new(100);
        let failed = cache.get_or_load(&id(1), || Err(Error::internal("boom")));
        assert!(failed.is_err());
        let data = cache.get_or_load(&id(1), || Ok(vec![7; 3])).unwrap();
        assert_eq!(&*data, &[7, 7, 7]);
    }

    #[test]
    fn concurrent_readers_of_one_chunk_share_one_fetch() {
        let cache = ChunkCache::new(100);
        let fetches = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    cache
                        .get_or_load(&id(9), || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![9; 4])
                        })
                        .unwrap()
                });
            }
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }
}
