//! `qemu-img`: image information, creation, comparison and conversion.
//!
//! Each function runs `qemu-img` once; when it fails, the error names the
//! command and carries qemu-img's stderr, which is what tells the user why
//! ("Could not open 'x': No such file or directory", "Image is not in qcow2
//! format", ...).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::process;

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Image format (`raw`, `qcow2`, `vmdk`, ...).
    pub format: String,
    /// The disk size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes the image occupies on the host, if known.
    pub actual_size: Option<u64>,
    /// Whether the image was not closed cleanly (qcow2 dirty flag).
    pub dirty: bool,
    /// Cluster size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// The backing file as recorded in the image, if any.
    pub backing_file: Option<String>,
    /// The backing file's format, if recorded.
    pub backing_format: Option<String>,
    /// Whether the image is encrypted.
    pub encrypted: bool,
    /// Persistent dirty bitmaps (qcow2), for incremental backups.
    pub bitmaps: Vec<BitmapInfo>,
}

/// A persistent dirty bitmap stored in an image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Flags such as `auto` or `in-use`.
    #[serde(default)]
    pub flags: Vec<String>,
}

impl BitmapInfo {
    /// Whether the bitmap records writes (flag `auto`: enabled).
    pub fn is_recording(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }

    /// Whether the bitmap can be trusted: `in-use` means the image was
    /// not closed cleanly while the bitmap was loaded, so it may have
    /// missed writes and must not be used for an incremental backup.
    pub fn is_consistent(&self) -> bool {
        !self.flags.iter().any(|f| f == "in-use")
    }
}

impl ImageInfo {
    /// The persistent bitmap called `name`, if the image has one.
    pub fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// The subset of `qemu-img info --output=json` we use.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawInfo {
    format: String,
    virtual_size: u64,
    actual_size: Option<u64>,
    dirty_flag: Option<bool>,
    cluster_size: Option<u64>,
    backing_filename: Option<String>,
    backing_filename_format: Option<String>,
    encrypted: Option<bool>,
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(Debug, Deserialize)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<BitmapInfo>,
}

/// Parses the JSON printed by `qemu-img info --output=json`.
pub fn parse_info_json(json: &[u8]) -> std::result::Result<ImageInfo, serde_json::Error> {
    let raw: RawInfo = serde_json::from_slice(json)?;
    let bitmaps = raw
        .format_specific
        .and_then(|f| f.data)
        .map(|d| d.bitmaps)
        .unwrap_or_default();
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size,
        dirty: raw.dirty_flag.unwrap_or(false),
        cluster_size: raw.cluster_size,
        backing_file: raw.backing_filename,
        backing_format: raw.backing_filename_format,
        encrypted: raw.encrypted.unwrap_or(false),
        bitmaps,
    })
}

/// A path qemu reads as a plain file name. qemu treats `proto:rest` as a
/// protocol prefix when the colon comes before any slash; an absolute path
/// never does.
pub(crate) fn qemu_path(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(format!("resolving {}", path.display()), e))
}

/// Checks that a format name is a plain word, so it cannot smuggle options
/// into qemu's command lines.
pub fn check_format(format: &str) -> Result<()> {
    let plain = format.len() <= 32
        && format.starts_with(|c: char| c.is_ascii_lowercase())
        && format
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if plain {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "invalid image format name {format:?}"
        )))
    }
}

/// Describes the image at `path` (format detected by qemu-img).
pub fn image_info(path: &Path) -> Result<ImageInfo> {
    // qemu-img info takes the locks of a reader that shares no writing.
    info(path).map_err(|e| {
        e.for_image(path)
            .in_use_if_locked(path, true)
            .missing_if_absent(path)
    })
}

fn info(path: &Path) -> Result<ImageInfo> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]).arg(qemu_path(path)?);
    let output = process::run(&mut cmd)?;
    parse_info_json(&output.stdout).map_err(|e| Error::BadOutput {
        command: process::command_line(&cmd),
        reason: e.to_string(),
    })
}

/// Creates an empty image of `format` and `size` bytes at `path`.
pub fn create(path: &Path, format: &str, size: u64) -> Result<()> {
    let run = || {
        check_format(format)?;
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", format])
            .arg(qemu_path(path)?)
            .arg(size.to_string());
        process::run(&mut cmd).map(drop)
    };
    run().map_err(|e| e.for_image(path).in_use_if_locked(path, false))
}

/// Creates a qcow2 image at `path` of `size` bytes whose backing file is
/// `backing` (a path or a URI such as `nbd+unix:///vda?socket=...`) in
/// `backing_format`: writes go to the new image, reads of what it does
/// not hold go to the backing file.
pub fn create_overlay(path: &Path, backing: &str, backing_format: &str, size: u64) -> Result<()> {
    let run = || {
        check_format(backing_format)?;
        let mut cmd = Command::new("qemu-img");
        cmd.args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            backing_format,
            "-b",
            backing,
        ])
        .arg(qemu_path(path)?)
        .arg(size.to_string());
        process::run(&mut cmd).map(drop)
    };
    run().map_err(|e| e.for_image(path))
}

/// Whether two images have the same guest-visible content, whatever their
/// formats (`qemu-img compare`: exit 0 same, 1 different, else error).
pub fn compare(a: &Path, b: &Path) -> Result<bool> {
    let format_a = image_info(a)?.format;
    let format_b = image_info(b)?.format;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["compare", "-q", "-f", &format_a, "-F", &format_b])
        .arg(qemu_path(a)?)
        .arg(qemu_path(b)?);
    let output = process::output(&mut cmd)?;
    match output.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(process::failure(&cmd, &output)),
    }
}

/// Checks an image's metadata with `qemu-img check`.
///
/// Needed because qemu opens a truncated or damaged image without complaint
/// and reads the missing parts as zeroes; only a check notices. Leaked
/// clusters (exit 3) are harmless for reading and pass, as do formats that
/// have no check (exit 63, e.g. raw, vpc). Corruption (exit 2) is
/// [`Error::Damaged`], an image that cannot be checked (exit 1) a failed
/// command; both carry qemu-img's report.
pub fn check(path: &Path, format: &str) -> Result<()> {
    let run = || {
        check_format(format)?;
        let mut cmd = Command::new("qemu-img");
        cmd.args(["check", "-f", format]).arg(qemu_path(path)?);
        let output = process::output(&mut cmd)?;
        match output.status.code() {
            Some(0 | 3 | 63) => Ok(()),
            Some(2) => Err(damaged(&cmd, &output)),
            _ => Err(check_failure(&cmd, &output)),
        }
    };
    run().map_err(|e| {
        e.for_image(path)
            .in_use_if_locked(path, true)
            .missing_if_absent(path)
    })
}

/// `qemu-img check` prints details on stderr and its verdict on stdout;
/// the user needs both.
fn check_failure(cmd: &Command, output: &std::process::Output) -> Error {
    Error::Command {
        command: process::command_line(cmd),
        status: output.status.to_string(),
        stderr: check_report(output),
    }
}

/// `qemu-img check`'s verdict that the image is corrupt.
fn damaged(cmd: &Command, output: &std::process::Output) -> Error {
    Error::Damaged {
        command: process::command_line(cmd),
        report: check_report(output),
    }
}

/// Both halves of `qemu-img check`'s report, trimmed.
fn check_report(output: &std::process::Output) -> String {
    let report = [output.stderr.as_slice(), b"\n", output.stdout.as_slice()].concat();
    process::stderr_text(&report)
}

/// Checks a dirty bitmap name: QEMU allows up to 1023 bytes; we also
/// refuse control characters and a leading `-`, which could be taken for an
/// option.
pub fn check_bitmap_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 1023
        && !name.starts_with('-')
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "invalid dirty bitmap name {name:?}"
        )))
    }
}

/// Runs one `qemu-img bitmap` operation on an image nobody else has open.
/// qemu-img takes the image lock, so while a VM uses the image this fails
/// with qemu's "Failed to get \"write\" lock" message.
fn bitmap_op(path: &Path, format: &str, op: &[&str], name: &str) -> Result<()> {
    let run = || {
        check_format(format)?;
        check_bitmap_name(name)?;
        let mut cmd = Command::new("qemu-img");
        cmd.arg("bitmap")
            .args(op)
            .args(["-f", format])
            .arg(qemu_path(path)?)
            .arg(name);
        process::run(&mut cmd).map(drop)
    };
    run().map_err(|e| e.for_image(path))
}

/// Adds a persistent bitmap that records writes from now on, with qemu's
/// default granularity (the image's cluster size, 64 KiB by default).
pub fn bitmap_add(path: &Path, format: &str, name: &str) -> Result<()> {
    bitmap_op(path, format, &["--add"], name)
}

/// Adds a persistent bitmap that records writes from now on, in granules
/// of `granularity` bytes (a power of two from 512 B; see
/// [`tracking_granularity`]).
pub fn bitmap_add_granular(path: &Path, format: &str, name: &str, granularity: u64) -> Result<()> {
    let granularity = granularity.to_string();
    bitmap_op(path, format, &["--add", "-g", &granularity], name)
}

/// The finest granularity the bitmaps vbackup creates for changed-block
/// tracking use: one bit per 4 KiB (a file system block), so scattered
/// 4 KiB writes are read back as 4 KiB, not as 64 KiB clusters.
pub const FINE_GRANULARITY: u64 = 4096;
/// The largest bitmap vbackup makes finer than qemu's default: 2^28 bits,
/// 32 MiB of memory in a running qemu (and of image file).
const MAX_BITMAP_BITS: u64 = 1 << 28;
/// qemu's default granularity for qcow2 images with 64 KiB clusters.
const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// The granularity of the dirty bitmaps vbackup creates for a disk of
/// `virtual_size` bytes: 4 KiB up to 1 TiB, then coarser so that the
/// bitmap stays at 32 MiB, and never coarser than qemu's default (64 KiB,
/// reached at 16 TiB). A bitmap costs `virtual_size / granularity` bits:
/// 32 KiB per GiB at 4 KiB, 2 KiB per GiB at 64 KiB.
pub fn tracking_granularity(virtual_size: u64) -> u64 {
    let needed = virtual_size.div_ceil(MAX_BITMAP_BITS).next_power_of_two();
    needed.clamp(FINE_GRANULARITY, DEFAULT_GRANULARITY)
}

/// Removes a persistent bitmap.
pub fn bitmap_remove(path: &Path, format: &str, name: &str) -> Result<()> {
    bitmap_op(path, format, &["--remove"], name)
}

/// Stops a bitmap from recording writes.
pub fn bitmap_disable(path: &Path, format: &str, name: &str) -> Result<()> {
    bitmap_op(path, format, &["--disable"], name)
}

/// Makes a bitmap record writes again.
pub fn bitmap_enable(path: &Path, format: &str, name: &str) -> Result<()> {
    bitmap_op(path, format, &["--enable"], name)
}

/// Ors bitmap `source` into bitmap `target` of the same image.
pub fn bitmap_merge(path: &Path, format: &str, source: &str, target: &str) -> Result<()> {
    check_bitmap_name(source).map_err(|e| e.for_image(path))?;
    bitmap_op(path, format, &["--merge", source], target)
}

/// Converts `src` (format detected unless given) into a new image `dst` of
/// `dst_format`.
pub fn convert(src: &Path, src_format: Option<&str>, dst: &Path, dst_format: &str) -> Result<()> {
    let src_format = match src_format {
        Some(f) => f.to_owned(),
        None => image_info(src)?.format,
    };
    check_format(&src_format)?;
    check_format(dst_format)?;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", &src_format, "-O", dst_format])
        .arg(qemu_path(src)?)
        .arg(qemu_path(dst)?);
    process::run(&mut cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_granularity_is_4_kib_up_to_1_tib_and_bounds_the_bitmap() {
        assert_eq!(tracking_granularity(4 << 30), 4096);
        assert_eq!(tracking_granularity(1 << 40), 4096);
        assert_eq!(tracking_granularity((1 << 40) + 1), 8192);
        assert_eq!(tracking_granularity(16 << 40), 64 << 10);
        assert_eq!(tracking_granularity(64 << 40), 64 << 10);
        assert_eq!(tracking_granularity(0), 4096);
    }

    #[test]
    fn parses_qcow2_info_with_bitmaps() {
        let json = br#"{
            "virtual-size": 4194304, "filename": "a.qcow2", "cluster-size": 65536,
            "format": "qcow2", "actual-size": 339968, "dirty-flag": false,
            "backing-filename": "base.qcow2", "backing-filename-format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                "bitmaps": [{"flags": ["auto"], "name": "b0", "granularity": 65536}]}}
        }"#;
        let info = parse_info_json(json).unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 4 << 20);
        assert_eq!(info.actual_size, Some(339968));
        assert_eq!(info.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(
            info.bitmaps,
            vec![BitmapInfo {
                name: "b0".into(),
                granularity: 65536,
                flags: vec!["auto".into()]
            }]
        );
    }

    #[test]
    fn bitmap_flags_tell_recording_and_consistency() {
        let b = |flags: &[&str]| BitmapInfo {
            name: "b".into(),
            granularity: 65536,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        assert!(b(&["auto"]).is_recording() && b(&["auto"]).is_consistent());
        assert!(!b(&[]).is_recording());
        assert!(!b(&["in-use", "auto"]).is_consistent());
    }

    #[test]
    fn bitmap_names_are_checked() {
        assert!(check_bitmap_name("vbackup-1").is_ok());
        for bad in ["", "-b", "a\nb", &"x".repeat(1024)] {
            assert!(check_bitmap_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_raw_info() {
        let json = br#"{"virtual-size": 512, "filename": "x", "format": "raw",
            "actual-size": 4096, "dirty-flag": false}"#;
        let info = parse_info_json(json).unwrap();
        assert_eq!(info.format, "raw");
        assert!(info.bitmaps.is_empty());
        assert!(!info.dirty);
    }

    #[test]
    fn rejects_format_names_that_are_not_words() {
        assert!(check_format("qcow2").is_ok());
        assert!(check_format("").is_err());
        assert!(check_format("raw,file.filename=/etc/shadow").is_err());
        assert!(check_format("--help").is_err());
    }

    #[test]
    fn qemu_path_is_absolute() {
        let p = qemu_path(Path::new("nbd:evil")).unwrap();
        assert!(p.is_absolute());
    }
}
