//! `vbackup policy`: the retention policy stored in the repository, so that
//! scheduled `forget` runs on every host apply the same rules.
//!
//! The policy is one sealed object, `policy` (authenticated like
//! snapshots: it cannot be changed without the key), with a payload
//! version and a revision counter that every `policy set` raises, so a
//! client that recorded a newer revision refuses an older policy the
//! storage put back. `forget` without keep options applies it.

use crate::format::lifecycle::{check_version, GroupBy, KeepRules, PolicyFile, LIFECYCLE_VERSION};
use crate::format::ObjectKind;
use crate::repo::POLICY_KEY;
use crate::{Error, Repository, Result};

/// The stored policy, if any.
pub fn read_policy(repo: &Repository) -> Result<Option<PolicyFile>> {
    match repo.get_sealed_json::<PolicyFile>(ObjectKind::Policy, POLICY_KEY) {
        Ok(policy) => {
            check_version(POLICY_KEY, policy.version)?;
            Ok(Some(policy))
        }
        Err(Error::Storage(e)) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Stores `keep` and `group_by` as the policy (replacing any). Rules that
/// keep nothing are refused. The new policy's revision is one more than
/// both the stored one's (an unreadable one counts as none) and
/// `newest_seen`, the newest revision the caller recorded (see
/// [`crate::client_state`]), so revisions only grow even over a rolled
/// back policy.
pub fn set_policy(
    repo: &Repository,
    keep: KeepRules,
    group_by: GroupBy,
    newest_seen: u64,
) -> Result<PolicyFile> {
    if keep.is_empty() {
        return Err(Error::InvalidInput(
            "a policy needs at least one --keep-* rule (a policy without rules would forget every snapshot)".to_string(),
        ));
    }
    let stored = match read_policy(repo) {
        Ok(policy) => policy.map_or(0, |p| p.revision),
        Err(Error::Storage(e)) => return Err(Error::Storage(e)),
        Err(_) => 0,
    };
    let policy = PolicyFile {
        revision: stored.max(newest_seen).saturating_add(1),
        version: LIFECYCLE_VERSION,
        updated: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        host: crate::hostname(),
        keep,
        group_by,
    };
    repo.put_sealed_json(ObjectKind::Policy, POLICY_KEY, &policy)?;
    Ok(policy)
}

/// Removes the stored policy; returns whether there was one.
pub fn clear_policy(repo: &Repository) -> Result<bool> {
    let existed = repo.backend().stat(POLICY_KEY)?.is_some();
    repo.backend().delete(POLICY_KEY)?;
    Ok(existed)
}
