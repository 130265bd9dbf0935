//! The pack part of the exclusive prune: which packs to delete, which to
//! repack, and the rewrite of the pack indexes.
//!
//! Runs inside `prune_exclusive` after the mark phase, while no backup can
//! run. Per pack, the *live* bytes are the blobs of referenced chunks whose
//! location (in the [`ChunkMap`]) is that pack; everything else in it
//! (unreferenced chunks, second copies of chunks stored elsewhere, the
//! trailer) is waste.
//!
//! - a pack with no live blob is deleted;
//! - a pack with at least [`REPACK_WASTE`] of waste, or a small pack (under
//!   half the pack size) when there are several, is *repacked*: its live
//!   blobs are read, checked, and copied byte for byte into new packs;
//! - the pack indexes are then rewritten as a few consolidated objects
//!   naming the kept and the new packs (this also folds in the indexes of
//!   earlier backups and the orphan packs found through their trailers), and
//!   only after that are the old indexes and the dropped packs deleted.
//!
//! Killed at any point, the repository stays readable: new packs without
//! an index are orphans, recovered from their trailers; old packs whose
//! index is gone are orphans too until deleted; duplicates are resolved by
//! readers taking one location. A live blob that fails its check when read
//! for copying keeps its whole pack (never delete the only copy because a
//! read went wrong).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::locks::Lease;
use super::prune::{PruneReport, Stored};
use crate::format::pack::{PackEntry, PackInfo};
use crate::packs::{pack_key, write_pack_indexes, ChunkMap, PackWriter};
use crate::{ChunkId, Error, Progress, Repository, Result};

/// Share of a pack's bytes that may be waste before it is repacked.
pub(super) const REPACK_WASTE: f64 = 0.2;

/// What happens to each pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Repack,
    Delete,
}

/// The packs' part of a prune: decided from the map and the marks.
pub(super) struct PackPlan {
    fates: Vec<Fate>,
    /// Every blob the map locates in each pack, in pack order.
    entries: Vec<Vec<PackEntry>>,
    /// Live blobs per pack, in pack order.
    live: Vec<Vec<PackEntry>>,
    /// Whether the pack indexes are rewritten.
    rewrite_indexes: bool,
}

impl PackPlan {
    /// Decides every pack's fate and counts it in `report`.
    pub(super) fn new(
        repo: &Repository,
        map: &ChunkMap,
        chunks: &Stored<ChunkId>,
        report: &mut PruneReport,
    ) -> Self {
        let target = u64::from(repo.config().pack_size);
        let entries = map.entries_by_pack();
        let live: Vec<Vec<PackEntry>> = entries
            .iter()
            .map(|blobs| {
                blobs
                    .iter()
                    .filter(|e| chunks.find(&e.id).is_some_and(|i| chunks.is_referenced(i)))
                    .copied()
                    .collect()
            })
            .collect();
        let live_bytes = |i: usize| live[i].iter().map(|e| u64::from(e.length)).sum::<u64>();
        let small = |i: usize| map.packs[i].size < target / 2;
        let small_with_live = (0..map.packs.len())
            .filter(|i| small(*i) && !live[*i].is_empty())
            .count();
        let mut fates = Vec::with_capacity(map.packs.len());
        for (i, pack) in map.packs.iter().enumerate() {
            let used = live_bytes(i);
            let waste = pack.size - used.min(pack.size);
            let fate = if used == 0 {
                Fate::Delete
            } else if waste as f64 >= REPACK_WASTE * pack.size as f64
                || (small(i) && small_with_live > 1)
            {
                Fate::Repack
            } else {
                Fate::Keep
            };
            fates.push(fate);
        }
        for (i, fate) in fates.iter().enumerate() {
            let dropped_blobs = map.packs[i].blobs as u64 - live[i].len() as u64;
            match fate {
                Fate::Keep => {}
                Fate::Repack => {
                    report.repacked_packs += 1;
                    report.marked_chunks += dropped_blobs;
                }
                Fate::Delete => {
                    report.deleted_packs += 1;
                    report.marked_chunks += dropped_blobs;
                    report.marked_bytes += map.packs[i].size;
                }
            }
        }
        report.packs = map.packs.len() as u64;
        let changed = fates.iter().any(|f| *f != Fate::Keep);
        let orphans = map.packs.iter().any(|p| !p.indexed);
        let rewrite_indexes = changed
            || orphans
            || !map.problems.is_empty()
            || (map.pack_indexes.len() > 1)
            || (map.pack_indexes.len() == 1 && map.packs.is_empty());
        Self {
            fates,
            entries,
            live,
            rewrite_indexes,
        }
    }

    /// Repacks, rewrites the indexes and deletes the dropped packs and old
    /// indexes, checking before every deletion that the prune still holds
    /// the repository.
    pub(super) fn carry_out(
        mut self,
        repo: &Repository,
        map: &ChunkMap,
        lock: &Lease,
        threads: usize,
        progress: &Progress,
        report: &mut PruneReport,
    ) -> Result<()> {
        if !self.rewrite_indexes {
            return Ok(());
        }
        let new_packs = self.repack(repo, map, threads, progress, report)?;
        let mut described: Vec<PackInfo> = Vec::new();
        for (i, pack) in map.packs.iter().enumerate() {
            if self.fates[i] == Fate::Keep {
                described.push(PackInfo {
                    digest: pack.digest,
                    size: pack.size,
                    entries: std::mem::take(&mut self.entries[i]),
                });
            }
        }
        report.written_packs = new_packs.len() as u64;
        let new_bytes: u64 = new_packs.iter().map(|p| p.size).sum();
        described.extend(new_packs);
        lock.check_fresh()?;
        let written: HashSet<String> = write_pack_indexes(repo, &described)?.into_iter().collect();
        report.pack_indexes_written = written.len() as u64;
        let backend = repo.backend().as_ref();
        for old in map
            .pack_indexes
            .iter()
            .filter(|o| !written.contains(&o.key))
        {
            lock.check_fresh()?;
            backend.delete(&old.key)?;
            report.pack_indexes_removed += 1;
        }
        let mut deleted_bytes = 0;
        let result = (|| {
            for (i, pack) in map.packs.iter().enumerate() {
                if self.fates[i] == Fate::Keep {
                    continue;
                }
                if progress.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                lock.check_fresh()?;
                backend.delete(&pack_key(&pack.digest))?;
                deleted_bytes += pack.size;
            }
            Ok(())
        })();
        report.freed_bytes += deleted_bytes.saturating_sub(new_bytes);
        result
    }

    /// Copies the live blobs of the packs to repack into new packs and
    /// returns them. A pack whose live blobs cannot all be read and checked
    /// is kept instead.
    fn repack(
        &mut self,
        repo: &Repository,
        map: &ChunkMap,
        threads: usize,
        progress: &Progress,
        report: &mut PruneReport,
    ) -> Result<Vec<PackInfo>> {
        let todo: Vec<usize> = (0..self.fates.len())
            .filter(|i| self.fates[*i] == Fate::Repack)
            .collect();
        if todo.is_empty() {
            return Ok(Vec::new());
        }
        let writer = PackWriter::new(repo);
        let next = AtomicUsize::new(0);
        let kept = Mutex::new(Vec::new());
        progress.add_total(todo.len() as u64);
        super::run_workers(threads, || {
            while let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                if progress.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                if let Err(error) = copy_live(repo, map, i, &self.live[i], &writer) {
                    if matches!(error, Error::Storage(ref e) if !e.is_not_found()) {
                        return Err(error);
                    }
                    kept.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, error));
                }
                progress.add_done(1);
            }
            Ok(())
        })?;
        for (i, error) in kept.into_inner().unwrap_or_else(|p| p.into_inner()) {
            self.fates[i] = Fate::Keep;
            report.repacked_packs -= 1;
            report
                .packs_kept_damaged
                .push(format!("{}: {error}", pack_key(&map.packs[i].digest)));
        }
        let written = writer.finish()?;
        report.repacked_bytes = written.iter().map(|p| p.size).sum();
        Ok(written)
    }
}

/// Reads the live blobs of pack `i` (as one range), checks each, and adds
/// them to `writer` unchanged. Nothing is added unless all are good, so a
/// pack is either copied whole or kept.
fn copy_live(
    repo: &Repository,
    map: &ChunkMap,
    i: usize,
    live: &[PackEntry],
    writer: &PackWriter<'_>,
) -> Result<()> {
    let Some(start) = live.iter().map(|e| e.offset).min() else {
        return Ok(());
    };
    // The furthest end, not the last entry's: entries merged from several
    // pack indexes may overlap, and a longer blob may start earlier.
    let end = live.iter().map(PackEntry::end).max().unwrap_or(start);
    let key = pack_key(&map.packs[i].digest);
    if end > map.packs[i].size {
        return Err(Error::corrupt(&key, "its index names bytes past its end"));
    }
    let range = repo.backend().get_range(&key, start, end - start)?;
    if range.len() as u64 != end - start {
        return Err(Error::corrupt(&key, "shorter than its index says"));
    }
    let blob = |e: &PackEntry| {
        let from = (e.offset - start) as usize;
        &range[from..from + e.length as usize]
    };
    for e in live {
        repo.decode_chunk(&e.id, blob(e).to_vec())
            .map_err(|err| Error::corrupt(&key, format!("chunk {}: {err}", e.id.to_hex())))?;
    }
    for e in live {
        writer.add(&e.id, blob(e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::kdf::KdfParams;
    use crate::InitOptions;
    use vbackup_storage::MemoryBackend;

    fn packed_repo() -> Repository {
        let options = InitOptions {
            chunk_size: 64 << 10,
            pack_size: Some(1 << 20),
            kdf: KdfParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        Repository::init(Arc::new(MemoryBackend::new()), Some("pw"), &options).unwrap()
    }

    #[test]
    fn overlapping_entries_merged_from_two_pack_indexes_do_not_panic_copy_live() {
        let repo = packed_repo();
        let data = vec![3u8; 64 << 10];
        let id = repo.crypto().chunk_id(&data);
        let writer = PackWriter::new(&repo);
        writer
            .add(&id, &repo.encode_chunk(&id, &data).unwrap())
            .unwrap();
        let packs = writer.finish().unwrap();
        write_pack_indexes(&repo, &packs).unwrap();
        let map = ChunkMap::load(&repo).unwrap();
        let whole = packs[0].entries[0];
        // A second, shorter entry starting inside the first one: the last
        // entry by offset is not the one that ends last.
        let inner = PackEntry {
            id: ChunkId([9; 32]),
            offset: whole.offset + 5,
            length: 3,
        };
        let target = PackWriter::new(&repo);
        let error = copy_live(&repo, &map, 0, &[whole, inner], &target).unwrap_err();
        assert!(matches!(error, Error::Corrupt { .. }), "{error}");
        // Nothing was copied: the pack is kept whole.
        assert!(target.finish().unwrap().is_empty());
    }
}
