//! A local cache of a remote repository's immutable metadata.
//!
//! Every backup reads every snapshot manifest (to plan changed-block
//! tracking and find the previous snapshot), the pack indexes (to know what
//! is stored) and a base index; on S3 each is a request, and a repository
//! with a thousand snapshots would cost a thousand GETs per backup. Those
//! objects never change under their name — snapshots have random ids and
//! are written once, indexes and pack indexes are named by a MAC of their
//! content — so a copy on the local disk is as good as the original.
//!
//! [`CachedBackend`] keeps such copies in a folder: `get` of a cached name
//! reads the file, anything else goes to the wrapped backend. Each file
//! carries a BLAKE3 checksum; a file that fails it (a torn write, a bad
//! disk) is removed and the object fetched again. The objects stay sealed:
//! the cache holds ciphertext, and whoever reads it still authenticates it.
//! A listing of a cached folder removes the copies of objects no longer
//! listed (forgotten snapshots, pruned indexes). Writing to the cache is
//! best effort: a full or read-only cache disk slows nothing down but the
//! cache itself.
//!
//! Commands that judge the repository's health (`check`, `verify`,
//! `repair`) must not use it: they are to see what the storage holds.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::local::{create_private_dir_all, create_private_file};
use crate::{validate_key, Backend, ObjectInfo, Result};

/// Folders whose objects never change under their name.
pub const CACHED_PREFIXES: [&str; 3] = ["snapshots/", "indexes/", "packindex/"];

/// The first bytes of every cache file.
const MAGIC: &[u8; 4] = b"VBC1";
/// Magic and checksum.
const HEADER_LEN: usize = 4 + 32;

/// Wraps a backend with a local copy of its immutable metadata.
pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    dir: PathBuf,
}

impl std::fmt::Debug for CachedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedBackend")
            .field("location", &self.inner.location())
            .field("dir", &self.dir)
            .finish()
    }
}

impl CachedBackend {
    /// Caches `inner`'s metadata in a folder of `root` named after the
    /// backend's location (so repositories never share copies).
    pub fn new(inner: Arc<dyn Backend>, root: &Path) -> Self {
        let hash = blake3::hash(inner.location().as_bytes());
        let dir = root.join(&hash.to_hex()[..32]);
        Self { inner, dir }
    }

    /// The folder of this backend's copies.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cached(key: &str) -> bool {
        CACHED_PREFIXES.iter().any(|p| key.starts_with(p)) && validate_key(key).is_ok()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The cached copy of `key`, if there is a sound one.
    fn read(&self, key: &str) -> Option<Vec<u8>> {
        let path = self.path(key);
        let mut bytes = std::fs::read(&path).ok()?;
        let sound = bytes.len() >= HEADER_LEN
            && &bytes[..4] == MAGIC
            && blake3::hash(&bytes[HEADER_LEN..]).as_bytes()[..] == bytes[4..HEADER_LEN];
        if !sound {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        bytes.drain(..HEADER_LEN);
        Some(bytes)
    }

    /// Stores a copy of `key`, best effort: through a temporary file, so a
    /// reader never sees half a copy.
    fn write(&self, key: &str, data: &[u8]) {
        let path = self.path(key);
        let Some(folder) = path.parent() else { return };
        let _ = create_private_dir_all(folder).and_then(|()| {
            let mut suffix = [0u8; 8];
            let _ = getrandom::getrandom(&mut suffix);
            let tmp = folder.join(format!(".tmp-{}", hex::encode(suffix)));
            let written = create_private_file(&tmp).and_then(|mut file| {
                file.write_all(MAGIC)?;
                file.write_all(blake3::hash(data).as_bytes())?;
                file.write_all(data)
            });
            match written.and_then(|()| std::fs::rename(&tmp, &path)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        });
    }

    fn forget(&self, key: &str) {
        if Self::cached(key) {
            let _ = std::fs::remove_file(self.path(key));
        }
    }

    /// Removes the copies under `prefix` whose names `listed` lacks.
    fn keep_only(&self, prefix: &str, listed: &HashSet<String>) {
        let mut stack = vec![self.dir.join(prefix)];
        while let Some(folder) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                    continue;
                }
                let key = path
                    .strip_prefix(&self.dir)
                    .ok()
                    .and_then(|k| k.to_str())
                    .map(str::to_string);
                let stale = key.is_none_or(|k| !listed.contains(&k));
                if stale {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

impl Backend for CachedBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.inner.put(key, data)?;
        if Self::cached(key) {
            self.write(key, data);
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        if !Self::cached(key) {
            return self.inner.get(key);
        }
        if let Some(bytes) = self.read(key) {
            return Ok(bytes);
        }
        let bytes = self.inner.get(key)?;
        self.write(key, &bytes);
        Ok(bytes)
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, length)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let objects = self.inner.list(prefix)?;
        if CACHED_PREFIXES.contains(&prefix) {
            let listed = objects.iter().map(|o| o.key.clone()).collect();
            self.keep_only(prefix, &listed);
        }
        Ok(objects)
    }

    fn list_each(&self, prefix: &str, visit: &mut dyn FnMut(ObjectInfo)) -> Result<()> {
        if !CACHED_PREFIXES.contains(&prefix) {
            return self.inner.list_each(prefix, visit);
        }
        let mut listed = HashSet::new();
        self.inner.list_each(prefix, &mut |o| {
            listed.insert(o.key.clone());
            visit(o);
        })?;
        self.keep_only(prefix, &listed);
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.stat(key)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)?;
        self.forget(key);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.inner.rename(from, to)?;
        self.forget(from);
        self.forget(to);
        Ok(())
    }

    fn can_rename(&self) -> bool {
        self.inner.can_rename()
    }

    fn missing(&self, keys: &[String]) -> Result<Vec<String>> {
        self.inner.missing(keys)
    }

    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }

    fn max_object_size(&self) -> Option<u64> {
        self.inner.max_object_size()
    }

    fn leftovers(&self) -> Result<Vec<ObjectInfo>> {
        self.inner.leftovers()
    }

    fn remove_leftover(&self, name: &str) -> Result<()> {
        self.inner.remove_leftover(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBackend;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the reads that reach the storage.
    struct Counting(MemoryBackend, AtomicUsize);

    impl Backend for Counting {
        fn location(&self) -> String {
            "counting".into()
        }
        fn put(&self, key: &str, data: &[u8]) -> Result<()> {
            self.0.put(key, data)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
            self.0.get_range(key, offset, length)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
            self.0.list(prefix)
        }
        fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
            self.0.stat(key)
        }
        fn delete(&self, key: &str) -> Result<()> {
            self.0.delete(key)
        }
    }

    fn setup() -> (Arc<Counting>, CachedBackend, tempfile::TempDir) {
        let inner = Arc::new(Counting(MemoryBackend::new(), AtomicUsize::new(0)));
        let dir = tempfile::tempdir().unwrap();
        let cached = CachedBackend::new(inner.clone(), dir.path());
        (inner, cached, dir)
    }

    fn reads(inner: &Counting) -> usize {
        inner.1.load(Ordering::SeqCst)
    }

    #[test]
    fn metadata_is_read_from_the_storage_once_and_other_objects_always() {
        let (inner, cached, _dir) = setup();
        inner.put("snapshots/a", b"manifest").unwrap();
        inner.put("locks/l", b"lease").unwrap();
        for _ in 0..3 {
            assert_eq!(cached.get("snapshots/a").unwrap(), b"manifest");
            assert_eq!(cached.get("locks/l").unwrap(), b"lease");
        }
        assert_eq!(reads(&inner), 1 + 3);
        // Own writes are cached too.
        cached.put("packindex/p", b"index").unwrap();
        assert_eq!(cached.get("packindex/p").unwrap(), b"index");
        assert_eq!(reads(&inner), 4);
    }

    #[test]
    fn a_damaged_copy_is_dropped_and_fetched_again() {
        let (inner, cached, _dir) = setup();
        inner.put("indexes/i", b"the index").unwrap();
        cached.get("indexes/i").unwrap();
        let path = cached.dir().join("indexes/i");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(cached.get("indexes/i").unwrap(), b"the index");
        assert_eq!(reads(&inner), 2);
        std::fs::write(&path, b"VB").unwrap();
        assert_eq!(cached.get("indexes/i").unwrap(), b"the index");
        assert_eq!(reads(&inner), 3);
    }

    #[test]
    fn deletes_and_listings_drop_copies_of_objects_that_are_gone() {
        let (inner, cached, _dir) = setup();
        for key in ["snapshots/a", "snapshots/b", "snapshots/c"] {
            cached.put(key, key.as_bytes()).unwrap();
        }
        cached.delete("snapshots/a").unwrap();
        assert!(!cached.dir().join("snapshots/a").exists());
        // Removed by another client: the next listing drops the copy.
        inner.delete("snapshots/b").unwrap();
        let listed = cached.list("snapshots/").unwrap();
        assert_eq!(listed.len(), 1);
        assert!(!cached.dir().join("snapshots/b").exists());
        assert!(cached.dir().join("snapshots/c").exists());
        let err = cached.get("snapshots/b").unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[test]
    fn attack_local_user_reads_the_metadata_cache_copies_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (inner, _, dir) = setup();
        // The cache root does not exist yet: it is created private too.
        let cached = CachedBackend::new(inner.clone(), &dir.path().join("cache"));
        inner.put("snapshots/a", b"manifest").unwrap();
        cached.get("snapshots/a").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cached.dir().join("snapshots/a")), 0o600);
        for folder in [dir.path().join("cache"), cached.dir().to_owned()] {
            assert_eq!(mode(&folder), 0o700, "{}", folder.display());
        }
        assert_eq!(mode(&cached.dir().join("snapshots")), 0o700);
    }

    #[test]
    fn names_that_are_not_safe_paths_are_never_cached() {
        let (inner, cached, dir) = setup();
        inner.put("snapshots/x", b"x").unwrap();
        assert!(!CachedBackend::cached("snapshots/../../etc"));
        cached.get("snapshots/x").unwrap();
        assert!(dir.path().read_dir().unwrap().count() == 1);
    }
}
