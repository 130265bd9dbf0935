//! The local-filesystem backend: one file per object under a root folder.
//!
//! Writes go to a hidden temporary file in the destination folder, are
//! fsynced, renamed over the final name and the folder is fsynced, so a crash
//! leaves either the whole object or no object (plus, at worst, a hidden
//! temporary file that listings ignore).
//!
//! Everything it creates is its owner's alone: files mode 0600, folders
//! 0700, set explicitly whatever the umask, because key objects hold the
//! wrapped master secret and anyone who can copy them can guess the
//! passphrase offline.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{validate_key, Backend, ErrorKind, ObjectInfo, Result, StorageError};

/// A repository stored in a folder of the local filesystem.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

/// Prefix of temporary files; names starting with `.` are never objects.
const TEMP_PREFIX: &str = ".tmp-";

impl LocalBackend {
    /// Opens the folder `root`, which need not exist yet (it is created by
    /// the first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder holding the objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Removes temporary files left behind by interrupted writes and returns
    /// how many there were.
    pub fn remove_temporary_files(&self) -> Result<usize> {
        let mut temporary = Vec::new();
        walk(&self.root, true, &mut |path, _| {
            if is_temporary(&path) {
                temporary.push(path);
            }
        })
        .map_err(|e| io_err("", format!("listing {}", self.root.display()), e))?;
        for path in &temporary {
            fs::remove_file(path).map_err(|e| {
                io_err(
                    "",
                    format!("removing the temporary file {}", path.display()),
                    e,
                )
            })?;
        }
        Ok(temporary.len())
    }
}

/// An I/O error about `key`; `what` says what was being done, naming the
/// file or folder, since "Not a directory" alone tells the user nothing.
fn io_err(key: &str, what: String, err: io::Error) -> StorageError {
    StorageError::from_io(key, &what, err)
}

/// `what` and the path it was done to, for [`io_err`].
fn doing(what: &str, path: &Path) -> String {
    format!("{what} {}", path.display())
}

fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMP_PREFIX))
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    // A failing OS random source only makes the name less unique; the
    // create_new below still refuses to clobber another writer's file.
    let _ = getrandom::getrandom(&mut bytes);
    hex::encode(bytes)
}

/// Mode of every file a repository or cache holds.
pub(crate) const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every folder a repository or cache holds.
pub(crate) const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents with mode 0700, set explicitly
/// (the umask could only remove bits); existing folders are left as they
/// are.
pub(crate) fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_private_dir_all(parent)?;
    }
    match DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir) {
        Ok(()) => fs::set_permissions(dir, Permissions::from_mode(PRIVATE_DIR_MODE)),
        // Another writer made it first.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the new file `path` with mode 0600, set explicitly.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE))?;
    Ok(file)
}

/// Writes `data` to a new temporary file in `dir` and returns its path.
fn write_temporary(dir: &Path, data: &[u8]) -> io::Result<PathBuf> {
    let temp = dir.join(format!("{TEMP_PREFIX}{}", random_suffix()));
    let result = (|| {
        let mut file = create_private_file(&temp)?;
        file.write_all(data)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(temp),
        Err(err) => {
            let _ = fs::remove_file(&temp);
            Err(err)
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Calls `visit` with every regular file below `dir` (with
/// `include_hidden` also dot-files) and its metadata; files that vanish
/// while the folder is read are skipped.
fn walk(
    dir: &Path,
    include_hidden: bool,
    visit: &mut dyn FnMut(PathBuf, fs::Metadata),
) -> io::Result<()> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = match fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let hidden = entry.file_name().as_encoded_bytes().first() == Some(&b'.');
            if hidden && !include_hidden {
                continue;
            }
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                match entry.metadata() {
                    Ok(meta) => visit(entry.path(), meta),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn info(key: String, meta: &fs::Metadata) -> ObjectInfo {
    ObjectInfo {
        key,
        size: meta.len(),
        modified: meta.modified().ok(),
        writer: None,
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path_of(key)?;
        let dir = path.parent().unwrap_or(&self.root);
        create_private_dir_all(dir)
            .map_err(|e| io_err(key, doing("creating the folder", dir), e))?;
        let temp = write_temporary(dir, data)
            .map_err(|e| io_err(key, doing("writing a temporary file in", dir), e))?;
        if let Err(e) = fs::rename(&temp, &path) {
            let _ = fs::remove_file(&temp);
            return Err(io_err(key, doing("renaming into place", &path), e));
        }
        sync_dir(dir).map_err(|e| io_err(key, doing("syncing the folder", dir), e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path_of(key)?;
        fs::read(&path).map_err(|e| io_err(key, doing("reading", &path), e))
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let path = self.path_of(key)?;
        let read = || -> io::Result<Vec<u8>> {
            let mut file = File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut data = Vec::new();
            file.take(length).read_to_end(&mut data)?;
            Ok(data)
        };
        read().map_err(|e| io_err(key, doing("reading part of", &path), e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut objects = Vec::new();
        self.list_each(prefix, &mut |object| objects.push(object))?;
        Ok(objects)
    }

    fn list_each(&self, prefix: &str, visit: &mut dyn FnMut(ObjectInfo)) -> Result<()> {
        let dir_part = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path_of(dir_part)?
        };
        walk(&start, false, &mut |path, meta| {
            if let Some(key) = key_of(&self.root, &path).filter(|k| k.starts_with(prefix)) {
                visit(info(key, &meta));
            }
        })
        .map_err(|e| io_err(prefix, doing("listing", &start), e))
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path_of(key)?;
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(info(key.to_string(), &meta))),
            Ok(_) => Err(StorageError::new(
                ErrorKind::Other,
                key,
                "expected a file, found a folder",
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key, doing("reading the metadata of", &path), e)),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key, doing("deleting", &path), e)),
        }
    }

    fn can_rename(&self) -> bool {
        true
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let source = self.path_of(from)?;
        let target = self.path_of(to)?;
        let dir = target.parent().unwrap_or(&self.root);
        create_private_dir_all(dir)
            .map_err(|e| io_err(to, doing("creating the folder", dir), e))?;
        fs::rename(&source, &target).map_err(|e| {
            let what = format!("moving {} to {}", source.display(), target.display());
            io_err(from, what, e)
        })
    }

    fn leftovers(&self) -> Result<Vec<ObjectInfo>> {
        let mut found = Vec::new();
        walk(&self.root, true, &mut |path, meta| {
            if is_temporary(&path) {
                if let Some(key) = key_of(&self.root, &path) {
                    found.push(info(key, &meta));
                }
            }
        })
        .map_err(|e| io_err("", doing("listing", &self.root), e))?;
        Ok(found)
    }

    fn remove_leftover(&self, name: &str) -> Result<()> {
        let path = self.root.join(name);
        let inside = name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..");
        if !inside || !is_temporary(&path) {
            return Err(StorageError::new(
                ErrorKind::InvalidKey,
                name,
                "not a temporary file of this repository",
            ));
        }
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_err(name, doing("removing the temporary file", &path), e))
            }
            _ => Ok(()),
        }
    }
}

/// The object name of a file below `root`, or `None` for non-UTF-8 names.
fn key_of(root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = relative
        .components()
        .map(|c| c.as_os_str().to_str())
        .collect();
    Some(parts?.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> (tempfile::TempDir, LocalBackend) {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path().join("repo"));
        (dir, backend)
    }

    #[test]
    fn put_get_list_delete_round_trip() {
        let (_dir, b) = backend();
        b.put("chunks/ab/abcd", b"hello").unwrap();
        b.put("chunks/cd/cdef", b"world!").unwrap();
        b.put("config", b"c").unwrap();
        assert_eq!(b.get("chunks/ab/abcd").unwrap(), b"hello");
        assert_eq!(b.get_range("chunks/cd/cdef", 2, 3).unwrap(), b"rld");
        let mut listed: Vec<_> = b
            .list("chunks/")
            .unwrap()
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            vec![("chunks/ab/abcd".into(), 5), ("chunks/cd/cdef".into(), 6)]
        );
        assert_eq!(b.stat("config").unwrap().unwrap().size, 1);
        b.delete("config").unwrap();
        assert!(b.stat("config").unwrap().is_none());
        assert!(b.get("config").unwrap_err().is_not_found());
        b.delete("config").unwrap();
    }

    #[test]
    fn temporary_files_are_not_listed_and_can_be_removed() {
        let (_dir, b) = backend();
        b.put("chunks/ab/abcd", b"x").unwrap();
        fs::write(b.root().join("chunks/ab/.tmp-dead"), b"partial").unwrap();
        assert_eq!(b.list("chunks/").unwrap().len(), 1);
        let leftovers = b.leftovers().unwrap();
        assert_eq!(leftovers.len(), 1);
        assert_eq!(leftovers[0].key, "chunks/ab/.tmp-dead");
        assert!(b.remove_leftover("chunks/ab/abcd").is_err());
        assert!(b.remove_leftover("../x/.tmp-1").is_err());
        b.remove_leftover(&leftovers[0].key).unwrap();
        fs::write(b.root().join("chunks/ab/.tmp-dead"), b"partial").unwrap();
        assert_eq!(b.remove_temporary_files().unwrap(), 1);
        assert_eq!(b.remove_temporary_files().unwrap(), 0);
    }

    #[test]
    fn rename_moves_atomically_and_keeps_the_modification_time() {
        let (_dir, b) = backend();
        assert!(b.can_rename());
        b.put("chunks/ab/abcd", b"hello").unwrap();
        let before = b.stat("chunks/ab/abcd").unwrap().unwrap();
        assert!(before.modified.is_some());
        b.rename("chunks/ab/abcd", "trash/ab/abcd").unwrap();
        assert!(b.stat("chunks/ab/abcd").unwrap().is_none());
        let moved = b.stat("trash/ab/abcd").unwrap().unwrap();
        assert_eq!(moved.modified, before.modified);
        assert_eq!(b.get("trash/ab/abcd").unwrap(), b"hello");
        let err = b.rename("chunks/ab/abcd", "trash/x").unwrap_err();
        assert!(err.is_not_found(), "{err}");
        let listed = b.list("trash/").unwrap();
        assert_eq!(listed[0].modified, before.modified);
    }

    #[test]
    fn storage_errors_name_the_path_when_the_root_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        let backend = LocalBackend::new(&file);
        let text = backend.stat("config").unwrap_err().to_string();
        let path = file.join("config");
        assert!(
            text.starts_with(&format!(
                "reading the metadata of {} (object 'config'): ",
                path.display()
            )),
            "{text}"
        );
        let text = backend.put("keys/k1", b"x").unwrap_err().to_string();
        assert!(
            text.contains(&format!(
                "creating the folder {}",
                file.join("keys").display()
            )),
            "{text}"
        );
        let text = backend.remove_temporary_files().unwrap_err().to_string();
        assert!(
            text.starts_with(&format!("listing {}: ", file.display())),
            "{text}"
        );
        assert!(!text.contains("(object '')"), "{text}");
    }

    #[test]
    fn listing_a_missing_folder_is_empty() {
        let (_dir, b) = backend();
        assert!(b.list("snapshots/").unwrap().is_empty());
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn attack_local_user_reads_key_files_objects_and_folders_are_private() {
        // A umask that would leave everything readable by all.
        let (dir, b) = backend();
        let old = set_umask(0);
        let put = b
            .put("keys/0123", b"wrapped")
            .and(b.put("chunks/ab/abcd", b"x"));
        let renamed = b.rename("chunks/ab/abcd", "trash/ab/abcd");
        set_umask(old);
        put.unwrap();
        renamed.unwrap();
        assert_eq!(mode(&b.root().join("keys/0123")), 0o600);
        assert_eq!(mode(&b.root().join("trash/ab/abcd")), 0o600);
        for folder in ["", "keys", "chunks", "chunks/ab", "trash", "trash/ab"] {
            assert_eq!(mode(&b.root().join(folder)), 0o700, "{folder}");
        }
        // Folders that existed before are not changed.
        assert_eq!(mode(dir.path()) & 0o700, 0o700);
    }

    /// Sets the process umask and returns the previous one. Tests in this
    /// module that create files run in one process, so only this test
    /// changes it, and restores it before asserting.
    #[allow(unsafe_code)]
    fn set_umask(mask: libc::mode_t) -> libc::mode_t {
        // SAFETY: umask(2) takes and returns an integer and cannot fail.
        unsafe { libc::umask(mask) }
    }

    #[test]
    fn unsafe_keys_never_touch_the_filesystem() {
        let (_dir, b) = backend();
        assert_eq!(
            b.put("../escape", b"x").unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
    }
}
