//! One module per operation on a repository.

pub mod backup;
pub(crate) mod backup_guard;
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
            let result = handle.join().unwrap_or_else(|_| {
                Err(crate::Error::InvalidInput(
                    "a worker thread panicked; this is a bug in vbackup".to_string(),
                ))
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}
