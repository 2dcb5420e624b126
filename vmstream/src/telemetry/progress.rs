//! The terminal progress bar of `vmstream send`: pages of the current round, on stderr
//! when it is a terminal.

use std::io::IsTerminal;
use std::time::Duration;

/// A progress bar on stderr, only when stderr is a terminal.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// A bar if stderr is a terminal and `enabled`.
    pub fn new(enabled: bool) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} pages {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar }
    }

    /// Starts round `round` of `pages` pages.
    pub fn round(&self, round: u64, pages: u64, paused: bool) {
        if let Some(b) = &self.bar {
            b.set_prefix(if paused {
                "final".to_string()
            } else {
                format!("round {round}")
            });
            b.set_position(0);
            b.set_length(pages);
        }
    }

    /// Advances by `n` pages.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Shows `msg` next to the bar.
    pub fn message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
