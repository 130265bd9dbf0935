//! `vbackup quickstart`: the whole cycle on a sample VM disk, with figures.
//!
//! It builds a qcow2 disk holding a real ext4 filesystem with real files
//! (copied from this machine's /usr/share), backs it up into a new encrypted
//! repository, changes files inside the filesystem, backs it up again,
//! restores both snapshots, compares them with `qemu-img compare`, verifies
//! the repository and prints what happened.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use vbackup_core::{InitOptions, Repository};
use vbackup_storage::LocalBackend;

use crate::args::QuickstartArgs;
use crate::commands::{print_backup_summary, Context};
use crate::ui::{human_bytes, human_rate, with_progress};

const PASSPHRASE: &str = "quickstart-demo-passphrase";
const VM: &str = "quickstart-vm";

/// Runs the demonstration, in `--dir` (kept), or in a temporary folder
/// that is removed at the end unless `--keep` is given; either way the
/// output says which.
pub fn run(ctx: &Context, args: &QuickstartArgs) -> Result<()> {
    let Some(dir) = &args.dir else {
        return run_in_temporary(ctx, args);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    ctx.say(format!("vbackup quickstart in {}", dir.display()));
    demonstrate(ctx, args, dir)?;
    say_try(ctx, dir);
    Ok(())
}

fn run_in_temporary(ctx: &Context, args: &QuickstartArgs) -> Result<()> {
    let temp = tempfile::Builder::new()
        .prefix("vbackup-quickstart-")
        .tempdir()?;
    let work = temp.path().to_path_buf();
    ctx.say(format!(
        "vbackup quickstart in {} (a temporary folder: removed at the end{})",
        work.display(),
        if args.keep {
            ", except with --keep"
        } else {
            "; --keep keeps it"
        }
    ));
    let outcome = demonstrate(ctx, args, &work);
    if args.keep {
        let kept = temp.keep();
        ctx.say(format!("kept {} (--keep)", kept.display()));
        say_try(ctx, &kept);
        return outcome;
    }
    let removed = temp.close();
    match &outcome {
        Ok(()) => ctx.say(format!(
            "removed the temporary folder {} (--keep keeps it)",
            work.display()
        )),
        Err(_) => eprintln!(
            "vbackup: removed the temporary folder {} (--keep keeps it)",
            work.display()
        ),
    }
    outcome?;
    removed.with_context(|| format!("cannot remove the temporary folder {}", work.display()))
}

/// How to look at the repository the demonstration left.
fn say_try(ctx: &Context, work: &Path) {
    ctx.say(format!(
        "try: vbackup --repo {} snapshots   (passphrase: {PASSPHRASE})",
        work.join("repository").display()
    ));
}

/// The demonstration itself, in the folder `work`.
fn demonstrate(ctx: &Context, args: &QuickstartArgs, work: &Path) -> Result<()> {
    let work = work.to_path_buf();
    let disk = work.join("vm-disk.qcow2");
    let files = make_sample_disk(ctx, &work, &disk, args.size_mib)?;
    let repo_dir = work.join("repository");
    if repo_dir.exists() {
        std::fs::remove_dir_all(&repo_dir)?;
    }
    let repo = Repository::init(
        Arc::new(LocalBackend::new(&repo_dir)),
        Some(PASSPHRASE),
        &InitOptions::default(),
    )?;
    ctx.say(format!(
        "2. created an encrypted repository at {} (passphrase '{PASSPHRASE}')",
        repo_dir.display()
    ));

    let first = backup(ctx, &repo, &disk, "3. first backup (full)")?;
    let first_copy = work.join("vm-disk-at-first-backup.qcow2");
    std::fs::copy(&disk, &first_copy)?;
    change_files(ctx, &work, &disk, &files)?;
    let second = backup(
        ctx,
        &repo,
        &disk,
        "5. second backup (incremental: reads only what the dirty bitmap marks)",
    )?;

    let restored = work.join("restored");
    let _ = std::fs::remove_dir_all(&restored);
    restore_and_compare(
        ctx,
        &repo,
        &second,
        &restored.join("latest"),
        &disk,
        "6. restored the latest snapshot",
    )?;
    restore_and_compare(
        ctx,
        &repo,
        &first,
        &restored.join("first"),
        &first_copy,
        "7. restored the first snapshot",
    )?;

    let started = Instant::now();
    let report = with_progress("verify", true, &ctx.signal, |p| {
        vbackup_core::verify(&repo, ctx.threads(), p)
    })?;
    if !report.is_clean() {
        bail!("verify found damage: {:?}", report.problems);
    }
    let secs = started.elapsed().as_secs_f64();
    ctx.say(format!(
        "8. verified {} chunks ({}) in {secs:.2} s: no damage",
        report.chunks_checked,
        human_bytes(report.bytes_checked)
    ));
    let s = vbackup_core::stats(&repo)?;
    ctx.say(format!(
        "9. repository: {} snapshots, {} of disk data stored as {} (dedup {:.2}x, compression {:.2}x)",
        s.snapshots,
        human_bytes(s.referenced_bytes),
        human_bytes(s.stored_bytes),
        s.dedup_ratio,
        s.compression_ratio
    ));
    ctx.json(&serde_json::json!({ "first": first.id, "second": second.id, "stats": s }))?;
    ctx.say("quickstart finished: every snapshot restored byte-identical");
    Ok(())
}

/// Runs an external tool and fails with its stderr.
fn tool(program: &str, args: &[&str]) -> Result<()> {
    let output = Process::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}; install it (qemu-utils, e2fsprogs)"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

/// Copies up to `budget` bytes of regular files from `roots` into `dest`.
fn copy_real_files(roots: &[&str], dest: &Path, budget: u64) -> Result<Vec<PathBuf>> {
    let mut copied = Vec::new();
    let mut used = 0u64;
    let mut pending: Vec<PathBuf> = roots.iter().map(PathBuf::from).collect();
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !kind.is_file() || used + meta.len() > budget {
                continue;
            }
            let relative = path.strip_prefix("/").unwrap_or(&path);
            let target = dest.join(relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if std::fs::copy(&path, &target).is_ok() {
                used += meta.len();
                copied.push(relative.to_path_buf());
            }
        }
    }
    Ok(copied)
}

/// Makes `disk` (qcow2) holding an ext4 filesystem with real files; returns
/// the files' paths inside the filesystem.
fn make_sample_disk(
    ctx: &Context,
    work: &Path,
    disk: &Path,
    size_mib: u64,
) -> Result<Vec<PathBuf>> {
    let tree = work.join("sample-files");
    let _ = std::fs::remove_dir_all(&tree);
    let files = copy_real_files(
        &["/usr/share", "/usr/lib"],
        &tree,
        size_mib * (1 << 20) * 2 / 5,
    )?;
    let raw = work.join("vm-disk.raw");
    let size = format!("{size_mib}M");
    tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "quickstart",
            "-d",
            path_str(&tree)?,
            path_str(&raw)?,
            &size,
        ],
    )?;
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            path_str(&raw)?,
            path_str(disk)?,
        ],
    )?;
    std::fs::remove_file(&raw)?;
    std::fs::remove_dir_all(&tree)?;
    ctx.say(format!(
        "1. made a {size_mib} MiB qcow2 VM disk with an ext4 filesystem holding {} real files from /usr",
        files.len()
    ));
    Ok(files)
}

/// Changes the filesystem inside the disk the way a guest would: a new
/// 8 MiB file and some files removed. debugfs edits a raw copy; the blocks
/// that differ are then written into the qcow2 through qemu-nbd, as a
/// guest's writes would be, so vbackup's dirty bitmap in the image records
/// them.
fn change_files(ctx: &Context, work: &Path, disk: &Path, files: &[PathBuf]) -> Result<()> {
    let before = work.join("before.raw");
    let after = work.join("after.raw");
    for copy in [&before, &after] {
        tool(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                path_str(disk)?,
                path_str(copy)?,
            ],
        )?;
    }
    let new_file = work.join("new-file.bin");
    let content: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&new_file, content)?;
    let mut script = format!("write {} /new-file.bin\n", path_str(&new_file)?);
    for file in files.iter().step_by(50).take(20) {
        script.push_str(&format!("rm /{}\n", file.display()));
    }
    let script_path = work.join("debugfs-commands");
    std::fs::write(&script_path, script)?;
    tool(
        "debugfs",
        &["-w", "-f", path_str(&script_path)?, path_str(&after)?],
    )?;
    let written = write_differences(&before, &after, disk)?;
    for path in [before, after, new_file, script_path] {
        std::fs::remove_file(path)?;
    }
    ctx.say(format!(
        "4. changed the filesystem inside the disk: added an 8 MiB file, removed 20 files ({} written into the qcow2 through qemu-nbd, as a guest would)",
        human_bytes(written)
    ));
    Ok(())
}

/// Writes the 64 KiB blocks of `after` that differ from `before` into the
/// qcow2 `disk` through a writable qemu-nbd; returns the bytes written.
fn write_differences(before: &Path, after: &Path, disk: &Path) -> Result<u64> {
    use std::io::Read;
    const BLOCK: usize = 64 << 10;
    let options = vbackup_qemu::QemuNbdOptions {
        format: Some("qcow2".to_string()),
        read_only: false,
        ..vbackup_qemu::QemuNbdOptions::new(disk)
    };
    let server = vbackup_qemu::QemuNbd::start(&options)?;
    let mut client = server.connect()?;
    let (mut a, mut b) = (std::fs::File::open(before)?, std::fs::File::open(after)?);
    let (mut old, mut new) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let (mut offset, mut written) = (0u64, 0u64);
    loop {
        let n = read_full(&mut b, &mut new)?;
        if n == 0 {
            break;
        }
        a.read_exact(&mut old[..n])?;
        if old[..n] != new[..n] {
            client.write_at(&new[..n], offset)?;
            written += n as u64;
        }
        offset += n as u64;
    }
    client.flush()?;
    drop(client);
    server.stop()?;
    Ok(written)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    use std::io::Read;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn backup(
    ctx: &Context,
    repo: &Repository,
    disk: &Path,
    label: &str,
) -> Result<vbackup_core::Snapshot> {
    let job = vbackup_vm::job::BackupJob {
        vm: VM.to_string(),
        source: vbackup_vm::job::VmSource {
            disks: vec![disk.to_path_buf()],
            disk_names: vec!["vda".to_string()],
            tags: vec!["quickstart".into()],
            ..Default::default()
        },
        requested: vbackup_vm::Requested::Auto,
        threads: ctx.threads(),
        skip_unchanged: true,
    };
    let snapshot = with_progress("backup", true, &ctx.signal, |p| {
        vbackup_vm::job::backup(repo, &job, p)
    })?
    .snapshot;
    ctx.say(format!("{label}:"));
    print_backup_summary(ctx, &snapshot);
    Ok(snapshot)
}

fn restore_and_compare(
    ctx: &Context,
    repo: &Repository,
    snapshot: &vbackup_core::Snapshot,
    dir: &Path,
    original: &Path,
    label: &str,
) -> Result<()> {
    vbackup_vm::restore::prepare_folder(dir)?;
    let disk = &snapshot.manifest.disks[0];
    let options = vbackup_vm::restore::RestoreOptions {
        format: "raw".to_string(),
        force: true,
        threads: ctx.io_threads(repo),
        connections: 1,
    };
    let restored = with_progress("restore", true, &ctx.signal, |p| {
        vbackup_vm::restore::restore_to_file(repo, disk, dir, &options, p)
    })?;
    let (path, secs, stats) = (Path::new(&restored.path), restored.seconds, restored.stats);
    if !vbackup_qemu::img::compare(original, path)? {
        bail!(
            "qemu-img compare found differences between {} and {}",
            original.display(),
            path.display()
        );
    }
    ctx.say(format!(
        "{label} {} in {secs:.2} s ({}): qemu-img compare says identical to the disk as it was",
        snapshot.short_id(),
        human_rate(stats.bytes_written, secs)
    ));
    Ok(())
}
