//! `vbackup restore`: write a snapshot's disk back, chunks fetched in parallel.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::format::delta::Delta;
use crate::format::{DiskIndex, DiskRecord};
use crate::packs::{plan_reads, read_unit, sort_by_location, ChunkMap, Location, ReadUnit};
use crate::source::DiskTarget;
use crate::{ChunkId, Error, Progress, Repository, Result};

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreStats {
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes of data written: the chunks' bytes less the zero blocks
    /// inside them left as holes on fresh targets (holes are skipped, or
    /// zeroed on targets that may hold old data, and not counted).
    pub bytes_written: u64,
    /// Chunks fetched from the repository.
    pub chunks_read: u64,
}

/// Reads and checks a disk's index against its record.
pub(crate) fn load_index(repo: &Repository, disk: &DiskRecord) -> Result<DiskIndex> {
    let index = repo.read_index(&disk.index).map_err(missing_is_damage)?;
    if index.virtual_size != disk.virtual_size || index.chunk_size != disk.chunk_size {
        return Err(Error::corrupt(
            &disk.index,
            "index does not match the snapshot's disk record",
        ));
    }
    Ok(index)
}

/// A missing object that a snapshot needs is damage, not an I/O failure.
pub(crate) fn missing_is_damage(error: Error) -> Error {
    match error {
        Error::Storage(e) if e.is_not_found() => Error::corrupt(
            e.key(),
            "missing from the repository (`vbackup check` names what it breaks, `vbackup repair` marks it)",
        ),
        other => other,
    }
}

/// Where a restore finds chunks: loose objects are read by name; in a
/// repository with packs the chunk map says which range of which pack.
struct Chunks<'a> {
    repo: &'a Repository,
    map: Option<ChunkMap>,
}

impl<'a> Chunks<'a> {
    fn new(repo: &'a Repository) -> Result<Self> {
        let map = match repo.config().packs() {
            true => Some(repo.chunk_map()?),
            false => None,
        };
        Ok(Self { repo, map })
    }

    /// Fetches chunk `i` of `index` alone, checked, and of the expected
    /// length; a delta is applied to its base (fetched too).
    fn fetch(&self, index: &DiskIndex, i: u64, id: &ChunkId) -> Result<Vec<u8>> {
        let data = self.fetch_object(i, id)?;
        let data = self.resolve(index, i, id, data)?;
        check_length(index, i, id, &data)?;
        Ok(data)
    }

    /// Chunk `i`'s data from the object `id` read for it (see
    /// [`resolve_chunk`]; the base is fetched alone).
    fn resolve(&self, index: &DiskIndex, i: u64, id: &ChunkId, data: Vec<u8>) -> Result<Vec<u8>> {
        resolve_chunk(index, i, id, data, |base| self.fetch_object(i, base))
    }

    /// Reads object `id` (a chunk or a delta) for chunk `i`, authenticated
    /// and digest-checked.
    fn fetch_object(&self, i: u64, id: &ChunkId) -> Result<Vec<u8>> {
        let data = match &self.map {
            None => self.repo.read_chunk(id).map_err(missing_is_damage)?,
            Some(map) => {
                let mut data = Err(missing(id));
                let (units, _) = plan_reads(map, [(i, *id)], 0);
                for unit in &units {
                    read_unit(self.repo, map, unit, &mut |_, _, read| {
                        data = read;
                        Ok(())
                    })?;
                }
                data.map_err(missing_is_damage)?
            }
        };
        Ok(data)
    }

    /// The work of restoring `index`: its data chunks grouped into reads
    /// (neighbouring blobs of a pack are fetched with one request), then,
    /// when `zero_holes`, its holes.
    fn plan(&self, index: &DiskIndex, zero_holes: bool) -> Result<Vec<Work>> {
        let data = index.data().iter().copied();
        let mut work: Vec<Work> = match &self.map {
            None => data
                .map(|(i, id)| {
                    Work::Read(ReadUnit {
                        pack: None,
                        start: 0,
                        end: 0,
                        items: vec![(i, id, Location::Loose { size: 0 })],
                    })
                })
                .collect(),
            Some(map) => {
                // Pack order, not disk order: a backup's workers append
                // neighbouring chunks to packs in the order they finish, so
                // disk order would hop between packs.
                let mut data: Vec<(u64, ChunkId)> = data.collect();
                sort_by_location(map, &mut data);
                // A pack's blobs fill up to its size plus one chunk.
                let config = self.repo.config();
                let span = u64::from(config.pack_size) + u64::from(config.chunk_size);
                let (units, missing_chunks) = plan_reads(map, data, span);
                if let Some((_, id)) = missing_chunks.first() {
                    return Err(missing_is_damage(missing(id)));
                }
                units.into_iter().map(Work::Read).collect()
            }
        };
        if zero_holes {
            for (first, count) in index.hole_runs() {
                let pieces = (0..count).step_by(HOLE_PIECE as usize);
                work.extend(pieces.map(|at| Work::Hole(first + at, HOLE_PIECE.min(count - at))));
            }
        }
        Ok(work)
    }
}

/// Chunk `i`'s data from the object `id` read for it: the object itself
/// for a full chunk, or, when the index says chunk `i` is a delta, the
/// delta applied to its base (read with `base`). The delta must name the
/// base the index names; the base is a full chunk (depth 1), so a chunk
/// never costs more than two objects.
pub(crate) fn resolve_chunk<B: AsRef<[u8]>>(
    index: &DiskIndex,
    i: u64,
    id: &ChunkId,
    data: Vec<u8>,
    base: impl FnOnce(&ChunkId) -> Result<B>,
) -> Result<Vec<u8>> {
    let Some(base_id) = index.base_of(i) else {
        return Ok(data);
    };
    let key = Repository::chunk_key(id);
    let delta = Delta::decode(&key, &data)?;
    if delta.base != base_id {
        return Err(Error::corrupt(
            &key,
            "is a delta on another base than its index names",
        ));
    }
    let full = base(&base_id)?;
    check_length(index, i, &base_id, full.as_ref())?;
    delta.apply(&key, full.as_ref())
}

/// One piece of a restore's work.
enum Work {
    /// Chunks read with one request, tagged with their position in the index.
    Read(ReadUnit<u64>),
    /// A run of holes to zero: first chunk, number of chunks.
    Hole(u64, u64),
}

/// The most chunks one hole-zeroing work item covers, so the workers share
/// a long run of holes.
const HOLE_PIECE: u64 = 256;

/// The blocks inside a chunk that are looked at for zeros: an aligned
/// block of zeros is not written to a fresh target, which then keeps it
/// a hole (4 KiB: a file system block, and a divisor of every chunk size).
const ZERO_BLOCK: usize = 4096;

/// The runs `(start, end)` of `data` to write so that every aligned block
/// of `block` bytes holding only zeros is left out; neighbouring blocks
/// with data make one run. A chunk without zero blocks is one run.
pub(crate) fn data_runs(data: &[u8], block: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (k, piece) in data.chunks(block.max(1)).enumerate() {
        if crate::is_all_zero(piece) {
            continue;
        }
        let start = k * block.max(1);
        let end = start + piece.len();
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// A chunk the repository does not have, as a storage error on its name.
fn missing(id: &ChunkId) -> Error {
    Error::Storage(vbackup_storage::StorageError::new(
        vbackup_storage::ErrorKind::NotFound,
        &Repository::chunk_key(id),
        "not stored",
    ))
}

/// Checks that chunk `i` has the length the disk needs there.
pub(crate) fn check_length(index: &DiskIndex, i: u64, id: &ChunkId, data: &[u8]) -> Result<()> {
    let (_, length) = index.chunk_range(i);
    if data.len() != length {
        return Err(Error::corrupt(
            &Repository::chunk_key(id),
            format!("holds {} bytes where the disk needs {length}", data.len()),
        ));
    }
    Ok(())
}

/// Restores one disk into `target` with `threads` workers. Holes are not
/// written, so a fresh sparse target stays sparse; on a target that may
/// hold old data (a block device) they are zeroed. Stops at the first
/// damaged chunk: nothing wrong is ever written. In a repository with
/// packs, neighbouring chunks of a pack are fetched with one ranged read.
pub fn restore_disk(
    repo: &Repository,
    disk: &DiskRecord,
    target: &dyn DiskTarget,
    threads: usize,
    progress: &Progress,
) -> Result<RestoreStats> {
    let index = load_index(repo, disk)?;
    let chunks = Chunks::new(repo)?;
    let zero_holes = target.holes_need_zeroing();
    let work = chunks.plan(&index, zero_holes)?;
    progress.add_total(index.virtual_size);
    if !zero_holes {
        let holes = index
            .hole_runs()
            .map(|(first, n)| index.chunks_range(first, n).1);
        progress.add_done(holes.sum());
    }
    let block = target.hole_granularity().max(ZERO_BLOCK);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let chunks_read = AtomicU64::new(0);
    let target_error = |source| Error::Target {
        disk: disk.name.clone(),
        source,
    };
    let worker = || -> Result<()> {
        let mut writer = target.open_writer().map_err(target_error)?;
        loop {
            if stop.load(Ordering::Relaxed) || progress.is_cancelled() {
                break;
            }
            let Some(item) = work.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            match item {
                Work::Hole(first, count) => {
                    let (offset, length) = index.chunks_range(*first, *count);
                    writer.write_zeroes(offset, length).map_err(target_error)?;
                    progress.add_done(length);
                }
                Work::Read(unit) => {
                    let mut write = |i: &u64, id: &ChunkId, data: Result<Vec<u8>>| {
                        let data = data.map_err(missing_is_damage)?;
                        let data = chunks.resolve(&index, *i, id, data)?;
                        check_length(&index, *i, id, &data)?;
                        let (offset, length) = index.chunk_range(*i);
                        let bytes = match zero_holes {
                            // Old data may be there: zeros are written too.
                            true => writer.write_all_at(&data, offset).map(|()| length as u64),
                            false => write_runs(writer.as_mut(), &data, offset, block),
                        }
                        .map_err(target_error)?;
                        written.fetch_add(bytes, Ordering::Relaxed);
                        chunks_read.fetch_add(1, Ordering::Relaxed);
                        progress.add_done(length as u64);
                        Ok(())
                    };
                    match &chunks.map {
                        Some(map) => read_unit(repo, map, unit, &mut write)?,
                        None => {
                            for (i, id, _) in &unit.items {
                                write(i, id, repo.read_chunk(id))?;
                            }
                        }
                    }
                }
            }
        }
        writer.flush().map_err(target_error)
    };
    super::run_workers(threads, || {
        worker().inspect_err(|_| stop.store(true, Ordering::Relaxed))
    })?;
    if progress.is_cancelled() {
        return Err(Error::Interrupted);
    }
    target.finish().map_err(target_error)?;
    Ok(RestoreStats {
        virtual_size: index.virtual_size,
        bytes_written: written.into_inner(),
        chunks_read: chunks_read.into_inner(),
    })
}

/// Streams one disk, in order, to `out` (holes as zeros), fetching chunks in
/// parallel. At most `2 * threads` chunks are held in memory.
pub fn restore_disk_to_writer(
    repo: &Repository,
    disk: &DiskRecord,
    out: &mut dyn Write,
    threads: usize,
    progress: &Progress,
) -> Result<RestoreStats> {
    let index = load_index(repo, disk)?;
    let chunks = Chunks::new(repo)?;
    progress.add_total(index.virtual_size);
    let window = threads.max(1) * 2;
    let (ticket_tx, ticket_rx) = bounded::<()>(window);
    let (result_tx, result_rx) = bounded::<(u64, Result<Vec<u8>>)>(window);
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            let (tickets, results) = (ticket_rx.clone(), result_tx.clone());
            let (index, next, chunks) = (&index, &next, &chunks);
            scope.spawn(move || fetch_worker(chunks, index, next, &tickets, &results));
        }
        drop(result_tx);
        drop(ticket_rx);
        write_in_order(
            &index, out, window, ticket_tx, result_rx, progress, &disk.name,
        )
    })
}

fn fetch_worker(
    chunks: &Chunks<'_>,
    index: &DiskIndex,
    next: &AtomicU64,
    tickets: &Receiver<()>,
    results: &Sender<(u64, Result<Vec<u8>>)>,
) {
    while tickets.recv().is_ok() {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= index.count() {
            return;
        }
        let data = match &index.get(i) {
            Some(id) => chunks.fetch(index, i, id),
            None => Ok(Vec::new()),
        };
        if results.send((i, data)).is_err() {
            return;
        }
    }
}

/// Writes fetched chunks in disk order; owning both channel ends means
/// returning (also early, on error) disconnects them and frees the workers.
fn write_in_order(
    index: &DiskIndex,
    out: &mut dyn Write,
    window: usize,
    tickets: Sender<()>,
    results: Receiver<(u64, Result<Vec<u8>>)>,
    progress: &Progress,
    disk: &str,
) -> Result<RestoreStats> {
    let target_error = |source| Error::Target {
        disk: disk.to_string(),
        source,
    };
    let total = index.count();
    for _ in 0..window.min(total as usize) {
        let _ = tickets.send(());
    }
    let mut pending = BTreeMap::new();
    let mut stats = RestoreStats {
        virtual_size: index.virtual_size,
        ..Default::default()
    };
    let zeros = vec![0u8; index.chunk_size as usize];
    let mut written = 0u64;
    while written < total {
        if progress.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let Ok((i, data)) = results.recv() else { break };
        pending.insert(i, data?);
        while let Some(data) = pending.remove(&written) {
            let (_, length) = index.chunk_range(written);
            if data.is_empty() {
                out.write_all(&zeros[..length]).map_err(target_error)?;
            } else {
                out.write_all(&data).map_err(target_error)?;
                stats.bytes_written += length as u64;
                stats.chunks_read += 1;
            }
            progress.add_done(length as u64);
            written += 1;
            let _ = tickets.send(());
        }
    }
    drop(pending);
    if written < total {
        return Err(Error::internal(
            "restore workers stopped before every chunk was written",
        ));
    }
    out.flush().map_err(target_error)?;
    Ok(stats)
}

/// Writes the parts of a chunk's `data` (at `offset` of the disk) that are
/// not aligned zero blocks of `block` bytes, leaving those as holes of a
/// fresh target; returns the bytes written.
fn write_runs(
    writer: &mut dyn crate::source::DiskWriter,
    data: &[u8],
    offset: u64,
    block: usize,
) -> std::io::Result<u64> {
    let mut written = 0;
    for (start, end) in data_runs(data, block) {
        writer.write_all_at(&data[start..end], offset + start as u64)?;
        written += (end - start) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_blocks_inside_a_chunk_are_left_out() {
        let mut data = vec![0u8; 16 * 4096];
        data[5] = 1; // block 0
        data[2 * 4096] = 1; // block 2
        data[3 * 4096 + 4095] = 1; // block 3
        data[15 * 4096 + 1] = 1; // block 15
        assert_eq!(
            data_runs(&data, 4096),
            vec![(0, 4096), (2 * 4096, 4 * 4096), (15 * 4096, 16 * 4096)]
        );
        assert_eq!(data_runs(&vec![0u8; 8192], 4096), vec![]);
        assert_eq!(
            data_runs(&[1u8; 5000], 4096),
            vec![(0, 5000)],
            "a short last block"
        );
        assert_eq!(data_runs(&[0, 0, 1], 4096), vec![(0, 3)]);
    }

    proptest! {
        /// Writing the runs onto zeros gives back the chunk, and every
        /// block left out is all zeros.
        #[test]
        fn runs_rebuild_the_chunk_and_skip_only_zero_blocks(
            blocks in proptest::collection::vec(proptest::option::of(any::<(u16, u8)>()), 0..40),
            block in prop_oneof![Just(1usize), Just(7), Just(64), Just(4096)],
        ) {
            let mut data = vec![0u8; blocks.len() * block + block / 2];
            for (k, b) in blocks.iter().enumerate() {
                if let Some((at, v)) = b {
                    data[k * block + usize::from(*at) % block] = *v;
                }
            }
            let runs = data_runs(&data, block);
            let mut rebuilt = vec![0u8; data.len()];
            let mut covered = vec![false; data.len()];
            for (s, e) in &runs {
                prop_assert!(s < e && s % block == 0);
                rebuilt[*s..*e].copy_from_slice(&data[*s..*e]);
                covered[*s..*e].iter_mut().for_each(|c| *c = true);
            }
            prop_assert_eq!(&rebuilt, &data);
            for (k, piece) in covered.chunks(block).enumerate() {
                let skipped = piece.iter().all(|c| !c);
                let zero = data.chunks(block).nth(k).is_some_and(crate::is_all_zero);
                prop_assert_eq!(skipped, zero);
            }
            for w in runs.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "runs are separated by a zero block");
            }
        }
    }
}
