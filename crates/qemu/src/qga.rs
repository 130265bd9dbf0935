//! A client for the QEMU guest agent (`qemu-ga`), for application-consistent
//! backups.
//!
//! Why: a point in time taken under a running guest is crash-consistent —
//! like pulling the power plug. Asking the agent inside the guest to freeze
//! its file systems (`guest-fsfreeze-freeze`: flush, then block writers)
//! just before the instant and to thaw them right after makes the file
//! systems clean in the backup. The freeze must be short and must always be
//! undone, so every call has a timeout and [`crate::live::LiveSession`]
//! thaws on every path.
//!
//! The agent also runs commands in the guest (`guest-exec`, then
//! `guest-exec-status` until the process ended: [`GuestAgent::run`]) and
//! powers it off (`guest-shutdown`), which is how a restored guest is
//! checked after a boot and stopped again.
//!
//! The agent's socket is the host end of a virtio-serial channel: there is
//! no greeting, and stale replies from an earlier client may still be in
//! the pipe, so the connection starts with the `guest-sync-delimited`
//! handshake (a 0xFF byte resets the agent's parser, the reply is preceded
//! by 0xFF and echoes a random id).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::jsonline::{bounded_text, JsonLines};
use crate::process::random_u64;

/// How long an ordinary agent command may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freeze may take: the guest flushes its dirty data first.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
const PEER: &str = "the guest agent";
/// The byte that delimits the sync reply (and resets the agent's parser).
const SYNC_MARKER: u8 = 0xff;

/// What `guest-fsfreeze-status` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeStatus {
    /// File systems are writable.
    Thawed,
    /// File systems are frozen.
    Frozen,
    /// Anything else the agent said.
    Other(String),
}

/// What `guest-exec-status` says about a process `guest-exec` started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecStatus {
    /// Whether the process has ended; the other fields are final only then.
    pub exited: bool,
    /// Its exit code, if it exited normally.
    pub exit_code: Option<i64>,
    /// The signal that ended it, if one did.
    pub signal: Option<i64>,
    /// What it wrote to stdout (with output capture).
    pub stdout: Vec<u8>,
    /// What it wrote to stderr (with output capture).
    pub stderr: Vec<u8>,
    /// Whether the agent cut stdout or stderr short (it keeps at most 16 MiB).
    pub truncated: bool,
}

impl ExecStatus {
    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        self.exited && self.exit_code == Some(0)
    }
}

/// How often [`GuestAgent::run`] asks whether the process has ended.
const EXEC_POLL: Duration = Duration::from_millis(100);

/// A connection to a guest agent socket.
#[derive(Debug)]
pub struct GuestAgent {
    lines: JsonLines,
    timeout: Duration,
    freeze_timeout: Duration,
    next_id: u64,
}

impl GuestAgent {
    /// Connects to the agent's socket and synchronizes
    /// (`guest-sync-delimited`), with [`DEFAULT_TIMEOUT`].
    pub fn connect(socket: &Path) -> Result<Self> {
        Self::connect_with_timeout(socket, DEFAULT_TIMEOUT)
    }

    /// [`GuestAgent::connect`] with a timeout for ordinary commands.
    pub fn connect_with_timeout(socket: &Path, timeout: Duration) -> Result<Self> {
        let mut agent = GuestAgent {
            lines: JsonLines::connect(socket, PEER)?,
            timeout,
            freeze_timeout: DEFAULT_FREEZE_TIMEOUT.max(timeout),
            next_id: random_u64() >> 12,
        };
        agent.sync()?;
        Ok(agent)
    }

    /// Changes the timeout of ordinary commands.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Changes the timeout of `guest-fsfreeze-freeze`.
    pub fn set_freeze_timeout(&mut self, timeout: Duration) {
        self.freeze_timeout = timeout;
    }

    /// Resynchronizes: discards whatever stale output is in the channel
    /// and checks that the agent answers.
    pub fn sync(&mut self) -> Result<()> {
        let id = self.take_id();
        let request = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        self.lines.send_raw(&[SYNC_MARKER], self.timeout)?;
        self.lines.send(&request, self.timeout)?;
        let deadline = Instant::now() + self.timeout;
        let what = "the reply to guest-sync-delimited";
        loop {
            self.lines.skip_through(SYNC_MARKER, deadline, what)?;
            // The reply follows the marker; a marker inside stale output
            // is followed by something else, so look for the next one.
            let line = self.lines.read_line(deadline, what)?;
            if parse_line(&line)
                .ok()
                .and_then(|v| v.get("return").cloned())
                == Some(json!(id))
            {
                return Ok(());
            }
        }
    }

    /// Runs an agent command and returns its `return` value; a refusal is
    /// [`Error::GuestAgent`] with the agent's description.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value> {
        self.execute_within(command, args, self.timeout)
    }

    fn execute_within(&mut self, command: &str, args: Value, timeout: Duration) -> Result<Value> {
        let id = self.take_id();
        let mut request = Map::new();
        request.insert("execute".into(), json!(command));
        if let Value::Object(map) = &args {
            if !map.is_empty() {
                request.insert("arguments".into(), args);
            }
        }
        request.insert("id".into(), json!(id));
        self.lines.send(&Value::Object(request), timeout)?;
        let deadline = Instant::now() + timeout;
        let what = format!("the reply to '{command}'");
        loop {
            let line = self.lines.read_line(deadline, &what)?;
            let reply = parse_line(&line).map_err(|why| self.lines.poison(why))?;
            match reply.get("id") {
                Some(got) if *got != json!(id) => continue, // a stale reply
                _ => return reply_value(command, reply, self.lines.peer()),
            }
        }
    }

    /// Freezes the guest's file systems; returns how many were frozen.
    pub fn fsfreeze_freeze(&mut self) -> Result<u64> {
        let value =
            self.execute_within("guest-fsfreeze-freeze", Value::Null, self.freeze_timeout)?;
        count(value, "guest-fsfreeze-freeze")
    }

    /// Thaws the guest's file systems; returns how many were thawed.
    pub fn fsfreeze_thaw(&mut self) -> Result<u64> {
        let value = self.execute("guest-fsfreeze-thaw", Value::Null)?;
        count(value, "guest-fsfreeze-thaw")
    }

    /// Whether the guest's file systems are frozen.
    pub fn fsfreeze_status(&mut self) -> Result<FreezeStatus> {
        let value = self.execute("guest-fsfreeze-status", Value::Null)?;
        match value.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            Some(other) => Ok(FreezeStatus::Other(bounded_text(other))),
            None => Err(bad_reply(
                "guest-fsfreeze-status",
                "a status that is not a string",
            )),
        }
    }

    /// Checks that the agent answers (`guest-ping`).
    pub fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping", Value::Null).map(drop)
    }

    /// Starts `path` with `args` in the guest (`guest-exec`), capturing its
    /// stdout and stderr if `capture_output`; returns the guest's process
    /// id for [`GuestAgent::exec_status`]. Nothing is run through a shell
    /// unless `path` is one (`/bin/sh`, `["-c", "..."]`).
    pub fn exec(&mut self, path: &str, args: &[&str], capture_output: bool) -> Result<i64> {
        let value = self.execute(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": capture_output}),
        )?;
        value
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad_reply("guest-exec", "no process id"))
    }

    /// Whether the process `pid` that [`GuestAgent::exec`] started has
    /// ended, and how (`guest-exec-status`). The agent forgets a process
    /// once it reported it ended.
    pub fn exec_status(&mut self, pid: i64) -> Result<ExecStatus> {
        let value = self.execute("guest-exec-status", json!({"pid": pid}))?;
        exec_status(&value)
    }

    /// Runs `path` with `args` in the guest with output capture and waits
    /// up to `timeout` for it to end (for checks such as "does the
    /// restored guest's database answer"). A process still running after
    /// `timeout` is an error (it keeps running in the guest).
    pub fn run(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecStatus> {
        let pid = self.exec(path, args, true)?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.exec_status(pid)?;
            if status.exited {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    format!("'{path}' (pid {pid} in the guest) did not end within {timeout:?}"),
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            std::thread::sleep(EXEC_POLL);
        }
    }

    /// Writes `data` to the file `path` in the guest, created or
    /// truncated (`guest-file-open`, `-write`, `-flush`, `-close`).
    pub fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        use base64::Engine;
        let handle = self.file_open(path, "w")?;
        let buf = base64::engine::general_purpose::STANDARD.encode(data);
        let written = self
            .execute(
                "guest-file-write",
                json!({"handle": handle, "buf-b64": buf}),
            )
            .and_then(|_| self.execute("guest-file-flush", json!({"handle": handle})));
        let closed = self.execute("guest-file-close", json!({"handle": handle}));
        written?;
        closed.map(drop)
    }

    /// Reads at most `max` bytes of the file `path` in the guest.
    pub fn read_file(&mut self, path: &str, max: usize) -> Result<Vec<u8>> {
        let handle = self.file_open(path, "r")?;
        let read = self.execute("guest-file-read", json!({"handle": handle, "count": max}));
        let closed = self.execute("guest-file-close", json!({"handle": handle}));
        let read = read?;
        closed?;
        let text = read
            .get("buf-b64")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_reply("guest-file-read", "no 'buf-b64'"))?;
        decode_base64(text)
            .ok_or_else(|| bad_reply("guest-file-read", "invalid base64 in 'buf-b64'"))
    }

    fn file_open(&mut self, path: &str, mode: &str) -> Result<i64> {
        self.execute("guest-file-open", json!({"path": path, "mode": mode}))?
            .as_i64()
            .ok_or_else(|| bad_reply("guest-file-open", "no file handle"))
    }

    /// Asks the guest to power off (`guest-shutdown`, mode `powerdown`).
    /// The agent answers only a refusal: success is the guest going away,
    /// so this waits up to the command timeout for an error reply and
    /// treats silence or a closed connection as accepted. Whether the
    /// guest did stop is for the caller to watch (the VM's process, QMP).
    pub fn shutdown(&mut self) -> Result<()> {
        let id = self.take_id();
        let request =
            json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}, "id": id});
        self.lines.send(&request, self.timeout)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let Ok(line) = self
                .lines
                .read_line(deadline, "a refusal of guest-shutdown")
            else {
                return Ok(()); // silence or a closed channel: the guest is going down
            };
            let Ok(reply) = parse_line(&line) else {
                continue;
            };
            if reply.get("id") == Some(&json!(id)) || reply.get("error").is_some() {
                return reply_value("guest-shutdown", reply, PEER).map(drop);
            }
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1) & ((1 << 52) - 1);
        id
    }
}

fn parse_line(line: &[u8]) -> std::result::Result<Value, String> {
    match serde_json::from_slice::<Value>(line) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("a message that is not a JSON object".into()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn reply_value(command: &str, mut reply: Value, peer: &'static str) -> Result<Value> {
    if let Some(value) = reply.get_mut("return") {
        return Ok(value.take());
    }
    if let Some(error) = reply.get("error") {
        let text = |k: &str| error.get(k).and_then(Value::as_str).map(bounded_text);
        return Err(Error::GuestAgent {
            command: command.to_owned(),
            class: text("class").unwrap_or_default(),
            desc: text("desc").unwrap_or_else(|| "(no description)".into()),
        });
    }
    Err(Error::BadReply {
        peer,
        reason: format!("a reply to '{command}' with neither return nor error"),
    })
}

fn exec_status(value: &Value) -> Result<ExecStatus> {
    let exited = value
        .get("exited")
        .and_then(Value::as_bool)
        .ok_or_else(|| bad_reply("guest-exec-status", "no 'exited' flag"))?;
    let output = |key: &str| match value.get(key).and_then(Value::as_str) {
        Some(text) => decode_base64(text)
            .ok_or_else(|| bad_reply("guest-exec-status", &format!("invalid base64 in '{key}'"))),
        None => Ok(Vec::new()),
    };
    Ok(ExecStatus {
        exited,
        exit_code: value.get("exitcode").and_then(Value::as_i64),
        signal: value.get("signal").and_then(Value::as_i64),
        stdout: output("out-data")?,
        stderr: output("err-data")?,
        truncated: ["out-truncated", "err-truncated"]
            .iter()
            .any(|k| value.get(*k).and_then(Value::as_bool) == Some(true)),
    })
}

/// Decodes standard base64 (with `=` padding, as the agent sends output);
/// `None` if `text` is not valid base64.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

fn count(value: Value, command: &str) -> Result<u64> {
    value
        .as_u64()
        .ok_or_else(|| bad_reply(command, "a count that is not a number"))
}

fn bad_reply(command: &str, what: &str) -> Error {
    Error::BadReply {
        peer: PEER,
        reason: format!("{what} in the reply to '{command}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    /// A fake agent: answers the sync handshake, then gives each further
    /// request to `answer` (which returns the reply line, or `None` to
    /// close the connection).
    fn fake_agent(
        answer: impl Fn(&Value) -> Option<String> + Send + 'static,
    ) -> (
        std::path::PathBuf,
        tempfile::TempDir,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve(stream, &answer);
        });
        (path, dir, thread)
    }

    fn serve(mut stream: UnixStream, answer: &dyn Fn(&Value) -> Option<String>) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap() > 0 {
            // The client's 0xFF parser reset comes right before a request.
            let start = line.iter().position(|&b| b != SYNC_MARKER).unwrap_or(0);
            let request: Value = serde_json::from_slice(&line[start..]).unwrap();
            line.clear();
            let reply = if request["execute"] == "guest-sync-delimited" {
                let mut bytes = vec![SYNC_MARKER];
                bytes.extend(format!(r#"{{"return": {}}}"#, request["arguments"]["id"]).bytes());
                bytes
            } else {
                match answer(&request) {
                    Some(reply) => reply.into_bytes(),
                    None => return,
                }
            };
            stream.write_all(&reply).unwrap();
            stream.write_all(b"\n").unwrap();
        }
    }

    #[test]
    fn shutdown_is_accepted_when_the_guest_goes_away_and_refused_on_an_error() {
        let (path, _dir, thread) = fake_agent(|_| None);
        GuestAgent::connect(&path).unwrap().shutdown().unwrap();
        thread.join().unwrap();

        let (path, _dir, thread) = fake_agent(|request| {
            assert_eq!(request["arguments"]["mode"], "powerdown");
            Some(format!(
                r#"{{"error": {{"class": "GenericError", "desc": "child process has failed to shutdown"}}, "id": {}}}"#,
                request["id"]
            ))
        });
        let err = GuestAgent::connect(&path).unwrap().shutdown().unwrap_err();
        assert!(err.to_string().contains("failed to shutdown"), "{err}");
        thread.join().unwrap();
    }

    #[test]
    fn replies_map_to_values_and_errors() {
        let ok = reply_value("x", json!({"return": 3}), PEER).unwrap();
        assert_eq!(ok, json!(3));
        let err = reply_value(
            "guest-fsfreeze-freeze",
            json!({"error": {"class": "CommandNotFound", "desc": "The command guest-fsfreeze-freeze has been disabled"}}),
            PEER,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "guest agent command 'guest-fsfreeze-freeze' failed: The command guest-fsfreeze-freeze has been disabled (CommandNotFound)"
        );
        assert!(reply_value("x", json!({"what": 1}), PEER).is_err());
        assert!(count(json!("three"), "x").is_err());
    }

    #[test]
    fn base64_decodes_agent_output() {
        assert_eq!(decode_base64("aGkK").unwrap(), b"hi\n");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64("/+8=").unwrap(), [0xff, 0xef]);
        assert!(decode_base64("YQ=").is_none());
        assert!(decode_base64("YQ==YQ==").is_none());
        assert!(decode_base64("Y===").is_none());
        assert!(decode_base64("aGk*").is_none());
    }

    #[test]
    fn exec_status_reads_code_output_and_signal() {
        let done = exec_status(
            &json!({"exitcode": 0, "out-data": "aGkK", "out-truncated": false, "exited": true}),
        )
        .unwrap();
        assert!(done.success());
        assert_eq!(done.stdout, b"hi\n");
        assert!(done.stderr.is_empty() && !done.truncated);
        let running = exec_status(&json!({"exited": false})).unwrap();
        assert!(!running.exited && !running.success());
        let killed =
            exec_status(&json!({"exited": true, "signal": 9, "err-truncated": true})).unwrap();
        assert_eq!(
            (killed.signal, killed.truncated, killed.success()),
            (Some(9), true, false)
        );
        assert!(exec_status(&json!({"exitcode": 0})).is_err());
        assert!(exec_status(&json!({"exited": true, "out-data": "%%%%"})).is_err());
    }
}
