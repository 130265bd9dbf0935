//! A real `vbackup server` process on 127.0.0.1 for the end-to-end tests,
//! and the tokens they give their clients.
//!
//! The server is started on port 0 and the test reads the address it got
//! and its certificate's fingerprint from the lines it prints at start,
//! exactly as an operator would, so the start-up output is tested too.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::util::{s, send_sigterm, text};

/// A running `vbackup server`, stopped (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    addr: String,
    fingerprint: String,
}

impl Server {
    /// Starts `binary server` on the data folder `data`, its stderr the
    /// test's, and waits until it listens.
    pub fn start(binary: &str, data: &Path) -> Self {
        Self::start_with(binary, data, &[], None)
    }

    /// [`Server::start`] with more server `options`, its stderr written to
    /// `log` if given.
    pub fn start_with(binary: &str, data: &Path, options: &[&str], log: Option<&Path>) -> Self {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::File::create(path)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display())),
            ),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(binary)
            .args(["server", "--listen", "127.0.0.1:0", "--data", s(data)])
            .args(options)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary} server: {e}"));
        let banner = child.stdout.take().and_then(read_banner);
        match banner {
            Some((addr, fingerprint)) => Self {
                child,
                addr,
                fingerprint,
            },
            None => {
                let _ = child.kill();
                let status = child.wait();
                panic!("the server exited before listening: {status:?}");
            }
        }
    }

    /// The address it listens on, `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its certificate's SHA-256 fingerprint (64 hex digits), to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The URL of repository `repo` on it.
    pub fn url(&self, repo: &str) -> String {
        format!("https://{}/{repo}", self.addr)
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it with SIGTERM; it must exit cleanly (the test fails
    /// otherwise).
    pub fn stop(mut self) {
        send_sigterm(&self.child).unwrap_or_else(|e| panic!("SIGTERM to the server: {e}"));
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for the server: {e}"));
        assert!(status.success(), "server exit: {status:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the server's start lines: the fingerprint, then
/// `listening on https://ADDR`; `None` if it exits first.
fn read_banner(stdout: ChildStdout) -> Option<(String, String)> {
    let mut fingerprint = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.ok()?;
        if let Some(rest) = line.split("fingerprint ").nth(1) {
            if fingerprint.is_empty() {
                fingerprint = rest.split_whitespace().next()?.to_string();
            }
        }
        if let Some(addr) = line.strip_prefix("listening on https://") {
            assert_eq!(fingerprint.len(), 64, "fingerprint printed before: {line}");
            return Some((addr.to_string(), fingerprint));
        }
    }
    None
}

/// Adds a token for repository `repo` (or `*`) with `role` to the server
/// data folder `data` (`binary --json server token add`, labelled with
/// the role); returns the secret token.
pub fn add_token(binary: &str, data: &Path, repo: &str, role: &str) -> String {
    let out = Command::new(binary)
        .args(["--json", "server", "token", "add", "--data", s(data)])
        .args(["--repo", repo, "--role", role, "--label", role])
        .output()
        .unwrap_or_else(|e| panic!("running {binary}: {e}"));
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("token add printed no JSON ({e}): {}", text(&out)));
    json["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {json}"))
        .to_string()
}
