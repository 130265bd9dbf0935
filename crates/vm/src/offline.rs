//! Backups of disk images whose VM is stopped.
//!
//! qcow2 images hold vbackup's persistent dirty bitmaps: after each backup
//! an image carries exactly one `vbackup-inc-*` bitmap (changes since that
//! snapshot) and one `vbackup-full-*` bitmap (changes since the last full),
//! and no other vbackup bitmap. qemu-img refuses to change bitmaps of an
//! image a running VM has open, which also stops an offline backup of a
//! running VM (use the live path for those).

use std::path::{Path, PathBuf};

use vbackup_core::cbt::{self, DiskObservation, DiskPlan, ObservedBitmap, Planner, Requested};
use vbackup_core::format::{DiskRecord, ReadScope, SnapshotManifest, VmDefinition};
use vbackup_core::{BackupDisk, BackupOptions, Progress, Repository, Snapshot};
use vbackup_qemu::img;

use crate::{Error, Result};

/// One disk image of the VM.
#[derive(Debug, Clone)]
pub struct Image {
    /// The disk's name in the VM.
    pub name: String,
    /// The image file (or block device).
    pub path: PathBuf,
    /// Its format, if the user named it; detected otherwise.
    pub format: Option<String>,
}

/// An offline backup request.
#[derive(Debug, Clone)]
pub struct OfflineBackup {
    /// The VM's name.
    pub vm: String,
    /// Its disks.
    pub images: Vec<Image>,
    /// The backup type asked for.
    pub requested: Requested,
    /// Engine options (threads, tags, host, unchanged-file shortcut).
    pub options: BackupOptions,
    /// The VM's definition to store, if given.
    pub definition: Option<VmDefinition>,
}

/// An image as inspected before the backup.
struct Inspected {
    image: Image,
    format: String,
    /// What `qemu-img info` said, reused to open the disk.
    info: vbackup_qemu::ImageInfo,
    observation: DiskObservation,
}

/// Runs an offline backup and records its snapshot.
pub fn backup(repo: &Repository, request: &OfflineBackup, progress: &Progress) -> Result<Snapshot> {
    refuse_duplicates(&request.images)?;
    let inspected: Vec<Inspected> = request.images.iter().map(inspect).collect::<Result<_>>()?;
    // The lease first: planning checks base snapshots against the chunk
    // listing the backup itself then trusts.
    let start = vbackup_core::BackupStart::begin(repo)?;
    let planner = Planner::for_backup(repo, &request.vm, "qcow2", &start)?;
    let plans: Vec<DiskPlan> = inspected
        .iter()
        .map(|i| planner.plan(request.requested, &i.observation))
        .collect();
    drop(planner);
    let previous = start.latest_of(&request.vm).cloned();
    let disks = open_disks(&inspected, &plans, request.options.threads)?;
    // A full backup reads everything, even a file whose fingerprint is unchanged.
    let options = BackupOptions {
        skip_unchanged: request.options.skip_unchanged && request.requested != Requested::Full,
        ..request.options.clone()
    };
    let mut prepared =
        vbackup_core::backup_prepare_started(repo, start, &disks, &options, progress)?;
    drop(disks); // stops qemu-nbd: qemu-img needs the image lock
    let manifest = &mut prepared.manifest;
    for ((record, plan), item) in manifest.disks.iter_mut().zip(&plans).zip(&inspected) {
        finish_disk(record, plan, item, previous.as_ref())?;
    }
    manifest.backup_type = cbt::snapshot_type(&plans);
    manifest.consistency = Some("offline".to_string());
    manifest.definition = request.definition.clone();
    Ok(prepared.commit(repo)?)
}

/// Refuses an image given twice (under any spelling of its path): its
/// bitmaps would be rotated twice and the snapshot would hold it twice.
fn refuse_duplicates(images: &[Image]) -> Result<()> {
    let mut seen: Vec<(PathBuf, &Image)> = Vec::new();
    for image in images {
        let real = std::fs::canonicalize(&image.path).unwrap_or_else(|_| image.path.clone());
        if let Some((_, first)) = seen.iter().find(|(path, _)| *path == real) {
            return Err(Error::Invalid(format!(
                "the disk image {} is given twice (as disk '{}' and as disk '{}'); name each disk once",
                real.display(),
                first.name,
                image.name
            )));
        }
        seen.push((real, image));
    }
    Ok(())
}

/// Formats whose images start with a header qemu-img recognises, by the
/// file-name extensions that name them.
const EXTENSION_FORMATS: [(&str, &str); 8] = [
    ("qcow2", "qcow2"),
    ("qcow", "qcow"),
    ("vmdk", "vmdk"),
    ("vhdx", "vhdx"),
    ("vdi", "vdi"),
    ("vhd", "vpc"),
    ("vpc", "vpc"),
    ("qed", "qed"),
];

/// Refuses a file whose name says one format while qemu-img, finding no
/// header, reads it as raw bytes (a damaged or wrong file): backing it up
/// as raw would store the wrong thing silently. An explicit `--format raw`
/// (`format` given) says the bytes are meant.
pub fn check_detected_format(path: &Path, given: Option<&str>, detected: &str) -> Result<()> {
    if given.is_some() || detected != "raw" {
        return Ok(());
    }
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let Some((_, named)) = EXTENSION_FORMATS.iter().find(|(ext, _)| *ext == extension) else {
        return Ok(());
    };
    Err(Error::Invalid(format!(
        "{} is named like a {named} image, but qemu-img finds no {named} header in it and would read it as raw bytes: it is no {named} image (damaged, or another file). If it really is a raw disk image, pass --format raw",
        path.display()
    )))
}

fn inspect(image: &Image) -> Result<Inspected> {
    vbackup_qemu::check_not_in_use(&image.path)
        .map_err(Error::qemu(format!("inspecting disk '{}'", image.name)))?;
    let info = img::image_info(&image.path)
        .map_err(Error::qemu(format!("inspecting disk '{}'", image.name)))?;
    check_detected_format(&image.path, image.format.as_deref(), &info.format)?;
    let format = image.format.clone().unwrap_or_else(|| info.format.clone());
    let untrackable = match format.as_str() {
        "qcow2" if info.backing_file.is_none() => None,
        "qcow2" => Some(
            "the qcow2 image has a backing file (vbackup tracks only standalone images)"
                .to_string(),
        ),
        other => Some(format!("{other} images cannot hold dirty bitmaps")),
    };
    let bitmaps = info
        .bitmaps
        .iter()
        .map(|b| ObservedBitmap {
            name: b.name.clone(),
            recording: b.is_recording(),
            consistent: b.is_consistent(),
        })
        .collect();
    let observation = DiskObservation {
        name: image.name.clone(),
        size: info.virtual_size,
        bitmaps,
        untrackable,
    };
    Ok(Inspected {
        image: image.clone(),
        format,
        info,
        observation,
    })
}

fn open_disks(
    inspected: &[Inspected],
    plans: &[DiskPlan],
    threads: usize,
) -> Result<Vec<BackupDisk>> {
    inspected
        .iter()
        .zip(plans)
        .map(|(item, plan)| {
            let options = vbackup_qemu::OpenDiskOptions {
                format: Some(item.format.clone()),
                connections: u32::try_from(threads).unwrap_or(u32::MAX).max(1),
                check: true,
                lazy: true,
                bitmap: plan.read_bitmap().map(str::to_owned),
            };
            let source =
                vbackup_qemu::open_disk_inspected(&item.image.path, &options, item.info.clone())
                    .map_err(Error::qemu(format!("opening disk '{}'", item.image.name)))?;
            Ok(BackupDisk {
                name: item.image.name.clone(),
                source_label: absolute(&item.image.path).display().to_string(),
                source,
                base: plan.changes.as_ref().map(|(_, base)| base.clone()),
            })
        })
        .collect()
}

/// The image's path made absolute (without resolving links: the path as
/// the VM's definition names it), so the snapshot records where the disk
/// was, wherever the backup ran from.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Rotates the disk's bitmaps (unless the disk was not read at all) and
/// completes its record.
fn finish_disk(
    record: &mut DiskRecord,
    plan: &DiskPlan,
    item: &Inspected,
    previous: Option<&Snapshot>,
) -> Result<()> {
    record.fallback_reason = plan.fallback_reason.clone();
    if record.read == ReadScope::None {
        // The image is byte-for-byte the one of the previous snapshot:
        // its bitmaps are still right.
        record.tracking = previous.and_then(|p| previous_tracking(&p.manifest, &record.name));
        return Ok(());
    }
    if plan.tracking.is_some() {
        let granularity = img::tracking_granularity(item.info.virtual_size);
        rotate_bitmaps(&item.image.path, &item.format, granularity, plan).map_err(Error::qemu(
            format!("updating the dirty bitmaps of disk '{}'", record.name),
        ))?;
        // The fingerprint after our own changes to the file, so an
        // untouched image is recognized next time.
        record.source_identity = record
            .source_identity
            .as_ref()
            .and(vbackup_qemu::file_identity(&item.image.path));
    }
    record.tracking = plan.tracking.clone();
    Ok(())
}

fn previous_tracking(
    manifest: &SnapshotManifest,
    disk: &str,
) -> Option<vbackup_core::format::Tracking> {
    manifest
        .disks
        .iter()
        .find(|d| d.name == disk)
        .and_then(|d| d.tracking.clone())
}

/// Adds the plan's new bitmaps (with `granularity`, see
/// `img::tracking_granularity`) and removes the ones it retires.
fn rotate_bitmaps(
    path: &Path,
    format: &str,
    granularity: u64,
    plan: &DiskPlan,
) -> vbackup_qemu::Result<()> {
    for name in &plan.add_bitmaps {
        img::bitmap_add_granular(path, format, name, granularity)?;
    }
    for name in &plan.remove_bitmaps {
        img::bitmap_remove(path, format, name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_named_qcow2_are_refused_unless_raw_is_given() {
        let path = Path::new("/images/web1.qcow2");
        let err = check_detected_format(path, None, "raw")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/images/web1.qcow2")
                && err.contains("qcow2")
                && err.contains("--format raw"),
            "{err}"
        );
        assert!(check_detected_format(path, Some("raw"), "raw").is_ok());
        assert!(check_detected_format(path, None, "qcow2").is_ok());
        assert!(check_detected_format(Path::new("/images/web1.img"), None, "raw").is_ok());
        assert!(check_detected_format(Path::new("/dev/vg/web1"), None, "raw").is_ok());
        let vhd = check_detected_format(Path::new("a.VHD"), None, "raw").unwrap_err();
        assert!(vhd.to_string().contains("vpc"), "{vhd}");
    }

    #[test]
    fn the_same_disk_given_twice_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.qcow2");
        std::fs::write(&file, b"x").unwrap();
        let image = |name: &str, path: PathBuf| Image {
            name: name.to_string(),
            path,
            format: None,
        };
        let twice = [
            image("d", file.clone()),
            image("d-2", dir.path().join(".").join("d.qcow2")),
        ];
        let err = refuse_duplicates(&twice).unwrap_err().to_string();
        assert!(err.contains("d.qcow2") && err.contains("'d-2'"), "{err}");
        let other = dir.path().join("e.qcow2");
        std::fs::write(&other, b"x").unwrap();
        assert!(refuse_duplicates(&[image("d", file), image("e", other)]).is_ok());
    }
}
