//! Access tokens: `DIR/tokens.json`, a versioned list of tokens stored
//! only as SHA-256 hashes, each scoped to one repository (or `*`) with a
//! role. A token reads `vbk1.<id>.<secret>`: the id finds the entry, the
//! hash of the whole token is compared in constant time.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use vbackup_core::roles::Role;
use vbackup_remote::protocol::validate_repo_name;

use crate::Error;

/// The version of the token file format this build reads and writes.
pub const TOKENS_VERSION: u32 = 1;

/// The token file's name inside the data folder.
pub const TOKENS_FILE: &str = "tokens.json";

const TOKEN_PREFIX: &str = "vbk1";

/// The token file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Format version ([`TOKENS_VERSION`]).
    pub version: u32,
    /// The tokens.
    pub tokens: Vec<TokenEntry>,
}

/// One token as stored: never the secret itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Public id (16 hex digits), part of the token.
    pub id: String,
    /// SHA-256 of the whole token, hex.
    pub sha256: String,
    /// The repository it opens, or `*` for all.
    pub repo: String,
    /// What it may do.
    pub role: Role,
    /// A note for people (whose token this is).
    #[serde(default)]
    pub label: String,
    /// When it was made (RFC 3339, UTC).
    pub created: String,
}

impl TokenEntry {
    /// True when the token may act on repository `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.repo == "*" || self.repo == name
    }
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf)
        .map_err(|e| Error::Other(format!("no random numbers from the OS: {e}")))?;
    Ok(hex::encode(buf))
}

/// The path of the token file in `data`.
pub fn tokens_path(data: &Path) -> PathBuf {
    data.join(TOKENS_FILE)
}

/// Reads the token file of `data` (none yet = no tokens).
pub fn load(data: &Path) -> Result<TokenFile, Error> {
    let path = tokens_path(data);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(TokenFile {
                version: TOKENS_VERSION,
                tokens: Vec::new(),
            })
        }
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    parse(&bytes).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}

/// Parses a token file, checking its version.
pub fn parse(bytes: &[u8]) -> Result<TokenFile, String> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version =
        serde_json::from_slice(bytes).map_err(|e| format!("not a token file: {e}"))?;
    if version.version != TOKENS_VERSION {
        return Err(format!(
            "token file version {} is not the version {TOKENS_VERSION} this vbackup understands",
            version.version
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("malformed token file: {e}"))
}

fn save(data: &Path, file: &TokenFile) -> Result<(), Error> {
    fs::create_dir_all(data).map_err(|e| Error::io(format!("creating {}", data.display()), e))?;
    let path = tokens_path(data);
    let temp = data.join(format!(".{TOKENS_FILE}.tmp-{}", random_hex(8)?));
    let json = serde_json::to_vec_pretty(file).map_err(|e| Error::Other(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        out.write_all(&json)?;
        out.sync_all()?;
        fs::rename(&temp, &path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        Error::io(format!("writing {}", path.display()), e)
    })
}

/// Makes a token for `repo` (a name or `*`) with `role`; returns its entry
/// and the secret token, which is shown once and stored nowhere.
pub fn add(
    data: &Path,
    repo: &str,
    role: Role,
    label: &str,
) -> Result<(TokenEntry, String), Error> {
    if repo != "*" {
        validate_repo_name(repo).map_err(Error::Usage)?;
    }
    let mut file = load(data)?;
    let id = random_hex(8)?;
    let token = format!("{TOKEN_PREFIX}.{id}.{}", random_hex(32)?);
    let entry = TokenEntry {
        id,
        sha256: hash(&token),
        repo: repo.to_string(),
        role,
        label: label.to_string(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    file.tokens.push(entry.clone());
    save(data, &file)?;
    Ok((entry, token))
}

/// Removes the tokens whose id or label is `which`; returns them.
pub fn remove(data: &Path, which: &str) -> Result<Vec<TokenEntry>, Error> {
    let mut file = load(data)?;
    let (gone, kept): (Vec<_>, Vec<_>) = file
        .tokens
        .into_iter()
        .partition(|t| t.id == which || (!t.label.is_empty() && t.label == which));
    if gone.is_empty() {
        return Err(Error::Usage(format!(
            "no token has the id or label '{which}'"
        )));
    }
    file.tokens = kept;
    save(data, &file)?;
    Ok(gone)
}

/// Why a request's token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Unknown or wrong token.
    Invalid,
}

/// Finds the entry matching `token`, comparing hashes in constant time.
pub fn authenticate(file: &TokenFile, token: &str) -> Result<TokenEntry, AuthError> {
    let id = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|t| t.strip_prefix('.'))
        .and_then(|t| t.split('.').next())
        .ok_or(AuthError::Invalid)?;
    let presented = hash(token);
    let mut found = None;
    for entry in file.tokens.iter().filter(|e| e.id == id) {
        if bool::from(entry.sha256.as_bytes().ct_eq(presented.as_bytes())) {
            found = Some(entry.clone());
        }
    }
    found.ok_or(AuthError::Invalid)
}

/// The token file as the server sees it: reloaded when it changes on disk,
/// so `token add` and `token remove` take effect without a restart.
#[derive(Debug)]
pub struct TokenStore {
    data: PathBuf,
    cached: RwLock<(Option<(SystemTime, u64)>, TokenFile)>,
}

impl TokenStore {
    /// Loads the tokens of `data`.
    pub fn open(data: &Path) -> Result<Self, Error> {
        let file = load(data)?;
        Ok(Self {
            data: data.to_path_buf(),
            cached: RwLock::new((stamp(data), file)),
        })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.cached
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .tokens
            .len()
    }

    /// True when there is no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks `token` against the current file.
    pub fn authenticate(&self, token: &str) -> Result<TokenEntry, AuthError> {
        let now = stamp(&self.data);
        {
            let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
            if cached.0 == now {
                return authenticate(&cached.1, token);
            }
        }
        let mut cached = self.cached.write().unwrap_or_else(|p| p.into_inner());
        // A file that cannot be read now keeps the last good tokens.
        if let Ok(file) = load(&self.data) {
            *cached = (now, file);
        }
        authenticate(&cached.1, token)
    }
}

fn stamp(data: &Path) -> Option<(SystemTime, u64)> {
    let meta = fs::metadata(tokens_path(data)).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (entry, token) = add(dir.path(), "vm1", Role::Backup, "host a").unwrap();
        let text = fs::read_to_string(tokens_path(dir.path())).unwrap();
        assert!(!text.contains(&token), "the secret must not be stored");
        assert!(text.contains(&entry.sha256));
        let file = load(dir.path()).unwrap();
        let found = authenticate(&file, &token).unwrap();
        assert_eq!(found.role, Role::Backup);
        assert!(found.covers("vm1") && !found.covers("vm2"));
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(authenticate(&file, &wrong), Err(AuthError::Invalid));
        assert_eq!(authenticate(&file, ""), Err(AuthError::Invalid));
        assert_eq!(authenticate(&file, "vbk1."), Err(AuthError::Invalid));
        remove(dir.path(), "host a").unwrap();
        assert_eq!(
            authenticate(&load(dir.path()).unwrap(), &token),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn the_store_sees_new_tokens_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        assert!(store.is_empty());
        let (_, token) = add(dir.path(), "*", Role::Admin, "").unwrap();
        assert_eq!(store.authenticate(&token).unwrap().role, Role::Admin);
    }

    #[test]
    fn bad_names_and_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(add(dir.path(), "../x", Role::Read, "").is_err());
        assert!(parse(br#"{"version":2,"tokens":[]}"#).is_err());
        assert!(parse(b"[]").is_err());
        assert!(parse(br#"{"version":1,"tokens":[]}"#).is_ok());
    }
}
