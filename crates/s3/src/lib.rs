//! S3-compatible storage for vbackup repositories.
//!
//! A repository named `s3:https://HOST[:PORT]/BUCKET[/PREFIX]` (or
//! `s3:http://…`, for a store on a trusted network such as loopback) lives
//! under `PREFIX/` in `BUCKET`, addressed path-style (`HOST/BUCKET/KEY`), as
//! Garage, MinIO and Ceph need. Objects keep the repository's names
//! (`config`, `chunks/ab/…`), each one a single `PutObject`.
//!
//! Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
//! (and `AWS_SESSION_TOKEN`), else from the AWS shared files
//! (`~/.aws/credentials`, `~/.aws/config`, profile `AWS_PROFILE`); the
//! region from `AWS_REGION` / `AWS_DEFAULT_REGION` (default `us-east-1`;
//! Garage's default is `garage`). `VBACKUP_S3_TIMEOUT` (seconds, default 60)
//! bounds every request so a hung server cannot stall a backup.
//!
//! The S3 protocol itself comes from Apache OpenDAL; this crate adds the
//! blocking [`Backend`](vbackup_storage::Backend) interface over a private
//! tokio runtime, the error classification, and the presence check at open.
//! Plain S3 has no atomic rename, so `rename` keeps the trait's refusal and
//! `can_rename` is false: `prune` runs with the repository to itself on S3
//! repositories (backups are refused meanwhile).
#![deny(missing_docs)]

mod backend;
mod error;
mod url;

pub use backend::{S3Backend, S3Credentials};
pub use url::S3Location;

use vbackup_storage::{Result, RetryBackend, RetryPolicy};

/// True when `repo` names an S3 repository (`s3:…`).
pub fn is_s3(repo: &str) -> bool {
    repo.starts_with("s3:")
}

/// Opens the S3 repository `repo` with retries from
/// [`RetryPolicy::from_env`], after checking that its bucket answers (with
/// the same retries, so a server that is restarting gets its chance).
pub fn open(repo: &str) -> Result<RetryBackend<S3Backend>> {
    open_with(repo, None)
}

/// [`open`] with explicit credentials instead of the environment's (for
/// programs that hold several S3 identities at once, and tests).
pub fn open_with(
    repo: &str,
    credentials: Option<&S3Credentials>,
) -> Result<RetryBackend<S3Backend>> {
    let location = S3Location::parse(repo)?;
    let backend = match credentials {
        Some(credentials) => S3Backend::with_credentials(&location, credentials)?,
        None => S3Backend::new(&location)?,
    };
    let backend = RetryBackend::new(backend, RetryPolicy::from_env());
    backend.retrying(S3Backend::check)?;
    Ok(backend)
}
