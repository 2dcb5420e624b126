//! Prints the engine's notices ([`Notice`]) for a command: steps, notes and warnings on
//! stderr after `vmstream WHO: `, output lines on stdout, the sender's progress as a bar
//! on stderr when it is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use crate::telemetry::notice::{Notice, Notices};
use crate::telemetry::progress::ProgressEvent;

/// Notices printed for `vmstream WHO` (`send`, `recv`, `kvm run`).
pub fn printer(who: &'static str) -> Notices {
    let bar = ProgressBar::default();
    Notices::new(move |notice: &Notice| match notice {
        Notice::Info(text) | Notice::Error(text) => eprintln!("vmstream {who}: {text}"),
        Notice::Note(text) => eprintln!("vmstream {who}: note: {text}"),
        Notice::Warning(text) => eprintln!("vmstream {who}: warning: {text}"),
        Notice::Listening(addr) => output(&format!("listening on {addr}")),
        Notice::ListeningUnix(path) => output(&format!("listening on unix:{}", path.display())),
        Notice::Output(line) => output(line),
        Notice::GuestStderr(line) => {
            let _ = writeln!(std::io::stderr(), "guest: {line}");
        }
        Notice::Progress(event) => bar.show(*event),
    })
}

/// Writes `line` to stdout at once (a pipe's reader waits for it).
fn output(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The sender's progress bar: pages of the current round, drawn on stderr from the
/// migration's start to its end, only when stderr is a terminal.
#[derive(Default)]
struct ProgressBar {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl ProgressBar {
    fn show(&self, event: ProgressEvent) {
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match (event, bar.as_ref()) {
            (ProgressEvent::Started, None) if std::io::stderr().is_terminal() => {
                *bar = Some(new_bar());
            }
            (
                ProgressEvent::Round {
                    round,
                    pages,
                    paused,
                },
                Some(b),
            ) => {
                b.set_prefix(if paused {
                    "final".to_string()
                } else {
                    format!("round {round}")
                });
                b.set_position(0);
                b.set_length(pages);
            }
            (ProgressEvent::Pages(n), Some(b)) => b.inc(n),
            (ProgressEvent::Bandwidth(bytes_per_s), Some(b)) => {
                b.set_message(format!("{:.0} MB/s", bytes_per_s / 1e6));
            }
            (ProgressEvent::Finished, Some(b)) => {
                b.finish_and_clear();
                *bar = None;
            }
            _ => {}
        }
    }
}

fn new_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} pages {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
