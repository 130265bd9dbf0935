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
use vbackup_protocol::{validate_repo_name, Role};

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
    /// The most bytes this token may add to the server (new objects it
    /// uploads, counted in `DIR/usage/ID`); none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
}

impl TokenEntry {
    /// True when the token may act on repository `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.repo == "*" || self.repo == name
    }

    /// How refusals and writer records name the token: `LABEL (token ID)`,
    /// or `token ID` without a label.
    pub fn describe(&self) -> String {
        if self.label.is_empty() {
            format!("token {}", self.id)
        } else {
            format!("{} (token {})", self.label, self.id)
        }
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
    let file: TokenFile =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed token file: {e}"))?;
    check_entries(&file, bytes)?;
    Ok(file)
}

/// Checks what the JSON syntax cannot: every id, hash and repository
/// name well formed, no id twice. Errors name the entry's line.
fn check_entries(file: &TokenFile, bytes: &[u8]) -> Result<(), String> {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    for (i, entry) in file.tokens.iter().enumerate() {
        let problem = if !hex(&entry.id, 16) {
            Some("its id is not 16 lowercase hex digits".to_string())
        } else if !hex(&entry.sha256, 64) {
            Some("its sha256 is not 64 lowercase hex digits".to_string())
        } else if entry.repo != "*" && validate_repo_name(&entry.repo).is_err() {
            Some(format!(
                "its repo {:?} is neither `*` nor a repository name",
                entry.repo
            ))
        } else if file.tokens[..i].iter().any(|t| t.id == entry.id) {
            Some("its id is used by an earlier token".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(format!(
                "token {} (id {:?}, line {}): {problem}",
                i + 1,
                entry.id,
                line_of(
                    bytes,
                    &entry.id,
                    file.tokens[..i].iter().filter(|t| t.id == entry.id).count()
                )
            ));
        }
    }
    Ok(())
}

/// The line (from 1) where the id `id` is written for the `nth` time
/// (from 0); 0 when it cannot be found.
fn line_of(bytes: &[u8], id: &str, nth: usize) -> usize {
    let text = String::from_utf8_lossy(bytes);
    let quoted = format!("\"{id}\"");
    text.match_indices(&quoted)
        .nth(nth)
        .map_or(0, |(at, _)| text[..at].matches('\n').count() + 1)
}

fn save(data: &Path, file: &TokenFile) -> Result<(), Error> {
    crate::create_private_dir(data)
        .map_err(|e| Error::io(format!("creating {}", data.display()), e))?;
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

/// Makes a token for `repo` (a name or `*`) with `role` and an optional
/// quota in bytes; returns its entry and the secret token, which is shown
/// once and stored nowhere.
pub fn add(
    data: &Path,
    repo: &str,
    role: Role,
    label: &str,
    quota: Option<u64>,
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
        quota,
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
    /// The token file is broken (the reason, with its line): every request
    /// is refused until it is fixed.
    Broken(String),
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
/// so `token add` and `token remove` take effect without a restart. A file
/// that becomes unreadable or malformed fails closed: every request is
/// refused (and the problem logged once, with its line) until it is fixed.
#[derive(Debug)]
pub struct TokenStore {
    data: PathBuf,
    cached: RwLock<(Option<Stamp>, Result<TokenFile, String>)>,
}

/// When the token file was last changed and its length: a new stamp means
/// it must be read again.
type Stamp = (SystemTime, u64);

impl TokenStore {
    /// Loads the tokens of `data`; a broken file is an error, so the server
    /// does not start with it.
    pub fn open(data: &Path) -> Result<Self, Error> {
        let file = load(data)?;
        Ok(Self {
            data: data.to_path_buf(),
            cached: RwLock::new((stamp(data), Ok(file))),
        })
    }

    /// How many tokens there are (0 while the file is broken).
    pub fn len(&self) -> usize {
        self.current().map_or(0, |f| f.tokens.len())
    }

    /// True when there is no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks `token` against the current file.
    pub fn authenticate(&self, token: &str) -> Result<TokenEntry, AuthError> {
        let file = self.current().map_err(AuthError::Broken)?;
        authenticate(&file, token)
    }

    /// The entry with id `id` in the current file, if any.
    pub fn find(&self, id: &str) -> Option<TokenEntry> {
        let file = self.current().ok()?;
        file.tokens.into_iter().find(|t| t.id == id)
    }

    /// The current file, reloaded when it changed on disk.
    fn current(&self) -> Result<TokenFile, String> {
        let now = stamp(&self.data);
        {
            let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
            if cached.0 == now {
                return cached.1.clone();
            }
        }
        let mut cached = self.cached.write().unwrap_or_else(|p| p.into_inner());
        if cached.0 != now {
            let loaded = load(&self.data).map_err(|e| e.to_string());
            match (&cached.1, &loaded) {
                (_, Err(e)) => eprintln!(
                    "vbackup server: ERROR: the token file is broken, every request is refused until it is fixed: {e}"
                ),
                (Err(_), Ok(_)) => eprintln!(
                    "vbackup server: the token file {} is readable again; requests are served",
                    tokens_path(&self.data).display()
                ),
                (Ok(_), Ok(_)) => {}
            }
            *cached = (now, loaded);
        }
        cached.1.clone()
    }
}

fn stamp(data: &Path) -> Option<Stamp> {
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
        let (entry, token) = add(dir.path(), "vm1", Role::Backup, "host a", None).unwrap();
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
        let (_, token) = add(dir.path(), "*", Role::Admin, "", None).unwrap();
        assert_eq!(store.authenticate(&token).unwrap().role, Role::Admin);
    }

    #[test]
    fn bad_names_and_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(add(dir.path(), "../x", Role::Read, "", None).is_err());
        assert!(parse(br#"{"version":2,"tokens":[]}"#).is_err());
        assert!(parse(b"[]").is_err());
        assert!(parse(br#"{"version":1,"tokens":[]}"#).is_ok());
    }

    #[test]
    fn attack_broken_token_file_keeps_revoked_tokens_working() {
        let dir = tempfile::tempdir().unwrap();
        let (_, kept) = add(dir.path(), "r", Role::Backup, "kept", None).unwrap();
        let (_, revoked) = add(dir.path(), "r", Role::Admin, "revoked", None).unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        assert!(store.authenticate(&revoked).is_ok());
        // The operator removes a token by hand and leaves a syntax error.
        let path = tokens_path(dir.path());
        let text = fs::read_to_string(&path).unwrap();
        let broken = text.replacen("\"label\": \"revoked\",", "\"label\": \"revoked\"", 1);
        assert_ne!(broken, text);
        fs::write(&path, &broken).unwrap();
        for token in [&revoked, &kept] {
            let Err(AuthError::Broken(why)) = store.authenticate(token) else {
                panic!("a broken token file must refuse every token");
            };
            assert!(why.contains("tokens.json") && why.contains("line"), "{why}");
        }
        assert!(store.find("anything").is_none());
        // Fixed: served again, from the fixed file.
        remove_by_text(&path, &text, "revoked");
        assert!(store.authenticate(&kept).is_ok());
        assert_eq!(store.authenticate(&revoked), Err(AuthError::Invalid));
    }

    /// Writes `text` without the token labelled `label`.
    fn remove_by_text(path: &Path, text: &str, label: &str) {
        let mut file = parse(text.as_bytes()).unwrap();
        file.tokens.retain(|t| t.label != label);
        fs::write(path, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    }

    #[test]
    fn malformed_entries_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        add(dir.path(), "r", Role::Read, "a", None).unwrap();
        let path = tokens_path(dir.path());
        let text = fs::read_to_string(&path).unwrap();
        let mut file = parse(text.as_bytes()).unwrap();
        let mut twin = file.tokens[0].clone();
        twin.label = "twin".into();
        file.tokens.push(twin);
        let bytes = serde_json::to_vec_pretty(&file).unwrap();
        let err = parse(&bytes).unwrap_err();
        assert!(
            err.contains("token 2") && err.contains("used by an earlier"),
            "{err}"
        );
        assert!(err.contains("line 13"), "{err}");
        file.tokens.truncate(1);
        file.tokens[0].repo = "../etc".into();
        let err = parse(&serde_json::to_vec(&file).unwrap()).unwrap_err();
        assert!(err.contains("repo"), "{err}");
        let err = parse(b"{\"version\": 1,\n \"tokens\": [}").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }
}
