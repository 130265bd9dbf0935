//! Opening a vbackup repository wherever it lives.
//!
//! Every front end — the CLI, the backup server's own tools, the daemon,
//! tests, programs using vbackup as a library — names a repository by one
//! location string and calls [`open`] (or [`init`], [`backend`]). This
//! crate owns what used to be decided in the CLI:
//!
//! - **Scheme dispatch** ([`Location`]): a folder, `s3:http(s)://HOST/BUCKET/PREFIX`
//!   (several endpoints of one cluster separated by commas), or
//!   `https://HOST:PORT/NAME` on a `vbackup server`. Other schemes are
//!   refused by name.
//! - **Retries** of transient failures (inside the S3 and server backends).
//! - **The metadata cache** of remote repositories ([`Purpose::Use`]), and
//!   none for the commands that judge what the storage holds
//!   ([`Purpose::Judge`]: check, verify, repair).
//! - **The client state** (`known-repositories.json` and the per-repository
//!   records, `state/` in the cache folder) that keeps storage from
//!   switching encryption off or rolling back unnoticed.
//! - **The worker budget** ([`io_threads`]): enough requests in flight for
//!   the backend, but memory bounded whatever the chunk and pack sizes.
//!
//! [`RepositoryOptions`] is the one options struct for all of this: the CLI
//! fills it from flags and the environment, a config file deserializes it
//! (kebab-case TOML or JSON), tests build it literally.
#![deny(missing_docs)]

pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vbackup_core::{Error, InitOptions, OpenOptions, Repository, Result};
use vbackup_storage::{Backend, CachedBackend, LocalBackend};

/// Memory the extra workers for a remote backend may take: with 4 MiB
/// chunks, 12 workers; with 16 MiB packs as well, 4.
pub const IO_MEMORY_BUDGET: u64 = 192 << 20;

/// Copies of a chunk a backup or restore worker holds at once (read,
/// compressed, sealed, and the request body).
const WORKER_CHUNK_COPIES: u64 = 4;

/// Where a repository lives, parsed from its location string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A folder on this host.
    Folder(PathBuf),
    /// A prefix of a bucket on S3-compatible storage (the location string
    /// as given, `s3:…`).
    S3(String),
    /// A repository on a `vbackup server` (`https://HOST:PORT/NAME`).
    Server(String),
}

impl Location {
    /// Parses a location: `s3:` and `https://` name remote storage, any
    /// other `scheme:` or `scheme://` is refused (a typo must not become
    /// a folder named after it), everything else is a folder.
    pub fn parse(text: &str) -> Result<Self> {
        if text.is_empty() {
            return Err(Error::InvalidInput(
                "the repository location is empty".to_string(),
            ));
        }
        if vbackup_s3::is_s3(text) {
            vbackup_s3::S3Location::parse(text).map_err(|e| Error::InvalidInput(e.to_string()))?;
            return Ok(Location::S3(text.to_string()));
        }
        if text.starts_with("https://") {
            return Ok(Location::Server(text.to_string()));
        }
        if let Some((scheme, _)) = text
            .split_once("://")
            .or_else(|| text.split_once(':').filter(|(s, _)| s.len() > 1))
        {
            return Err(Error::InvalidInput(format!(
                "repository '{text}': the '{scheme}' scheme is not supported by this build; give a folder, s3:… or https://…"
            )));
        }
        Ok(Location::Folder(PathBuf::from(text)))
    }

    /// Whether the repository is on another machine (S3, a server): such
    /// repositories get the metadata cache and more workers.
    pub fn is_remote(&self) -> bool {
        !matches!(self, Location::Folder(_))
    }
}

/// What a backend is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Ordinary work (backup, restore, listing, prune): remote repositories
    /// go through the local metadata cache unless it is turned off.
    Use,
    /// Judging what the storage holds (check, verify, repair): never
    /// through the cache, whose good copies would hide damage.
    Judge,
}

/// How to reach and open a repository: one struct for the library, the
/// CLI's flags and environment, and the `[repository.NAME]` sections of a
/// configuration file (kebab-case keys: `location`, `password-file`, ...).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepositoryOptions {
    /// The location: a folder, `s3:…` or `https://HOST:PORT/NAME`.
    #[serde(default)]
    pub location: String,
    /// The file whose first line is the passphrase.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// For a server: the access token (a secret; never printed by `Debug`,
    /// never read from or written to a configuration file: those name a
    /// `token-file`).
    #[serde(skip)]
    pub token: Option<String>,
    /// For a server: the file whose first line is the access token, read
    /// when `token` is not given.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// For a server with a self-signed certificate: its SHA-256
    /// fingerprint (hex), pinned.
    #[serde(default)]
    pub server_fingerprint: Option<String>,
    /// Do not keep the local metadata cache of remote repositories.
    #[serde(default)]
    pub no_cache: bool,
    /// The client's cache and state folder; `None` chooses
    /// `VBACKUP_CACHE_DIR`, else `$XDG_CACHE_HOME/vbackup`, else
    /// `~/.cache/vbackup`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Accept a repository without encryption (see `vbackup_core::trust`).
    #[serde(default)]
    pub allow_unencrypted: bool,
    /// Worker threads; `None` picks them from the cores and the backend.
    #[serde(default)]
    pub threads: Option<usize>,
}

impl std::fmt::Debug for RepositoryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryOptions")
            .field("location", &self.location)
            .field("password_file", &self.password_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("server_fingerprint", &self.server_fingerprint)
            .field("no_cache", &self.no_cache)
            .field("cache_dir", &self.cache_dir)
            .field("allow_unencrypted", &self.allow_unencrypted)
            .field("threads", &self.threads)
            .finish()
    }
}

impl RepositoryOptions {
    /// Options for the repository at `location` with every default.
    pub fn new(location: impl Into<String>) -> Self {
        Self {
            location: location.into(),
            ..Self::default()
        }
    }

    /// These options, with what they leave unset taken from `lower` (a
    /// configuration file's section under the command line's flags): the
    /// location and every optional value where this one has none, and the
    /// switches on when either turns them on.
    pub fn over(self, lower: &RepositoryOptions) -> Self {
        let location = match self.location.is_empty() {
            true => lower.location.clone(),
            false => self.location,
        };
        Self {
            location,
            password_file: self.password_file.or_else(|| lower.password_file.clone()),
            token: self.token.or_else(|| lower.token.clone()),
            token_file: self.token_file.or_else(|| lower.token_file.clone()),
            server_fingerprint: self
                .server_fingerprint
                .or_else(|| lower.server_fingerprint.clone()),
            no_cache: self.no_cache || lower.no_cache,
            cache_dir: self.cache_dir.or_else(|| lower.cache_dir.clone()),
            allow_unencrypted: self.allow_unencrypted || lower.allow_unencrypted,
            threads: self.threads.or(lower.threads),
        }
    }

    /// The parsed location.
    pub fn location(&self) -> Result<Location> {
        Location::parse(&self.location)
    }

    /// The server token: `token`, else the first line of `token_file`;
    /// `None` when neither is given.
    pub fn token(&self) -> Result<Option<String>> {
        if let Some(token) = self.token.as_ref().filter(|t| !t.trim().is_empty()) {
            return Ok(Some(token.trim().to_string()));
        }
        match &self.token_file {
            Some(file) => read_secret_file(file, "token").map(Some),
            None => Ok(None),
        }
    }

    /// The passphrase from `password_file`, if one is named.
    pub fn passphrase(&self) -> Result<Option<String>> {
        match &self.password_file {
            Some(file) => read_secret_file(file, "passphrase").map(Some),
            None => Ok(None),
        }
    }

    /// The client's cache folder (remote repositories' metadata copies).
    pub fn cache_root(&self) -> Option<PathBuf> {
        self.cache_dir.clone().or_else(default_cache_root)
    }

    /// The client's state folder: records that storage cannot roll back.
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.cache_root().map(|root| root.join("state"))
    }

    /// Worker threads for work bound by the CPU: `threads`, else the cores
    /// plus two.
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(vbackup_core::default_threads)
            .max(1)
    }
}

/// The first line of the secret file `file` (a passphrase or a token,
/// named by `what` in the error), without its line ending; a token also
/// without surrounding spaces, a passphrase with them.
pub fn read_secret_file(file: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::InvalidInput(format!(
            "cannot read the {what} file {}: {e}",
            file.display()
        ))
    })?;
    let line = text.lines().next().unwrap_or_default();
    Ok(match what {
        "token" => line.trim().to_string(),
        _ => line.to_string(),
    })
}

/// A warning, as ssh gives for keys, when the secret file `file` (a
/// passphrase or a token, named by `what`) can be read or written by users
/// other than its owner: anyone who reads it can open the repository.
/// Front ends print it and go on, so a scheduled backup does not stop
/// over a mode.
pub fn secret_file_exposure(file: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the {what} file {} has mode {mode:04o}: other users can read or change it; \
             make it its owner's alone (chmod 600 {})",
            file.display(),
            file.display()
        )
    })
}

/// `VBACKUP_CACHE_DIR`, else `$XDG_CACHE_HOME/vbackup`, else
/// `~/.cache/vbackup` (empty variables count as unset).
pub fn default_cache_root() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("VBACKUP_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("vbackup"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".cache/vbackup"))
}

/// The storage backend of the repository, for `purpose`.
pub fn backend(options: &RepositoryOptions, purpose: Purpose) -> Result<Arc<dyn Backend>> {
    let location = options.location()?;
    let raw = raw_backend(options, &location)?;
    let cached = location.is_remote() && purpose == Purpose::Use && !options.no_cache;
    match options.cache_root().filter(|_| cached) {
        Some(root) => Ok(Arc::new(CachedBackend::new(raw, &root))),
        None => Ok(raw),
    }
}

/// The backend of `location`, with retries, without the cache.
fn raw_backend(options: &RepositoryOptions, location: &Location) -> Result<Arc<dyn Backend>> {
    match location {
        Location::Folder(path) => Ok(Arc::new(LocalBackend::new(path.clone()))),
        Location::S3(text) => Ok(Arc::new(vbackup_s3::open(text)?)),
        Location::Server(url) => {
            let token = options.token()?.ok_or_else(|| {
                Error::InvalidInput(format!(
                    "the repository {url} is on a vbackup server, which needs an access token"
                ))
            })?;
            let config = vbackup_remote::RemoteConfig {
                url: url.clone(),
                token,
                fingerprint: options.server_fingerprint.clone(),
            };
            let backend =
                vbackup_remote::open(&config).map_err(|e| Error::InvalidInput(e.to_string()))?;
            Ok(Arc::new(backend))
        }
    }
}

/// The core's open options for `options`: the explicit choice about
/// unencrypted repositories, whether a passphrase was supplied, and the
/// client state folder.
pub fn core_open_options(options: &RepositoryOptions, passphrase_given: bool) -> OpenOptions {
    OpenOptions {
        allow_unencrypted: options.allow_unencrypted,
        passphrase_given,
        state_dir: options.state_dir(),
    }
}

/// Opens the repository for `purpose`. `passphrase` is asked for only
/// when the repository is encrypted; `passphrase_given` says whether one
/// was supplied without asking (then an unencrypted config is refused).
pub fn open(
    options: &RepositoryOptions,
    purpose: Purpose,
    passphrase_given: bool,
    passphrase: impl FnOnce() -> Result<Option<String>>,
) -> Result<Repository> {
    let backend = backend(options, purpose)?;
    Repository::open_with(
        backend,
        &core_open_options(options, passphrase_given),
        passphrase,
    )
}

/// Creates a repository at the location; it is recorded in the client
/// state (encrypted, or by explicit choice not).
pub fn init(
    options: &RepositoryOptions,
    passphrase: Option<&str>,
    init: &InitOptions,
) -> Result<Repository> {
    let backend = backend(options, Purpose::Use)?;
    let init = InitOptions {
        state_dir: init.state_dir.clone().or_else(|| options.state_dir()),
        ..init.clone()
    };
    Repository::init(backend, passphrase, &init)
}

/// For a repository on a server, refuses at once an operation the token's
/// role does not allow, before any work (the server would refuse its first
/// change anyway, possibly after much was read). Other locations, and
/// options without a token, pass.
pub fn check_role(
    options: &RepositoryOptions,
    operation: vbackup_protocol::Operation,
) -> Result<()> {
    let (Location::Server(url), Some(token)) = (options.location()?, options.token()?) else {
        return Ok(());
    };
    let client = vbackup_remote::RemoteBackend::new(&vbackup_remote::RemoteConfig {
        url: url.clone(),
        token,
        fingerprint: options.server_fingerprint.clone(),
    })
    .map_err(|e| Error::InvalidInput(e.to_string()))?;
    let me = client.whoami().map_err(|e| {
        Error::Storage(vbackup_storage::StorageError::new(
            e.kind(),
            e.key(),
            format!("cannot learn the token's role from the server at {url}, so the command was not started: {e}"),
        ))
    })?;
    if me.role.allows(operation) {
        return Ok(());
    }
    let needed = match operation.required_role() {
        vbackup_protocol::Role::Admin => "an admin",
        vbackup_protocol::Role::Backup => "a backup (or admin)",
        vbackup_protocol::Role::Read => "a read",
    };
    Err(Error::InvalidInput(format!(
        "this command needs {needed} token; the token {} has the role {} on the server",
        me.id, me.role
    )))
}

/// Worker threads for work that mostly waits on `repo`'s backend (backup,
/// restore, verify): `threads` when given, else enough to keep the
/// backend's preferred number of requests in flight — but beyond the
/// machine's cores only as many as fit in [`IO_MEMORY_BUDGET`], since each
/// holds a few copies of a chunk and, with packs, the pack it uploads or
/// the range it reads twice (the S3 client copies what it sends and
/// receives).
pub fn io_threads(repo: &Repository, threads: Option<usize>) -> usize {
    if let Some(threads) = threads {
        return threads.max(1);
    }
    let per_worker = WORKER_CHUNK_COPIES * u64::from(repo.config().chunk_size)
        + 2 * u64::from(repo.config().pack_size);
    let affordable = usize::try_from(IO_MEMORY_BUDGET / per_worker.max(1)).unwrap_or(1);
    let wanted = repo.backend().concurrency().min(affordable);
    vbackup_core::default_threads().max(1).max(wanted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn locations_dispatch_by_scheme_and_typos_are_refused() {
        assert_eq!(
            Location::parse("/srv/vbackup").unwrap(),
            Location::Folder("/srv/vbackup".into())
        );
        assert_eq!(
            Location::parse("relative/dir").unwrap(),
            Location::Folder("relative/dir".into())
        );
        assert!(matches!(
            Location::parse("s3:http://127.0.0.1:3900/bucket/prefix").unwrap(),
            Location::S3(_)
        ));
        assert!(matches!(
            Location::parse("https://backup:8007/web").unwrap(),
            Location::Server(_)
        ));
        for bad in ["sftp://host/x", "rest:http://x", "s3:nope", ""] {
            let error = Location::parse(bad).unwrap_err();
            assert_eq!(
                error.class(),
                vbackup_core::ErrorClass::Usage,
                "{bad}: {error}"
            );
        }
        assert!(!Location::Folder("/x".into()).is_remote());
        assert!(Location::Server("https://h/x".into()).is_remote());
    }

    #[test]
    fn options_read_from_a_config_file_and_never_print_the_token() {
        let mut options: RepositoryOptions = serde_json::from_str(
            r#"{"location": "https://backup:8007/web", "token-file": "/etc/vbackup/token", "threads": 4}"#,
        )
        .unwrap();
        assert_eq!(options.threads(), 4);
        assert_eq!(
            options.token_file,
            Some(PathBuf::from("/etc/vbackup/token"))
        );
        options.token = Some("vb1.abc.s3cr3tvalue".into());
        assert!(!format!("{options:?}").contains("s3cr3tvalue"));
        assert!(!serde_json::to_string(&options)
            .unwrap()
            .contains("s3cr3tvalue"));
        assert!(
            serde_json::from_str::<RepositoryOptions>(r#"{"location": "x", "typo": 1}"#).is_err()
        );
        assert!(
            serde_json::from_str::<RepositoryOptions>(r#"{"token": "inline"}"#).is_err(),
            "a token is never read from a configuration file"
        );
    }

    #[test]
    fn flags_win_over_the_configuration_file_and_fill_from_it() {
        let file = RepositoryOptions {
            password_file: Some("/etc/vbackup/pw".into()),
            threads: Some(8),
            allow_unencrypted: true,
            ..RepositoryOptions::new("/srv/vbackup")
        };
        let flags = RepositoryOptions {
            threads: Some(2),
            ..RepositoryOptions::default()
        };
        let merged = flags.over(&file);
        assert_eq!(merged.location, "/srv/vbackup");
        assert_eq!(merged.threads, Some(2));
        assert_eq!(merged.password_file, Some("/etc/vbackup/pw".into()));
        assert!(merged.allow_unencrypted);
        let elsewhere = RepositoryOptions::new("/mnt/other").over(&file);
        assert_eq!(elsewhere.location, "/mnt/other");
    }

    #[test]
    fn secret_files_give_their_first_line_and_exposed_ones_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, " pass phrase \nsecond\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_secret_file(&file, "passphrase").unwrap(),
            " pass phrase "
        );
        assert_eq!(read_secret_file(&file, "token").unwrap(), "pass phrase");
        assert_eq!(secret_file_exposure(&file, "passphrase"), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = secret_file_exposure(&file, "passphrase").unwrap();
        assert!(
            warning.contains("passphrase file")
                && warning.contains("0644")
                && warning.contains("chmod 600"),
            "{warning}"
        );
        let missing = read_secret_file(&dir.path().join("none"), "token").unwrap_err();
        assert!(missing.to_string().contains("token file"), "{missing}");
        assert_eq!(missing.class(), vbackup_core::ErrorClass::Usage);
    }

    #[test]
    fn a_server_without_a_token_is_refused_before_any_request() {
        let options = RepositoryOptions::new("https://127.0.0.1:9/web");
        let error = backend(&options, Purpose::Use).err().unwrap();
        assert!(error.to_string().contains("access token"), "{error}");
    }

    #[test]
    fn a_folder_is_opened_through_the_library_with_its_client_state() {
        let dir = tempfile::tempdir().unwrap();
        let options = RepositoryOptions {
            cache_dir: Some(dir.path().join("cache")),
            ..RepositoryOptions::new(dir.path().join("repo").to_str().unwrap())
        };
        let init_options = InitOptions {
            kdf: vbackup_core::crypto::kdf::KdfParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..InitOptions::default()
        };
        init(&options, Some("pw"), &init_options).unwrap();
        assert!(dir
            .path()
            .join("cache/state/known-repositories.json")
            .exists());
        let repo = open(&options, Purpose::Judge, true, || Ok(Some("pw".into()))).unwrap();
        assert!(io_threads(&repo, None) >= 1);
        assert_eq!(io_threads(&repo, Some(3)), 3);
    }
}
