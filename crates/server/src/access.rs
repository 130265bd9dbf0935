//! What each role may do to one object: the server's rules, as pure
//! functions so they are tested on their own.
//!
//! - `read`: get, ranged get, list, stat, chunk-presence queries.
//! - `backup`: also add objects (append-only). A backup writes chunks,
//!   indexes, its snapshot and its own lease under `locks/`; it may rewrite
//!   and delete only the lease it created. A `put` of an existing object
//!   never changes its bytes: identical bytes refresh its modification time
//!   (garbage collection reads a re-put as "in use again"); different bytes
//!   are refused, except for content-addressed objects (`chunks/`,
//!   `indexes/`, `packs/`, `packindex/`), whose name is a keyed digest of their plaintext: any
//!   sealing under that name holds the same content (each seal has a fresh
//!   random salt, so a backup's re-upload never has the same bytes), so the
//!   stored copy is kept, its time refreshed, and the put answered as done.
//!   (A pack never reaches this rule with other bytes: the server checks
//!   that its name is the hash of its body first.)
//! - `admin`: everything, including deletes, moves and creating a
//!   repository.

use vbackup_protocol::Role;

/// Object folders a backup token may add to.
pub const BACKUP_PREFIXES: [&str; 7] = [
    "chunks/",
    "indexes/",
    "packs/",
    "packindex/",
    "snapshots/",
    "locks/",
    "verified/",
];

/// Content-addressed folders: a name fixes the plaintext (packs are named
/// by the hash of their bytes, pack indexes by the MAC of their payload).
pub const CONTENT_ADDRESSED: [&str; 4] = ["chunks/", "indexes/", "packs/", "packindex/"];

/// What is stored under a name a client wants to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Nothing.
    Absent,
    /// The same bytes.
    Same,
    /// Other bytes.
    Different,
}

/// What the server does with a `put`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutDecision {
    /// Store the bytes.
    Write,
    /// Keep the stored bytes, refresh their modification time, answer done.
    Touch,
    /// Refuse with 403 and this reason.
    Refuse(String),
}

/// The decision for a `put` of `key` by `role`. `own_lock` tells whether
/// a lock object was created by the same token (only asked for `locks/`).
pub fn decide_put(role: Role, key: &str, existing: Existing, own_lock: bool) -> PutDecision {
    match role {
        Role::Admin => PutDecision::Write,
        Role::Read => PutDecision::Refuse("a read token cannot store objects".into()),
        Role::Backup => decide_backup_put(key, existing, own_lock),
    }
}

fn decide_backup_put(key: &str, existing: Existing, own_lock: bool) -> PutDecision {
    if !BACKUP_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return PutDecision::Refuse(format!(
            "a backup token may only add chunks, indexes, snapshots, boot reports and its own lease, not '{key}'"
        ));
    }
    if let Some(lock) = key.strip_prefix("locks/") {
        return if lock.contains('/') {
            PutDecision::Refuse("lock names are one path component".into())
        } else if existing == Existing::Absent || own_lock {
            PutDecision::Write
        } else {
            PutDecision::Refuse(format!(
                "'{key}' is another client's lock; a backup token may rewrite only the lease it created"
            ))
        };
    }
    match existing {
        Existing::Absent => PutDecision::Write,
        Existing::Same => PutDecision::Touch,
        Existing::Different if CONTENT_ADDRESSED.iter().any(|p| key.starts_with(p)) => {
            PutDecision::Touch
        }
        Existing::Different => PutDecision::Refuse(format!(
            "'{key}' exists with other content and a backup token is append-only: it cannot overwrite it"
        )),
    }
}

/// Whether `role` may delete `key`; `own_lock` as for [`decide_put`].
pub fn may_delete(role: Role, key: &str, own_lock: bool) -> Result<(), String> {
    match role {
        Role::Admin => Ok(()),
        Role::Backup if key.starts_with("locks/") && own_lock => Ok(()),
        Role::Backup => Err(format!(
            "a backup token is append-only: it cannot delete '{key}' (only the lease it created); forget, prune and repair need an admin token"
        )),
        Role::Read => Err("a read token cannot delete objects".into()),
    }
}

/// Whether `role` may move objects (prune, repair).
pub fn may_rename(role: Role) -> Result<(), String> {
    match role {
        Role::Admin => Ok(()),
        _ => Err("moving objects (prune, repair) needs an admin token".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_tokens_append_only() {
        use Existing::*;
        let b = Role::Backup;
        assert_eq!(
            decide_put(b, "chunks/ab/x", Absent, false),
            PutDecision::Write
        );
        assert_eq!(
            decide_put(b, "chunks/ab/x", Same, false),
            PutDecision::Touch
        );
        assert_eq!(
            decide_put(b, "indexes/x", Different, false),
            PutDecision::Touch
        );
        assert!(matches!(
            decide_put(b, "snapshots/x", Different, false),
            PutDecision::Refuse(_)
        ));
        assert_eq!(
            decide_put(b, "snapshots/x", Same, false),
            PutDecision::Touch
        );
        assert!(matches!(
            decide_put(b, "config", Absent, false),
            PutDecision::Refuse(_)
        ));
        assert!(matches!(
            decide_put(b, "keys/k", Absent, false),
            PutDecision::Refuse(_)
        ));
        assert!(matches!(
            decide_put(b, "prune/p", Absent, false),
            PutDecision::Refuse(_)
        ));
        assert_eq!(decide_put(b, "locks/a", Absent, false), PutDecision::Write);
        assert_eq!(
            decide_put(b, "locks/a", Different, true),
            PutDecision::Write
        );
        assert!(matches!(
            decide_put(b, "locks/a", Different, false),
            PutDecision::Refuse(_)
        ));
        assert!(matches!(
            decide_put(b, "locks/a", Same, false),
            PutDecision::Refuse(_)
        ));
    }

    #[test]
    fn roles_bound_what_a_token_can_change() {
        assert!(matches!(
            decide_put(Role::Read, "chunks/x", Existing::Absent, false),
            PutDecision::Refuse(_)
        ));
        assert_eq!(
            decide_put(Role::Admin, "config", Existing::Different, false),
            PutDecision::Write
        );
        assert!(may_delete(Role::Backup, "chunks/x", false).is_err());
        assert!(may_delete(Role::Backup, "locks/x", false).is_err());
        assert!(may_delete(Role::Backup, "locks/x", true).is_ok());
        assert!(may_delete(Role::Read, "locks/x", true).is_err());
        assert!(may_delete(Role::Admin, "snapshots/x", false).is_ok());
        assert!(may_rename(Role::Backup).is_err());
        assert!(may_rename(Role::Admin).is_ok());
    }
}
