//! Which role each repository operation needs: the hook for the backup
//! server (issue 4), which authenticates clients and must check
//! `operation.required_role() <= client role` before running anything.
//! Local use (a folder the user can write) is not restricted.
//!
//! Backups only add objects and hold a lease, so they need `Backup`.
//! Everything that deletes or rewrites existing objects — forget, prune,
//! repair, unlock, policy changes — needs `Admin`.

use serde::{Deserialize, Serialize};

/// A client's role, from least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// List snapshots, restore, check.
    Read,
    /// Also back up (adds objects, never removes any).
    Backup,
    /// Also forget, prune, repair, unlock and change the policy.
    Admin,
}

/// An operation on a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// List snapshots, show stats, the policy or locks.
    Read,
    /// Restore a snapshot.
    Restore,
    /// Check or verify.
    Check,
    /// Back up.
    Backup,
    /// Forget snapshots.
    Forget,
    /// Prune unreferenced data.
    Prune,
    /// Repair damage.
    Repair,
    /// Remove locks.
    Unlock,
    /// Set or clear the stored retention policy.
    SetPolicy,
}

impl Operation {
    /// The least role allowed to run this operation.
    pub fn required_role(self) -> Role {
        match self {
            Operation::Read | Operation::Restore | Operation::Check => Role::Read,
            Operation::Backup => Role::Backup,
            Operation::Forget
            | Operation::Prune
            | Operation::Repair
            | Operation::Unlock
            | Operation::SetPolicy => Role::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleting_operations_need_the_admin_role() {
        for op in [
            Operation::Forget,
            Operation::Prune,
            Operation::Repair,
            Operation::Unlock,
        ] {
            assert_eq!(op.required_role(), Role::Admin);
        }
        assert!(Operation::Backup.required_role() < Role::Admin);
        assert!(Role::Read < Role::Backup);
    }
}
