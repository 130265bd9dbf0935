//! Removing what a killed vbackup left in QEMU.
//!
//! Why: a [`LiveSession`](super::LiveSession) cleans up on commit, abort and
//! drop, but not when the process is killed (SIGKILL, power loss of the
//! backup host). QEMU then keeps the export, the fleecing job, the overlay
//! node (which grows with every guest write) and the temporary bitmaps,
//! and maybe an NBD server listening on a socket in a deleted folder.
//! Everything vbackup creates is named `vbackup-...`, so it can be found
//! again and removed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::NAME_PREFIX;
use crate::error::{Error, Result};
use crate::qmp::QmpClient;

/// Prefixes of the bitmaps only a session uses (a frozen copy, a tracker).
const TEMPORARY_BITMAPS: [&str; 2] = ["vbackup-tmp-", "vbackup-trk-"];
/// The prefix of a session's private folder.
const WORK_DIR_PREFIX: &str = "vbackup-live-";

/// Removes every export, job, node and temporary bitmap vbackup created in
/// this QEMU, the overlay folders, and the NBD server if a session started
/// it. Returns what was removed, for the user to see. Each removal is
/// tried even if an earlier one failed; the first failure is returned.
///
/// Call it only while no other vbackup works on the same VM: it cannot
/// tell a dead session from a live one. Bitmap rotations are not undone
/// (which plan was running is unknown): a read bitmap left disabled makes
/// the next plan fall back to a full backup.
pub fn cleanup_leftovers(qmp: &mut QmpClient, timeout: Duration) -> Result<Vec<String>> {
    let mut log = Log::default();
    delete_exports(qmp, timeout, &mut log)?;
    cancel_jobs(qmp, timeout, &mut log)?;
    let folders = delete_nodes_and_bitmaps(qmp, &mut log)?;
    remove_folders(qmp, &folders, &mut log);
    match log.error {
        Some(e) => Err(e),
        None => Ok(log.removed),
    }
}

/// What was removed, and the first failure.
#[derive(Default)]
struct Log {
    removed: Vec<String>,
    error: Option<Error>,
}

impl Log {
    fn note(&mut self, what: String, result: Result<()>) {
        match result {
            Ok(()) => self.removed.push(what),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }
}

fn ours(name: &str) -> bool {
    name.starts_with(NAME_PREFIX)
}

fn delete_exports(qmp: &mut QmpClient, timeout: Duration, log: &mut Log) -> Result<()> {
    for export in qmp.query_block_exports()? {
        if !ours(&export.id) {
            continue;
        }
        let id = export.id.as_str();
        let result = qmp
            .execute("block-export-del", json!({"id": id, "mode": "hard"}))
            .and_then(|_| qmp.wait_event("BLOCK_EXPORT_DELETED", |d| d["id"] == id, timeout))
            .map(drop);
        log.note(format!("NBD export {id}"), result);
    }
    Ok(())
}

fn cancel_jobs(qmp: &mut QmpClient, timeout: Duration, log: &mut Log) -> Result<()> {
    for job in qmp.query_block_jobs()? {
        if !ours(&job.device) {
            continue;
        }
        let id = job.device.as_str();
        let result = qmp
            .execute("block-job-cancel", json!({"device": id, "force": true}))
            .and_then(|_| {
                qmp.wait_event(
                    "JOB_STATUS_CHANGE",
                    |d| d["id"] == id && d["status"] == "null",
                    timeout,
                )
            })
            .map(drop);
        log.note(format!("block job {id}"), result);
    }
    Ok(())
}

/// Deletes our overlay nodes and temporary bitmaps; returns the folders
/// the overlays were in.
fn delete_nodes_and_bitmaps(qmp: &mut QmpClient, log: &mut Log) -> Result<Vec<PathBuf>> {
    let mut folders = Vec::new();
    for node in qmp.query_named_block_nodes()? {
        let Some(name) = node.node_name.as_deref() else {
            continue;
        };
        if ours(name) {
            let result = qmp.execute("blockdev-del", json!({"node-name": name}));
            log.note(format!("block node {name}"), result.map(drop));
            folders.extend(overlay_file(&node.image.filename).and_then(|f| work_dir_of(&f)));
            continue;
        }
        for bitmap in node.dirty_bitmaps.iter().filter_map(|b| b.name.as_deref()) {
            if TEMPORARY_BITMAPS.iter().any(|p| bitmap.starts_with(p)) {
                let result = qmp.bitmap_remove(name, bitmap);
                log.note(format!("dirty bitmap {bitmap} of node {name}"), result);
            }
        }
    }
    folders.sort();
    folders.dedup();
    Ok(folders)
}

/// The file of an overlay node: QEMU describes a node whose backing was
/// given as a node name as `json:{..., "file": {"filename": ...}}`.
fn overlay_file(filename: &str) -> Option<PathBuf> {
    let Some(json) = filename.strip_prefix("json:") else {
        return Some(PathBuf::from(filename));
    };
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value["file"]["filename"].as_str().map(PathBuf::from)
}

/// The session folder an overlay file is in, if it looks like one.
fn work_dir_of(overlay: &Path) -> Option<PathBuf> {
    let dir = overlay.parent()?;
    let name = dir.file_name()?.to_str()?;
    let file = overlay.file_name()?.to_str()?;
    (name.starts_with(WORK_DIR_PREFIX) && file.starts_with("overlay-")).then(|| dir.to_owned())
}

/// Removes the folders; a folder holding our NBD socket means the server
/// was ours, so it is stopped.
fn remove_folders(qmp: &mut QmpClient, folders: &[PathBuf], log: &mut Log) {
    for dir in folders {
        let socket = dir.join("nbd.sock");
        if socket.exists() {
            match qmp.nbd_server_stop() {
                Err(Error::Qmp { .. }) => {} // not running any more
                result => log.note(format!("NBD server on {}", socket.display()), result),
            }
        }
        if dir.exists() {
            let result = fs::remove_dir_all(dir)
                .map_err(|e| Error::io(format!("removing {}", dir.display()), e));
            log.note(format!("folder {}", dir.display()), result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_session_folders_are_recognized() {
        let ok = Path::new("/tmp/vbackup-live-Ab12/overlay-0.qcow2");
        assert_eq!(
            work_dir_of(ok),
            Some(PathBuf::from("/tmp/vbackup-live-Ab12"))
        );
        assert_eq!(
            work_dir_of(Path::new("/var/lib/images/overlay-0.qcow2")),
            None
        );
        assert_eq!(
            work_dir_of(Path::new("/tmp/vbackup-live-x/disk.qcow2")),
            None
        );
        assert_eq!(work_dir_of(Path::new("json:{}")), None);
    }

    #[test]
    fn overlay_files_are_found_in_json_descriptions() {
        let described = r#"json:{"backing": {"driver": "qcow2"}, "driver": "qcow2", "file": {"driver": "file", "filename": "/tmp/vbackup-live-x/overlay-1.qcow2"}}"#;
        assert_eq!(
            overlay_file(described),
            Some(PathBuf::from("/tmp/vbackup-live-x/overlay-1.qcow2"))
        );
        assert_eq!(overlay_file("/a/b"), Some(PathBuf::from("/a/b")));
        assert_eq!(overlay_file("json:{broken"), None);
    }
}
