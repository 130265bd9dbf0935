//! Small helpers shared by the test files: a process's output for
//! assertion messages, external tools, deterministic data, folder walks.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// A process's status and both of its outputs, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A path as `&str` (test paths are UTF-8; anything else fails the test).
pub fn s(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("test path {} is not UTF-8", path.display()))
}

/// Runs an external tool, fails the test if it fails, returns its stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{program} {args:?}: stdout: {e}"))
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

/// Sends SIGTERM to `child`, a process of ours that has not been reaped
/// (so its id cannot have been reused by another process). Why not the
/// shell's `kill`: no extra process while a test measures shutdown.
#[allow(unsafe_code)]
pub(crate) fn send_sigterm(child: &Child) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // `pid` is our own unreaped child (see above).
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Stops `child` as systemd would: SIGTERM, up to 30 s to exit, then
/// SIGKILL; reaps it either way (a daemon cancels its runs on SIGTERM).
pub fn stop_gently(child: &mut Child) {
    if send_sigterm(child).is_ok() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
