//! What the engine tells whoever runs it while it works (progress, notes, warnings, the
//! lines a guest it runs reports), as typed [`Notice`]s handed to the sink its caller
//! installs ([`Notices`]): the engine prints nothing, the CLI prints them.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::telemetry::progress::ProgressEvent;

/// One thing the engine tells its caller. The texts are sentences without a prefix; the
/// CLI adds `vmstream send: ` and the like.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A step worth telling: a connection came, channels were bound, a stale file was
    /// removed.
    Info(String),
    /// Something failed that the run gets over (or reports again in its result), with no
    /// label of its own: "resuming the source guest failed: ...".
    Error(String),
    /// Something worth knowing that changes nothing (the CLI: `note: ...`).
    Note(String),
    /// Something went wrong but the run goes on (the CLI: `warning: ...`).
    Warning(String),
    /// The destination is bound and listening on this address.
    Listening(SocketAddr),
    /// The destination is bound and listening on this unix socket.
    ListeningUnix(std::path::PathBuf),
    /// A line for standard output: what a guest run by this process reports (its ready
    /// and done lines, its transactions per second, `resumed kind=kvm ...`).
    Output(String),
    /// A line the source's guest process wrote to its standard error.
    GuestStderr(String),
    /// How the sender's current round goes (for a progress bar).
    Progress(ProgressEvent),
}

/// What the caller does with each notice (any thread may call it).
type Sink = dyn Fn(&Notice) + Send + Sync;

/// Where notices go: a cheap, cloneable handle on the caller's sink, shared by the
/// engine's threads. The default is silent.
#[derive(Clone, Default)]
pub struct Notices {
    sink: Option<Arc<Sink>>,
}

impl std::fmt::Debug for Notices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notices")
            .field("silent", &self.sink.is_none())
            .finish()
    }
}

impl Notices {
    /// Notices handed to `sink` (called on whichever thread has something to tell).
    pub fn new(sink: impl Fn(&Notice) + Send + Sync + 'static) -> Notices {
        Notices {
            sink: Some(Arc::new(sink)),
        }
    }

    /// Notices that go nowhere.
    pub fn silent() -> Notices {
        Notices::default()
    }

    /// Tells `notice`.
    pub fn tell(&self, notice: Notice) {
        if let Some(sink) = &self.sink {
            sink(&notice);
        }
    }

    /// Tells a [`Notice::Info`].
    pub fn info(&self, text: impl Into<String>) {
        self.tell(Notice::Info(text.into()));
    }

    /// Tells a [`Notice::Error`].
    pub fn error(&self, text: impl Into<String>) {
        self.tell(Notice::Error(text.into()));
    }

    /// Tells a [`Notice::Note`].
    pub fn note(&self, text: impl Into<String>) {
        self.tell(Notice::Note(text.into()));
    }

    /// Tells a [`Notice::Warning`].
    pub fn warning(&self, text: impl Into<String>) {
        self.tell(Notice::Warning(text.into()));
    }

    /// Tells a [`Notice::Output`] line.
    pub fn output(&self, line: impl Into<String>) {
        self.tell(Notice::Output(line.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn notices_reach_the_sink_in_order_and_the_default_is_silent() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let notices = Notices::new({
            let seen = seen.clone();
            move |n: &Notice| seen.lock().unwrap().push(n.clone())
        });
        let clone = notices.clone();
        notices.info("a");
        clone.warning("b");
        std::thread::spawn(move || clone.output("c"))
            .join()
            .unwrap();
        notices.note("d");
        notices.error("e");
        assert_eq!(
            *seen.lock().unwrap(),
            [
                Notice::Info("a".into()),
                Notice::Warning("b".into()),
                Notice::Output("c".into()),
                Notice::Note("d".into()),
                Notice::Error("e".into()),
            ]
        );
        let silent = Notices::default();
        silent.warning("nobody hears this");
        assert_eq!(format!("{silent:?}"), "Notices { silent: true }");
    }
}
