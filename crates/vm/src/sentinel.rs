//! Clean-up that survives the process being killed.
//!
//! `vbackup serve` leaves a unix socket; `vbackup recover instant` and
//! `vbackup verify --boot` start a `qemu-system` and write throwaway
//! overlays. A process that is stopped normally or by SIGINT / SIGTERM
//! removes them itself; one killed with SIGKILL cannot. So each such
//! command starts a *sentinel* first: a small `/bin/sh` in its own process
//! group (a Ctrl-C on the terminal does not reach it) that waits on a pipe
//! from vbackup. When vbackup ends without saying "done" on the pipe — it
//! was killed, or it panicked — the pipe closes, and the sentinel stops
//! the processes and removes the files it was told about. A normal end
//! says "done" first and the sentinel leaves at once.
//!
//! Processes are stopped with SIGTERM, then SIGKILL two seconds later.
//! The sentinel knows only what [`Sentinel::watch_pid`] and
//! [`Sentinel::remove_on_kill`] gave it; a file listed later than the kill
//! is not removed (so list files before creating them).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::{Error, Result};

/// The sentinel's script: reads lines `pid N` / `file PATH` until `done`
/// or the end of its input; at an end without `done` it cleans up.
const SCRIPT: &str = r#"trap '' INT TERM HUP
pids=""
files=""
while IFS= read -r line; do
  case "$line" in
    done) exit 0 ;;
    "pid "*) pids="$pids ${line#pid }" ;;
    "file "*) files="$files
${line#file }" ;;
  esac
done
for p in $pids; do kill -TERM "$p" 2>/dev/null; done
n=0
for p in $pids; do
  while kill -0 "$p" 2>/dev/null && [ $n -lt 20 ]; do sleep 0.1; n=$((n+1)); done
  kill -KILL "$p" 2>/dev/null
done
printf '%s\n' "$files" | while IFS= read -r f; do [ -n "$f" ] && rm -rf -- "$f"; done
exit 0
"#;

/// A running sentinel; [`Sentinel::done`] (or dropping it after a normal
/// clean-up) dismisses it.
#[derive(Debug)]
pub struct Sentinel {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Sentinel {
    /// Starts a sentinel.
    pub fn start() -> Result<Self> {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Io {
                context: "starting the clean-up sentinel (/bin/sh)".into(),
                source,
            })?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    fn tell(&mut self, line: &str) -> Result<()> {
        if line.contains('\n') {
            return Err(Error::Invalid(format!(
                "cannot watch '{}': its name holds a line break",
                line.escape_debug()
            )));
        }
        let Some(stdin) = self.stdin.as_mut() else {
            return Ok(());
        };
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|source| Error::Io {
                context: "telling the clean-up sentinel what to watch".into(),
                source,
            })
    }

    /// Has the sentinel stop process `pid` should vbackup be killed.
    pub fn watch_pid(&mut self, pid: u32) -> Result<()> {
        self.tell(&format!("pid {pid}"))
    }

    /// Has the sentinel remove `path` (a file, socket or folder) should
    /// vbackup be killed.
    pub fn remove_on_kill(&mut self, path: &Path) -> Result<()> {
        let path = std::path::absolute(path).map_err(|source| Error::Io {
            context: format!("resolving {}", path.display()),
            source,
        })?;
        self.tell(&format!("file {}", path.display()))
    }

    /// Dismisses the sentinel: vbackup cleaned up itself.
    pub fn done(mut self) {
        self.dismiss();
    }

    fn dismiss(&mut self) {
        let _ = self.tell("done");
        self.stdin = None;
        let _ = self.child.wait();
    }
}

impl Drop for Sentinel {
    /// Dropping is a normal end (unwinding included: the caller's own
    /// clean-up runs in its drops too), so the sentinel is dismissed.
    fn drop(&mut self) {
        if self.stdin.is_some() {
            self.dismiss();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dismissed_sentinel_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kept");
        std::fs::write(&file, b"x").unwrap();
        let mut sentinel = Sentinel::start().unwrap();
        sentinel.remove_on_kill(&file).unwrap();
        sentinel.done();
        assert!(file.exists());
    }

    #[test]
    fn a_sentinel_whose_pipe_closes_without_done_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("with space");
        std::fs::write(&file, b"x").unwrap();
        let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
        let mut sentinel = Sentinel::start().unwrap();
        sentinel.remove_on_kill(&file).unwrap();
        sentinel.watch_pid(victim.id()).unwrap();
        // What a SIGKILL of vbackup does: the pipe closes without "done".
        sentinel.stdin = None;
        let _ = sentinel.child.wait();
        assert!(!file.exists(), "the file was removed");
        let status = victim.wait().unwrap();
        assert!(!status.success(), "the watched process was stopped");
    }
}
