//! Boot verification results, stored with the snapshots they prove.
//!
//! `vbackup verify --boot` boots a snapshot in isolation and records what
//! happened as a sealed object `verified/<snapshot id>/<time>-<random>`
//! (object kind 12, JSON, version 1; see `docs/formats.md`). Objects are
//! only ever added (a backup token of the server may add them, like
//! snapshots), so a history of verifications builds up; `snapshots` shows
//! the newest of each snapshot, and `forget` removes them with their
//! snapshot.

use std::collections::BTreeMap;

use crate::format::ObjectKind;
use crate::{Error, Repository, Result};

/// Where boot reports are stored.
pub const BOOT_REPORT_PREFIX: &str = "verified/";
/// The boot report version this build writes and reads.
pub const BOOT_REPORT_VERSION: u32 = 1;

/// One boot verification of one snapshot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BootReport {
    /// Format version.
    pub version: u32,
    /// The snapshot booted (full id).
    pub snapshot: String,
    /// Whether the heartbeat came (and the check, if any, passed).
    pub passed: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What counted as the heartbeat: `agent` or `console:TEXT`.
    pub heartbeat: String,
    /// Seconds from starting QEMU to the heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_to_heartbeat: Option<f64>,
    /// The check command run in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// Its exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_exit: Option<i64>,
    /// The snapshot's canary (live backups with a guest agent): `matched`
    /// when the booted guest holds this snapshot's token, else why it was
    /// not checked. A different token fails the verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// When the verification ran (RFC 3339, UTC).
    pub time: String,
    /// The host it ran on.
    pub host: String,
}

impl BootReport {
    /// `passed` / `failed`, for listings.
    pub fn verdict(&self) -> &'static str {
        match self.passed {
            true => "passed",
            false => "failed",
        }
    }
}

/// The time now, as reports record it (RFC 3339, UTC, seconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Stores `report` beside its snapshot; returns the object's name.
pub fn record_boot_report(repo: &Repository, report: &BootReport) -> Result<String> {
    crate::format::check_file_name("snapshot id", &report.snapshot).map_err(Error::InvalidInput)?;
    let mut random = [0u8; 4];
    getrandom::getrandom(&mut random)
        .map_err(|e| Error::internal(format!("the random source failed: {e}")))?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let key = format!(
        "{BOOT_REPORT_PREFIX}{}/{stamp}-{}",
        report.snapshot,
        hex::encode(random)
    );
    repo.put_sealed_json(ObjectKind::BootReport, &key, report)?;
    Ok(key)
}

/// The newest boot report of every snapshot that has one. A report that
/// does not authenticate, or names another snapshot than its folder, is
/// left out (and named in the second list).
pub fn latest_boot_reports(
    repo: &Repository,
) -> Result<(BTreeMap<String, BootReport>, Vec<String>)> {
    let mut keys: Vec<String> = repo
        .backend()
        .list(BOOT_REPORT_PREFIX)?
        .into_iter()
        .map(|o| o.key)
        .collect();
    // Names sort by time within a snapshot's folder: the last one wins.
    keys.sort();
    let mut newest: BTreeMap<String, String> = BTreeMap::new();
    for key in keys {
        let Some((snapshot, _)) = key[BOOT_REPORT_PREFIX.len()..].split_once('/') else {
            continue;
        };
        newest.insert(snapshot.to_string(), key);
    }
    let mut reports = BTreeMap::new();
    let mut bad = Vec::new();
    for (snapshot, key) in newest {
        match read_boot_report(repo, &key) {
            Ok(report) if report.snapshot == snapshot => {
                reports.insert(snapshot, report);
            }
            Ok(_) | Err(Error::Corrupt { .. } | Error::UnsupportedVersion { .. }) => bad.push(key),
            Err(e) => return Err(e),
        }
    }
    Ok((reports, bad))
}

/// Reads one boot report.
pub fn read_boot_report(repo: &Repository, key: &str) -> Result<BootReport> {
    let report: BootReport = repo.get_sealed_json(ObjectKind::BootReport, key)?;
    if report.version != BOOT_REPORT_VERSION {
        return Err(Error::UnsupportedVersion {
            what: format!("boot report {key}"),
            found: report.version,
            supported: BOOT_REPORT_VERSION,
        });
    }
    Ok(report)
}

/// Deletes the boot reports of snapshot `id` (with the snapshot).
pub fn delete_boot_reports(repo: &Repository, id: &str) -> Result<()> {
    for object in repo.backend().list(&format!("{BOOT_REPORT_PREFIX}{id}/"))? {
        repo.backend().delete(&object.key)?;
    }
    Ok(())
}
