//! `vbackup-synth`: fills a repository with synthetic chunks and snapshots
//! through the core API, fast, for the prune benchmark (`bench/prune.sh`).
//! A benchmark tool, kept out of the `vbackup` binary.
//!
//! Chunks are tiny (16 bytes of plaintext, sealed like real chunks), so the
//! repository has the metadata shape of a large one — a million chunk
//! objects, a thousand snapshots with real indexes — without the data.
//! Objects are written without temporary files or fsync (a crash while
//! synthesizing leaves a useless repository, which is fine for a
//! benchmark); the snapshots cannot be restored (their chunks are shorter
//! than the chunk size), only listed, checked for structure and pruned.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Parser;
use vbackup_core::format::{
    BackupStats, DiskIndex, DiskRecord, SnapshotManifest, SNAPSHOT_VERSION,
};
use vbackup_core::{ChunkId, Repository};
use vbackup_storage::{Backend, LocalBackend, ObjectInfo};

/// A synthetic repository for benchmarks, in an initialized local
/// repository (the passphrase from VBACKUP_PASSWORD).
#[derive(Debug, Parser)]
#[command(name = "vbackup-synth", version)]
struct SynthArgs {
    /// The repository folder (initialized with `vbackup init`).
    #[arg(long, env = "VBACKUP_REPOSITORY")]
    repo: PathBuf,
    /// Chunk objects to write (tiny synthetic chunks).
    #[arg(long, default_value_t = 1_000_000)]
    chunks: u64,
    /// Snapshots to write; snapshot i references a window of chunks starting
    /// at i * chunks / snapshots, twice that long.
    #[arg(long, default_value_t = 1000)]
    snapshots: u64,
    /// VMs the snapshots are spread over (round robin).
    #[arg(long, default_value_t = 10)]
    vms: u64,
    /// Worker threads (default: cores + 2).
    #[arg(long)]
    threads: Option<usize>,
}

/// A local backend whose `put` writes the file in place, without a
/// temporary file or fsync: only for synthesizing benchmark repositories.
struct FastBackend {
    inner: LocalBackend,
    folders: Mutex<HashSet<PathBuf>>,
}

impl Backend for FastBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, key: &str, data: &[u8]) -> vbackup_storage::Result<()> {
        vbackup_storage::validate_key(key)?;
        let path = self.inner.root().join(key);
        let io = |e| vbackup_storage::StorageError::from_io(key, "writing the object", e);
        if let Some(dir) = path.parent() {
            let mut folders = self.folders.lock().unwrap_or_else(|p| p.into_inner());
            if folders.insert(dir.to_path_buf()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
        }
        std::fs::write(&path, data).map_err(io)
    }

    fn get(&self, key: &str) -> vbackup_storage::Result<Vec<u8>> {
        self.inner.get(key)
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> vbackup_storage::Result<Vec<u8>> {
        self.inner.get_range(key, offset, length)
    }

    fn list(&self, prefix: &str) -> vbackup_storage::Result<Vec<ObjectInfo>> {
        self.inner.list(prefix)
    }

    fn stat(&self, key: &str) -> vbackup_storage::Result<Option<ObjectInfo>> {
        self.inner.stat(key)
    }

    fn delete(&self, key: &str) -> vbackup_storage::Result<()> {
        self.inner.delete(key)
    }
}

fn main() -> Result<()> {
    let args = SynthArgs::parse();
    let backend = Arc::new(FastBackend {
        inner: LocalBackend::new(args.repo.clone()),
        folders: Mutex::new(HashSet::new()),
    });
    let passphrase = std::env::var("VBACKUP_PASSWORD").ok();
    let repo = Repository::open(backend, || Ok(passphrase))?;
    let threads = args
        .threads
        .unwrap_or_else(vbackup_core::default_threads)
        .max(1);
    let started = Instant::now();
    let ids = write_chunks(&repo, args.chunks, threads)?;
    let chunk_seconds = started.elapsed().as_secs_f64();
    write_snapshots(&repo, &ids, &args, threads)?;
    println!(
        "synthesized {} chunks in {:.1} s and {} snapshots of {} VMs in {:.1} s",
        ids.len(),
        chunk_seconds,
        args.snapshots,
        args.vms,
        started.elapsed().as_secs_f64() - chunk_seconds
    );
    Ok(())
}

/// Writes `count` distinct tiny chunks in parallel; returns their ids in order.
fn write_chunks(repo: &Repository, count: u64, threads: usize) -> Result<Vec<ChunkId>> {
    let count = usize::try_from(count).context("too many chunks")?;
    let salt: [u8; 8] = vbackup_core::crypto::random_bytes()?;
    let ids: Vec<Mutex<Vec<ChunkId>>> = (0..count.div_ceil(4096))
        .map(|_| Mutex::new(Vec::new()))
        .collect();
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| scope.spawn(|| chunk_worker(repo, count, &salt, &next, &ids)))
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a synth worker panicked"))??;
        }
        Ok(())
    })?;
    Ok(ids
        .into_iter()
        .flat_map(|batch| batch.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect())
}

fn chunk_worker(
    repo: &Repository,
    count: usize,
    salt: &[u8; 8],
    next: &AtomicU64,
    ids: &[Mutex<Vec<ChunkId>>],
) -> Result<()> {
    loop {
        let batch = next.fetch_add(1, Ordering::Relaxed) as usize;
        let Some(slot) = ids.get(batch) else {
            return Ok(());
        };
        let mut made = Vec::with_capacity(4096);
        for i in batch * 4096..((batch + 1) * 4096).min(count) {
            let plain = [(i as u64).to_le_bytes(), *salt].concat();
            let id = repo.crypto().chunk_id(&plain);
            repo.put_chunk(&id, &repo.encode_chunk(&id, &plain)?)?;
            made.push(id);
        }
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = made;
    }
}

/// Snapshot `s` references the chunks `[s * step, s * step + 2 * step)`.
fn write_snapshots(
    repo: &Repository,
    ids: &[ChunkId],
    args: &SynthArgs,
    threads: usize,
) -> Result<()> {
    let snapshots = args.snapshots.max(1);
    let step = (ids.len() as u64 / snapshots).max(1) as usize;
    let next = AtomicU64::new(0);
    let base =
        chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.with_timezone(&chrono::Utc);
    let work = || -> Result<()> {
        loop {
            let s = next.fetch_add(1, Ordering::Relaxed);
            if s >= snapshots {
                return Ok(());
            }
            let start = (s as usize * step).min(ids.len());
            let window = &ids[start..(start + 2 * step).min(ids.len())];
            let time = base + chrono::Duration::hours(s as i64);
            write_snapshot(repo, window, &format!("vm{}", s % args.vms.max(1)), time)?;
        }
    };
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(work)).collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a synth worker panicked"))??;
        }
        Ok(())
    })
}

fn write_snapshot(
    repo: &Repository,
    chunks: &[ChunkId],
    vm: &str,
    time: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    let chunk_size = repo.config().chunk_size;
    let index = DiskIndex::from_chunks(
        chunks.len() as u64 * u64::from(chunk_size),
        chunk_size,
        chunks.iter().copied().map(Some),
    )?;
    let record = DiskRecord {
        name: "vda".to_string(),
        source: "synthetic".to_string(),
        format: "raw".to_string(),
        virtual_size: index.virtual_size,
        chunk_size,
        index: repo.write_index(&index)?,
        data_chunks: chunks.len() as u64,
        ..DiskRecord::default()
    };
    let manifest = SnapshotManifest {
        version: SNAPSHOT_VERSION,
        vm: vm.to_string(),
        host: "synth".to_string(),
        time: time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        tags: vec![],
        disks: vec![record],
        stats: BackupStats::default(),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        ..SnapshotManifest::default()
    };
    repo.write_snapshot(&manifest)?;
    Ok(())
}
