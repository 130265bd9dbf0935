//! `vbackup restore`: write a snapshot's disk back, chunks fetched in parallel.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::format::{DiskIndex, DiskRecord};
use crate::source::DiskTarget;
use crate::{ChunkId, Error, Progress, Repository, Result};

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreStats {
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes of data written (holes are skipped, or zeroed on targets that
    /// may hold old data).
    pub bytes_written: u64,
    /// Chunks fetched from the repository.
    pub chunks_read: u64,
}

/// Reads and checks a disk's index against its record.
fn load_index(repo: &Repository, disk: &DiskRecord) -> Result<DiskIndex> {
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
fn missing_is_damage(error: Error) -> Error {
    match error {
        Error::Storage(e) if e.is_not_found() => Error::corrupt(
            e.key(),
            "missing from the repository (`vbackup check` names what it breaks, `vbackup repair` marks it)",
        ),
        other => other,
    }
}

/// Fetches chunk `i` of `index`, checked, and of the expected length.
fn fetch(repo: &Repository, index: &DiskIndex, i: u64, id: &ChunkId) -> Result<Vec<u8>> {
    let data = repo.read_chunk(id).map_err(missing_is_damage)?;
    let (_, length) = index.chunk_range(i);
    if data.len() != length {
        return Err(Error::corrupt(
            &Repository::chunk_key(id),
            format!("holds {} bytes where the disk needs {length}", data.len()),
        ));
    }
    Ok(data)
}

/// Restores one disk into `target` with `threads` workers. Holes are not
/// written, so a fresh sparse target stays sparse; on a target that may
/// hold old data (a block device) they are zeroed. Stops at the first
/// damaged chunk: nothing wrong is ever written.
pub fn restore_disk(
    repo: &Repository,
    disk: &DiskRecord,
    target: &dyn DiskTarget,
    threads: usize,
    progress: &Progress,
) -> Result<RestoreStats> {
    let index = load_index(repo, disk)?;
    progress.add_total(index.virtual_size);
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let chunks_read = AtomicU64::new(0);
    let target_error = |source| Error::Target {
        disk: disk.name.clone(),
        source,
    };
    let zero_holes = target.holes_need_zeroing();
    let worker = || -> Result<()> {
        let mut writer = target.open_writer().map_err(target_error)?;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= index.chunks.len() as u64
                || stop.load(Ordering::Relaxed)
                || progress.is_cancelled()
            {
                break;
            }
            let (offset, length) = index.chunk_range(i);
            if let Some(id) = &index.chunks[i as usize] {
                let data = fetch(repo, &index, i, id)?;
                writer.write_all_at(&data, offset).map_err(target_error)?;
                written.fetch_add(length as u64, Ordering::Relaxed);
                chunks_read.fetch_add(1, Ordering::Relaxed);
            } else if zero_holes {
                writer
                    .write_zeroes(offset, length as u64)
                    .map_err(target_error)?;
            }
            progress.add_done(length as u64);
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
    progress.add_total(index.virtual_size);
    let window = threads.max(1) * 2;
    let (ticket_tx, ticket_rx) = bounded::<()>(window);
    let (result_tx, result_rx) = bounded::<(u64, Result<Vec<u8>>)>(window);
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            let (tickets, results) = (ticket_rx.clone(), result_tx.clone());
            let (index, next) = (&index, &next);
            scope.spawn(move || fetch_worker(repo, index, next, &tickets, &results));
        }
        drop(result_tx);
        drop(ticket_rx);
        write_in_order(
            &index, out, window, ticket_tx, result_rx, progress, &disk.name,
        )
    })
}

fn fetch_worker(
    repo: &Repository,
    index: &DiskIndex,
    next: &AtomicU64,
    tickets: &Receiver<()>,
    results: &Sender<(u64, Result<Vec<u8>>)>,
) {
    while tickets.recv().is_ok() {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= index.chunks.len() as u64 {
            return;
        }
        let data = match &index.chunks[i as usize] {
            Some(id) => fetch(repo, index, i, id),
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
    let total = index.chunks.len() as u64;
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
        return Err(Error::InvalidInput(
            "restore workers stopped early".to_string(),
        ));
    }
    out.flush().map_err(target_error)?;
    Ok(stats)
}
