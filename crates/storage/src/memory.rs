//! An in-memory backend for unit tests of the layers above.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::{validate_key, Backend, ErrorKind, ObjectInfo, Result, StorageError};

/// Keeps objects in a map; for unit tests only, never for real repositories.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.objects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces an object's bytes, bypassing immutability: tests use it to
    /// simulate damage.
    pub fn corrupt(&self, key: &str, data: Vec<u8>) {
        self.lock().insert(key.to_string(), data);
    }
}

fn not_found(key: &str) -> StorageError {
    StorageError::new(ErrorKind::NotFound, key, "object not found")
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        validate_key(key)?;
        self.lock().insert(key.to_string(), data.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.lock().get(key).cloned().ok_or_else(|| not_found(key))
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
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        Ok(self.lock().get(key).map(|v| ObjectInfo {
            key: key.to_string(),
            size: v.len() as u64,
        }))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.lock().remove(key);
        Ok(())
    }
}
