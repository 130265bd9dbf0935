//! [`LiveSession`]: one point in time of a running VM's disks, exported
//! over NBD until it is committed or aborted.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vbackup_core::source::DiskSource;

use super::{action, discover_disks, find_disk, LiveDisk};
use crate::disk::{NbdExportOptions, NbdExportSource, DEFAULT_CONNECTIONS};
use crate::error::{Error, Result};
use crate::img;
use crate::process::{self, random_u64};
use crate::qga::GuestAgent;
use crate::qmp::QmpClient;

/// How long cleanup waits for QEMU to report an export or job gone.
const DEFAULT_EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What to do with one disk at the instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveDiskPlan {
    /// The disk's top node ([`LiveDisk::node`]).
    pub node: String,
    /// Incremental: an enabled bitmap whose content at the instant is
    /// exactly what changed since the base backup. The transaction
    /// disables it, so it stops at the instant, and the export offers it.
    pub read_bitmap: Option<String>,
    /// Differential: an enabled bitmap (changes since the last full) that
    /// keeps recording; the transaction makes a disabled copy of it, and
    /// the export offers the copy. Exclusive with `read_bitmap`.
    pub freeze_copy_of: Option<String>,
    /// New persistent bitmaps, created enabled in the transaction: they
    /// record every write after the instant (the next backup's base).
    pub add_bitmaps: Vec<String>,
    /// Bitmaps removed by [`LiveSession::commit`] (typically the read
    /// bitmap, superseded by an added one). A read bitmap not listed here
    /// stays, disabled.
    pub remove_after: Vec<String>,
}

impl LiveDiskPlan {
    /// A plan that only reads `node` at the instant (full backup, no
    /// bitmap changes).
    pub fn full(node: impl Into<String>) -> Self {
        LiveDiskPlan {
            node: node.into(),
            ..LiveDiskPlan::default()
        }
    }

    /// The bitmap the export offers (before renaming a frozen copy).
    fn source_bitmap(&self) -> Option<&str> {
        self.read_bitmap
            .as_deref()
            .or(self.freeze_copy_of.as_deref())
    }
}

/// How to run a [`LiveSession`].
#[derive(Debug)]
pub struct LiveOptions<'a> {
    /// The unix socket of an NBD server already running in QEMU (QEMU has
    /// only one). Used only when `nbd-server-start` says one is running;
    /// otherwise vbackup starts its own on a private socket and stops it at
    /// the end.
    pub nbd_socket: Option<PathBuf>,
    /// The guest agent: file systems are frozen right before the instant
    /// and thawed right after it (application-consistent); without it, or
    /// if the freeze fails, the instant is crash-consistent.
    pub guest_agent: Option<&'a mut GuestAgent>,
    /// Where the private temporary folder (overlays, socket) is created;
    /// `None` is the system's. QEMU must be able to create and write files
    /// there (think of its user and of AppArmor/SELinux), and the overlays
    /// grow by the amount of data the guest overwrites during the backup.
    pub work_dir: Option<PathBuf>,
    /// How many readers each disk's source allows at once.
    pub connections: u32,
    /// How long cleanup waits for QEMU to confirm an export or job is gone.
    pub event_timeout: Duration,
}

impl Default for LiveOptions<'_> {
    fn default() -> Self {
        LiveOptions {
            nbd_socket: None,
            guest_agent: None,
            work_dir: None,
            connections: DEFAULT_CONNECTIONS,
            event_timeout: DEFAULT_EVENT_TIMEOUT,
        }
    }
}

/// Whether the instant was application-consistent, and if not, why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreezeReport {
    /// The guest's file systems were frozen at the instant.
    pub frozen: bool,
    /// How many file systems the agent froze.
    pub filesystems: u64,
    /// Why the instant is only crash-consistent (no agent, refused, ...).
    pub reason: Option<String>,
    /// Thawing failed: the guest may still be frozen. Tell the user loudly.
    pub thaw_error: Option<String>,
}

/// The names QEMU knows one disk's session objects by.
#[derive(Debug)]
struct DiskState {
    disk: LiveDisk,
    plan: LiveDiskPlan,
    overlay_file: PathBuf,
    overlay_node: String,
    filter_node: String,
    job: String,
    export: String,
    /// The bitmap the export offers: the read bitmap or a frozen copy.
    exported_bitmap: Option<String>,
    /// The frozen copy of `freeze_copy_of`.
    copy: Option<String>,
    /// An internal recording bitmap when the plan adds none, so abort can
    /// still merge the writes since the instant back into the read bitmap.
    tracker: Option<String>,
    overlay_added: bool,
    export_added: bool,
    size: u64,
}

/// A point in time of a running VM's disks, exported over NBD.
///
/// Dropping a session that was neither committed nor aborted aborts it.
#[derive(Debug)]
pub struct LiveSession<'q> {
    qmp: &'q mut QmpClient,
    token: String,
    disks: Vec<DiskState>,
    dir: Option<tempfile::TempDir>,
    nbd_socket: PathBuf,
    user_socket: bool,
    server_started: bool,
    /// The transaction ran: jobs exist and bitmaps were rotated.
    rotated: bool,
    freeze: FreezeReport,
    connections: u32,
    event_timeout: Duration,
    finished: bool,
}

impl<'q> LiveSession<'q> {
    /// Takes the point in time of the planned disks and exports it.
    ///
    /// Steps: check the plans against the VM's disks and bitmaps; create
    /// the overlays in a private temporary folder; start (or find) the NBD
    /// server; `blockdev-add` the overlays; freeze the guest; run the one
    /// transaction; thaw; export each view with its bitmap and check that
    /// it can be read. On any error everything done so far is undone and
    /// the error names the disk and carries QEMU's message.
    pub fn begin(
        qmp: &'q mut QmpClient,
        plans: &[LiveDiskPlan],
        options: LiveOptions<'_>,
    ) -> Result<Self> {
        let token = format!("{:08x}", random_u64() & 0xffff_ffff);
        let disks = plan_disks(qmp, plans, &token)?;
        let mut session = LiveSession {
            qmp,
            token,
            disks,
            dir: None,
            nbd_socket: PathBuf::new(),
            user_socket: false,
            server_started: false,
            rotated: false,
            freeze: FreezeReport::default(),
            connections: options.connections.max(1),
            event_timeout: options.event_timeout,
            finished: false,
        };
        match session.start(options) {
            Ok(()) => Ok(session),
            Err(e) => {
                let _ = session.finish(false);
                Err(with_thaw_error(e, &session.freeze))
            }
        }
    }

    fn start(&mut self, options: LiveOptions<'_>) -> Result<()> {
        self.create_overlays(options.work_dir.as_deref())?;
        self.start_nbd_server(options.nbd_socket)?;
        self.add_overlay_nodes()?;
        self.take_instant(options.guest_agent)?;
        self.add_exports()
    }

    /// The random token in the names of everything this session creates.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The disks, in plan order.
    pub fn disks(&self) -> Vec<&LiveDisk> {
        self.disks.iter().map(|d| &d.disk).collect()
    }

    /// The NBD export names, in plan order.
    pub fn export_names(&self) -> Vec<&str> {
        self.disks.iter().map(|d| d.export.as_str()).collect()
    }

    /// The private temporary folder holding the overlays (removed at the
    /// end).
    pub fn work_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    /// The socket of the NBD server the exports are on.
    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// Whether the instant was application-consistent (guest frozen).
    pub fn frozen(&self) -> bool {
        self.freeze.frozen
    }

    /// The details of the freeze: why not frozen, thaw problems.
    pub fn freeze_report(&self) -> &FreezeReport {
        &self.freeze
    }

    /// One source per disk, in plan order: the disk as it was at the
    /// instant, recorded with the disk's format; `changed()` answers from
    /// the exported bitmap when the plan has one.
    pub fn sources(&self) -> Vec<Box<dyn DiskSource>> {
        self.disks
            .iter()
            .map(|d| {
                let options = NbdExportOptions {
                    export: d.export.clone(),
                    bitmap: d.exported_bitmap.clone(),
                    format: d.disk.format.clone(),
                    connections: self.connections,
                };
                let source = NbdExportSource::with_size(&self.nbd_socket, options, d.size);
                Box::new(source) as Box<dyn DiskSource>
            })
            .collect()
    }

    /// The backup succeeded: removes the plans' `remove_after` bitmaps
    /// and the frozen copies, then cleans up. If the point-in-time view
    /// broke during the backup (the fleecing job ended), this aborts
    /// instead and fails, because what was read may mix two instants.
    pub fn commit(mut self) -> Result<()> {
        let healthy = self.check_jobs();
        let finished = self.finish(healthy.is_ok());
        healthy.and(finished)
    }

    /// The backup failed: undoes the bitmap rotation (the added bitmaps'
    /// changes are merged back into the read bitmap, which records again;
    /// the added bitmaps are removed), then cleans up.
    pub fn abort(mut self) -> Result<()> {
        self.finish(false)
    }

    /// Cleanup in a fixed order, each step tolerant of earlier failures;
    /// returns the first error.
    fn finish(&mut self, commit: bool) -> Result<()> {
        self.finished = true;
        let mut first = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        note(self.delete_exports());
        if self.rotated {
            note(if commit {
                self.commit_bitmaps()
            } else {
                self.undo_bitmaps()
            });
        }
        note(self.cancel_jobs());
        note(self.delete_overlay_nodes());
        note(self.remove_dir());
        note(self.stop_nbd_server());
        first.map_or(Ok(()), Err)
    }
}

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.finish(false);
        }
    }
}

/// Checks the plans against the VM's disks and bitmaps and names the
/// session's objects.
fn plan_disks(qmp: &mut QmpClient, plans: &[LiveDiskPlan], token: &str) -> Result<Vec<DiskState>> {
    if plans.is_empty() {
        return Err(Error::InvalidRequest("no disks to back up".into()));
    }
    let disks = discover_disks(qmp)?;
    let mut states = Vec::with_capacity(plans.len());
    for (i, plan) in plans.iter().enumerate() {
        if plans[..i].iter().any(|p| p.node == plan.node) {
            return Err(Error::InvalidRequest(format!(
                "block node '{}' is planned twice",
                plan.node
            )));
        }
        let disk = find_disk(&disks, &plan.node)?;
        check_plan(disk, plan).map_err(|e| e.for_disk(&disk.name))?;
        states.push(DiskState::new(disk.clone(), plan.clone(), token, i));
    }
    Ok(states)
}

/// Refuses plans QEMU would refuse with a less helpful message, and plans
/// that would silently lose changes.
fn check_plan(disk: &LiveDisk, plan: &LiveDiskPlan) -> Result<()> {
    if plan.read_bitmap.is_some() && plan.freeze_copy_of.is_some() {
        return Err(Error::InvalidRequest(
            "a plan reads either a bitmap (read_bitmap) or a frozen copy (freeze_copy_of), not both".into(),
        ));
    }
    if let Some(name) = plan.source_bitmap() {
        let bitmap = disk.bitmap(name).ok_or_else(|| {
            Error::InvalidRequest(format!("node '{}' has no dirty bitmap '{name}'", disk.node))
        })?;
        if bitmap.inconsistent {
            return Err(Error::InvalidRequest(format!(
                "dirty bitmap '{name}' is inconsistent (QEMU stopped uncleanly while it was recording); a full backup is needed"
            )));
        }
        if !bitmap.recording {
            return Err(Error::InvalidRequest(format!(
                "dirty bitmap '{name}' is not recording, so it cannot tell what changed up to now"
            )));
        }
    }
    for name in &plan.add_bitmaps {
        img::check_bitmap_name(name)?;
        if disk.bitmap(name).is_some() {
            return Err(Error::InvalidRequest(format!(
                "dirty bitmap '{name}' already exists on node '{}'",
                disk.node
            )));
        }
    }
    Ok(())
}

/// Whether QEMU accepts `name` in an id (export, node, job): letters,
/// digits, `-`, `.` and `_`, starting with a letter.
fn is_qemu_id(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

impl DiskState {
    fn new(disk: LiveDisk, plan: LiveDiskPlan, token: &str, index: usize) -> Self {
        let prefix = format!("vbackup-{token}");
        let copy = plan
            .freeze_copy_of
            .as_ref()
            .map(|_| format!("vbackup-tmp-{token}-{index}"));
        let tracker = (plan.read_bitmap.is_some() && plan.add_bitmaps.is_empty())
            .then(|| format!("vbackup-trk-{token}-{index}"));
        DiskState {
            overlay_file: PathBuf::from(format!("overlay-{index}.qcow2")),
            overlay_node: format!("{prefix}-ov{index}"),
            filter_node: format!("{prefix}-cbw{index}"),
            job: format!("{prefix}-job{index}"),
            // Named after the node when QEMU takes that as an id; nodes
            // QEMU named itself (`#block123`, what `-drive` gets) are not.
            export: match is_qemu_id(&disk.node) {
                true => format!("{prefix}-{}", disk.node),
                false => format!("{prefix}-disk{index}"),
            },
            exported_bitmap: copy.clone().or_else(|| plan.read_bitmap.clone()),
            copy,
            tracker,
            overlay_added: false,
            export_added: false,
            size: disk.size,
            disk,
            plan,
        }
    }

    /// This disk's part of the transaction: the fleecing job and the
    /// bitmap rotation.
    fn actions(&self) -> Vec<Value> {
        let node = self.disk.node.as_str();
        let mut actions = vec![action(
            "blockdev-backup",
            json!({"job-id": self.job, "device": node, "target": self.overlay_node,
                   "sync": "none", "filter-node-name": self.filter_node}),
        )];
        if let Some(name) = &self.plan.read_bitmap {
            actions.push(action(
                "block-dirty-bitmap-disable",
                json!({"node": node, "name": name}),
            ));
        }
        if let (Some(copy), Some(source)) = (&self.copy, &self.plan.freeze_copy_of) {
            let granularity = self.disk.bitmap(source).map(|b| b.granularity);
            let mut add =
                json!({"node": node, "name": copy, "persistent": false, "disabled": true});
            if let Some(g) = granularity {
                add["granularity"] = json!(g);
            }
            actions.push(action("block-dirty-bitmap-add", add));
            actions.push(action(
                "block-dirty-bitmap-merge",
                json!({"node": node, "target": copy, "bitmaps": [source]}),
            ));
        }
        // Fine bitmaps (4 KiB up to 1 TiB): scattered small writes are
        // read back at their size (see `img::tracking_granularity`).
        let granularity = crate::img::tracking_granularity(self.disk.size);
        for name in &self.plan.add_bitmaps {
            actions.push(action(
                "block-dirty-bitmap-add",
                json!({"node": node, "name": name, "persistent": true, "disabled": false,
                       "granularity": granularity}),
            ));
        }
        if let Some(tracker) = &self.tracker {
            actions.push(action(
                "block-dirty-bitmap-add",
                json!({"node": node, "name": tracker, "persistent": false, "disabled": false,
                       "granularity": granularity}),
            ));
        }
        actions
    }

    /// Bitmaps recording since the instant.
    fn new_bitmaps(&self) -> Vec<&str> {
        let added = self.plan.add_bitmaps.iter().map(String::as_str);
        added.chain(self.tracker.as_deref()).collect()
    }

    /// Undo actions: the writes since the instant go back into the read
    /// bitmap, which records again; whatever the session added goes.
    fn undo_actions(&self) -> Vec<Value> {
        let node = self.disk.node.as_str();
        let mut actions = Vec::new();
        if let Some(read) = &self.plan.read_bitmap {
            actions.push(action(
                "block-dirty-bitmap-merge",
                json!({"node": node, "target": read, "bitmaps": self.new_bitmaps()}),
            ));
            actions.push(action(
                "block-dirty-bitmap-enable",
                json!({"node": node, "name": read}),
            ));
        }
        for name in self.new_bitmaps().into_iter().chain(self.copy.as_deref()) {
            actions.push(action(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": name}),
            ));
        }
        actions
    }

    /// Bitmaps [`LiveSession::commit`] removes.
    fn commit_removals(&self) -> Vec<&str> {
        let listed = self.plan.remove_after.iter().map(String::as_str);
        listed
            .chain(self.copy.as_deref())
            .chain(self.tracker.as_deref())
            .collect()
    }
}

// The steps of `begin`, in order.
impl LiveSession<'_> {
    fn create_overlays(&mut self, work_dir: Option<&Path>) -> Result<()> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("vbackup-live-");
        let dir = match work_dir {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .map_err(|e| {
            Error::io(
                "creating a temporary folder for the point-in-time overlays",
                e,
            )
        })?;
        for d in &mut self.disks {
            d.overlay_file = dir.path().join(&d.overlay_file);
            img::create(&d.overlay_file, "qcow2", d.disk.size)
                .map_err(|e| e.for_disk(&d.disk.name))?;
        }
        self.dir = Some(dir);
        Ok(())
    }

    /// Starts QEMU's NBD server on a private socket, or uses the one the
    /// user named when QEMU already runs a server.
    fn start_nbd_server(&mut self, user_socket: Option<PathBuf>) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Err(Error::InvalidRequest("no temporary folder".into()));
        };
        let socket = dir.path().join("nbd.sock");
        process::check_socket_path(&socket)?;
        match self.qmp.nbd_server_start_unix(&socket) {
            Ok(()) => {
                self.server_started = true;
                self.nbd_socket = socket;
                Ok(())
            }
            Err(Error::Qmp { desc, .. }) => match user_socket {
                Some(path) => {
                    self.user_socket = true;
                    self.nbd_socket = path;
                    Ok(())
                }
                None => Err(Error::InvalidRequest(format!(
                    "QEMU could not start an NBD server for the backup ({desc}); if QEMU already runs one (it allows only one), pass its unix socket with --nbd-socket"
                ))),
            },
            Err(e) => Err(e),
        }
    }

    /// `blockdev-add`s each overlay with the disk's node as backing.
    fn add_overlay_nodes(&mut self) -> Result<()> {
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let args = json!({
                "driver": "qcow2",
                "node-name": d.overlay_node,
                "file": {"driver": "file", "filename": d.overlay_file},
                "backing": d.disk.node,
            });
            let name = d.disk.name.clone();
            self.qmp
                .execute("blockdev-add", args)
                .map_err(|e| e.for_disk(name))?;
            self.disks[i].overlay_added = true;
        }
        Ok(())
    }

    /// Freeze, the one transaction, thaw.
    fn take_instant(&mut self, agent: Option<&mut GuestAgent>) -> Result<()> {
        let actions: Vec<Value> = self.disks.iter().flat_map(DiskState::actions).collect();
        let mut agent = agent;
        let (report, needs_thaw) = freeze(agent.as_deref_mut());
        self.freeze = report;
        let result = self.qmp.execute("transaction", json!({"actions": actions}));
        if let (Some(agent), true) = (agent, needs_thaw) {
            thaw(agent, &mut self.freeze);
        }
        match result {
            Ok(_) => {
                self.rotated = true;
                Ok(())
            }
            Err(e) => {
                // A timeout leaves it open whether QEMU ran it; its jobs tell.
                self.rotated = !matches!(e, Error::Qmp { .. }) && self.jobs_exist();
                Err(e)
            }
        }
    }

    fn jobs_exist(&mut self) -> bool {
        match self.qmp.query_block_jobs() {
            Ok(jobs) => jobs
                .iter()
                .any(|j| self.disks.iter().any(|d| d.job == j.device)),
            Err(_) => true,
        }
    }

    /// Exports each view read-only with its bitmap, then reads its size
    /// over NBD: proves the export works and that the bitmap is offered.
    fn add_exports(&mut self) -> Result<()> {
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let mut args = json!({
                "type": "nbd", "id": d.export, "node-name": d.overlay_node,
                "name": d.export, "writable": false,
            });
            if let Some(bitmap) = &d.exported_bitmap {
                args["bitmaps"] = json!([{"node": d.disk.node, "name": bitmap}]);
            }
            let name = d.disk.name.clone();
            self.qmp
                .execute("block-export-add", args)
                .map_err(|e| e.for_disk(&name))?;
            self.disks[i].export_added = true;
            let size = self.probe_export(i).map_err(|e| e.for_disk(&name))?;
            self.disks[i].size = size;
        }
        Ok(())
    }

    fn probe_export(&self, i: usize) -> Result<u64> {
        let d = &self.disks[i];
        let options = NbdExportOptions {
            export: d.export.clone(),
            bitmap: d.exported_bitmap.clone(),
            format: d.disk.format.clone(),
            connections: 1,
        };
        let source = NbdExportSource::open(&self.nbd_socket, options).map_err(|e| {
            if self.user_socket {
                Error::InvalidRequest(format!(
                    "{e} (is {} the socket of this QEMU's NBD server?)",
                    self.nbd_socket.display()
                ))
            } else {
                e
            }
        })?;
        let size = source.virtual_size();
        if size < d.disk.size {
            return Err(Error::InvalidRequest(format!(
                "the export serves {size} bytes, less than the disk's {}",
                d.disk.size
            )));
        }
        Ok(d.disk.size)
    }
}

/// Freezes the guest's file systems if an agent is there; never fails:
/// a refusal makes the instant crash-consistent, with the reason. Also
/// says whether a thaw is needed: after a freeze, and after a timeout,
/// which leaves the guest's state unknown.
fn freeze(agent: Option<&mut GuestAgent>) -> (FreezeReport, bool) {
    let Some(agent) = agent else {
        let report = FreezeReport {
            reason: Some("no guest agent".into()),
            ..FreezeReport::default()
        };
        return (report, false);
    };
    match agent.fsfreeze_freeze() {
        Ok(n) => {
            let report = FreezeReport {
                frozen: true,
                filesystems: n,
                ..FreezeReport::default()
            };
            (report, true)
        }
        Err(e) => {
            let report = FreezeReport {
                reason: Some(format!(
                    "the guest agent did not freeze the file systems: {e}"
                )),
                ..FreezeReport::default()
            };
            (report, e.kind() == io::ErrorKind::TimedOut)
        }
    }
}

/// A failed begin must not hide that the guest may still be frozen.
fn with_thaw_error(error: Error, freeze: &FreezeReport) -> Error {
    match &freeze.thaw_error {
        None => error,
        Some(thaw) => Error::InvalidRequest(format!(
            "{error}; moreover the guest's file systems could not be thawed and may still be frozen: {thaw}"
        )),
    }
}

/// Thaws after the transaction (also when it failed). Tried twice: a
/// guest left frozen is worse than a failed backup.
fn thaw(agent: &mut GuestAgent, report: &mut FreezeReport) {
    let first = agent.fsfreeze_thaw();
    let result = first.or_else(|_| agent.sync().and_then(|()| agent.fsfreeze_thaw()));
    if let Err(e) = result {
        report.thaw_error = Some(e.to_string());
    }
}

// The steps of cleanup, in order; each one tolerates the others' failures.
impl LiveSession<'_> {
    /// Fails if a fleecing job is gone or failed: the view is not a
    /// single instant any more.
    fn check_jobs(&mut self) -> Result<()> {
        if !self.rotated {
            return Ok(());
        }
        let jobs = self.qmp.query_block_jobs()?;
        for d in &self.disks {
            let job = jobs.iter().find(|j| j.device == d.job);
            match job {
                Some(j) if j.is_alive() => {}
                other => {
                    let state = other.map_or("gone".to_owned(), |j| match &j.error {
                        Some(e) => format!("{} ({e})", j.status),
                        None => j.status.clone(),
                    });
                    return Err(Error::InvalidRequest(format!(
                        "the point-in-time view broke during the backup (fleecing job {} is {state}); the backup is not consistent",
                        d.job
                    ))
                    .for_disk(&d.disk.name));
                }
            }
        }
        Ok(())
    }

    fn delete_exports(&mut self) -> Result<()> {
        let mut first = Ok(());
        for i in 0..self.disks.len() {
            if !self.disks[i].export_added {
                continue;
            }
            let id = self.disks[i].export.clone();
            let result = self.delete_export(&id);
            if result.is_ok() {
                self.disks[i].export_added = false;
            }
            first = first.and(result.map_err(|e| e.for_disk(&self.disks[i].disk.name)));
        }
        first
    }

    fn delete_export(&mut self, id: &str) -> Result<()> {
        let args = json!({"id": id, "mode": "hard"});
        self.qmp.execute("block-export-del", args)?;
        let timeout = self.event_timeout;
        self.qmp
            .wait_event("BLOCK_EXPORT_DELETED", |d| d["id"] == id, timeout)
            .map(drop)
    }

    fn commit_bitmaps(&mut self) -> Result<()> {
        let mut first = Ok(());
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let node = d.disk.node.clone();
            let disk = d.disk.name.clone();
            let names: Vec<String> = d.commit_removals().into_iter().map(str::to_owned).collect();
            for name in names {
                let result = self.qmp.bitmap_remove(&node, &name);
                first = first.and(result.map_err(|e| e.for_disk(&disk)));
            }
        }
        first
    }

    fn undo_bitmaps(&mut self) -> Result<()> {
        let actions: Vec<Value> = self
            .disks
            .iter()
            .flat_map(DiskState::undo_actions)
            .collect();
        if actions.is_empty() {
            return Ok(());
        }
        self.qmp
            .execute("transaction", json!({"actions": actions}))
            .map(drop)
    }

    fn cancel_jobs(&mut self) -> Result<()> {
        if !self.rotated {
            return Ok(());
        }
        let mut first = Ok(());
        for i in 0..self.disks.len() {
            let job = self.disks[i].job.clone();
            let result = self.cancel_job(&job);
            first = first.and(result.map_err(|e| e.for_disk(&self.disks[i].disk.name)));
        }
        first
    }

    fn cancel_job(&mut self, job: &str) -> Result<()> {
        let args = json!({"device": job, "force": true});
        match self.qmp.execute("block-job-cancel", args) {
            Ok(_) => {}
            // Already gone (it failed or was cancelled): nothing to wait for.
            Err(Error::Qmp { class, .. }) if class == "DeviceNotActive" => return Ok(()),
            Err(e) => return Err(e),
        }
        let timeout = self.event_timeout;
        self.qmp.wait_any_event(
            &["BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"],
            |d| d["device"] == job,
            timeout,
        )?;
        // Auto-dismissed right after: only then is the overlay free.
        self.qmp
            .wait_event(
                "JOB_STATUS_CHANGE",
                |d| d["id"] == job && d["status"] == "null",
                timeout,
            )
            .map(drop)
    }

    fn delete_overlay_nodes(&mut self) -> Result<()> {
        let mut first = Ok(());
        for i in 0..self.disks.len() {
            if !self.disks[i].overlay_added {
                continue;
            }
            let node = self.disks[i].overlay_node.clone();
            let result = self.qmp.execute("blockdev-del", json!({"node-name": node}));
            if result.is_ok() {
                self.disks[i].overlay_added = false;
            }
            first = first.and(
                result
                    .map(drop)
                    .map_err(|e| e.for_disk(&self.disks[i].disk.name)),
            );
        }
        first
    }

    fn remove_dir(&mut self) -> Result<()> {
        match self.dir.take() {
            Some(dir) => dir
                .close()
                .map_err(|e| Error::io("removing the point-in-time overlays", e)),
            None => Ok(()),
        }
    }

    fn stop_nbd_server(&mut self) -> Result<()> {
        if !self.server_started {
            return Ok(());
        }
        self.server_started = false;
        self.qmp.nbd_server_stop()
    }
}
