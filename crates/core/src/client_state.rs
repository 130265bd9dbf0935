//! What this client has seen of a repository, kept on the local disk so
//! that the storage cannot roll it back: the snapshots it forgot and the
//! newest retention policy it read or wrote.
//!
//! Whoever runs the storage can put back any object that once existed:
//! a snapshot manifest that `forget` removed opens and authenticates as
//! well as it did before, and so does an older `policy`. Neither can be
//! told from the repository alone. The client therefore remembers, per
//! repository id, one small versioned JSON file (`<dir>/<repository
//! id>.json`, written atomically, mode 0600, see `docs/format.md`), and
//! `check`, `snapshots`, `forget` and `policy` compare what the storage
//! shows with it.
//!
//! The record protects only what this host did or saw: a snapshot forgotten
//! on another host, or a policy set there that this host never read, is
//! not in it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::commands::check::Notice;
use crate::crypto::random_bytes;
use crate::format::lifecycle::PolicyFile;
use crate::repo::SNAPSHOTS_PREFIX;
use crate::{Error, Repository, Result};

/// Version of the client state file written by this build.
pub const CLIENT_STATE_VERSION: u32 = 1;

/// The largest state file read (a million forgotten snapshots is ~100 MiB;
/// anything near this is not ours).
const MAX_STATE_LEN: u64 = 256 << 20;

/// A snapshot this client removed with `forget`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ForgottenSnapshot {
    /// When this client removed it (RFC 3339, UTC, this host's clock).
    pub forgotten: String,
    /// Its VM.
    pub vm: String,
    /// Its time (RFC 3339, UTC).
    pub time: String,
}

/// The newest stored policy this client read or wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SeenPolicy {
    /// Its revision ([`PolicyFile::revision`]).
    pub revision: u64,
    /// Its `updated` time (RFC 3339, as stored).
    pub updated: String,
    /// When this client saw it (RFC 3339, UTC, this host's clock).
    pub seen: String,
}

/// The state file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClientState {
    /// Payload version ([`CLIENT_STATE_VERSION`]).
    pub version: u32,
    /// The repository's id (`config`'s `id`).
    pub repository: String,
    /// Snapshots this client forgot, by id.
    #[serde(default)]
    pub forgotten: BTreeMap<String, ForgottenSnapshot>,
    /// The newest policy seen, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SeenPolicy>,
}

impl ClientState {
    /// An empty record for repository `id`.
    pub fn new(id: &str) -> Self {
        Self {
            version: CLIENT_STATE_VERSION,
            repository: id.to_string(),
            forgotten: BTreeMap::new(),
            policy: None,
        }
    }

    /// Records that this client removed snapshot `id`.
    pub fn record_forgotten(&mut self, id: &str, vm: &str, time: &str) {
        self.forgotten.insert(
            id.to_string(),
            ForgottenSnapshot {
                forgotten: now_rfc3339(),
                vm: vm.to_string(),
                time: time.to_string(),
            },
        );
    }

    /// The revision below which a stored policy is a rollback (0: none).
    pub fn newest_policy_revision(&self) -> u64 {
        self.policy.as_ref().map_or(0, |p| p.revision)
    }

    /// Records `policy` as seen, if it is newer than what was recorded.
    pub fn record_policy(&mut self, policy: &PolicyFile) {
        if self
            .policy
            .as_ref()
            .is_some_and(|p| p.revision >= policy.revision)
        {
            return;
        }
        self.policy = Some(SeenPolicy {
            revision: policy.revision,
            updated: policy.updated.clone(),
            seen: now_rfc3339(),
        });
    }

    /// Refuses a stored policy older than the newest one this client saw:
    /// the storage put an old object back.
    pub fn check_policy(&self, policy: &PolicyFile) -> Result<()> {
        match &self.policy {
            Some(seen) if policy.revision < seen.revision => {
                Err(Error::Refused(policy_rollback(policy, seen)))
            }
            _ => Ok(()),
        }
    }

    /// Of the snapshot ids `listed`, those this client forgot: the storage
    /// holds them again.
    pub fn reappeared<'a>(
        &'a self,
        listed: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(&'a str, &'a ForgottenSnapshot)> {
        listed
            .into_iter()
            .filter_map(|id| self.forgotten.get_key_value(id))
            .map(|(id, f)| (id.as_str(), f))
            .collect()
    }
}

fn policy_rollback(policy: &PolicyFile, seen: &SeenPolicy) -> String {
    format!(
        "the repository's policy has revision {} (set {} on host '{}'), but this host saw revision {} (set {}) on {}: the storage put back an older policy (rollback or replay); it is not applied. Check who can write to the storage, then store the rules you want again with `vbackup policy set` (it writes revision {})",
        policy.revision,
        policy.updated,
        policy.host,
        seen.revision,
        seen.updated,
        seen.seen,
        seen.revision + 1
    )
}

/// What the storage shows that contradicts this client's record: forgotten
/// snapshots that are back, a policy older than one seen. Each names the
/// object and when this client removed or saw the newer one.
pub fn rollback_findings(repo: &Repository, state: &ClientState) -> Result<Vec<Notice>> {
    let listed: Vec<String> = repo
        .backend()
        .list(SNAPSHOTS_PREFIX)?
        .into_iter()
        .map(|o| o.key[SNAPSHOTS_PREFIX.len()..].to_string())
        .collect();
    let mut findings: Vec<Notice> = state
        .reappeared(listed.iter().map(String::as_str))
        .into_iter()
        .map(|(id, f)| Notice {
            object: format!("{SNAPSHOTS_PREFIX}{id}"),
            note: format!(
                "snapshot {id} (VM '{}', {}) was removed by `vbackup forget` on this host at {}, but the storage holds it again: the storage put back a removed manifest (rollback or replay). Do not trust it; `vbackup forget` removes it again",
                f.vm, f.time, f.forgotten
            ),
        })
        .collect();
    if let Some(policy) = crate::read_policy(repo)? {
        if let Err(e) = state.check_policy(&policy) {
            findings.push(Notice {
                object: crate::repo::POLICY_KEY.to_string(),
                note: e.to_string(),
            });
        }
    }
    Ok(findings)
}

/// The state file of one repository in a folder (the CLI uses
/// `<cache dir>/state`).
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    id: String,
}

impl StateFile {
    /// The file for repository `id` in `dir`.
    pub fn new(dir: &Path, id: &str) -> Self {
        Self {
            path: dir.join(format!("{id}.json")),
            id: id.to_string(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the record; an absent file is an empty record.
    pub fn load(&self) -> Result<ClientState> {
        let bytes = match read_bounded(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ClientState::new(&self.id))
            }
            Err(e) => return Err(self.error(&format!("cannot read it: {e}"))),
        };
        let state: ClientState = serde_json::from_slice(&bytes)
            .map_err(|e| self.error(&format!("it is not a state file: {e}")))?;
        if state.version > CLIENT_STATE_VERSION || state.version == 0 {
            return Err(Error::UnsupportedVersion {
                what: format!("client state file {}", self.path.display()),
                found: state.version,
                supported: CLIENT_STATE_VERSION,
            });
        }
        if state.repository != self.id {
            return Err(self.error(&format!("it belongs to repository {}", state.repository)));
        }
        Ok(state)
    }

    /// Loads the record, lets `change` update it and writes it back, all
    /// under an exclusive lock on `<id>.lock` (so two processes on this
    /// host do not lose each other's updates).
    pub fn update<T>(&self, change: impl FnOnce(&mut ClientState) -> T) -> Result<T> {
        let dir = self.dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| self.error(&format!("cannot create its folder: {e}")))?;
        let lock = self.lock_file()?;
        lock.lock()
            .map_err(|e| self.error(&format!("cannot lock it: {e}")))?;
        let mut state = self.load()?;
        let result = change(&mut state);
        self.save(&state)?;
        Ok(result)
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn lock_file(&self) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.path.with_extension("lock"))
            .map_err(|e| self.error(&format!("cannot open its lock file: {e}")))
    }

    /// Writes the record atomically: a temporary file (mode 0600) in the
    /// same folder, fsynced, renamed over the old one, folder fsynced.
    fn save(&self, state: &ClientState) -> Result<()> {
        let json = serde_json::to_vec_pretty(state).map_err(|e| {
            Error::internal(format!(
                "cannot encode the client state file {}: {e}",
                self.path.display()
            ))
        })?;
        let tmp = self.dir().join(format!(
            ".tmp-{}-{}",
            self.id,
            hex::encode(random_bytes::<8>()?)
        ));
        let written = write_synced(&tmp, &json).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.error(&format!("cannot write it: {e}")));
        }
        File::open(self.dir())
            .and_then(|d| d.sync_all())
            .map_err(|e| self.error(&format!("cannot sync its folder: {e}")))
    }

    fn error(&self, what: &str) -> Error {
        Error::InvalidInput(format!(
            "client state file {} (this host's record of forgotten snapshots and seen policies, used to detect rollbacks): {what}; fix or remove it (removing it forgets that record)",
            self.path.display()
        ))
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_STATE_LEN), &mut bytes)?;
    Ok(bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_record_survives_a_round_trip_and_is_private() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = StateFile::new(&dir.path().join("state"), "abc");
        assert_eq!(file.load().ok(), Some(ClientState::new("abc")));
        file.update(|s| s.record_forgotten("s1", "vm", "2026-01-01T00:00:00Z"))
            .unwrap_or_else(|e| panic!("{e}"));
        let state = file.load().unwrap_or_else(|e| panic!("{e}"));
        assert!(state.forgotten.contains_key("s1"));
        let mode = std::fs::metadata(file.path())
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        let other = StateFile::new(&dir.path().join("state"), "abd");
        std::fs::copy(file.path(), other.path()).unwrap_or_else(|e| panic!("{e}"));
        let err = other
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("belongs to repository abc"), "{err}");
    }
}
