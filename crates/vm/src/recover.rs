//! Recovery from a snapshot without restoring it first: boot verification
//! (`vbackup verify --boot`) and instant recovery with live restore
//! (`vbackup recover instant`).
//!
//! Both serve the snapshot's disks over NBD from this process (a unix
//! socket in a private run folder), put a qcow2 overlay over each export
//! and boot the stored definition on the overlays ([`crate::boot`]).
//!
//! - Boot verification isolates the VM (no network, throwaway overlays in
//!   the run folder, nothing written to the repository but its report),
//!   waits for a heartbeat, runs an optional check through the guest
//!   agent, stops the VM and records a [`BootReport`] with the snapshot.
//! - Instant recovery keeps the overlays (they hold what the VM writes,
//!   never lost: on any failure the command says where they are). With a
//!   live restore, once the VM runs, QEMU's `blockdev-mirror` copies each
//!   disk (the backup under the VM's writes) onto its target — new qcow2
//!   files in a folder, skipping the backup's holes, or raw devices —
//!   while the VM keeps running; once all are in sync the VM is pivoted
//!   onto the targets, the exports are dropped and the VM runs on, no
//!   longer needing vbackup.
//!
//! A [`Sentinel`] stops QEMU and removes the run folder should vbackup be
//! killed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vbackup_core::boot_report::{record_boot_report, BootReport, BOOT_REPORT_VERSION};
use vbackup_core::reader::ReaderOptions;
use vbackup_core::{Repository, Snapshot};
use vbackup_qemu::qmp::QmpClient;

use crate::boot::{create_overlay, plan, BootDisk, BootOptions, BootPlan, Heartbeat, RunningVm};
use crate::sentinel::Sentinel;
use crate::serve::{Exports, Listen, Listener, ServeOptions};
use crate::{Error, Result};

/// A private folder (0700) for sockets, logs and throwaway overlays,
/// removed when dropped unless kept.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    keep: AtomicBool,
}

impl RunDir {
    /// `parent/vbackup-WHAT-PID-NANOS`, not yet created (so the sentinel
    /// can be told about it first).
    fn name(parent: &Path, what: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        parent.join(format!("vbackup-{what}-{}-{nanos}", std::process::id()))
    }

    fn create(path: PathBuf, keep: bool) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&path)
            .map_err(|source| Error::Io {
                context: format!("creating {}", path.display()),
                source,
            })?;
        Ok(Self {
            path,
            keep: AtomicBool::new(keep),
        })
    }
}

impl RunDir {
    /// Keeps the folder after all.
    fn keep_now(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The snapshot's exports on a unix socket in `dir`, served on a thread
/// of `scope` until `stop`.
fn serve_in<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    exports: &'scope Exports,
    dir: &Path,
    stop: &'scope AtomicBool,
) -> Result<(Listen, std::thread::ScopedJoinHandle<'scope, Result<()>>)> {
    let listen = Listen::Unix(dir.join("nbd.sock"));
    let listener = Listener::bind(&listen, false)?;
    let handle = scope.spawn(move || exports.serve(listener, stop));
    Ok((listen, handle))
}

fn open_exports(repo: Arc<Repository>, snapshot: &Snapshot, cache_bytes: u64) -> Result<Exports> {
    let options = ServeOptions {
        disks: Vec::new(),
        writable: false,
        overlay: None,
        cache_bytes,
        reader: ReaderOptions::default(),
    };
    Exports::open(repo, snapshot, &options)
}

/// Creates the qcow2 overlays (`dir/DISK.qcow2`) over the exports.
fn overlays(snapshot: &Snapshot, listen: &Listen, dir: &Path) -> Result<Vec<BootDisk>> {
    let mut disks = Vec::new();
    for disk in &snapshot.manifest.disks {
        let overlay = dir.join(format!("{}.qcow2", disk.name));
        if overlay.exists() {
            return Err(Error::Invalid(format!(
                "{} exists: it may hold a recovered VM's writes; move it away or choose another folder",
                overlay.display()
            )));
        }
        create_overlay(&overlay, &listen.uri(&disk.name), disk.virtual_size)?;
        disks.push(BootDisk {
            source: disk.source.clone(),
            source_format: disk.format.clone(),
            overlay,
        });
    }
    Ok(disks)
}

/// What one boot verification saw: the heartbeat (or why none), the
/// check's exit code, the accelerator, the canary's state.
type Outcome = (Result<Duration>, Option<i64>, String, Option<String>);

/// What boot verification does.
#[derive(Debug, Clone)]
pub struct VerifyBoot {
    /// What counts as the heartbeat.
    pub heartbeat: Heartbeat,
    /// A command run in the guest (through its agent) after the
    /// heartbeat; it must exit 0.
    pub check: Option<String>,
    /// How long to wait for the heartbeat (and, again, for the check).
    pub timeout: Duration,
    /// QEMU, firmware, accelerator (the network is always isolated).
    pub boot: BootOptions,
    /// Bytes of decoded chunks kept in memory.
    pub cache_bytes: u64,
    /// Record the result in the repository.
    pub record: bool,
}

/// Boots `snapshot` in isolation and reports whether it came up; the
/// report is recorded with the snapshot when `request.record`. A VM that
/// does not boot is a report with `passed: false` and its reason, not an
/// error; errors are what kept the verification from running.
pub fn verify_boot(
    repo: Arc<Repository>,
    snapshot: &Snapshot,
    request: &VerifyBoot,
    cancel: &AtomicBool,
) -> Result<BootReport> {
    let mut sentinel = Sentinel::start()?;
    let path = RunDir::name(&std::env::temp_dir(), "verify");
    sentinel.remove_on_kill(&path)?;
    let run = RunDir::create(path, false)?;
    let exports = open_exports(Arc::clone(&repo), snapshot, request.cache_bytes)?;
    let stop = AtomicBool::new(false);
    let mut boot = request.boot.clone();
    boot.isolate = true;
    let outcome = std::thread::scope(|scope| -> Result<Outcome> {
        let (listen, server) = serve_in(scope, &exports, &run.path, &stop)?;
        let result = (|| -> Result<Outcome> {
            let disks = overlays(snapshot, &listen, &run.path)?;
            let plan = plan(
                snapshot.manifest.definition.as_ref(),
                &disks,
                &run.path,
                &boot,
            )?;
            let accel = plan.accel.clone();
            let mut vm = RunningVm::start(plan)?;
            if let Some(pid) = vm.pid() {
                sentinel.watch_pid(pid)?;
            }
            let beat =
                wait_heartbeat_or_cancel(&mut vm, &request.heartbeat, request.timeout, cancel);
            let mut check_exit = None;
            let beat = match (beat, &request.check) {
                (Ok(t), Some(command)) => match vm.guest_exec(command, request.timeout) {
                    Ok((0, _)) => {
                        check_exit = Some(0);
                        Ok(t)
                    }
                    Ok((code, output)) => {
                        check_exit = Some(code);
                        Err(Error::Invalid(format!(
                            "the check '{command}' exited with {code}: {}",
                            output.trim()
                        )))
                    }
                    Err(e) => Err(e),
                },
                (beat, _) => beat,
            };
            let (beat, canary) = match beat {
                Ok(t) => {
                    let (checked, canary) = check_canary(&vm, snapshot, &request.heartbeat)?;
                    (checked.map(|()| t), canary)
                }
                Err(e) => (Err(e), None),
            };
            vm.stop();
            Ok((beat, check_exit, accel, canary))
        })();
        stop.store(true, Ordering::Relaxed);
        let served = server
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the NBD server thread panicked".into())));
        let result = result?;
        served?;
        Ok(result)
    })?;
    let (beat, check_exit, accelerator, canary) = outcome;
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Core(vbackup_core::Error::Interrupted));
    }
    let report = BootReport {
        version: BOOT_REPORT_VERSION,
        snapshot: snapshot.id.clone(),
        passed: beat.is_ok(),
        reason: beat.as_ref().err().map(ToString::to_string),
        heartbeat: match &request.heartbeat {
            Heartbeat::Agent => "agent".into(),
            Heartbeat::Console(text) => format!("console:{text}"),
        },
        seconds_to_heartbeat: beat.as_ref().ok().map(Duration::as_secs_f64),
        check: request.check.clone(),
        check_exit,
        canary,
        accelerator,
        time: vbackup_core::boot_report::now(),
        host: vbackup_core::hostname(),
    };
    if request.record {
        record_boot_report(&repo, &report)?;
    }
    drop(run);
    sentinel.done();
    Ok(report)
}

/// Reads the snapshot's canary back from the booted guest: `Ok((Ok, ..))`
/// with `matched` or why it could not be checked; a different token turns
/// the heartbeat into a failure (the disk is not this point in time).
fn check_canary(
    vm: &RunningVm,
    snapshot: &Snapshot,
    heartbeat: &Heartbeat,
) -> Result<(Result<()>, Option<String>)> {
    let Some(canary) = &snapshot.manifest.canary else {
        return Ok((Ok(()), None));
    };
    match vm.guest_read(&canary.path) {
        Ok(bytes) if String::from_utf8_lossy(&bytes).contains(&canary.token) => {
            Ok((Ok(()), Some("matched".into())))
        }
        Ok(bytes) => Ok((
            Err(Error::Invalid(format!(
                "the booted guest's {} holds '{}', not this snapshot's canary {}: the disk is not this snapshot's point in time",
                canary.path,
                String::from_utf8_lossy(&bytes).trim(),
                canary.token
            ))),
            Some("mismatch".into()),
        )),
        Err(e) if matches!(heartbeat, Heartbeat::Agent) => Ok((
            Err(Error::Invalid(format!(
                "the snapshot's canary {} could not be read back: {e}",
                canary.path
            ))),
            Some("missing".into()),
        )),
        Err(e) => Ok((Ok(()), Some(format!("unchecked: {e}")))),
    }
}

fn wait_heartbeat_or_cancel(
    vm: &mut RunningVm,
    heartbeat: &Heartbeat,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Core(vbackup_core::Error::Interrupted));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match vm.wait_heartbeat(heartbeat, left.min(Duration::from_millis(500))) {
            Ok(t) => return Ok(t),
            Err(e) if left <= Duration::from_millis(500) || vm.exited().is_some() => {
                return Err(e.with_timeout(timeout));
            }
            Err(_) => {}
        }
    }
}

impl Error {
    /// A "no heartbeat within N s" message says the whole timeout, not the
    /// last slice of it.
    fn with_timeout(self, timeout: Duration) -> Self {
        match self {
            Error::Invalid(text) if text.starts_with("no heartbeat within") => {
                let rest = text.split_once(" s: ").map_or("", |(_, r)| r);
                Error::Invalid(format!(
                    "no heartbeat within {} s: {rest}",
                    timeout.as_secs()
                ))
            }
            other => other,
        }
    }
}

/// Where a live restore moves the data.
#[derive(Debug, Clone)]
pub enum LiveRestore {
    /// A folder the disks end up in (`DISK.qcow2`, complete, standalone):
    /// the overlays are made there and `block-stream` fills them.
    Dir(PathBuf),
    /// One raw target per disk, in the snapshot's disk order (block
    /// devices, or existing files of at least the disk's size; their old
    /// content is overwritten): `blockdev-mirror` copies the running disk
    /// there and pivots the VM onto it.
    Targets(Vec<PathBuf>),
}

impl LiveRestore {
    /// `--live-restore` values: one folder (existing or not), or one raw
    /// target (block device or existing regular file) per disk.
    pub fn from_paths(paths: &[PathBuf]) -> Result<Self> {
        match paths {
            [] => Err(Error::Invalid(
                "--live-restore needs a folder or one target per disk".into(),
            )),
            [one] if one.is_dir() || !one.exists() => Ok(LiveRestore::Dir(one.clone())),
            many => {
                for path in many {
                    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
                        context: format!("looking at the live-restore target {}", path.display()),
                        source,
                    })?;
                    use std::os::unix::fs::FileTypeExt;
                    if !(meta.file_type().is_block_device() || meta.is_file()) {
                        return Err(Error::Invalid(format!(
                            "live-restore target {} is neither a block device nor a file (give one folder, or one device per disk)",
                            path.display()
                        )));
                    }
                }
                Ok(LiveRestore::Targets(many.to_vec()))
            }
        }
    }
}

/// What instant recovery does.
#[derive(Debug, Clone)]
pub struct InstantRecovery {
    /// Folder for the VM's overlays (unless live-restoring) and its run
    /// files (QMP and agent sockets, console log).
    pub dir: PathBuf,
    /// Move the data to final disks while the VM runs.
    pub live_restore: Option<LiveRestore>,
    /// QEMU, firmware, accelerator, network isolation.
    pub boot: BootOptions,
    /// A heartbeat to wait for and report (time to heartbeat), if any.
    pub heartbeat: Option<Heartbeat>,
    /// How long to wait for it.
    pub timeout: Duration,
    /// Bytes of decoded chunks kept in memory.
    pub cache_bytes: u64,
    /// Attach the disks to a QEMU that already runs, instead of starting
    /// one from the stored definition.
    pub attach: Option<Attach>,
}

/// A running QEMU to give the recovered disks to (`--qmp SOCKET`).
#[derive(Debug, Clone)]
pub struct Attach {
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// Its guest agent socket, for an agent heartbeat.
    pub agent: Option<PathBuf>,
    /// The device model each disk is plugged in as.
    pub device: String,
}

/// What instant recovery did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecoveryReport {
    /// The snapshot recovered.
    pub snapshot: String,
    /// QEMU's pid.
    pub pid: Option<u32>,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// Its guest agent socket.
    pub agent: PathBuf,
    /// Its serial console log.
    pub console: PathBuf,
    /// Seconds from the start of the command to the VM running.
    pub seconds_to_running: f64,
    /// Seconds to the heartbeat, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_to_heartbeat: Option<f64>,
    /// Seconds to every disk fully restored (live restore).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_to_restored: Option<f64>,
    /// The disks the VM runs on: the overlays, complete after a live restore.
    pub disks: Vec<PathBuf>,
    /// Whether the VM still depends on vbackup's exports.
    pub needs_exports: bool,
    /// What went wrong after the VM started (its writes are in `disks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Starts `snapshot`'s VM from the backup. `on_running` gets the report as
/// soon as the VM runs (and again is not called). Without a live restore,
/// or when it fails, this serves the exports until the VM exits or
/// `cancel` is set (then the VM is stopped: its writes stay in the
/// overlays). After a live restore the VM is left running on the restored
/// disks and this returns.
pub fn recover_instant(
    repo: Arc<Repository>,
    snapshot: &Snapshot,
    request: &InstantRecovery,
    cancel: &AtomicBool,
    on_running: &mut dyn FnMut(&RecoveryReport),
) -> Result<RecoveryReport> {
    let started = Instant::now();
    let mut sentinel = Sentinel::start()?;
    let run_path = request.dir.join(".vbackup-run");
    sentinel.remove_on_kill(&run_path)?;
    let run = RunDir::create(run_path, false)?;
    let disk_dir = request.dir.clone();
    if let Some(LiveRestore::Targets(targets)) = &request.live_restore {
        check_targets(snapshot, targets)?;
    }
    if let Some(LiveRestore::Dir(dir)) = &request.live_restore {
        check_free_names(snapshot, dir)?;
    }
    RunDir::create(disk_dir.clone(), true)?;
    let exports = open_exports(Arc::clone(&repo), snapshot, request.cache_bytes)?;
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|scope| -> Result<RecoveryReport> {
        let (listen, server) = serve_in(scope, &exports, &run.path, &stop)?;
        let result = (|| -> Result<RecoveryReport> {
            let disks = overlays(snapshot, &listen, &disk_dir)?;
            let mut vm = match &request.attach {
                Some(attach) => attach_disks(attach, &disks, &run.path)?,
                None => {
                    let plan = plan(
                        snapshot.manifest.definition.as_ref(),
                        &disks,
                        &run.path,
                        &request.boot,
                    )?;
                    let vm = RunningVm::start(plan)?;
                    if let Some(pid) = vm.pid() {
                        sentinel.watch_pid(pid)?;
                    }
                    vm
                }
            };
            vm.wait_running(request.timeout)?;
            let mut report = RecoveryReport {
                snapshot: snapshot.id.clone(),
                pid: vm.pid(),
                qmp: vm.plan().qmp.clone(),
                agent: vm.plan().agent.clone(),
                console: vm.plan().console.clone(),
                seconds_to_running: started.elapsed().as_secs_f64(),
                seconds_to_heartbeat: None,
                seconds_to_restored: None,
                disks: disks.iter().map(|d| d.overlay.clone()).collect(),
                needs_exports: true,
                error: None,
            };
            if let Some(heartbeat) = &request.heartbeat {
                let beat = wait_heartbeat_or_cancel(&mut vm, heartbeat, request.timeout, cancel)?;
                report.seconds_to_heartbeat =
                    Some(beat.as_secs_f64() + (vm.started() - started).as_secs_f64());
            }
            on_running(&report);
            if let Some(live) = &request.live_restore {
                let moved = match live {
                    LiveRestore::Dir(dir) => new_qcow2_targets(snapshot, dir).and_then(|targets| {
                        mirror_all(&mut vm, &disks, &targets, "qcow2", cancel).map(|()| targets)
                    }),
                    LiveRestore::Targets(targets) => {
                        mirror_all(&mut vm, &disks, targets, "raw", cancel)
                            .map(|()| targets.clone())
                    }
                };
                match moved {
                    Ok(targets) => {
                        report.disks = targets;
                        report.seconds_to_restored = Some(started.elapsed().as_secs_f64());
                        report.needs_exports = false;
                        vm.detach();
                        return Ok(report);
                    }
                    Err(e) => report.error = Some(format!("live restore failed: {e}")),
                }
            }
            // Serve until the VM ends or we are told to stop.
            while vm.exited().is_none() && !cancel.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
            }
            vm.stop();
            Ok(report)
        })();
        stop.store(true, Ordering::Relaxed);
        let served = server
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the NBD server thread panicked".into())));
        let report = result?;
        served?;
        Ok(report)
    })
    .inspect(|report| {
        if !report.needs_exports {
            // The VM runs on, its sockets in the run folder: keep it.
            run.keep_now();
        }
    });
    sentinel.done();
    result
}

/// Plugs each overlay into the QEMU of `attach` (`blockdev-add` of the
/// qcow2 overlay, whose backing is the export, then `device_add`) and lets
/// a VM paused at start (`-S`) run.
fn attach_disks(attach: &Attach, disks: &[BootDisk], run_dir: &Path) -> Result<RunningVm> {
    let mut qmp = QmpClient::connect_with_timeout(&attach.qmp, Duration::from_secs(10)).map_err(
        Error::qemu(format!(
            "connecting to the VM's QMP socket {}",
            attach.qmp.display()
        )),
    )?;
    for (i, disk) in disks.iter().enumerate() {
        let node = format!("vbackup-disk-{i}");
        qmp.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node, "detect-zeroes": "on",
                   "file": {"driver": "file", "filename": disk.overlay.display().to_string()}}),
        )
        .map_err(Error::qemu(format!(
            "opening {} in the running QEMU",
            disk.overlay.display()
        )))?;
        qmp.execute(
            "device_add",
            json!({"driver": attach.device, "drive": node, "id": format!("vbackup-dev-{i}")}),
        )
        .map_err(Error::qemu(format!(
            "plugging {} into the running VM as {}",
            disk.overlay.display(),
            attach.device
        )))?;
    }
    let status = qmp
        .execute("query-status", json!({}))
        .map_err(Error::qemu("asking QEMU whether the VM runs"))?;
    if status["running"].as_bool() != Some(true) {
        qmp.execute("cont", json!({}))
            .map_err(Error::qemu("letting the VM run"))?;
    }
    Ok(RunningVm::attached(BootPlan {
        qemu: PathBuf::new(),
        args: Vec::new(),
        accel: String::new(),
        qmp: attach.qmp.clone(),
        agent: attach
            .agent
            .clone()
            .unwrap_or_else(|| run_dir.join("no-agent")),
        console: run_dir.join("no-console"),
        log: run_dir.join("no-log"),
    }))
}

/// One target per disk, each large enough.
fn check_targets(snapshot: &Snapshot, targets: &[PathBuf]) -> Result<()> {
    let disks = &snapshot.manifest.disks;
    if targets.len() != disks.len() {
        return Err(Error::Invalid(format!(
            "snapshot {} has {} disk(s) ({}); give as many live-restore targets, in that order",
            snapshot.short_id(),
            disks.len(),
            disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (disk, target) in disks.iter().zip(targets) {
        let size = device_size(target)?;
        if size < disk.virtual_size {
            return Err(Error::Invalid(format!(
                "live-restore target {} holds {size} bytes, less than disk '{}' ({} bytes)",
                target.display(),
                disk.name,
                disk.virtual_size
            )));
        }
    }
    Ok(())
}

/// The size of a file or block device (seeking to its end).
fn device_size(path: &Path) -> Result<u64> {
    use std::io::Seek;
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .map_err(|source| Error::Io {
            context: format!("reading the size of {}", path.display()),
            source,
        })
}

/// Refuses a live-restore folder that already holds a disk's file.
fn check_free_names(snapshot: &Snapshot, dir: &Path) -> Result<()> {
    for disk in &snapshot.manifest.disks {
        let target = dir.join(format!("{}.qcow2", disk.name));
        if target.exists() {
            return Err(Error::Invalid(format!(
                "{} exists; the live restore will not overwrite it (move it away or choose another folder)",
                target.display()
            )));
        }
    }
    Ok(())
}

/// Creates the empty qcow2 files a live restore into `dir` fills
/// (`DISK.qcow2`, 0600, in a 0700 folder when it makes one).
fn new_qcow2_targets(snapshot: &Snapshot, dir: &Path) -> Result<Vec<PathBuf>> {
    RunDir::create(dir.to_path_buf(), true)?;
    let mut targets = Vec::new();
    for disk in &snapshot.manifest.disks {
        let target = dir.join(format!("{}.qcow2", disk.name));
        vbackup_qemu::img::create(&target, "qcow2", disk.virtual_size)
            .map_err(Error::qemu(format!("creating {}", target.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::Io {
                context: format!("restricting {} to its owner", target.display()),
                source,
            },
        )?;
        targets.push(target);
    }
    Ok(targets)
}

/// Mirrors every disk onto its target (of `format`) with
/// `blockdev-mirror` and pivots the VM onto the targets once all are in
/// sync. The mirror asks the source's block status: the backup's holes
/// (answered from the index through the export) become write-zeroes on
/// the target, cheap on qcow2 and kept sparse on files, instead of
/// copied zeros, so a sparse disk costs its data, not its size.
fn mirror_all(
    vm: &mut RunningVm,
    disks: &[BootDisk],
    targets: &[PathBuf],
    format: &str,
    cancel: &AtomicBool,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let mut qmp = vm.qmp(Duration::from_secs(30))?;
    let nodes = overlay_nodes(&mut qmp, disks)?;
    for (i, (node, target)) in nodes.iter().zip(targets).enumerate() {
        let device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
        let protocol = if device { "host_device" } else { "file" };
        qmp.execute(
            "blockdev-add",
            json!({"driver": format, "node-name": format!("vbackup-target-{i}"), "detect-zeroes": "on",
                   "file": {"driver": protocol, "filename": target.display().to_string()}}),
        )
        .map_err(Error::qemu(format!(
            "opening the live-restore target {}",
            target.display()
        )))?;
        qmp.execute(
            "blockdev-mirror",
            json!({"job-id": format!("vbackup-restore-{i}"), "device": node,
                   "target": format!("vbackup-target-{i}"), "sync": "full"}),
        )
        .map_err(Error::qemu(format!("starting the mirror of {node}")))?;
    }
    let mut ready = std::collections::BTreeSet::new();
    while ready.len() < nodes.len() {
        if cancel.load(Ordering::Relaxed) {
            for i in 0..nodes.len() {
                let _ = qmp.execute(
                    "block-job-cancel",
                    json!({"device": format!("vbackup-restore-{i}")}),
                );
            }
            return Err(Error::Core(vbackup_core::Error::Interrupted));
        }
        let jobs = qmp
            .execute("query-block-jobs", json!({}))
            .map_err(Error::qemu("asking QEMU about the live restore"))?;
        for job in jobs.as_array().into_iter().flatten() {
            let Some(id) = job["device"]
                .as_str()
                .filter(|d| d.starts_with("vbackup-restore-"))
            else {
                continue;
            };
            if job["ready"].as_bool() == Some(true) {
                ready.insert(id.to_string());
            }
        }
        let running = jobs.as_array().map_or(0, |j| j.len());
        if running < nodes.len() && ready.len() < nodes.len() {
            let events = qmp.take_events();
            let error = events.iter().find_map(|e| {
                e.data
                    .get("error")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            });
            return Err(Error::Invalid(format!(
                "a mirror job ended before it was in sync{}",
                error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // All in sync: pivot each disk onto its target.
    for i in 0..nodes.len() {
        qmp.execute(
            "block-job-complete",
            json!({"device": format!("vbackup-restore-{i}")}),
        )
        .map_err(Error::qemu("pivoting the VM onto its restored disk"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = qmp
            .execute("query-block-jobs", json!({}))
            .map_err(Error::qemu("asking QEMU about the pivot"))?;
        if jobs.as_array().is_none_or(|j| j.is_empty()) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::Invalid(
                "the mirror jobs did not finish their pivot within 120 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The VM must now run on the targets, not the overlays.
    let blocks = qmp
        .execute("query-block", json!({}))
        .map_err(Error::qemu("asking QEMU about the restored disks"))?;
    for disk in disks {
        let path = disk.overlay.display().to_string();
        if blocks
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["inserted"]["file"].as_str() == Some(path.as_str()))
        {
            return Err(Error::Invalid(format!(
                "the VM still runs on {path} after the pivot"
            )));
        }
    }
    Ok(())
}

/// The block node each overlay is open as.
fn overlay_nodes(qmp: &mut QmpClient, disks: &[BootDisk]) -> Result<Vec<String>> {
    let blocks = qmp
        .execute("query-block", json!({}))
        .map_err(Error::qemu("listing the VM's block devices"))?;
    disks
        .iter()
        .map(|disk| {
            let path = disk.overlay.display().to_string();
            blocks
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["inserted"]["file"].as_str() == Some(path.as_str()))
                .and_then(|b| b["inserted"]["node-name"].as_str())
                .map(str::to_string)
                .ok_or_else(|| Error::Invalid(format!("QEMU has no block device open on {path}")))
        })
        .collect()
}
