//! The server's dashboard: what it holds, per repository, for a token.
//!
//! The server has no passphrase, so it shows what the storage shows: per
//! repository the objects of each kind and their bytes, the newest
//! snapshot's write time, and the locks and leases of running work. The
//! page (`GET /`) is static; it asks `GET /v1/overview` with the token the
//! user gives it (any role), which lists the repositories that token
//! covers. Walking a repository's folders costs a directory listing per
//! folder, so answers are kept for a minute.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use vbackup_protocol::validate_repo_name;

/// How long a repository's overview is kept.
const KEEP_FOR: Duration = Duration::from_secs(60);

/// Objects of one kind.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Objects {
    /// How many.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// One repository as the dashboard shows it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepositoryOverview {
    /// Its name on the server.
    pub name: String,
    /// Snapshot manifests.
    pub snapshots: Objects,
    /// Disk indexes.
    pub indexes: Objects,
    /// Data: packs and loose chunks.
    pub data: Objects,
    /// Everything else (config, keys, pack indexes, lifecycle records).
    pub other: Objects,
    /// Locks and leases of work in progress.
    pub locks: u64,
    /// When the newest snapshot manifest was written (RFC 3339).
    pub newest_snapshot: Option<String>,
}

/// Overviews kept for a while.
#[derive(Debug, Default)]
pub struct Overviews {
    kept: Mutex<HashMap<String, (Instant, RepositoryOverview)>>,
}

impl Overviews {
    /// The overview of each repository named in `names` under `repos`
    /// (the server's `repos/` folder).
    pub fn of(&self, repos: &Path, names: &[String]) -> Vec<RepositoryOverview> {
        names
            .iter()
            .map(|name| {
                if let Some(view) = self.fresh(name) {
                    return view;
                }
                let view = read(&repos.join(name), name);
                if let Ok(mut kept) = self.kept.lock() {
                    kept.insert(name.clone(), (Instant::now(), view.clone()));
                }
                view
            })
            .collect()
    }

    fn fresh(&self, name: &str) -> Option<RepositoryOverview> {
        let kept = self.kept.lock().ok()?;
        let (at, view) = kept.get(name)?;
        (at.elapsed() < KEEP_FOR).then(|| view.clone())
    }
}

/// The names of the repositories under `repos` (valid names only).
pub fn repository_names(repos: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(repos) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| validate_repo_name(name).is_ok())
        .collect();
    names.sort();
    names
}

/// Walks the repository folder `root`.
fn read(root: &Path, name: &str) -> RepositoryOverview {
    let mut view = RepositoryOverview {
        name: name.to_string(),
        ..RepositoryOverview::default()
    };
    let mut newest: Option<SystemTime> = None;
    walk(root, root, &mut |relative, meta| {
        let top = relative.split('/').next().unwrap_or_default();
        let objects = match top {
            "snapshots" => {
                let modified = meta.modified().ok();
                newest = newest.max(modified);
                &mut view.snapshots
            }
            "indexes" => &mut view.indexes,
            "packs" | "chunks" => &mut view.data,
            "locks" | "leases" => {
                view.locks += 1;
                return;
            }
            _ => &mut view.other,
        };
        objects.count += 1;
        objects.bytes += meta.len();
    });
    view.newest_snapshot = newest.map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339());
    view
}

/// Calls `visit` with the path relative to `root` and the metadata of
/// every file below `dir` (dot-files, the backend's temporaries, skipped).
fn walk(root: &Path, dir: &Path, visit: &mut dyn FnMut(&str, &std::fs::Metadata)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            walk(root, &path, visit);
        } else if let Ok(relative) = path.strip_prefix(root) {
            visit(&relative.to_string_lossy(), &meta);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn objects_are_counted_by_kind_and_junk_names_are_no_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("web");
        for (file, size) in [
            ("config", 10),
            ("keys/k1", 20),
            ("snapshots/s1", 30),
            ("snapshots/s2", 30),
            ("indexes/i1", 40),
            ("packs/ab/p1", 1000),
            ("locks/l1", 5),
            ("snapshots/.tmp-x", 99),
        ] {
            let path = repo.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, vec![0u8; size]).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("..bad")).unwrap();
        assert_eq!(repository_names(dir.path()), ["web"]);
        let view = Overviews::default()
            .of(dir.path(), &["web".into()])
            .remove(0);
        assert_eq!((view.snapshots.count, view.snapshots.bytes), (2, 60));
        assert_eq!((view.data.count, view.data.bytes), (1, 1000));
        assert_eq!((view.other.count, view.other.bytes), (2, 30));
        assert_eq!(view.locks, 1);
        assert!(view.newest_snapshot.is_some());
    }
}
