//! `vbackup stats`: sizes, dedup and compression ratios.

use std::collections::HashSet;

use serde::Serialize;

use crate::{ChunkId, Repository, Result};

/// Sizes of a repository's content.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepoStats {
    /// Snapshots.
    pub snapshots: usize,
    /// Distinct VMs.
    pub vms: usize,
    /// Sum of the virtual sizes of all disks of all snapshots.
    pub logical_bytes: u64,
    /// Data (non-hole) bytes referenced by all snapshots, counted per snapshot.
    pub referenced_bytes: u64,
    /// Plaintext bytes of the distinct chunks referenced.
    pub unique_bytes: u64,
    /// Distinct chunks referenced.
    pub unique_chunks: u64,
    /// Stored (compressed, sealed) bytes of the referenced chunks.
    pub stored_bytes: u64,
    /// Chunks stored but referenced by no snapshot.
    pub unreferenced_chunks: u64,
    /// Stored bytes of those.
    pub unreferenced_bytes: u64,
    /// referenced / unique.
    pub dedup_ratio: f64,
    /// unique / stored.
    pub compression_ratio: f64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Computes the repository's statistics from its metadata (no chunk is read).
pub fn stats(repo: &Repository) -> Result<RepoStats> {
    let snapshots = repo.list_snapshots()?;
    let stored = repo.list_chunks()?;
    let mut s = RepoStats {
        snapshots: snapshots.len(),
        ..Default::default()
    };
    s.vms = snapshots
        .iter()
        .map(|x| x.manifest.vm.as_str())
        .collect::<HashSet<_>>()
        .len();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    for snapshot in &snapshots {
        for disk in &snapshot.manifest.disks {
            s.logical_bytes += disk.virtual_size;
            let index = repo.read_index(&disk.index)?;
            for (i, id) in index.data() {
                let length = index.chunk_range(*i).1 as u64;
                s.referenced_bytes += length;
                if seen.insert(*id) {
                    s.unique_bytes += length;
                    s.stored_bytes += stored.get(id).copied().unwrap_or(0);
                }
            }
            // A delta's base is referenced too (and holds a chunk's data),
            // even when no snapshot lists it as a chunk of its own.
            for (i, base) in index.deltas() {
                if seen.insert(*base) {
                    s.unique_bytes += index.chunk_range(*i).1 as u64;
                    s.stored_bytes += stored.get(base).copied().unwrap_or(0);
                }
            }
        }
    }
    s.unique_chunks = seen.len() as u64;
    for (id, size) in &stored {
        if !seen.contains(id) {
            s.unreferenced_chunks += 1;
            s.unreferenced_bytes += size;
        }
    }
    s.dedup_ratio = ratio(s.referenced_bytes, s.unique_bytes);
    s.compression_ratio = ratio(s.unique_bytes, s.stored_bytes);
    Ok(s)
}
