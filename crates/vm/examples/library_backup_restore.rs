//! vbackup as a library, without its command line: creates a repository,
//! backs up a disk image of a stopped VM, restores it as qcow2 and as raw,
//! and checks that both hold the original bytes.
//!
//! ```sh
//! cargo run -p vbackup-vm --example library_backup_restore -- /tmp/vbackup-example
//! ```
//!
//! Everything a front end needs comes from three crates: `vbackup_open`
//! (where the repository lives, the client state, the worker budget),
//! `vbackup_vm` (VM backup jobs) and `vbackup_core` (the engine: restore,
//! check). `scripts/test.sh` runs it, so CI proves the library stands alone.

use std::error::Error;
use std::path::{Path, PathBuf};

use vbackup_core::{BackupOptions, InitOptions, Progress, Repository};
use vbackup_open::{Purpose, RepositoryOptions};
use vbackup_vm::offline::{self, Image, OfflineBackup};
use vbackup_vm::restore;
use vbackup_vm::Requested;

const PASSPHRASE: &str = "library example";

fn main() -> Result<(), Box<dyn Error>> {
    let work = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: library_backup_restore WORK_DIR (an empty or missing folder)")?;
    std::fs::create_dir_all(&work)?;
    let image = work.join("web1.raw");
    std::fs::write(&image, sample_disk())?;

    let options = RepositoryOptions {
        cache_dir: Some(work.join("cache")),
        ..RepositoryOptions::new(path_text(&work.join("repo"))?)
    };
    vbackup_open::init(&options, Some(PASSPHRASE), &InitOptions::default())?;
    let repo = vbackup_open::open(&options, Purpose::Use, true, || {
        Ok(Some(PASSPHRASE.to_string()))
    })?;

    let request = OfflineBackup {
        vm: "web1".to_string(),
        images: vec![Image {
            name: "web1".to_string(),
            path: image.clone(),
            format: None,
        }],
        requested: Requested::Auto,
        options: BackupOptions {
            vm: "web1".to_string(),
            tags: vec!["example".to_string()],
            host: None,
            threads: vbackup_open::io_threads(&repo, None),
            skip_unchanged: true,
        },
        definition: None,
    };
    let snapshot = offline::backup(&repo, &request, &Progress::new())?;
    println!(
        "backed up {} as snapshot {} ({} chunks stored)",
        image.display(),
        snapshot.short_id(),
        snapshot.manifest.stats.chunks_new
    );

    for format in ["qcow2", "raw"] {
        let dir = work.join(format!("restored-{format}"));
        let restored = restore(&repo, &snapshot, &dir, format)?;
        let raw = as_raw(&restored, format, &work)?;
        if std::fs::read(&raw)? != std::fs::read(&image)? {
            return Err(format!("{} differs from the original", restored.display()).into());
        }
        println!("restored {} and compared it: identical", restored.display());
    }
    Ok(())
}

/// Restores the snapshot's only disk into the folder `dir` as `format`,
/// the way every front end does (`vbackup_vm::restore`); returns the file.
fn restore(
    repo: &Repository,
    snapshot: &vbackup_core::Snapshot,
    dir: &Path,
    format: &str,
) -> Result<PathBuf, Box<dyn Error>> {
    let disks = restore::selected_disks(snapshot, None)?;
    restore::prepare_folder(dir)?;
    let options = restore::RestoreOptions {
        format: format.to_string(),
        force: false,
        threads: vbackup_open::io_threads(repo, None),
        connections: 4,
    };
    let restored = restore::restore_to_file(repo, disks[0], dir, &options, &Progress::new())?;
    Ok(PathBuf::from(restored.path))
}

/// A raw copy of `path` (converted with qemu-img when it is not raw).
fn as_raw(path: &Path, format: &str, work: &Path) -> Result<PathBuf, Box<dyn Error>> {
    if format == "raw" {
        return Ok(path.to_path_buf());
    }
    let raw = work.join("converted.raw");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .status()?;
    if !status.success() {
        return Err(format!("qemu-img convert of {} failed", path.display()).into());
    }
    Ok(raw)
}

/// 24 MiB: data, a hole, repeated data (deduplicated), more data.
fn sample_disk() -> Vec<u8> {
    let mut disk = vec![0u8; 24 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for byte in disk[..8 << 20].iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = (state >> 32) as u8;
    }
    let (head, tail) = disk.split_at_mut(16 << 20);
    tail[..4 << 20].copy_from_slice(&head[..4 << 20]);
    disk
}

fn path_text(path: &Path) -> Result<String, Box<dyn Error>> {
    Ok(path
        .to_str()
        .ok_or("the example's folder must have a UTF-8 path")?
        .to_string())
}
