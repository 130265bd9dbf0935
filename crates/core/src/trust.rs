//! What this client remembers of the repositories it has opened, so that
//! the storage cannot switch encryption off behind its back.
//!
//! The config object is readable and, for anyone with write access to the
//! storage, writable without the key. An unencrypted config has no MAC, so a
//! storage operator could replace an encrypted repository's config by an
//! unencrypted one and the next backup would write plaintext. The defences
//! (see docs/security.md, "Encryption downgrade"):
//!
//! - a repository whose config says "unencrypted" but which holds key
//!   files is refused;
//! - a client given a passphrase refuses an unencrypted config;
//! - a client that opened the repository encrypted before (recorded here,
//!   per location) refuses an unencrypted config;
//! - using an unencrypted repository at all is the user's explicit choice
//!   ([`OpenOptions::allow_unencrypted`], or `init --encryption none` on
//!   this host), remembered here per location.
//!
//! The record is one small JSON file (`known-repositories.json`, format in
//! docs/format.md), written atomically and private to the user. Failing to
//! write it never fails the operation: it only weakens the third defence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::Config;

/// Name of the record file inside the client's state folder.
pub const KNOWN_REPOSITORIES_FILE: &str = "known-repositories.json";
/// Format version of the record file.
const RECORD_VERSION: u32 = 1;
/// Locations remembered at most (oldest forgotten first).
const MAX_LOCATIONS: usize = 10_000;

/// How a repository is to be opened: what the user said, and where this
/// client keeps its record of repositories it has seen.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The user explicitly accepts a repository without encryption
    /// (`--allow-unencrypted`). Without it, an unencrypted repository opens
    /// only if this host created it so or accepted it before.
    pub allow_unencrypted: bool,
    /// A passphrase was supplied without asking (environment, file): the
    /// user expects an encrypted repository.
    pub passphrase_given: bool,
    /// Folder of the client's record of known repositories; `None` keeps
    /// no record.
    pub state_dir: Option<PathBuf>,
}

/// What was recorded about one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KnownRepository {
    /// The repository id last seen there.
    pub id: String,
    /// Whether it was encrypted.
    pub encrypted: bool,
    /// When it was first recorded (RFC 3339).
    pub first_seen: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RecordFile {
    version: u32,
    repositories: BTreeMap<String, KnownRepository>,
}

/// The record file of one client.
#[derive(Debug, Clone)]
pub struct KnownRepositories {
    path: PathBuf,
}

impl KnownRepositories {
    /// The record kept in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(KNOWN_REPOSITORIES_FILE),
        }
    }

    /// What is recorded for `location`. An unreadable or damaged record
    /// reads as empty (it is advisory, and rewritten on the next open), but
    /// a record of a newer format is left alone.
    pub fn get(&self, location: &str) -> Option<KnownRepository> {
        self.load().ok()?.repositories.remove(location)
    }

    /// Records what was just opened at `location`. Best effort.
    pub fn record(&self, location: &str, config: &Config) {
        let Ok(mut file) = self.load() else { return };
        let encrypted = config.cipher != crate::crypto::CipherKind::None;
        let unchanged = file
            .repositories
            .get(location)
            .is_some_and(|k| k.id == config.id && k.encrypted == encrypted);
        if unchanged {
            return;
        }
        // Once encrypted, a location stays recorded as encrypted: only the
        // user, by removing the record, can undo that.
        let was_encrypted = file.repositories.get(location).is_some_and(|k| k.encrypted);
        let first_seen = file
            .repositories
            .get(location)
            .map(|k| k.first_seen.clone())
            .unwrap_or_else(|| chrono::Utc::now().to_rfc3339());
        file.repositories.insert(
            location.to_string(),
            KnownRepository {
                id: config.id.clone(),
                encrypted: encrypted || was_encrypted,
                first_seen,
            },
        );
        while file.repositories.len() > MAX_LOCATIONS {
            let oldest = file
                .repositories
                .iter()
                .min_by(|a, b| a.1.first_seen.cmp(&b.1.first_seen))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(key) => file.repositories.remove(&key),
                None => break,
            };
        }
        let _ = self.save(&file);
    }

    fn load(&self) -> std::result::Result<RecordFile, ()> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RecordFile {
                    version: RECORD_VERSION,
                    ..RecordFile::default()
                })
            }
            Err(_) => return Err(()),
        };
        match serde_json::from_slice::<RecordFile>(&bytes) {
            Ok(file) if file.version > RECORD_VERSION => Err(()),
            Ok(file) => Ok(file),
            Err(_) => Ok(RecordFile {
                version: RECORD_VERSION,
                ..RecordFile::default()
            }),
        }
    }

    fn save(&self, file: &RecordFile) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let json = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(
            ".{KNOWN_REPOSITORIES_FILE}.{}.tmp",
            std::process::id()
        ));
        write_private(&tmp, &json)?;
        std::fs::rename(&tmp, &self.path)
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Decides whether an unencrypted config may be used. `keys` is the number
/// of key objects the storage holds.
pub(crate) fn check_unencrypted(
    location: &str,
    keys: usize,
    options: &OpenOptions,
    known: Option<&KnownRepository>,
) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::Downgrade {
            location: location.to_string(),
            reason,
        })
    };
    if keys > 0 {
        return refuse(format!(
            "its config says it is not encrypted, but it holds {keys} key file(s): the config was rewritten by someone without the key"
        ));
    }
    if let Some(known) = known.filter(|k| k.encrypted) {
        return refuse(format!(
            "this client opened it encrypted before (first seen {}), and now its config says it is not encrypted",
            known.first_seen
        ));
    }
    if options.passphrase_given {
        return refuse(
            "a passphrase was given, but its config says it is not encrypted; if it really is an unencrypted repository, unset VBACKUP_PASSWORD / VBACKUP_PASSWORD_FILE"
                .to_string(),
        );
    }
    if options.allow_unencrypted || known.is_some() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "the repository at {location} is not encrypted: anyone with access to its storage can read and change the backups; if that is what you chose, open it once with --allow-unencrypted (or VBACKUP_ALLOW_UNENCRYPTED=1) and this host remembers it"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(encrypted: bool) -> Config {
        Config {
            version: 1,
            id: "00112233445566778899aabbccddeeff".into(),
            chunk_size: 4 << 20,
            digest: crate::crypto::DigestKind::Blake3Keyed,
            cipher: match encrypted {
                true => crate::crypto::CipherKind::Aes256Gcm,
                false => crate::crypto::CipherKind::None,
            },
            compression_level: 3,
            pack_size: 0,
            mac: String::new(),
        }
    }

    #[test]
    fn a_location_once_encrypted_stays_recorded_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownRepositories::new(dir.path());
        known.record("/srv/a", &config(true));
        known.record("/srv/a", &config(false));
        assert!(known.get("/srv/a").unwrap().encrypted);
        assert!(known.get("/srv/b").is_none());
    }

    #[test]
    fn the_record_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        KnownRepositories::new(&state).record("/srv/a", &config(true));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(KNOWN_REPOSITORIES_FILE)), 0o600);
    }

    #[test]
    fn a_damaged_record_reads_as_empty_and_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KNOWN_REPOSITORIES_FILE), b"{garbage").unwrap();
        let known = KnownRepositories::new(dir.path());
        assert!(known.get("/srv/a").is_none());
        known.record("/srv/a", &config(true));
        assert!(known.get("/srv/a").unwrap().encrypted);
    }

    #[test]
    fn unencrypted_needs_an_explicit_choice_and_no_sign_of_encryption() {
        let allow = OpenOptions {
            allow_unencrypted: true,
            ..OpenOptions::default()
        };
        assert!(check_unencrypted("x", 0, &allow, None).is_ok());
        let class = |r: Result<()>| r.unwrap_err().class();
        use crate::ErrorClass::*;
        assert_eq!(
            class(check_unencrypted("x", 0, &OpenOptions::default(), None)),
            Usage
        );
        assert_eq!(class(check_unencrypted("x", 1, &allow, None)), Integrity);
        let given = OpenOptions {
            passphrase_given: true,
            ..allow.clone()
        };
        assert_eq!(class(check_unencrypted("x", 0, &given, None)), Integrity);
        let seen = KnownRepository {
            id: "a".into(),
            encrypted: true,
            first_seen: "2026-01-01T00:00:00Z".into(),
        };
        assert_eq!(
            class(check_unencrypted("x", 0, &allow, Some(&seen))),
            Integrity
        );
        let chosen = KnownRepository {
            encrypted: false,
            ..seen
        };
        assert!(check_unencrypted("x", 0, &OpenOptions::default(), Some(&chosen)).is_ok());
    }
}
