//! One module per operation on a repository.

pub mod backup;
pub(crate) mod backup_guard;
mod backup_plan;
pub mod check;
pub mod forget;
pub mod locks;
pub mod policy;
pub mod prune;
pub(crate) mod prune_exclusive;
mod prune_packs;
pub mod repair;
pub mod restore;
pub mod stats;
pub mod verify;

/// Runs `work` on `threads` scoped threads and returns the first error.
pub(crate) fn run_workers<F>(threads: usize, work: F) -> crate::Result<()>
where
    F: Fn() -> crate::Result<()> + Sync,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(&work)).collect();
        let mut first_error = None;
        for handle in handles {
            let result = handle
                .join()
                .unwrap_or_else(|_| Err(crate::Error::internal("a worker thread panicked")));
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// Names a stored object for messages: its key and, where the storage
/// tells, when it was last written (by the storage's clock). Every refusal
/// that blames an object goes through here, so what the storage knows
/// about the writer can be added in one place.
pub(crate) fn describe_object(info: &vbackup_storage::ObjectInfo) -> String {
    let writer = info
        .writer
        .as_deref()
        .map(|w| format!(" by {w}"))
        .unwrap_or_default();
    match info.modified {
        Some(modified) => format!(
            "object '{}' (last written {}{writer})",
            info.key,
            rfc3339(modified)
        ),
        None if writer.is_empty() => format!("object '{}'", info.key),
        None => format!("object '{}' (written{writer})", info.key),
    }
}

/// `info` with the writer the storage knows for it (the backup server
/// records which token wrote each lock, snapshot, prune list and policy),
/// when the listing did not carry it: one `stat`, for refusals only, so a
/// refusal names the token an admin has to look at. Failures leave `info`
/// as it was.
pub(crate) fn with_writer(
    repo: &crate::Repository,
    info: &vbackup_storage::ObjectInfo,
) -> vbackup_storage::ObjectInfo {
    if info.writer.is_some() {
        return info.clone();
    }
    match repo.backend().stat(&info.key) {
        Ok(Some(stat)) if stat.writer.is_some() => vbackup_storage::ObjectInfo {
            writer: stat.writer,
            ..info.clone()
        },
        _ => info.clone(),
    }
}

/// A time as RFC 3339 UTC with seconds, for messages and reports.
pub(crate) fn rfc3339(time: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    /// Issue 11: a panicked worker was reported as bad usage (exit 2).
    #[test]
    fn issue11_panicked_worker_is_an_internal_error() {
        let error = run_workers(2, || -> crate::Result<()> { panic!("worker bug") })
            .expect_err("a panicked worker fails the run");
        assert_eq!(error.class(), ErrorClass::Internal, "{error}");
        assert!(
            error.to_string().contains("worker thread panicked"),
            "{error}"
        );
        let usage = run_workers(2, || Err(crate::Error::InvalidInput("bad".into())));
        assert_eq!(usage.map_err(|e| e.class()), Err(ErrorClass::Usage));
    }
}
