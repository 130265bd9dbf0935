//! The roles a server token can have, and which role each repository
//! operation needs. The server checks them per object (`vbackup-server`'s
//! `access.rs`); the CLI asks the server for its token's role (`whoami`)
//! and refuses an operation the role does not allow before starting it.
//! Local use (a folder the user can write) is not restricted.
//!
//! Backups only add objects and hold a lease, so they need `Backup`.
//! Everything that deletes or rewrites existing objects — forget, prune,
//! repair, unlock, policy changes — needs `Admin`.
//!
//! On the wire and in the server's token file a role is one of the strings
//! `read`, `backup` and `admin`. Any other string is an error
//! ([`UnknownRole`]), never a guess: a client that took an unknown role for
//! `Admin` would start work the server then refuses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A client's role, from least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum Role {
    /// List snapshots, restore, check.
    Read,
    /// Also back up (adds objects, never removes any).
    Backup,
    /// Also forget, prune, repair, unlock and change the policy.
    Admin,
}

impl Role {
    /// Every role, from least to most powerful.
    pub const ALL: [Role; 3] = [Role::Read, Role::Backup, Role::Admin];

    /// The role's name on the wire and in the token file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Backup => "backup",
            Role::Admin => "admin",
        }
    }

    /// Whether a token with this role may run `operation`.
    pub fn allows(self, operation: Operation) -> bool {
        self >= operation.required_role()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so tables can align roles with `{:<7}`.
        f.pad(self.name())
    }
}

/// A role name that is none of `read`, `backup` and `admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownRole(pub String);

impl fmt::Display for UnknownRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown role {:?}: the roles are read, backup and admin",
            self.0
        )
    }
}

impl std::error::Error for UnknownRole {}

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(text: &str) -> Result<Self, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|role| role.name() == text)
            .ok_or_else(|| UnknownRole(text.to_string()))
    }
}

impl TryFrom<String> for Role {
    type Error = UnknownRole;

    fn try_from(text: String) -> Result<Self, UnknownRole> {
        text.parse()
    }
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn deleting_operations_need_the_admin_role() {
        for op in [
            Operation::Forget,
            Operation::Prune,
            Operation::Repair,
            Operation::Unlock,
            Operation::SetPolicy,
        ] {
            assert_eq!(op.required_role(), Role::Admin);
            assert!(Role::Admin.allows(op));
            assert!(!Role::Backup.allows(op), "{op:?} allowed to a backup token");
            assert!(!Role::Read.allows(op));
        }
        assert!(Role::Backup.allows(Operation::Backup));
        assert!(!Role::Read.allows(Operation::Backup));
        assert!(Role::Read.allows(Operation::Restore));
        assert!(Role::Read < Role::Backup && Role::Backup < Role::Admin);
    }

    #[test]
    fn roles_round_trip_through_their_names_display_and_json() {
        for role in Role::ALL {
            assert_eq!(role.to_string(), role.name());
            assert_eq!(format!("{role:<7}|").len(), 8);
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.name()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
    }

    #[test]
    fn the_json_strings_are_those_older_versions_wrote() {
        // Older servers and token files wrote the roles as these strings.
        for (text, role) in [
            ("\"read\"", Role::Read),
            ("\"backup\"", Role::Backup),
            ("\"admin\"", Role::Admin),
        ] {
            assert_eq!(serde_json::from_str::<Role>(text).unwrap(), role);
            assert_eq!(serde_json::to_string(&role).unwrap(), text);
        }
    }

    #[test]
    fn regression_an_unknown_role_string_is_an_error_never_admin() {
        for bad in [
            "",
            "superuser",
            "Admin",
            "ADMIN",
            " admin",
            "admin ",
            "root",
            "*",
        ] {
            let error = bad.parse::<Role>().unwrap_err();
            assert_eq!(error, UnknownRole(bad.to_string()));
            assert!(error.to_string().contains("read, backup and admin"));
            let json = serde_json::to_string(bad).unwrap();
            let refused = serde_json::from_str::<Role>(&json).unwrap_err();
            assert!(
                refused.to_string().contains("unknown role"),
                "{bad:?}: {refused}"
            );
        }
        assert!(serde_json::from_str::<Role>("3").is_err());
        assert!(serde_json::from_str::<Role>("null").is_err());
    }
}
