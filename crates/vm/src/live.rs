//! Backups of running VMs through QMP.
//!
//! One QMP `transaction` takes the point in time of all the VM's disks
//! together (image fleecing) and rotates their dirty bitmaps; the guest
//! agent, when given, freezes the guest's filesystems around that instant.
//! The engine then reads the point-in-time view over NBD — only the chunks
//! the exported bitmap marks, for incrementals and differentials — while the
//! VM keeps running; its writes after the instant are in the new bitmap,
//! hence in the next incremental. Everything the session created in QEMU is
//! removed at the end, also on failure or interruption.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vbackup_core::cbt::{self, DiskObservation, DiskPlan, ObservedBitmap, Planner, Requested};
use vbackup_core::format::{Canary, ConfigFile, SnapshotManifest, VmDefinition};
use vbackup_core::{BackupDisk, BackupOptions, PreparedBackup, Progress, Repository, Snapshot};
use vbackup_qemu::live::{self, FreezeReport, LiveDisk, LiveDiskPlan, LiveOptions, LiveSession};
use vbackup_qemu::{GuestAgent, QmpClient};

use crate::{Error, Result};

/// A backup of a running VM.
#[derive(Debug, Clone)]
pub struct LiveBackup {
    /// The VM's name in the repository.
    pub vm: String,
    /// QMP socket of the QEMU or qemu-storage-daemon running it.
    pub qmp_socket: PathBuf,
    /// The guest agent's socket, to freeze filesystems at the instant.
    pub guest_agent: Option<PathBuf>,
    /// The VM's NBD server socket, when it already runs one.
    pub nbd_socket: Option<PathBuf>,
    /// Only these disks (device or node names); empty = all.
    pub only: Vec<String>,
    /// The backup type asked for.
    pub requested: Requested,
    /// Engine options.
    pub options: BackupOptions,
    /// A configuration file to store with the snapshot.
    pub config_file: Option<ConfigFile>,
    /// With a guest agent: the file in the guest that gets a token naming
    /// this backup just before the point in time (see
    /// [`DEFAULT_CANARY_PATH`]); `None` writes none.
    pub canary: Option<String>,
}

/// Where a live backup with a guest agent writes its canary by default.
pub const DEFAULT_CANARY_PATH: &str = "/var/lib/vbackup-canary";

/// Writes a fresh token to `path` in the guest, so that the snapshot's
/// disks hold it: boot verification reads it back. A guest that refuses
/// (no such folder, a read-only root, an agent without file commands)
/// only loses the canary, never the backup: the reason is returned.
fn write_canary(agent: &mut GuestAgent, path: &str) -> std::result::Result<Canary, String> {
    let token = vbackup_core::crypto::random_bytes::<16>()
        .map(hex_of)
        .map_err(|e| e.to_string())?;
    agent
        .write_file(path, format!("vbackup canary {token}\n").as_bytes())
        .map_err(|e| format!("the canary could not be written to {path} in the guest: {e}"))?;
    Ok(Canary {
        path: path.to_string(),
        token,
    })
}

fn hex_of(bytes: [u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a live backup did besides the snapshot.
#[derive(Debug)]
pub struct LiveOutcome {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Objects an earlier, killed vbackup had left in QEMU and that were removed.
    pub leftovers_removed: Vec<String>,
    /// The guest agent's part.
    pub freeze: FreezeReport,
    /// Problems after the snapshot was safely recorded (cleanup).
    pub warnings: Vec<String>,
}

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a live backup and records its snapshot.
pub fn backup(repo: &Repository, request: &LiveBackup, progress: &Progress) -> Result<LiveOutcome> {
    let _lock = lock_vm(&request.qmp_socket)?;
    let mut qmp =
        QmpClient::connect(&request.qmp_socket).map_err(Error::qemu("connecting to QMP"))?;
    let leftovers_removed = live::cleanup_leftovers(&mut qmp, EVENT_TIMEOUT).map_err(
        Error::qemu("removing what an interrupted vbackup left in QEMU"),
    )?;
    let disks = select_disks(
        live::discover_disks(&mut qmp).map_err(Error::qemu("listing the VM's disks"))?,
        &request.only,
    )?;
    let definition = definition(&mut qmp, request.config_file.clone());
    // The lease first: planning checks base snapshots against the chunk
    // listing the backup itself then trusts.
    let start = vbackup_core::BackupStart::begin(repo)?;
    let planner = Planner::for_backup(repo, &request.vm, "qmp", &start)?;
    let plans: Vec<DiskPlan> = disks
        .iter()
        .map(|d| planner.plan(request.requested, &observe(d)))
        .collect();
    drop(planner);
    let live_plans: Vec<LiveDiskPlan> = disks
        .iter()
        .zip(&plans)
        .map(|(d, p)| live_plan(d, p))
        .collect();
    let mut agent = match &request.guest_agent {
        Some(socket) => Some(
            GuestAgent::connect(socket).map_err(Error::qemu("connecting to the guest agent"))?,
        ),
        None => None,
    };
    // Before the point in time, so the snapshot holds it (the freeze
    // flushes it to the disk).
    let canary = match (agent.as_mut(), &request.canary) {
        (Some(agent), Some(path)) => Some(write_canary(agent, path)),
        _ => None,
    };
    let options = LiveOptions {
        nbd_socket: request.nbd_socket.clone(),
        guest_agent: agent.as_mut(),
        connections: u32::try_from(request.options.threads)
            .unwrap_or(u32::MAX)
            .max(1),
        ..LiveOptions::default()
    };
    let session = LiveSession::begin(&mut qmp, &live_plans, options)
        .map_err(Error::qemu("taking the point in time of the VM's disks"))?;
    let freeze = session.freeze_report().clone();
    let read = read_disks(
        repo,
        start,
        &session,
        &disks,
        &plans,
        &request.options,
        progress,
    );
    let mut prepared = match read {
        Ok(prepared) => prepared,
        Err(e) => {
            let _ = session.abort();
            return Err(e);
        }
    };
    complete_manifest(&mut prepared.manifest, &plans, &freeze, definition);
    match canary {
        Some(Ok(canary)) => prepared.manifest.canary = Some(canary),
        Some(Err(reason)) => {
            let note = prepared.manifest.consistency_note.take();
            prepared.manifest.consistency_note =
                Some(note.map_or(reason.clone(), |n| format!("{n}; {reason}")));
        }
        None => {}
    }
    let snapshot = match prepared.commit(repo) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            let _ = session.abort();
            return Err(e.into());
        }
    };
    let warnings = session
        .commit()
        .err()
        .map(|e| format!("the snapshot is safe, but cleaning up in QEMU failed: {e}"))
        .into_iter()
        .collect();
    Ok(LiveOutcome {
        snapshot,
        leftovers_removed,
        freeze,
        warnings,
    })
}

/// Reads the session's point-in-time view of every disk.
fn read_disks(
    repo: &Repository,
    start: vbackup_core::BackupStart,
    session: &LiveSession<'_>,
    disks: &[LiveDisk],
    plans: &[DiskPlan],
    options: &BackupOptions,
    progress: &Progress,
) -> Result<PreparedBackup> {
    let backup_disks: Vec<BackupDisk> = disks
        .iter()
        .zip(session.sources())
        .zip(plans)
        .map(|((disk, source), plan)| BackupDisk {
            name: disk.name.clone(),
            source_label: disk.filename.clone(),
            source,
            base: plan.changes.as_ref().map(|(_, base)| base.clone()),
        })
        .collect();
    // The unchanged-file shortcut never applies: a running VM's file is live.
    let options = BackupOptions {
        skip_unchanged: false,
        ..options.clone()
    };
    Ok(vbackup_core::backup_prepare_started(
        repo,
        start,
        &backup_disks,
        &options,
        progress,
    )?)
}

fn complete_manifest(
    manifest: &mut SnapshotManifest,
    plans: &[DiskPlan],
    freeze: &FreezeReport,
    definition: VmDefinition,
) {
    for (record, plan) in manifest.disks.iter_mut().zip(plans) {
        record.tracking = plan.tracking.clone();
        record.fallback_reason = plan.fallback_reason.clone();
    }
    manifest.backup_type = cbt::snapshot_type(plans);
    let consistency = if freeze.frozen {
        "application-consistent"
    } else {
        "crash-consistent"
    };
    manifest.consistency = Some(consistency.to_string());
    manifest.consistency_note = freeze.reason.clone().filter(|_| !freeze.frozen);
    manifest.definition = Some(definition);
}

/// Serializes live backups of one VM on this host: the leftovers cleanup
/// must never remove a running session's objects.
fn lock_vm(qmp_socket: &Path) -> Result<File> {
    let name = qmp_socket
        .file_name()
        .map_or("vm".into(), |n| n.to_string_lossy().into_owned());
    let path = qmp_socket.with_file_name(format!(".{name}.vbackup.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            Error::Lock(format!(
                "cannot create the lock file {}: {e}",
                path.display()
            ))
        })?;
    file.try_lock().map_err(|_| {
        Error::Lock(format!(
            "another vbackup is backing up the VM behind {} (lock {})",
            qmp_socket.display(),
            path.display()
        ))
    })?;
    Ok(file)
}

fn select_disks(disks: Vec<LiveDisk>, only: &[String]) -> Result<Vec<LiveDisk>> {
    if disks.is_empty() {
        return Err(Error::Invalid(
            "QMP reports no disks for this VM".to_string(),
        ));
    }
    if only.is_empty() {
        return Ok(disks);
    }
    for wanted in only {
        if !disks.iter().any(|d| &d.name == wanted || &d.node == wanted) {
            let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
            return Err(Error::Invalid(format!(
                "the VM has no disk '{wanted}'; its disks: {}",
                names.join(", ")
            )));
        }
    }
    Ok(disks
        .into_iter()
        .filter(|d| only.iter().any(|w| w == &d.name || w == &d.node))
        .collect())
}

fn observe(disk: &LiveDisk) -> DiskObservation {
    let untrackable = (disk.format != "qcow2").then(|| {
        format!(
            "{} images cannot hold persistent dirty bitmaps",
            disk.format
        )
    });
    let bitmaps = disk
        .bitmaps
        .iter()
        .map(|b| ObservedBitmap {
            name: b.name.clone(),
            recording: b.recording && !b.busy,
            consistent: !b.inconsistent,
        })
        .collect();
    DiskObservation {
        name: disk.name.clone(),
        size: disk.size,
        bitmaps,
        untrackable,
    }
}

fn live_plan(disk: &LiveDisk, plan: &DiskPlan) -> LiveDiskPlan {
    let (read_bitmap, freeze_copy_of) = match plan.read_bitmap() {
        Some(name) if plan.read_bitmap_stays => (None, Some(name.to_string())),
        Some(name) => (Some(name.to_string()), None),
        None => (None, None),
    };
    LiveDiskPlan {
        node: disk.node.clone(),
        read_bitmap,
        freeze_copy_of,
        add_bitmaps: plan.add_bitmaps.clone(),
        remove_after: plan.remove_bitmaps.clone(),
    }
}

/// What QMP tells about the VM (each query best effort: a
/// qemu-storage-daemon answers fewer than a QEMU), plus the config file.
fn definition(qmp: &mut QmpClient, config_file: Option<ConfigFile>) -> VmDefinition {
    let queries = [
        ("version", "query-version", Value::Null),
        ("name", "query-name", Value::Null),
        ("uuid", "query-uuid", Value::Null),
        ("target", "query-target", Value::Null),
        (
            "machine-type",
            "qom-get",
            json!({"path": "/machine", "property": "type"}),
        ),
        ("cpus", "query-cpus-fast", Value::Null),
        ("memory", "query-memory-size-summary", Value::Null),
        ("block-devices", "query-block", Value::Null),
        (
            "block-nodes",
            "query-named-block-nodes",
            json!({"flat": true}),
        ),
    ];
    let mut report = serde_json::Map::new();
    for (key, command, args) in queries {
        if let Ok(value) = qmp.execute(command, args) {
            report.insert(key.to_string(), value);
        }
    }
    VmDefinition {
        qmp: Some(Value::Object(report)),
        config_file,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vbackup_core::ErrorClass;

    /// Issue 11: a VM another vbackup is backing up was reported as an
    /// invalid request; it is a lock held elsewhere, a runtime failure.
    #[test]
    fn issue11_a_vm_locked_by_another_backup_is_a_runtime_failure() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let socket = dir.path().join("web1.qmp");
        let _held = lock_vm(&socket).expect("the first lock is taken");
        let error = lock_vm(&socket).expect_err("the second is refused");
        assert!(matches!(error, Error::Lock(_)), "{error}");
        assert_eq!(error.class(), ErrorClass::Runtime);
        assert!(error.to_string().contains("another vbackup"), "{error}");
        let nowhere = dir.path().join("gone").join("web1.qmp");
        let error = lock_vm(&nowhere).expect_err("no folder for the lock file");
        assert_eq!(error.class(), ErrorClass::Runtime, "{error}");
    }
}
