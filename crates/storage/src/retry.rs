//! Retries of transient failures, for backends that talk over a network.
//!
//! Every repository object is immutable and named by its content or a
//! random id, so `put`, `get`, `stat`, `delete` and `missing` are idempotent
//! and safe to repeat. Two operations are retried only when repeating them
//! cannot change their outcome: a listing only while it has not yet handed
//! out any object, and `rename` never (a lost reply would turn a successful
//! move into a "not found").

use std::time::Duration;

use crate::{Backend, ErrorKind, ObjectInfo, Result};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retries).
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub initial_delay: Duration,
    /// Longest wait between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Six attempts over about 15 s: long enough to ride out a restarting
    /// server or a node failing over, short enough that a dead endpoint is
    /// reported while the user still watches.
    fn default() -> Self {
        Self {
            attempts: 6,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// The default, with the number of attempts taken from the environment
    /// variable `VBACKUP_RETRIES` (retries after the first attempt) when it
    /// is set to a number; tests use it to fail fast.
    pub fn from_env() -> Self {
        let mut policy = Self::default();
        if let Some(retries) = std::env::var("VBACKUP_RETRIES")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            policy.attempts = retries.saturating_add(1);
        }
        policy
    }

    /// The wait before attempt number `attempt` (1 = the first retry), with
    /// up to 25% random jitter so that many clients do not retry in step.
    fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        let base = self
            .initial_delay
            .saturating_mul(factor)
            .min(self.max_delay);
        let mut byte = [0u8; 1];
        let _ = getrandom::getrandom(&mut byte);
        base + base.mul_f64(f64::from(byte[0]) / 1024.0)
    }
}

/// Wraps a backend and repeats operations that fail with
/// [`ErrorKind::Transient`], waiting longer after each failure. Other
/// errors (not found, permission denied, no space) are returned at once.
#[derive(Debug)]
pub struct RetryBackend<B> {
    inner: B,
    policy: RetryPolicy,
}

impl<B: Backend> RetryBackend<B> {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: B, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Runs `operation` on the wrapped backend with this wrapper's retries,
    /// for idempotent calls outside the [`Backend`] trait (a backend's own
    /// start-up check, say).
    pub fn retrying<T>(&self, mut operation: impl FnMut(&B) -> Result<T>) -> Result<T> {
        self.retry(|| operation(&self.inner))
    }

    fn retry<T>(&self, mut operation: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempt = 1;
        loop {
            match operation() {
                Err(e) if e.kind() == ErrorKind::Transient && attempt < self.policy.attempts => {
                    std::thread::sleep(self.policy.delay(attempt));
                    attempt += 1;
                }
                Err(e) if e.kind() == ErrorKind::Transient && attempt > 1 => {
                    return Err(e.after_attempts(attempt));
                }
                other => return other,
            }
        }
    }
}

impl<B: Backend> Backend for RetryBackend<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.retry(|| self.inner.put(key, data))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.retry(|| self.inner.get(key))
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.retry(|| self.inner.get_range(key, offset, length))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.retry(|| self.inner.list(prefix))
    }

    fn list_each(&self, prefix: &str, visit: &mut dyn FnMut(ObjectInfo)) -> Result<()> {
        let mut visited = false;
        self.retry(|| {
            if visited {
                // Started handing out objects: a repeat would hand some out twice.
                return self.inner.list_each(prefix, visit);
            }
            let result = self.inner.list_each(prefix, &mut |o| {
                visited = true;
                visit(o)
            });
            match result {
                Err(e) if visited => Err(e.permanent()),
                other => other,
            }
        })
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.retry(|| self.inner.stat(key))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.retry(|| self.inner.delete(key))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.inner.rename(from, to)
    }

    fn can_rename(&self) -> bool {
        self.inner.can_rename()
    }

    fn missing(&self, keys: &[String]) -> Result<Vec<String>> {
        self.retry(|| self.inner.missing(keys))
    }

    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }

    fn max_object_size(&self) -> Option<u64> {
        self.inner.max_object_size()
    }

    fn leftovers(&self) -> Result<Vec<ObjectInfo>> {
        self.retry(|| self.inner.leftovers())
    }

    fn remove_leftover(&self, name: &str) -> Result<()> {
        self.retry(|| self.inner.remove_leftover(name))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::{MemoryBackend, StorageError};

    /// Fails the first `failures` puts with `kind`, then stores.
    struct Flaky {
        inner: MemoryBackend,
        failures: AtomicU32,
        kind: ErrorKind,
        calls: AtomicU32,
    }

    impl Backend for Flaky {
        fn location(&self) -> String {
            "flaky".into()
        }
        fn put(&self, key: &str, data: &[u8]) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(StorageError::new(self.kind, key, "injected"));
            }
            self.inner.put(key, data)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
            self.inner.get_range(key, offset, length)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
            self.inner.list(prefix)
        }
        fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
            self.inner.stat(key)
        }
        fn delete(&self, key: &str) -> Result<()> {
            self.inner.delete(key)
        }
    }

    fn flaky(failures: u32, kind: ErrorKind) -> RetryBackend<Flaky> {
        let policy = RetryPolicy {
            attempts: 3,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let inner = Flaky {
            inner: MemoryBackend::new(),
            failures: AtomicU32::new(failures),
            kind,
            calls: AtomicU32::new(0),
        };
        RetryBackend::new(inner, policy)
    }

    #[test]
    fn can_rename_is_the_inner_backends() {
        assert!(!flaky(0, ErrorKind::Transient).can_rename());
        let memory = RetryBackend::new(MemoryBackend::new(), RetryPolicy::default());
        assert!(memory.can_rename());
    }

    #[test]
    fn transient_failures_are_retried_until_the_write_lands() {
        let backend = flaky(2, ErrorKind::Transient);
        backend.put("a", b"x").unwrap();
        assert_eq!(backend.get("a").unwrap(), b"x");
        assert_eq!(backend.inner().calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn giving_up_says_how_often_it_tried() {
        let backend = flaky(5, ErrorKind::Transient);
        let err = backend.put("a", b"x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Transient);
        assert!(err.to_string().contains("3 attempts"), "{err}");
        assert_eq!(backend.inner().calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn permanent_failures_are_not_retried() {
        let backend = flaky(1, ErrorKind::PermissionDenied);
        let err = backend.put("a", b"x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert_eq!(backend.inner().calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn delays_grow_and_stay_bounded() {
        let policy = RetryPolicy::default();
        assert!(policy.delay(1) >= policy.initial_delay);
        assert!(policy.delay(2) >= policy.initial_delay * 2);
        assert!(policy.delay(30) <= policy.max_delay + policy.max_delay / 4);
    }
}
