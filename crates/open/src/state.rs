//! This host's record of what it saw of a repository, kept where storage
//! cannot roll it back, and the commands that must keep it up to date.
//!
//! `vbackup_core::client_state` defines the record (snapshots this host
//! forgot, the newest retention policy it saw) and its file; this module
//! finds the file for a repository opened with [`RepositoryOptions`] and
//! wraps the engine's `forget` and policy calls so that every front end
//! (CLI, daemon) records what they did the same way. Without the record,
//! storage could put a forgotten snapshot or an older, laxer policy back
//! unnoticed.

use vbackup_core::client_state::{ClientState, StateFile};
use vbackup_core::format::lifecycle::{GroupBy, KeepRules, PolicyFile};
use vbackup_core::{ForgetOptions, ForgetReport, Repository, Result};

use crate::RepositoryOptions;

/// The record's file for `repo`: `<state dir>/<repository id>.json`;
/// `None` when no cache folder can be chosen (no `VBACKUP_CACHE_DIR`,
/// `XDG_CACHE_HOME` or `HOME`, and none in the options).
pub fn state_file(options: &RepositoryOptions, repo: &Repository) -> Option<StateFile> {
    Some(StateFile::new(&options.state_dir()?, &repo.config().id))
}

/// The record of `repo`, and a warning when its file exists but cannot be
/// read (then an empty record: commands that only warn go on).
pub fn load(options: &RepositoryOptions, repo: &Repository) -> (ClientState, Option<String>) {
    let empty = ClientState::new(&repo.config().id);
    let Some(file) = state_file(options, repo) else {
        return (empty, None);
    };
    match file.load() {
        Ok(state) => (state, None),
        Err(e) => (empty, Some(e.to_string())),
    }
}

/// Changes the record of `repo` (nothing when there is no state folder).
pub fn update(
    options: &RepositoryOptions,
    repo: &Repository,
    change: impl FnOnce(&mut ClientState),
) -> Result<()> {
    if let Some(file) = state_file(options, repo) {
        file.update(change)?;
    }
    Ok(())
}

/// Runs `vbackup_core::forget` with the newest policy revision this host
/// saw (an older stored policy is refused as a rollback), then records the
/// snapshots it removed and the policy it applied.
pub fn forget(
    options: &RepositoryOptions,
    repo: &Repository,
    forget: &ForgetOptions,
) -> Result<ForgetReport> {
    let (state, _) = load(options, repo);
    let forget = ForgetOptions {
        newest_policy_seen: forget
            .newest_policy_seen
            .max(state.newest_policy_revision()),
        ..forget.clone()
    };
    let report = vbackup_core::forget(repo, &forget)?;
    if !report.dry_run {
        update(options, repo, |state| record_forget(state, &report))?;
    }
    Ok(report)
}

/// Enters what `report` removed and applied into `state`.
fn record_forget(state: &mut ClientState, report: &ForgetReport) {
    for d in report.groups.iter().flat_map(|g| &g.decisions) {
        if !d.keep {
            state.record_forgotten(&d.snapshot, &d.vm, &d.time);
        }
    }
    if let Some(policy) = &report.policy {
        state.record_policy(policy);
    }
}

/// Stores a new retention policy (refused when the stored one is older
/// than the newest this host saw) and records it as seen.
pub fn set_policy(
    options: &RepositoryOptions,
    repo: &Repository,
    keep: KeepRules,
    group_by: GroupBy,
) -> Result<PolicyFile> {
    let (state, _) = load(options, repo);
    let policy = vbackup_core::set_policy(repo, keep, group_by, state.newest_policy_revision())?;
    update(options, repo, |state| state.record_policy(&policy))?;
    Ok(policy)
}

/// Checks a policy read from the repository against the newest this host
/// saw: `Some(warning)` for a rollback, else it is recorded as seen.
pub fn note_policy(
    options: &RepositoryOptions,
    repo: &Repository,
    policy: &PolicyFile,
) -> Result<Option<String>> {
    let (state, _) = load(options, repo);
    match state.check_policy(policy) {
        Err(e) => Ok(Some(e.to_string())),
        Ok(()) => {
            update(options, repo, |state| state.record_policy(policy))?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vbackup_core::format::lifecycle::KeepRules;
    use vbackup_core::InitOptions;

    fn repository(dir: &std::path::Path) -> (RepositoryOptions, Repository) {
        let options = RepositoryOptions {
            cache_dir: Some(dir.join("cache")),
            ..RepositoryOptions::new(dir.join("repo").to_str().unwrap())
        };
        let init = InitOptions {
            kdf: vbackup_core::crypto::kdf::KdfParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        let repo = crate::init(&options, Some("pw"), &init).unwrap();
        (options, repo)
    }

    #[test]
    fn a_stored_policy_older_than_the_one_this_host_set_is_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let (options, repo) = repository(dir.path());
        let keep = |n| KeepRules {
            last: Some(n),
            ..KeepRules::default()
        };
        let first = set_policy(&options, &repo, keep(3), GroupBy::default()).unwrap();
        let second = set_policy(&options, &repo, keep(5), GroupBy::default()).unwrap();
        assert!(second.revision > first.revision);
        assert_eq!(note_policy(&options, &repo, &second).unwrap(), None);
        let warning = note_policy(&options, &repo, &first).unwrap().unwrap();
        assert!(warning.contains("revision"), "{warning}");
        assert_eq!(
            load(&options, &repo).0.newest_policy_revision(),
            second.revision
        );
    }

    #[test]
    fn an_unreadable_record_is_reported_and_taken_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (options, repo) = repository(dir.path());
        let file = state_file(&options, &repo).unwrap();
        std::fs::create_dir_all(file.path().parent().unwrap()).unwrap();
        std::fs::write(file.path(), "not json").unwrap();
        let (state, warning) = load(&options, &repo);
        assert_eq!(state.newest_policy_revision(), 0);
        assert!(warning.is_some());
    }
}
