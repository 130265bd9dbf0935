//! Changed-block tracking plans: "trust, then verify the base".
//!
//! Before an incremental or differential backup reads only what a dirty
//! bitmap marks, this module checks everything the shortcut depends on: the
//! bitmap the previous snapshot recorded exists, records, is consistent, the
//! disk has the same size, and the base snapshot's index and chunks are
//! intact in the repository. If any check fails, the plan says to read the
//! whole disk and why — a wrong incremental is never produced — and the new
//! bitmaps it creates repair the tracking for the next run.
//!
//! Pure logic over what the caller observed (bitmaps on the image or node)
//! and the repository; no QEMU here.

use std::collections::HashSet;

use crate::format::{BackupType, DiskIndex, DiskRecord, Tracking};
use crate::{BaseIndex, ChunkId, Repository, Snapshot};

/// Prefix of every bitmap vbackup creates; others are never touched.
pub const BITMAP_PREFIX: &str = "vbackup-";

/// The backup type a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// Incremental when a valid base exists, else full.
    Auto,
    /// Always read everything.
    Full,
    /// Changes since the VM's previous snapshot.
    Incremental,
    /// Changes since the VM's last full snapshot.
    Differential,
}

/// A dirty bitmap as found on the image or node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedBitmap {
    /// Its name.
    pub name: String,
    /// Whether it is recording writes (enabled).
    pub recording: bool,
    /// False when QEMU flags it inconsistent (an unclean shutdown).
    pub consistent: bool,
}

/// What the caller found about one disk before the backup.
#[derive(Debug, Clone)]
pub struct DiskObservation {
    /// The disk's name in the VM.
    pub name: String,
    /// Its current virtual size.
    pub size: u64,
    /// Its dirty bitmaps.
    pub bitmaps: Vec<ObservedBitmap>,
    /// `None` when the disk can hold bitmaps; else why not (e.g. a raw image).
    pub untrackable: Option<String>,
}

/// What to read and how to rotate the bitmaps of one disk.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    /// The disk's name.
    pub name: String,
    /// What this disk's backup is.
    pub backup_type: BackupType,
    /// The bitmap to read changes from and the base index; `None` = read everything.
    pub changes: Option<(String, BaseIndex)>,
    /// Why everything is read although an incremental or differential was
    /// asked for (or possible with `auto`).
    pub fallback_reason: Option<String>,
    /// Bitmaps to create (persistent, recording) at the backup's instant.
    pub add_bitmaps: Vec<String>,
    /// vbackup bitmaps to remove once the snapshot is safe.
    pub remove_bitmaps: Vec<String>,
    /// The tracking record for the new snapshot (`None` for untrackable disks).
    pub tracking: Option<Tracking>,
    /// True when the read bitmap keeps recording afterwards (differential:
    /// the "since last full" bitmap); the caller must read a frozen copy.
    pub read_bitmap_stays: bool,
}

/// Inputs shared by the plans of all disks of one backup.
pub struct Planner<'a> {
    repo: &'a Repository,
    /// Snapshots of this VM, oldest first.
    snapshots: Vec<Snapshot>,
    known: std::borrow::Cow<'a, HashSet<ChunkId>>,
    method: String,
    token: String,
}

impl<'a> Planner<'a> {
    /// Prepares planning for `vm`, whose bitmaps live where `method` says
    /// (`qcow2` or `qmp`).
    pub fn new(repo: &'a Repository, vm: &str, method: &str) -> crate::Result<Self> {
        let known = repo.list_chunks()?.into_keys().collect();
        Self::build(repo, vm, method, std::borrow::Cow::Owned(known))
    }

    /// [`Planner::new`] for a started backup: base snapshots are checked
    /// against the chunks and snapshots it read when it began
    /// ([`crate::BackupStart`]), instead of reading them again.
    pub fn for_backup(
        repo: &'a Repository,
        vm: &str,
        method: &str,
        start: &'a crate::BackupStart,
    ) -> crate::Result<Self> {
        let snapshots = start
            .snapshots()
            .iter()
            .filter(|s| s.manifest.vm == vm)
            .cloned()
            .collect();
        Self::with_parts(
            repo,
            method,
            snapshots,
            std::borrow::Cow::Borrowed(start.stored()),
        )
    }

    fn build(
        repo: &'a Repository,
        vm: &str,
        method: &str,
        known: std::borrow::Cow<'a, HashSet<ChunkId>>,
    ) -> crate::Result<Self> {
        let (all, _) = repo.list_snapshots_checked()?;
        let now = chrono::Utc::now();
        let snapshots = all
            .into_iter()
            .filter(|s| s.manifest.vm == vm && !s.is_future_dated(now))
            .collect();
        Self::with_parts(repo, method, snapshots, known)
    }

    fn with_parts(
        repo: &'a Repository,
        method: &str,
        snapshots: Vec<Snapshot>,
        known: std::borrow::Cow<'a, HashSet<ChunkId>>,
    ) -> crate::Result<Self> {
        let token = hex::encode(crate::crypto::random_bytes::<6>()?);
        Ok(Self {
            repo,
            snapshots,
            known,
            method: method.to_string(),
            token,
        })
    }

    /// The plan for one disk.
    pub fn plan(&self, requested: Requested, disk: &DiskObservation) -> DiskPlan {
        let new_incremental = format!("{BITMAP_PREFIX}inc-{}", self.token);
        let new_full = format!("{BITMAP_PREFIX}full-{}", self.token);
        if let Some(why) = &disk.untrackable {
            let reason = (requested != Requested::Full && requested != Requested::Auto)
                .then(|| format!("no changed-block tracking: {why}"));
            return DiskPlan::full(&disk.name, reason, Vec::new(), None);
        }
        let attempt = match requested {
            Requested::Full => Err(None),
            Requested::Auto | Requested::Incremental => self.incremental(disk).map_err(Some),
            Requested::Differential => self.differential(disk).map_err(Some),
        };
        let stale = |keep: &[&str]| -> Vec<String> {
            disk.bitmaps
                .iter()
                .filter(|b| b.name.starts_with(BITMAP_PREFIX) && !keep.contains(&b.name.as_str()))
                .map(|b| b.name.clone())
                .collect()
        };
        match attempt {
            Ok(found) => {
                let backup_type = if found.differential {
                    BackupType::Differential
                } else {
                    BackupType::Incremental
                };
                let tracking = Tracking {
                    method: self.method.clone(),
                    incremental_bitmap: new_incremental.clone(),
                    full_bitmap: found.full_bitmap.clone(),
                    full_snapshot: found.full_snapshot.clone(),
                };
                DiskPlan {
                    name: disk.name.clone(),
                    backup_type,
                    remove_bitmaps: stale(&[&found.full_bitmap]),
                    changes: Some((found.read_bitmap, found.base)),
                    fallback_reason: None,
                    add_bitmaps: vec![new_incremental],
                    tracking: Some(tracking),
                    read_bitmap_stays: found.differential,
                }
            }
            Err(reason) => {
                let reason =
                    reason.filter(|_| requested != Requested::Auto || !self.first_backup(disk));
                let tracking = Tracking {
                    method: self.method.clone(),
                    incremental_bitmap: new_incremental.clone(),
                    full_bitmap: new_full.clone(),
                    full_snapshot: None,
                };
                DiskPlan::full(
                    &disk.name,
                    reason,
                    vec![new_incremental, new_full],
                    Some(tracking),
                )
                .with_removals(stale(&[]))
            }
        }
    }

    /// True when no snapshot of this VM has this disk yet.
    fn first_backup(&self, disk: &DiskObservation) -> bool {
        !self
            .snapshots
            .iter()
            .any(|s| s.manifest.disks.iter().any(|d| d.name == disk.name))
    }

    /// The latest snapshot with this disk, and its record.
    fn latest_with(&self, name: &str) -> Option<(&Snapshot, &DiskRecord)> {
        self.snapshots.iter().rev().find_map(|s| {
            s.manifest
                .disks
                .iter()
                .find(|d| d.name == name)
                .map(|d| (s, d))
        })
    }

    fn incremental(&self, disk: &DiskObservation) -> Result<Found, String> {
        let (snapshot, record) = self
            .latest_with(&disk.name)
            .ok_or_else(|| format!("no earlier snapshot of disk '{}'", disk.name))?;
        let tracking = self.tracking_of(snapshot, record)?;
        self.check_bitmap(disk, &tracking.incremental_bitmap)?;
        self.check_sole_starter(&tracking.incremental_bitmap, record, |_, t| {
            t.incremental_bitmap == tracking.incremental_bitmap
        })?;
        let base = self.check_base(snapshot, record, disk)?;
        Ok(Found {
            read_bitmap: tracking.incremental_bitmap.clone(),
            base,
            full_bitmap: tracking.full_bitmap.clone(),
            full_snapshot: tracking
                .full_snapshot
                .clone()
                .or_else(|| Some(snapshot.id.clone())),
            differential: false,
        })
    }

    fn differential(&self, disk: &DiskObservation) -> Result<Found, String> {
        let (latest, record) = self
            .latest_with(&disk.name)
            .ok_or_else(|| format!("no earlier snapshot of disk '{}'", disk.name))?;
        let tracking = self.tracking_of(latest, record)?;
        let full_id = tracking
            .full_snapshot
            .clone()
            .unwrap_or_else(|| latest.id.clone());
        let full = self
            .snapshots
            .iter()
            .find(|s| s.id == full_id)
            .ok_or_else(|| {
                format!(
                    "the last full snapshot {} is gone (forgotten or pruned)",
                    short(&full_id)
                )
            })?;
        let full_record = full
            .manifest
            .disks
            .iter()
            .find(|d| d.name == disk.name)
            .ok_or_else(|| {
                format!(
                    "the last full snapshot {} has no disk '{}'",
                    short(&full_id),
                    disk.name
                )
            })?;
        self.check_bitmap(disk, &tracking.full_bitmap)?;
        self.check_sole_starter(&tracking.full_bitmap, full_record, |s, t| {
            t.full_bitmap == tracking.full_bitmap
                && t.full_snapshot.as_ref().is_none_or(|f| *f == s.id)
        })?;
        let base = self.check_base(full, full_record, disk)?;
        Ok(Found {
            read_bitmap: tracking.full_bitmap.clone(),
            base,
            full_bitmap: tracking.full_bitmap.clone(),
            full_snapshot: Some(full_id),
            differential: true,
        })
    }

    fn tracking_of<'s>(
        &self,
        snapshot: &Snapshot,
        record: &'s DiskRecord,
    ) -> Result<&'s Tracking, String> {
        let tracking = record.tracking.as_ref().ok_or_else(|| {
            format!(
                "snapshot {} started no changed-block tracking for this disk",
                short(&snapshot.id)
            )
        })?;
        if tracking.method != self.method {
            return Err(format!(
                "snapshot {} tracked this disk through {}, this backup reads it through {}",
                short(&snapshot.id),
                tracking.method,
                self.method
            ));
        }
        Ok(tracking)
    }

    /// A base is only the snapshot that started the bitmap to be read:
    /// every snapshot of this VM that claims to have started it must record
    /// the same content (index) for the disk as the base. Snapshots of an
    /// unchanged image legitimately repeat the tracking of the one before
    /// with its index; a forged or replayed manifest copying the tracking
    /// with other content makes the claim ambiguous, and then no snapshot
    /// is trusted as a base and everything is read.
    fn check_sole_starter(
        &self,
        bitmap: &str,
        base: &DiskRecord,
        started: impl Fn(&Snapshot, &Tracking) -> bool,
    ) -> Result<(), String> {
        let disagreeing: Vec<&str> = self
            .snapshots
            .iter()
            .filter(|s| {
                s.manifest
                    .disks
                    .iter()
                    .filter(|d| d.name == base.name && d.index != base.index)
                    .filter_map(|d| d.tracking.as_ref())
                    .any(|t| started(s, t))
            })
            .map(|s| short(&s.id))
            .collect();
        match disagreeing.as_slice() {
            [] => Ok(()),
            _ => Err(format!(
                "snapshot(s) {} claim to have started dirty bitmap '{bitmap}' with other content than the base (a forged or replayed manifest?); no snapshot is trusted as a base",
                disagreeing.join(", ")
            )),
        }
    }

    fn check_bitmap(&self, disk: &DiskObservation, name: &str) -> Result<(), String> {
        let bitmap = disk.bitmaps.iter().find(|b| b.name == name).ok_or_else(|| {
            format!("dirty bitmap '{name}' is missing (deleted, or lost when the VM or daemon restarted)")
        })?;
        if !bitmap.consistent {
            return Err(format!(
                "dirty bitmap '{name}' is inconsistent (the image was not closed cleanly)"
            ));
        }
        if !bitmap.recording {
            return Err(format!("dirty bitmap '{name}' is not recording writes"));
        }
        Ok(())
    }

    fn check_base(
        &self,
        snapshot: &Snapshot,
        record: &DiskRecord,
        disk: &DiskObservation,
    ) -> Result<BaseIndex, String> {
        if record.virtual_size != disk.size {
            return Err(format!(
                "the disk was resized from {} to {} bytes",
                record.virtual_size, disk.size
            ));
        }
        if record.chunk_size != self.repo.config().chunk_size {
            return Err("the base snapshot uses another chunk size".to_string());
        }
        let index = self
            .repo
            .read_index(&record.index)
            .map_err(|e| format!("the base snapshot {} is damaged: {e}", short(&snapshot.id)))?;
        check_index_complete(&index, &self.known).map_err(|missing| {
            format!(
                "the base snapshot {} is damaged: {missing}",
                short(&snapshot.id)
            )
        })?;
        Ok(BaseIndex {
            snapshot: snapshot.id.clone(),
            index,
        })
    }
}

/// A usable base found for a disk.
struct Found {
    read_bitmap: String,
    base: BaseIndex,
    full_bitmap: String,
    full_snapshot: Option<String>,
    differential: bool,
}

fn check_index_complete(index: &DiskIndex, known: &HashSet<ChunkId>) -> Result<(), String> {
    let missing = index.ids().filter(|id| !known.contains(id)).count();
    match missing {
        0 => Ok(()),
        n => Err(format!("{n} of its chunks are missing from the repository")),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

impl DiskPlan {
    fn full(
        name: &str,
        reason: Option<String>,
        add: Vec<String>,
        tracking: Option<Tracking>,
    ) -> Self {
        Self {
            name: name.to_string(),
            backup_type: BackupType::Full,
            changes: None,
            fallback_reason: reason,
            add_bitmaps: add,
            remove_bitmaps: Vec::new(),
            tracking,
            read_bitmap_stays: false,
        }
    }

    fn with_removals(mut self, remove: Vec<String>) -> Self {
        self.remove_bitmaps = remove;
        self
    }

    /// The name of the bitmap to read, if any.
    pub fn read_bitmap(&self) -> Option<&str> {
        self.changes.as_ref().map(|(name, _)| name.as_str())
    }
}

/// The type of a snapshot made of these disk plans: full if every disk was
/// read whole, else the type of the tracked disks.
pub fn snapshot_type(plans: &[DiskPlan]) -> BackupType {
    plans
        .iter()
        .map(|p| p.backup_type)
        .find(|t| *t != BackupType::Full)
        .unwrap_or(BackupType::Full)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::{kdf::KdfParams, CipherKind};
    use crate::format::{BackupStats, SnapshotManifest, SNAPSHOT_VERSION};
    use crate::InitOptions;
    use vbackup_storage::MemoryBackend;

    const SIZE: u64 = 4 << 20;

    fn repo() -> Repository {
        let options = InitOptions {
            chunk_size: 1 << 20,
            cipher: CipherKind::None,
            kdf: KdfParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        Repository::init(Arc::new(MemoryBackend::new()), None, &options).unwrap()
    }

    /// Stores a snapshot of one disk "vda" with real chunks and `tracking`.
    fn snapshot(
        repo: &Repository,
        kind: BackupType,
        tracking: Option<Tracking>,
        seconds: u32,
    ) -> String {
        let time = format!("2026-01-01T00:00:{seconds:02}.000Z");
        snapshot_at(repo, kind, tracking, seconds as u8 + 1, &time)
    }

    /// [`snapshot`] at `time`, with chunk content `fill`.
    fn snapshot_at(
        repo: &Repository,
        kind: BackupType,
        tracking: Option<Tracking>,
        fill: u8,
        time: &str,
    ) -> String {
        let data = vec![fill; 1 << 20];
        let id = repo.crypto().chunk_id(&data);
        repo.put_chunk(&id, &repo.encode_chunk(&id, &data).unwrap())
            .unwrap();
        let index = DiskIndex::from_chunks(SIZE, 1 << 20, [Some(id), None, None, None]).unwrap();
        let record = DiskRecord {
            name: "vda".into(),
            source: "/img".into(),
            format: "qcow2".into(),
            virtual_size: SIZE,
            chunk_size: 1 << 20,
            index: repo.write_index(&index).unwrap(),
            data_chunks: 1,
            source_identity: None,
            unchanged_since: None,
            read: crate::format::ReadScope::All,
            base_snapshot: None,
            fallback_reason: None,
            tracking,
        };
        let manifest = SnapshotManifest {
            version: SNAPSHOT_VERSION,
            vm: "vm".into(),
            host: "h".into(),
            time: time.to_string(),
            tags: vec![],
            disks: vec![record],
            stats: BackupStats::default(),
            program_version: "test".into(),
            backup_type: kind,
            consistency: None,
            consistency_note: None,
            definition: None,
            canary: None,
        };
        repo.write_snapshot(&manifest).unwrap()
    }

    fn tracking(inc: &str, full: &str, full_snapshot: Option<&str>) -> Option<Tracking> {
        Some(Tracking {
            method: "qcow2".into(),
            incremental_bitmap: inc.into(),
            full_bitmap: full.into(),
            full_snapshot: full_snapshot.map(str::to_string),
        })
    }

    fn disk(bitmaps: &[(&str, bool, bool)], size: u64) -> DiskObservation {
        DiskObservation {
            name: "vda".into(),
            size,
            bitmaps: bitmaps
                .iter()
                .map(|(n, recording, consistent)| ObservedBitmap {
                    name: n.to_string(),
                    recording: *recording,
                    consistent: *consistent,
                })
                .collect(),
            untrackable: None,
        }
    }

    #[test]
    fn first_backup_is_a_full_without_a_fallback_reason() {
        let repo = repo();
        let plan = Planner::new(&repo, "vm", "qcow2")
            .unwrap()
            .plan(Requested::Auto, &disk(&[], SIZE));
        assert_eq!(plan.backup_type, BackupType::Full);
        assert!(plan.fallback_reason.is_none());
        assert_eq!(plan.add_bitmaps.len(), 2);
    }

    fn observed_a() -> DiskObservation {
        disk(
            &[
                ("vbackup-inc-a", true, true),
                ("vbackup-full-a", true, true),
            ],
            SIZE,
        )
    }

    #[test]
    fn attack_forged_snapshot_claiming_the_real_bitmap_is_no_base_and_neither_is_the_real_one() {
        let repo = repo();
        let full = snapshot(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-a", "vbackup-full-a", None),
            1,
        );
        // A host with the passphrase copies the real tracking into a newer
        // manifest whose chunks are something else.
        let forged = snapshot_at(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-a", "vbackup-full-a", None),
            9,
            "2026-01-01T00:00:30.000Z",
        );
        for requested in [Requested::Incremental, Requested::Differential] {
            let plan = Planner::new(&repo, "vm", "qcow2")
                .unwrap()
                .plan(requested, &observed_a());
            assert_eq!(plan.backup_type, BackupType::Full, "{requested:?}");
            let reason = plan.fallback_reason.unwrap();
            assert!(reason.contains("claim to have started"), "{reason}");
            // Whichever is taken as the base, the other is named.
            assert!(
                reason.contains(&forged[..8]) || reason.contains(&full[..8]),
                "{reason}"
            );
        }
    }

    #[test]
    fn attack_future_dated_snapshot_is_never_a_base() {
        let repo = repo();
        let full = snapshot(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-a", "vbackup-full-a", None),
            1,
        );
        snapshot_at(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-b", "vbackup-full-b", None),
            9,
            "2099-01-01T00:00:00.000Z",
        );
        let plan = Planner::new(&repo, "vm", "qcow2")
            .unwrap()
            .plan(Requested::Incremental, &observed_a());
        assert_eq!(plan.backup_type, BackupType::Incremental);
        assert_eq!(plan.changes.as_ref().unwrap().1.snapshot, full);
    }

    #[test]
    fn incremental_uses_the_previous_incremental_bitmap_and_keeps_the_full_one() {
        let repo = repo();
        let full = snapshot(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-a", "vbackup-full-a", None),
            1,
        );
        let observed = disk(
            &[
                ("vbackup-inc-a", true, true),
                ("vbackup-full-a", true, true),
                ("user", true, true),
            ],
            SIZE,
        );
        let plan = Planner::new(&repo, "vm", "qcow2")
            .unwrap()
            .plan(Requested::Incremental, &observed);
        assert_eq!(plan.backup_type, BackupType::Incremental);
        assert_eq!(plan.read_bitmap(), Some("vbackup-inc-a"));
        assert_eq!(plan.changes.as_ref().unwrap().1.snapshot, full);
        assert_eq!(
            plan.remove_bitmaps,
            vec!["vbackup-inc-a".to_string()],
            "user bitmaps are never touched"
        );
        let tracking = plan.tracking.unwrap();
        assert_eq!(tracking.full_bitmap, "vbackup-full-a");
        assert_eq!(tracking.full_snapshot.as_deref(), Some(full.as_str()));
    }

    #[test]
    fn differential_reads_a_frozen_copy_of_the_full_bitmap_against_the_full() {
        let repo = repo();
        let full = snapshot(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-a", "vbackup-full-a", None),
            1,
        );
        snapshot(
            &repo,
            BackupType::Incremental,
            tracking("vbackup-inc-b", "vbackup-full-a", Some(&full)),
            2,
        );
        let observed = disk(
            &[
                ("vbackup-inc-b", true, true),
                ("vbackup-full-a", true, true),
            ],
            SIZE,
        );
        let plan = Planner::new(&repo, "vm", "qcow2")
            .unwrap()
            .plan(Requested::Differential, &observed);
        assert_eq!(plan.backup_type, BackupType::Differential);
        assert_eq!(plan.read_bitmap(), Some("vbackup-full-a"));
        assert!(plan.read_bitmap_stays);
        assert_eq!(plan.changes.as_ref().unwrap().1.snapshot, full);
        assert_eq!(plan.remove_bitmaps, vec!["vbackup-inc-b".to_string()]);
    }

    #[test]
    fn every_broken_base_falls_back_with_its_reason() {
        let repo = repo();
        snapshot(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-a", "vbackup-full-a", None),
            1,
        );
        let planner = Planner::new(&repo, "vm", "qcow2").unwrap();
        let cases = [
            (disk(&[("vbackup-full-a", true, true)], SIZE), "missing"),
            (
                disk(&[("vbackup-inc-a", true, false)], SIZE),
                "inconsistent",
            ),
            (
                disk(&[("vbackup-inc-a", false, true)], SIZE),
                "not recording",
            ),
            (disk(&[("vbackup-inc-a", true, true)], SIZE * 2), "resized"),
        ];
        for (observed, reason) in cases {
            let plan = planner.plan(Requested::Auto, &observed);
            assert_eq!(plan.backup_type, BackupType::Full, "{reason}");
            let why = plan.fallback_reason.unwrap_or_default();
            assert!(why.contains(reason), "{why:?} should say {reason:?}");
            assert!(plan
                .remove_bitmaps
                .iter()
                .all(|b| b.starts_with(BITMAP_PREFIX)));
        }
        let untracked = DiskObservation {
            untrackable: Some("raw images cannot hold dirty bitmaps".into()),
            ..disk(&[], SIZE)
        };
        let plan = planner.plan(Requested::Incremental, &untracked);
        assert!(plan.fallback_reason.unwrap().contains("raw images"));
        assert!(plan.tracking.is_none() && plan.add_bitmaps.is_empty());
    }

    #[test]
    fn a_base_with_missing_chunks_is_not_trusted() {
        let repo = repo();
        snapshot(
            &repo,
            BackupType::Full,
            tracking("vbackup-inc-a", "vbackup-full-a", None),
            1,
        );
        for chunk in repo.list_chunks().unwrap().keys() {
            repo.backend()
                .delete(&Repository::chunk_key(chunk))
                .unwrap();
        }
        let observed = disk(
            &[
                ("vbackup-inc-a", true, true),
                ("vbackup-full-a", true, true),
            ],
            SIZE,
        );
        let plan = Planner::new(&repo, "vm", "qcow2")
            .unwrap()
            .plan(Requested::Incremental, &observed);
        assert!(plan.fallback_reason.unwrap().contains("damaged"));
    }
}
