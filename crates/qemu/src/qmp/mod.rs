//! A synchronous QMP (QEMU Machine Protocol) client.
//!
//! Why: backing up a running VM means asking QEMU (or
//! `qemu-storage-daemon`) to freeze a point in time, rotate dirty bitmaps
//! and export the frozen view over NBD; QMP is how. Like the NBD client it
//! is small and blocking — one command at a time, no async runtime.
//!
//! What it guarantees:
//! - every read has a deadline ([`QmpClient::set_timeout`]), so a hung QEMU
//!   yields an error instead of a hung backup;
//! - replies are matched to requests by id; asynchronous events that
//!   arrive meanwhile are kept (a bounded queue) for
//!   [`QmpClient::wait_event`];
//! - QEMU's refusals become [`Error::Qmp`] naming the command and carrying
//!   QEMU's description;
//! - QEMU's output is untrusted: lines are bounded, malformed messages are
//!   errors (never panics), and a broken stream is not used again.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::jsonline::{bounded_text, JsonLines};

mod types;

pub use types::{
    BlockDeviceInfo, BlockExportInfo, BlockGraph, BlockGraphEdge, BlockGraphNode, BlockInfo,
    BlockJobInfo, DirtyBitmapInfo, ImageSummary,
};

/// How long a command may take unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The most events kept while nobody waits for them; older ones are
/// dropped first.
const MAX_QUEUED_EVENTS: usize = 4096;
const PEER: &str = "QEMU (QMP)";

/// One asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, e.g. `BLOCK_JOB_CANCELLED`.
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
}

/// One message from QEMU, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// A successful reply.
    Return {
        /// The request id echoed back, if any.
        id: Option<Value>,
        /// The `return` value.
        value: Value,
    },
    /// A failed command.
    Error {
        /// The request id echoed back (absent when QEMU could not parse
        /// the request).
        id: Option<Value>,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event.
    Event(QmpEvent),
    /// The greeting sent on connection.
    Greeting(Value),
}

/// Parses one line from QEMU. Anything but a JSON object of a known shape
/// is an error; the caller decides whether the stream is still usable.
pub fn parse_message(line: &[u8]) -> std::result::Result<QmpMessage, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut map) = value else {
        return Err("a message that is not a JSON object".into());
    };
    let id = map.remove("id");
    if let Some(value) = map.remove("return") {
        return Ok(QmpMessage::Return { id, value });
    }
    if let Some(error) = map.remove("error") {
        let (class, desc) = error_fields(&error)?;
        return Ok(QmpMessage::Error { id, class, desc });
    }
    if let Some(name) = map.remove("event") {
        let Value::String(name) = name else {
            return Err("an event whose name is not a string".into());
        };
        let data = map.remove("data").unwrap_or(Value::Null);
        return Ok(QmpMessage::Event(QmpEvent { name, data }));
    }
    if let Some(greeting) = map.remove("QMP") {
        return Ok(QmpMessage::Greeting(greeting));
    }
    Err("a message with neither return, error, event nor QMP".into())
}

fn error_fields(error: &Value) -> std::result::Result<(String, String), String> {
    let text = |key: &str| error.get(key).and_then(Value::as_str).map(bounded_text);
    match (text("class"), text("desc")) {
        (Some(class), Some(desc)) => Ok((class, desc)),
        _ => Err("an error without class and desc strings".into()),
    }
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct QmpClient {
    lines: JsonLines,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    dropped_events: u64,
    timeout: Duration,
    version: Option<QemuVersion>,
}

impl QmpClient {
    /// Connects to a QMP monitor socket, reads the greeting and enters
    /// command mode (`qmp_capabilities`), with [`DEFAULT_TIMEOUT`].
    pub fn connect(path: &Path) -> Result<Self> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT)
    }

    /// [`QmpClient::connect`] with a timeout for every read.
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Self> {
        let lines = JsonLines::connect(path, PEER)?;
        let mut client = QmpClient {
            lines,
            next_id: 1,
            events: VecDeque::new(),
            dropped_events: 0,
            timeout,
            version: None,
        };
        client.greet()?;
        client.execute("qmp_capabilities", Value::Null)?;
        Ok(client)
    }

    fn greet(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let line = self.lines.read_line(deadline, "the QMP greeting")?;
        match parse_message(&line) {
            Ok(QmpMessage::Greeting(greeting)) => {
                self.version = parse_version(&greeting);
                Ok(())
            }
            Ok(_) => Err(self
                .lines
                .poison("the first message is not a QMP greeting".into())),
            Err(why) => Err(self.lines.poison(why)),
        }
    }

    /// The monitor socket.
    pub fn socket_path(&self) -> &Path {
        self.lines.path()
    }

    /// QEMU's version from the greeting, when it sent a readable one.
    pub fn version(&self) -> Option<QemuVersion> {
        self.version
    }

    /// The timeout of every command and read.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the timeout of every later command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `command` with `args` (an object, or `null` for none) and
    /// returns QEMU's `return` value. A refusal is [`Error::Qmp`] with
    /// QEMU's description; no reply within the timeout is an I/O error of
    /// kind `TimedOut`. Events that arrive meanwhile are kept.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.to_owned()));
        match args {
            Value::Null => {}
            Value::Object(map) if map.is_empty() => {}
            args @ Value::Object(_) => {
                request.insert("arguments".into(), args);
            }
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "arguments of QMP command '{command}' must be an object"
                )))
            }
        }
        request.insert("id".into(), json!(id));
        self.lines.send(&Value::Object(request), self.timeout)?;
        self.await_reply(command, id)
    }

    /// [`QmpClient::execute`], with the return value deserialized.
    pub fn execute_as<T: DeserializeOwned>(&mut self, command: &str, args: Value) -> Result<T> {
        let value = self.execute(command, args)?;
        serde_json::from_value(value).map_err(|e| Error::BadReply {
            peer: PEER,
            reason: format!("the reply to '{command}' does not have the expected shape: {e}"),
        })
    }

    fn await_reply(&mut self, command: &str, id: u64) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        let what = format!("the reply to '{command}'");
        loop {
            let line = self.lines.read_line(deadline, &what)?;
            let message = match parse_message(&line) {
                Ok(message) => message,
                Err(why) => return Err(self.lines.poison(why)),
            };
            match message {
                QmpMessage::Event(event) => self.queue(event),
                QmpMessage::Return {
                    id: Some(got),
                    value,
                } if got == json!(id) => return Ok(value),
                QmpMessage::Error {
                    id: reply_id,
                    class,
                    desc,
                } if reply_id.is_none() || reply_id == Some(json!(id)) => {
                    return Err(Error::Qmp {
                        command: command.to_owned(),
                        class,
                        desc,
                    })
                }
                // A late reply to an earlier command that timed out.
                QmpMessage::Return { .. } | QmpMessage::Error { .. } => {}
                QmpMessage::Greeting(_) => {
                    return Err(self.lines.poison("a second greeting".into()));
                }
            }
        }
    }

    fn queue(&mut self, event: QmpEvent) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped_events += 1;
        }
        self.events.push_back(event);
    }

    /// Waits for an event called `name` for which `predicate` holds on its
    /// `data`, up to `timeout`. Already queued events count (an event can
    /// arrive before the reply to the command that caused it); the matching
    /// event is taken out of the queue, the others stay.
    pub fn wait_event(
        &mut self,
        name: &str,
        predicate: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        self.wait_any_event(&[name], predicate, timeout)
    }

    /// [`QmpClient::wait_event`] for any of several event names.
    pub fn wait_any_event(
        &mut self,
        names: &[&str],
        mut predicate: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        let mut matches = |e: &QmpEvent| names.contains(&e.name.as_str()) && predicate(&e.data);
        if let Some(pos) = self.events.iter().position(&mut matches) {
            if let Some(event) = self.events.remove(pos) {
                return Ok(event);
            }
        }
        let deadline = Instant::now() + timeout;
        let what = format!("event {}", names.join(" or "));
        loop {
            let line = self.lines.read_line(deadline, &what)?;
            match parse_message(&line) {
                Ok(QmpMessage::Event(event)) if matches(&event) => return Ok(event),
                Ok(QmpMessage::Event(event)) => self.queue(event),
                // A late reply to a command that timed out.
                Ok(QmpMessage::Return { .. } | QmpMessage::Error { .. }) => {}
                Ok(QmpMessage::Greeting(_)) => {
                    return Err(self.lines.poison("a second greeting".into()))
                }
                Err(why) => return Err(self.lines.poison(why)),
            }
        }
    }

    /// Takes all queued events, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// How many events were dropped because nobody took them in time.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }
}

fn parse_version(greeting: &Value) -> Option<QemuVersion> {
    let v = greeting.get("version")?.get("qemu")?;
    let part = |k: &str| v.get(k).and_then(Value::as_u64);
    Some(QemuVersion {
        major: part("major")?,
        minor: part("minor")?,
        micro: part("micro")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_message_kinds() {
        let r = parse_message(br#"{"return": {"a": 1}, "id": 7}"#).unwrap();
        assert_eq!(
            r,
            QmpMessage::Return {
                id: Some(json!(7)),
                value: json!({"a": 1})
            }
        );
        let e = parse_message(br#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap();
        assert!(matches!(e, QmpMessage::Error { id: None, ref desc, .. } if desc == "no"));
        let ev = parse_message(br#"{"event": "X", "timestamp": {}}"#).unwrap();
        assert_eq!(
            ev,
            QmpMessage::Event(QmpEvent {
                name: "X".into(),
                data: Value::Null
            })
        );
        let g = parse_message(
            br#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}}}"#,
        )
        .unwrap();
        let QmpMessage::Greeting(g) = g else { panic!() };
        assert_eq!(
            parse_version(&g),
            Some(QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            })
        );
    }

    #[test]
    fn rejects_malformed_messages() {
        for bad in [
            &b"[1]"[..],
            b"{}",
            b"{\"error\": {\"desc\": 1}}",
            b"{\"event\": 5}",
            b"not json",
            b"\xff\xfe",
        ] {
            assert!(parse_message(bad).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_message(&bytes);
        }
    }
}
