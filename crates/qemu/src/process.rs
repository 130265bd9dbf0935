//! Running qemu tools and turning their failures into errors that carry
//! qemu's own explanation.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};

/// The most stderr text kept in an error message.
const MAX_STDERR: usize = 16 * 1024;

/// The command line as a user could type it.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// qemu's stderr as one readable message.
pub(crate) fn stderr_text(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return "(nothing on stderr)".to_owned();
    }
    if text.len() <= MAX_STDERR {
        return text.to_owned();
    }
    let mut cut = MAX_STDERR;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} [...]", &text[..cut])
}

/// Runs `cmd` to completion with stdout and stderr captured; the exit
/// status is the caller's to judge.
pub(crate) fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|error| Error::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            error,
        })
}

/// The error for a command that ended with `output`'s status.
pub(crate) fn failure(cmd: &Command, output: &Output) -> Error {
    Error::Command {
        command: command_line(cmd),
        status: output.status.to_string(),
        stderr: stderr_text(&output.stderr),
    }
}

/// Runs `cmd`; a nonzero exit is an error carrying its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let output = output(cmd)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failure(cmd, &output))
    }
}

/// Sends SIGTERM to our child process.
#[allow(unsafe_code)]
pub(crate) fn send_sigterm(pid: u32) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    // `pid` is our own child that has not been reaped yet (try_wait saw it
    // running), so the id cannot have been reused by another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A random number from std's per-process hash keys (no RNG crate needed:
/// it only has to differ from ids an earlier client used).
pub(crate) fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// The longest unix socket path Linux accepts (`sun_path` less the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Refuses a socket path Linux cannot bind, saying how to fix it.
pub(crate) fn check_socket_path(socket: &std::path::Path) -> Result<()> {
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::InvalidRequest(format!(
            "socket path {} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit; set TMPDIR (or the work directory) to a shorter folder",
            socket.display()
        )));
    }
    Ok(())
}

/// Whether `status` is a death by `signal`.
pub(crate) fn terminated_by(status: std::process::ExitStatus, signal: i32) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_only_what_needs_it() {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["info", "--output=json", "/tmp/my disk.qcow2", "it's"]);
        assert_eq!(
            command_line(&cmd),
            r"qemu-img info --output=json '/tmp/my disk.qcow2' 'it'\''s'"
        );
    }

    #[test]
    fn failure_carries_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'qemu-img: Could not open x' >&2; exit 3"]);
        let err = run(&mut cmd).unwrap_err().to_string();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("qemu-img: Could not open x"), "{err}");
    }

    #[test]
    fn random_numbers_differ() {
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn overlong_socket_paths_are_refused() {
        let long = std::path::PathBuf::from(format!("/{}", "x".repeat(200)));
        let err = check_socket_path(&long).unwrap_err().to_string();
        assert!(err.contains("107-byte limit"), "{err}");
        assert!(check_socket_path(std::path::Path::new("/tmp/s")).is_ok());
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run(&mut Command::new("vbackup-no-such-program")).unwrap_err();
        assert!(matches!(err, Error::Spawn { .. }), "{err}");
    }

    #[test]
    fn long_stderr_is_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_STDERR);
        let cut = stderr_text(text.as_bytes());
        assert!(cut.ends_with("[...]"));
        assert!(cut.len() <= MAX_STDERR + 6);
    }
}

/// Waits between polls of a process we expect to change state soon
/// (start up, exit): 1 ms at first, doubling up to 10 ms, so short waits
/// cost about what they last instead of a whole 10 ms tick.
#[derive(Debug)]
pub(crate) struct PollDelay {
    next: std::time::Duration,
}

impl PollDelay {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(1);
    const MAX: std::time::Duration = std::time::Duration::from_millis(10);

    /// A fresh sequence of delays.
    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// Sleeps for the next delay.
    pub(crate) fn sleep(&mut self) {
        std::thread::sleep(self.next);
        self.next = (self.next * 2).min(Self::MAX);
    }
}

#[cfg(test)]
mod poll_delay_tests {
    use super::PollDelay;

    #[test]
    fn delays_double_up_to_ten_milliseconds() {
        let mut delay = PollDelay::new();
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(delay.next.as_millis());
            delay.next = (delay.next * 2).min(PollDelay::MAX);
        }
        assert_eq!(seen, [1, 2, 4, 8, 10, 10]);
    }
}
