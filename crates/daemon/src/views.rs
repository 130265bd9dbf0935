//! What the dashboard shows of the repositories themselves: usage with
//! dedup and compression, damaged snapshots, and each VM's snapshots.
//!
//! Reading them means opening the repository and listing its snapshots
//! (and, for usage, its indexes), so answers are kept for a while: a
//! dashboard refreshing every second does not list S3 every second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vbackup_core::RepoStats;
use vbackup_open::Purpose;

use crate::config::Config;
use crate::jobs::open_repository;
use crate::Result;

/// How long a repository's usage is kept.
const USAGE_FOR: Duration = Duration::from_secs(60);
/// How long a VM's snapshot list is kept.
const SNAPSHOTS_FOR: Duration = Duration::from_secs(10);

/// A repository as the dashboard shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RepositoryView {
    /// Its name in the configuration file.
    pub name: String,
    /// Sizes, dedup and compression (`None` when it could not be read):
    /// `snapshots`, `vms`, `logical-bytes`, `referenced-bytes`,
    /// `unique-bytes`, `unique-chunks`, `stored-bytes`,
    /// `unreferenced-chunks`, `unreferenced-bytes`, `dedup-ratio`,
    /// `compression-ratio`.
    #[schema(value_type = Option<Object>)]
    pub stats: Option<RepoStats>,
    /// Snapshots `vbackup repair` marked damaged, and manifests that
    /// cannot be read.
    pub damaged_snapshots: Vec<String>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// A snapshot as the dashboard lists it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotView {
    /// Its id.
    pub id: String,
    /// When it was taken.
    pub time: String,
    /// Full, incremental or differential.
    pub backup_type: String,
    /// Offline, crash- or application-consistent.
    pub consistency: Option<String>,
    /// Its disks' names.
    pub disks: Vec<String>,
    /// Bytes stored by its backup.
    pub bytes_stored: u64,
}

/// Answers kept for a while.
#[derive(Default)]
pub struct Views {
    usage: Mutex<HashMap<String, (Instant, RepositoryView)>>,
    snapshots: Mutex<HashMap<String, (Instant, Vec<SnapshotView>)>>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views").finish_non_exhaustive()
    }
}

impl Views {
    /// Every repository of `config`, from the cache when fresh.
    pub fn repositories(&self, config: &Config) -> Vec<RepositoryView> {
        config
            .repository
            .keys()
            .map(|name| {
                if let Some(view) = fresh(&self.usage, name, USAGE_FOR) {
                    return view;
                }
                let view = read_repository(config, name);
                keep(&self.usage, name, view.clone());
                view
            })
            .collect()
    }

    /// The snapshots of `vm`, newest first, from the cache when fresh.
    pub fn snapshots(&self, config: &Config, vm: &str) -> Result<Vec<SnapshotView>> {
        if let Some(list) = fresh(&self.snapshots, vm, SNAPSHOTS_FOR) {
            return Ok(list);
        }
        let repository = config.vm_repository(vm).ok_or_else(|| {
            crate::Error::Invalid(format!("no job 'backup/{vm}' in the configuration"))
        })?;
        let repo = open_repository(config, repository, Purpose::Use)?;
        let mut list: Vec<SnapshotView> = repo
            .list_snapshots()?
            .into_iter()
            .filter(|s| s.manifest.vm == vm)
            .map(|s| SnapshotView {
                backup_type: format!("{:?}", s.manifest.backup_type).to_lowercase(),
                consistency: s.manifest.consistency.clone(),
                disks: s.manifest.disks.iter().map(|d| d.name.clone()).collect(),
                bytes_stored: s.manifest.stats.bytes_stored,
                time: s.manifest.time.clone(),
                id: s.id,
            })
            .collect();
        list.sort_by(|a, b| b.time.cmp(&a.time));
        keep(&self.snapshots, vm, list.clone());
        Ok(list)
    }
}

/// Opens repository `name` and reads its usage and damage.
fn read_repository(config: &Config, name: &str) -> RepositoryView {
    let read = || -> Result<(RepoStats, Vec<String>)> {
        let repo = open_repository(config, name, Purpose::Use)?;
        let stats = vbackup_core::stats(&repo)?;
        let (_, unreadable) = repo.list_snapshots_checked()?;
        let mut damaged = vbackup_core::marked_snapshots(&repo)?;
        damaged.extend(unreadable.iter().map(|e| e.to_string()));
        Ok((stats, damaged))
    };
    match read() {
        Ok((stats, damaged_snapshots)) => RepositoryView {
            name: name.to_string(),
            stats: Some(stats),
            damaged_snapshots,
            error: None,
        },
        Err(error) => RepositoryView {
            name: name.to_string(),
            stats: None,
            damaged_snapshots: Vec::new(),
            error: Some(error.to_string()),
        },
    }
}

/// The cached value of `key` if younger than `ttl`.
fn fresh<T: Clone>(
    cache: &Mutex<HashMap<String, (Instant, T)>>,
    key: &str,
    ttl: Duration,
) -> Option<T> {
    let cache = cache.lock().ok()?;
    let (at, value) = cache.get(key)?;
    (at.elapsed() < ttl).then(|| value.clone())
}

/// Keeps `value` for `key`.
fn keep<T>(cache: &Mutex<HashMap<String, (Instant, T)>>, key: &str, value: T) {
    if let Ok(mut cache) = cache.lock() {
        cache.insert(key.to_string(), (Instant::now(), value));
    }
}
