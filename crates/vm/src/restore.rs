//! Restoring a VM: the disks a snapshot holds, written where the user asks
//! (image files in a folder, a block device, a stream), and the VM's
//! definition beside them rewritten for the restored files.
//!
//! This is the part of a restore every front end shares (the CLI, the
//! daemon, an instant-recovery server): choosing and checking the target,
//! creating it through QEMU's tools, running the engine's restore, and
//! removing an incomplete file when it fails, so nothing half-written is
//! left looking like a disk. Front ends add only progress display and
//! output. Targets are private (mode 0600) and never reached through a
//! symbolic link or outside the target folder, whatever the manifest says
//! (see docs/security.md).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use vbackup_core::format::DiskRecord;
use vbackup_core::{Progress, Repository, RestoreStats, Snapshot};

use crate::definition::{rewrite_config, rewrite_qmp_report, RestoredImage};
use crate::error::{Error, Result};

/// Where one restore writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Image files `<disk>.<format>` in a folder (created, mode 0700).
    Folder(PathBuf),
    /// A block device, written raw with its holes zeroed.
    Device(PathBuf),
}

impl Target {
    /// The target a path names: a block device, else a folder.
    pub fn for_path(path: &Path) -> Self {
        let device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        match device {
            true => Target::Device(path.to_path_buf()),
            false => Target::Folder(path.to_path_buf()),
        }
    }
}

/// How disks are restored.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Image format of restored files (`raw`, `qcow2`, …; devices take raw).
    pub format: String,
    /// Overwrite existing files, and write onto block devices.
    pub force: bool,
    /// Engine workers (see `vbackup_open::io_threads`).
    pub threads: usize,
    /// NBD connections to a non-raw target at most.
    pub connections: u32,
}

/// One disk written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoredDisk {
    /// The disk's name in the snapshot.
    pub disk: String,
    /// Where it was written.
    pub path: String,
    /// In which format.
    pub format: String,
    /// What the engine wrote.
    pub stats: RestoreStats,
    /// How long it took.
    pub seconds: f64,
}

/// The snapshot's disks selected by `name` (all when `None`); a name no
/// disk has is refused, listing the disks there are.
pub fn selected_disks<'a>(
    snapshot: &'a Snapshot,
    name: Option<&str>,
) -> Result<Vec<&'a DiskRecord>> {
    let disks: Vec<&DiskRecord> = snapshot
        .manifest
        .disks
        .iter()
        .filter(|d| name.is_none_or(|name| d.name == name))
        .collect();
    if disks.is_empty() {
        let names: Vec<&str> = snapshot
            .manifest
            .disks
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        return Err(Error::Invalid(format!(
            "snapshot {} has no disk named '{}'; its disks: {}",
            snapshot.short_id(),
            name.unwrap_or_default(),
            names.join(", ")
        )));
    }
    Ok(disks)
}

/// Creates the target folder (mode 0700) if needed.
pub fn prepare_folder(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            io_error(
                format!("cannot create the target folder {}", dir.display()),
                e,
            )
        })
}

/// Restores `disk` into the folder `dir` as `<disk>.<format>`. An existing
/// file needs `force`; a symbolic link there is refused; on failure the
/// incomplete file is removed.
pub fn restore_to_file(
    repo: &Repository,
    disk: &DiskRecord,
    dir: &Path,
    options: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoredDisk> {
    let path = file_in(
        dir,
        &disk.name,
        "disk name",
        &format!(".{}", options.format),
    )?;
    if path.is_symlink() {
        return Err(Error::Invalid(format!(
            "{} is a symbolic link; vbackup does not restore through links: remove it",
            path.display()
        )));
    }
    if path.exists() && !options.force {
        return Err(Error::Invalid(format!(
            "{} already exists; remove it or pass --force",
            path.display()
        )));
    }
    let started = Instant::now();
    let target = vbackup_qemu::create_target_with(
        &path,
        &options.format,
        disk.virtual_size,
        options.connections,
    )
    .map_err(Error::qemu(format!("cannot create {}", path.display())))?;
    let result = vbackup_core::restore_disk(repo, disk, target.as_ref(), options.threads, progress);
    drop(target);
    match result {
        Ok(stats) => Ok(RestoredDisk {
            disk: disk.name.clone(),
            path: path.display().to_string(),
            format: options.format.clone(),
            stats,
            seconds: started.elapsed().as_secs_f64(),
        }),
        Err(error) => {
            let _ = std::fs::remove_file(&path);
            Err(Error::Restore {
                context: format!(
                    "restore of disk '{}' failed; the incomplete file {} was removed",
                    disk.name,
                    path.display()
                ),
                source: error,
            })
        }
    }
}

/// Restores `disk` onto the block device `device`, raw, zeroing holes so
/// none of its old content shows through. Needs `force`; a device that
/// is mounted or in use is refused by the target itself. On failure the
/// device is left partly written (it is the user's, never removed).
pub fn restore_to_device(
    repo: &Repository,
    disk: &DiskRecord,
    device: &Path,
    options: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoredDisk> {
    if options.format != "raw" {
        return Err(Error::Invalid(
            "a block device receives the raw disk; drop --format".to_string(),
        ));
    }
    if !options.force {
        return Err(Error::Invalid(format!(
            "{} is a block device: restoring onto it overwrites all it holds; pass --force to do so",
            device.display()
        )));
    }
    let started = Instant::now();
    let target = vbackup_qemu::create_target_with(device, "raw", disk.virtual_size, 1)
        .map_err(Error::qemu(format!("cannot use {}", device.display())))?;
    let stats = vbackup_core::restore_disk(repo, disk, target.as_ref(), options.threads, progress)
        .map_err(|source| Error::Restore {
            context: format!(
                "restore of disk '{}' onto {} failed; the device is partly written",
                disk.name,
                device.display()
            ),
            source,
        })?;
    Ok(RestoredDisk {
        disk: disk.name.clone(),
        path: device.display().to_string(),
        format: "raw".to_string(),
        stats,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes the snapshot's VM definition beside the restored disks in
/// `dir`, with the disks' original paths and formats replaced by the
/// restored ones (see [`crate::definition`]); returns the files written.
pub fn write_definition(
    snapshot: &Snapshot,
    restored: &[RestoredDisk],
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let Some(definition) = &snapshot.manifest.definition else {
        return Ok(Vec::new());
    };
    // A hypervisor resolves no relative path: the definition names the
    // restored files absolutely, whatever the target folder was.
    let absolute: Vec<String> = restored
        .iter()
        .map(|r| {
            std::path::absolute(&r.path)
                .map_or_else(|_| r.path.clone(), |p| p.display().to_string())
        })
        .collect();
    let images: Vec<RestoredImage> = restored
        .iter()
        .zip(&absolute)
        .filter_map(|(r, path)| {
            let record = snapshot.manifest.disks.iter().find(|d| d.name == r.disk)?;
            Some(RestoredImage {
                source: &record.source,
                source_format: &record.format,
                path,
                format: &r.format,
            })
        })
        .collect();
    let mut written = Vec::new();
    if let Some(config) = &definition.config_file {
        let path = file_in(dir, &config.name, "configuration file name", "")?;
        let content = rewrite_config(&config.content, &images);
        write_private(&path, content.as_bytes())?;
        written.push(path);
    }
    if let Some(qmp) = &definition.qmp {
        let path = dir.join("vm-definition.json");
        let mut qmp = qmp.clone();
        rewrite_qmp_report(&mut qmp, &images);
        let disks: Vec<serde_json::Value> = restored
            .iter()
            .zip(&absolute)
            .map(|(r, path)| serde_json::json!({"name": r.disk, "path": path, "format": r.format}))
            .collect();
        let document = serde_json::json!({
            "vm": snapshot.manifest.vm,
            "snapshot": snapshot.id,
            "time": snapshot.manifest.time,
            "disks": disks,
            "qmp": qmp,
        });
        let text = serde_json::to_string_pretty(&document).map_err(|e| {
            Error::Core(vbackup_core::Error::Internal(format!(
                "encoding the VM definition: {e}"
            )))
        })?;
        write_private(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// The path of the file `name` + `suffix` directly inside `dir`. The
/// manifest's names are checked when it is read; this checks again where
/// they become paths, so no name can reach outside the target folder.
pub fn file_in(dir: &Path, name: &str, what: &str, suffix: &str) -> Result<PathBuf> {
    vbackup_core::format::check_file_name(what, name).map_err(|reason| {
        Error::Core(vbackup_core::Error::Refused(format!(
            "refusing to restore: {reason} (the snapshot's manifest is damaged or forged)"
        )))
    })?;
    let file_name = format!("{name}{suffix}");
    let path = dir.join(&file_name);
    if path.parent() != Some(dir) || path.file_name() != Some(std::ffi::OsStr::new(&file_name)) {
        return Err(Error::Core(vbackup_core::Error::Refused(format!(
            "refusing to restore: {what} {name:?} would leave the target folder {}",
            dir.display()
        ))));
    }
    Ok(path)
}

/// Writes a restored file only its owner can read (mode 0600, also when
/// it replaces a file), never through a symbolic link.
fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(content)
    };
    write().map_err(|e| io_error(format!("cannot write {}", path.display()), e))
}

fn io_error(context: String, source: std::io::Error) -> Error {
    Error::Io { context, source }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn attack_restore_path_traversal_file_in_keeps_every_name_inside_the_folder() {
        let dir = Path::new("/restore");
        assert_eq!(
            file_in(dir, "web1", "disk name", ".raw").unwrap(),
            PathBuf::from("/restore/web1.raw")
        );
        let cases = [
            ("../escape", ".raw"),
            ("/abs/path", ".raw"),
            ("..", ""),
            ("a/../../b", ".raw"),
            ("", ".raw"),
            ("a", "/../../x"),
        ];
        for (name, suffix) in cases {
            let error = file_in(dir, name, "disk name", suffix).unwrap_err();
            assert_eq!(
                error.class(),
                vbackup_core::ErrorClass::Integrity,
                "{name}{suffix}: {error}"
            );
            assert!(
                error.to_string().starts_with("refusing to restore"),
                "{name}{suffix}: {error}"
            );
        }
    }

    #[test]
    fn a_folder_path_is_a_folder_target_and_a_block_device_a_device() {
        assert_eq!(
            Target::for_path(Path::new("/nonexistent/restore")),
            Target::Folder(PathBuf::from("/nonexistent/restore"))
        );
        let loops = std::fs::read_dir("/dev")
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()));
        if let Some(device) = loops {
            assert_eq!(Target::for_path(&device), Target::Device(device.clone()));
        }
    }
}
