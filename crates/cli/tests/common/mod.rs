//! Helpers shared by the end-to-end test binaries of the `vbackup` CLI.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]
// Test helpers panic on unexpected failures; that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A process's status and both of its outputs, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A path as `&str` (test paths are UTF-8).
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs an external tool, fails the test if it fails, returns its stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Deterministic bytes that do not compress much (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Every file below `dir`, recursively (none if it does not exist).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Writes `len` bytes of `pattern` at `offset` into the qcow2 `image`
/// (with `qemu-io`), as a guest of a stopped VM's disk would have.
pub fn guest_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    tool("qemu-io", &["-f", "qcow2", "-c", &cmd, s(image)]);
}

/// A raw copy of the qcow2 `image`'s content now, to compare restores with.
pub fn copy_now(image: &Path, to: &Path) {
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(image), s(to)],
    );
}

/// Whether two images hold the same content (`qemu-img compare`).
pub fn identical(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", s(a), s(b)])
        .status()
        .unwrap()
        .success()
}

/// Every folder below `dir` (not `dir` itself), recursively.
pub fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            dirs.extend(walk_dirs(&path));
            dirs.push(path);
        }
    }
    dirs
}

/// Sets up `cmd` (the `vbackup` binary, or a shell that runs it) for a
/// local repository in `dir/repo` opened with `password`, with a cheap
/// key derivation and the client state in `dir/cache` (never the real
/// home), no configuration file, and nothing inherited that could change
/// what it does.
pub fn local_env<'a>(cmd: &'a mut Command, dir: &Path, password: &str) -> &'a mut Command {
    cmd.env("VBACKUP_REPOSITORY", dir.join("repo"))
        .env("VBACKUP_PASSWORD", password)
        .env("VBACKUP_KDF_MEMORY_KIB", "1024")
        .env("VBACKUP_CACHE_DIR", dir.join("cache"))
        .env("VBACKUP_CONFIG", "/dev/null")
        .env_remove("VBACKUP_PASSWORD_FILE")
        .env_remove("VBACKUP_ALLOW_UNENCRYPTED")
        .stdin(std::process::Stdio::null())
}
