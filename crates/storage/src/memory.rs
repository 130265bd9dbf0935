//! An in-memory backend for unit tests of the layers above.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::{validate_key, Backend, ErrorKind, ObjectInfo, Result, StorageError};

/// One stored object: its bytes and when it was written.
#[derive(Debug, Clone)]
struct Stored {
    data: Vec<u8>,
    modified: SystemTime,
}

/// Keeps objects in a map; for unit tests only, never for real repositories.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, Stored>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Stored>> {
        self.objects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces an object's bytes, bypassing immutability: tests use it to
    /// simulate damage. The modification time is kept.
    pub fn corrupt(&self, key: &str, data: Vec<u8>) {
        let mut objects = self.lock();
        let modified = objects
            .get(key)
            .map_or_else(SystemTime::now, |o| o.modified);
        objects.insert(key.to_string(), Stored { data, modified });
    }

    /// Sets an object's modification time, as if it had been written then;
    /// returns false when there is no such object.
    pub fn set_modified(&self, key: &str, modified: SystemTime) -> bool {
        self.lock()
            .get_mut(key)
            .map(|o| o.modified = modified)
            .is_some()
    }
}

fn not_found(key: &str) -> StorageError {
    StorageError::new(ErrorKind::NotFound, key, "object not found")
}

fn info(key: &str, object: &Stored) -> ObjectInfo {
    ObjectInfo {
        key: key.to_string(),
        size: object.data.len() as u64,
        modified: Some(object.modified),
        writer: None,
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        validate_key(key)?;
        let stored = Stored {
            data: data.to_vec(),
            modified: SystemTime::now(),
        };
        self.lock().insert(key.to_string(), stored);
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.lock()
            .get(key)
            .map(|o| o.data.clone())
            .ok_or_else(|| not_found(key))
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let data = self.get(key)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = start
            .saturating_add(usize::try_from(length).unwrap_or(usize::MAX))
            .min(data.len());
        Ok(data[start..end].to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let objects = self.lock();
        Ok(objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| info(k, v))
            .collect())
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        Ok(self.lock().get(key).map(|v| info(key, v)))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.lock().remove(key);
        Ok(())
    }

    fn can_rename(&self) -> bool {
        true
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        validate_key(to)?;
        let mut objects = self.lock();
        let object = objects.remove(from).ok_or_else(|| not_found(from))?;
        objects.insert(to.to_string(), object);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_keeps_bytes_and_time() {
        let b = MemoryBackend::new();
        assert!(b.can_rename());
        b.put("a/x", b"1").unwrap();
        let old = SystemTime::UNIX_EPOCH;
        assert!(b.set_modified("a/x", old));
        b.rename("a/x", "b/x").unwrap();
        assert!(b.stat("a/x").unwrap().is_none());
        let moved = b.stat("b/x").unwrap().unwrap();
        assert_eq!((moved.size, moved.modified), (1, Some(old)));
        assert!(b.rename("a/x", "c").unwrap_err().is_not_found());
    }
}
