//! A small QMP client: connects to a QEMU monitor's unix socket, negotiates capabilities and
//! runs commands one at a time, each bounded by a timeout; asynchronous events met while
//! waiting for a reply are recorded, never mistaken for it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a command may take by default (QEMU answers most at once; `stop` waits for the
/// vCPUs to leave guest code).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP {path}: {source}")]
    Io {
        /// The monitor socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// QEMU closed the connection (it exited?).
    #[error("QMP {0}: QEMU closed the connection")]
    Closed(PathBuf),
    /// No reply within the timeout.
    #[error("QMP {path}: no reply to {command} within {timeout:?}")]
    Timeout {
        /// The monitor socket.
        path: PathBuf,
        /// The command waited for.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// QEMU said something that is not QMP.
    #[error("QMP {path}: not a QMP message: {line}")]
    Protocol {
        /// The monitor socket.
        path: PathBuf,
        /// What came.
        line: String,
    },
    /// QEMU refused the command.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
    /// The reply lacked what the caller needed.
    #[error("QMP {command}: unexpected reply {reply}")]
    Reply {
        /// The command.
        command: String,
        /// What came back.
        reply: String,
    },
}

/// A QMP event: its name, data and QEMU's timestamp (CLOCK_REALTIME, ns since the epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// `STOP`, `RESUME`, `MIGRATION`, ...
    pub name: String,
    /// The event's `data`, `null` if none.
    pub data: Value,
    /// When QEMU emitted it.
    pub at_unix_ns: u64,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<QmpEvent>,
}

impl Qmp {
    /// Connects to the monitor at `path`, reads its greeting and leaves capability
    /// negotiation mode (`qmp_capabilities`); each step bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message("the greeting", Instant::now() + timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                path: qmp.path.clone(),
                line: greeting.to_string(),
            });
        }
        qmp.execute_within("qmp_capabilities", Value::Null, timeout)?;
        Ok(qmp)
    }

    /// Connects, retrying while the socket does not exist or refuses (a QEMU starting up),
    /// until `timeout` has passed.
    pub fn connect_retrying(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Qmp::connect(path, timeout) {
                Err(QmpError::Io { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }

    /// The monitor socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` with `arguments` (`Value::Null`: none) and returns its `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, COMMAND_TIMEOUT)
    }

    /// [`Self::execute`] with its own timeout.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let request = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.read_message(command, deadline)?;
            if let Some(r) = message.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = message.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            // Events were recorded by read_message; anything else is not QMP.
            if message.get("event").is_none() {
                return Err(QmpError::Protocol {
                    path: self.path.clone(),
                    line: message.to_string(),
                });
            }
        }
    }

    /// `query-status`'s `status` (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", Value::Null)?;
        string_field("query-status", &r, "status")
    }

    /// `query-migrate`'s `status` (`none` when no migration ran).
    pub fn migration_status(&mut self) -> Result<(String, Value), QmpError> {
        let r = self.execute("query-migrate", Value::Null)?;
        let status = r
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        Ok((status, r))
    }

    /// Turns migration capabilities on or off.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))
            .map(drop)
    }

    /// The events seen so far, oldest first; taken out of the session.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    /// Waits until an event named `name` has come (seen before or during the wait) or
    /// `timeout` passed; returns it, leaving the other events recorded.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e.name == name) {
                return Ok(self.events.remove(i));
            }
            let message = self.read_message(name, deadline)?;
            if message.get("event").is_none() {
                return Err(QmpError::Protocol {
                    path: self.path.clone(),
                    line: message.to_string(),
                });
            }
        }
    }

    /// Reads one message before `deadline`; an event is also recorded.
    fn read_message(&mut self, waiting_for: &str, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = String::new();
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = || QmpError::Timeout {
            path: self.path.clone(),
            command: waiting_for.to_string(),
            timeout: left,
        };
        if left.is_zero() {
            return Err(timeout());
        }
        // A line that straddles the timeout is not lost: read_line keeps what it read.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout());
            }
            let _ = self.reader.get_ref().set_read_timeout(Some(left));
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QmpError::Closed(self.path.clone())),
                Ok(_) if line.ends_with('\n') => break,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        let message: Value = serde_json::from_str(line.trim()).map_err(|_| QmpError::Protocol {
            path: self.path.clone(),
            line: line.trim().to_string(),
        })?;
        if let Some(name) = message.get("event").and_then(Value::as_str) {
            let ts = message.get("timestamp");
            let part = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_u64);
            let at_unix_ns = part("seconds").unwrap_or(0) * 1_000_000_000
                + part("microseconds").unwrap_or(0) * 1_000;
            self.events.push(QmpEvent {
                name: name.to_string(),
                data: message.get("data").cloned().unwrap_or(Value::Null),
                at_unix_ns,
            });
        }
        Ok(message)
    }
}

/// `reply[key]` as a string, or a typed error naming `command`.
pub fn string_field(command: &str, reply: &Value, key: &str) -> Result<String, QmpError> {
    reply
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| QmpError::Reply {
            command: command.to_string(),
            reply: reply.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn socket_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmstream-qmp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A peer speaking QMP over a real unix socket: greets, then answers each line with the
    /// replies `script` gives for it.
    fn serve(name: &str, script: fn(&str) -> Vec<String>) -> PathBuf {
        let path = socket_path(name);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                for reply in script(&line) {
                    writeln!(w, "{reply}").unwrap();
                }
            }
        });
        path
    }

    #[test]
    fn events_before_a_reply_are_recorded_not_taken_for_it() {
        let path = serve("events", |line| {
            if line.contains("query-status") {
                vec![
                    r#"{"event": "STOP", "timestamp": {"seconds": 2, "microseconds": 5}}"#.into(),
                    r#"{"return": {"status": "paused", "running": false}}"#.into(),
                ]
            } else {
                vec![r#"{"return": {}}"#.into()]
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.status().unwrap(), "paused");
        let stop = qmp.wait_event("STOP", Duration::from_secs(1)).unwrap();
        assert_eq!(stop.at_unix_ns, 2_000_005_000);
    }

    #[test]
    fn an_error_reply_is_a_typed_error_and_silence_a_timeout() {
        let path = serve("errors", |line| {
            if line.contains("qmp_capabilities") {
                vec![r#"{"return": {}}"#.into()]
            } else if line.contains("cont") {
                vec![r#"{"error": {"class": "GenericError", "desc": "no"}}"#.into()]
            } else {
                vec![]
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let e = qmp.execute("cont", Value::Null).unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { class, .. } if class == "GenericError"),
            "{e}"
        );
        let t = Instant::now();
        let e = qmp
            .execute_within("stop", Value::Null, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_socket_that_is_not_qmp_is_refused() {
        let path = socket_path("not-qmp");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = writeln!(s, "hello, not json");
        });
        let e = Qmp::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, QmpError::Protocol { .. }), "{e}");
    }
}
