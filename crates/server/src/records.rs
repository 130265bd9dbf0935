//! What the server records beside the repositories, outside what clients
//! can name: which token wrote each non-content-addressed object
//! (`DIR/lock-owners/REPO/ID` for leases, `DIR/writers/REPO/KEY` for the
//! rest), and how many bytes each token with a quota has added
//! (`DIR/usage/ID`).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::http::StatusCode;
use vbackup_protocol::CODE_OVER_QUOTA;

use crate::api::ApiError;
use crate::tokens::TokenEntry;

/// Object folders (and the one name) whose writer is recorded: the
/// objects a name does not fix the content of.
const RECORDED_PREFIXES: [&str; 5] = ["locks/", "snapshots/", "prune/", "damaged/", "verified/"];

/// The policy object's name.
const POLICY_KEY: &str = "policy";

/// Whether the server records who writes `key`.
pub(crate) fn recorded(key: &str) -> bool {
    key == POLICY_KEY || RECORDED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Where the writer of `key` in repository `repo` is recorded. Leases
/// keep the folder older servers used for their owners.
pub(crate) fn record_path(data: &Path, repo: &str, key: &str) -> PathBuf {
    match key.strip_prefix("locks/") {
        Some(lock) => data.join("lock-owners").join(repo).join(lock),
        None => data.join("writers").join(repo).join(key),
    }
}

/// The id of the token that wrote `key`, if recorded.
pub(crate) fn writer_of(data: &Path, repo: &str, key: &str) -> Option<String> {
    let id = fs::read_to_string(record_path(data, repo, key)).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Records that the token `id` wrote `key`.
pub(crate) fn record_writer(data: &Path, repo: &str, key: &str, id: &str) -> io::Result<()> {
    let path = record_path(data, repo, key);
    if let Some(dir) = path.parent() {
        crate::create_private_dir(dir)?;
    }
    fs::write(&path, id)
}

/// Forgets who wrote `key` (it was deleted).
pub(crate) fn forget_writer(data: &Path, repo: &str, key: &str) {
    let _ = fs::remove_file(record_path(data, repo, key));
}

/// Carries the record of `from` to `to` when an object is moved (the
/// bytes keep their writer); a move into a recorded folder of an object
/// without a record names the token `mover` that put it there.
pub(crate) fn move_writer(
    data: &Path,
    repo: &str,
    from: &str,
    to: &str,
    mover: &str,
) -> io::Result<()> {
    match writer_of(data, repo, from) {
        Some(id) => {
            record_writer(data, repo, to, &id)?;
            forget_writer(data, repo, from);
            Ok(())
        }
        None if recorded(to) => record_writer(data, repo, to, mover),
        None => {
            forget_writer(data, repo, to);
            Ok(())
        }
    }
}

/// The bytes each token with a quota has added, counted in
/// `DIR/usage/ID` (a decimal number) so the count survives restarts.
#[derive(Debug)]
pub(crate) struct Usage {
    dir: PathBuf,
    counts: Mutex<HashMap<String, u64>>,
}

impl Usage {
    /// The counts of the data folder `data`.
    pub(crate) fn new(data: &Path) -> Self {
        Self {
            dir: data.join("usage"),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `bytes` against `token`'s quota before they are stored, or
    /// refuses them (507) when they would pass it. Tokens without a quota
    /// are not counted.
    pub(crate) fn reserve(&self, token: &TokenEntry, bytes: u64) -> Result<(), ApiError> {
        let Some(quota) = token.quota else {
            return Ok(());
        };
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let used = match counts.get(&token.id) {
            Some(used) => *used,
            None => self.load(&token.id)?,
        };
        let total = used.saturating_add(bytes);
        if total > quota {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                CODE_OVER_QUOTA,
                format!(
                    "{} is over its quota: it has added {used} of its {quota} bytes and this upload needs {bytes} more; the server's operator can raise `quota` in its token file",
                    token.describe()
                ),
            ));
        }
        self.save(&token.id, total)?;
        counts.insert(token.id.clone(), total);
        Ok(())
    }

    /// Gives back `bytes` reserved by `token` for an upload that failed.
    pub(crate) fn release(&self, token: &TokenEntry, bytes: u64) {
        if token.quota.is_none() {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(used) = counts.get_mut(&token.id) {
            *used = used.saturating_sub(bytes);
            let _ = self.save(&token.id, *used);
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The stored count of token `id` (0 when none); a damaged count file
    /// refuses the upload rather than forget what the token added.
    fn load(&self, id: &str) -> Result<u64, ApiError> {
        let path = self.path(id);
        match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|_| {
                eprintln!(
                    "vbackup server: ERROR: {} is not a byte count; uploads by token {id} are refused until it is fixed or removed",
                    path.display()
                );
                ApiError::internal(format!(
                    "the server's usage count of token {id} is damaged; its operator must fix it"
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ApiError::internal(format!(
                "cannot read the usage count of token {id}: {e}"
            ))),
        }
    }

    fn save(&self, id: &str, used: u64) -> Result<(), ApiError> {
        let write = || -> io::Result<()> {
            crate::create_private_dir(&self.dir)?;
            let temp = self.dir.join(format!(".{id}.tmp"));
            fs::write(&temp, used.to_string())?;
            fs::rename(&temp, self.path(id))
        };
        write()
            .map_err(|e| ApiError::internal(format!("cannot record the usage of token {id}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vbackup_protocol::Role;

    fn token(quota: Option<u64>) -> TokenEntry {
        TokenEntry {
            id: "0123456789abcdef".into(),
            sha256: String::new(),
            repo: "r".into(),
            role: Role::Backup,
            label: "host1".into(),
            created: String::new(),
            quota,
        }
    }

    #[test]
    fn attack_quota_is_exceeded_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t = token(Some(100));
        let usage = Usage::new(dir.path());
        usage.reserve(&t, 60).unwrap();
        let err = usage.reserve(&t, 41).unwrap_err();
        assert_eq!(err.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert!(err.message().contains("host1 (token 0123456789abcdef)"));
        assert!(err.message().contains("100 bytes"), "{}", err.message());
        usage.release(&t, 10);
        // A restarted server reads the count back.
        let usage = Usage::new(dir.path());
        usage.reserve(&t, 50).unwrap();
        assert!(usage.reserve(&t, 1).is_err());
        // No quota: nothing counted.
        Usage::new(dir.path())
            .reserve(&token(None), u64::MAX)
            .unwrap();
        fs::write(dir.path().join("usage/0123456789abcdef"), "junk").unwrap();
        assert!(Usage::new(dir.path()).reserve(&t, 1).is_err());
    }

    #[test]
    fn writers_follow_their_objects() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(recorded("snapshots/a") && recorded("policy") && recorded("locks/x"));
        assert!(!recorded("chunks/ab/x") && !recorded("policy2") && !recorded("packs/a"));
        record_writer(d, "r", "snapshots/a", "t1").unwrap();
        assert_eq!(writer_of(d, "r", "snapshots/a").as_deref(), Some("t1"));
        assert!(writer_of(d, "other", "snapshots/a").is_none());
        move_writer(d, "r", "snapshots/a", "trash/snapshots/a", "admin").unwrap();
        assert!(writer_of(d, "r", "snapshots/a").is_none());
        assert_eq!(
            writer_of(d, "r", "trash/snapshots/a").as_deref(),
            Some("t1")
        );
        move_writer(d, "r", "chunks/ab/c", "damaged/chunks/ab/c", "admin").unwrap();
        assert_eq!(
            writer_of(d, "r", "damaged/chunks/ab/c").as_deref(),
            Some("admin")
        );
        record_writer(d, "r", "locks/l", "t2").unwrap();
        assert!(d.join("lock-owners/r/l").is_file());
        forget_writer(d, "r", "locks/l");
        assert!(writer_of(d, "r", "locks/l").is_none());
    }
}
