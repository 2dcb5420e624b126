//! Throttling and pausing a guest process with SIGSTOP / SIGCONT.
//!
//! A background thread runs a 10 ms period: the guest is stopped for `p * 10 ms` and runs
//! for the rest, so it gets about `1 - p` of its normal CPU time (auto-converge style).
//! [`Throttle::pause`] stops the guest for good (the stop-and-copy phase) and returns only
//! when every thread of the guest is in the stopped state.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Length of one throttle period.
pub const PERIOD: Duration = Duration::from_millis(10);
/// Largest throttle fraction accepted by [`Throttle::set`].
pub const MAX_FRACTION: f64 = 0.99;
/// Longest single stop: a guest that overran its share by far (this thread woke very late)
/// pays off at most this much at once rather than freezing for seconds.
pub const MAX_STOP: Duration = Duration::from_millis(500);

/// How long to stop a guest throttled at `fraction` that ran for `ran` since it was last
/// continued (`None`: it was not throttled just before). On time it ran
/// `PERIOD * (1 - fraction)`; on a busy machine this thread wakes late and the guest runs
/// longer (at 99%, a 5 ms late wake-up is 50 times its share): the excess is paid back
/// stopped, in the same proportion, so that the guest keeps to `1 - fraction` of the time.
pub fn stop_time(fraction: f64, ran: Option<Duration>) -> Duration {
    let fraction = fraction.clamp(0.0, MAX_FRACTION);
    let base = PERIOD.mul_f64(fraction);
    let Some(ran) = ran else { return base };
    let excess = ran.saturating_sub(PERIOD.mul_f64(1.0 - fraction));
    (base + excess.mul_f64(fraction / (1.0 - fraction))).min(MAX_STOP.max(base))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Running,
    Paused,
    Exit,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    fraction: f64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// Stops and continues one guest process.
#[derive(Debug)]
pub struct Throttle {
    pid: Pid,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn signal(pid: Pid, sig: Signal) -> io::Result<()> {
    kill(pid, sig).map_err(io::Error::from)
}

impl Throttle {
    /// Control process `pid`; starts unthrottled and running.
    pub fn new(pid: u32) -> io::Result<Self> {
        let pid = Pid::from_raw(pid as i32);
        kill(pid, None).map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode: Mode::Running,
                fraction: 0.0,
            }),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vmstream-throttle".into())
            .spawn(move || throttle_loop(pid, &s))?;
        Ok(Self {
            pid,
            shared,
            thread: Some(thread),
        })
    }

    /// Set the stopped fraction of each period, clamped to `[0, 0.99]`.
    pub fn set(&self, fraction: f64) {
        let f = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, MAX_FRACTION)
        };
        self.shared.state.lock().unwrap().fraction = f;
        self.shared.changed.notify_all();
    }

    /// Current throttle fraction.
    pub fn fraction(&self) -> f64 {
        self.shared.state.lock().unwrap().fraction
    }

    /// Stop the guest and wait until all its threads are stopped. Throttling is suspended
    /// until [`Throttle::resume`].
    pub fn pause(&self) -> io::Result<()> {
        {
            let mut st = self.shared.state.lock().unwrap();
            st.mode = Mode::Paused;
            signal(self.pid, Signal::SIGSTOP)?;
        }
        self.shared.changed.notify_all();
        wait_stopped(self.pid.as_raw() as u32, Duration::from_secs(10))
    }

    /// Continue a paused guest; throttling (if set) goes on.
    pub fn resume(&self) -> io::Result<()> {
        let mut st = self.shared.state.lock().unwrap();
        st.mode = Mode::Running;
        signal(self.pid, Signal::SIGCONT)?;
        drop(st);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.shared.state.lock().unwrap().mode == Mode::Paused
    }
}

impl Drop for Throttle {
    /// Stops throttling. A paused guest stays stopped; a running one is continued.
    fn drop(&mut self) {
        let paused = {
            let mut st = self.shared.state.lock().unwrap();
            let paused = st.mode == Mode::Paused;
            st.mode = Mode::Exit;
            paused
        };
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !paused {
            let _ = signal(self.pid, Signal::SIGCONT);
        }
    }
}

fn throttle_loop(pid: Pid, shared: &Shared) {
    let mut st = shared.state.lock().unwrap();
    // When this loop last continued the guest (None: it is not in a throttle period).
    let mut continued: Option<Instant> = None;
    loop {
        match st.mode {
            Mode::Exit => return,
            Mode::Paused => {
                continued = None;
                st = shared.changed.wait(st).unwrap();
            }
            Mode::Running if st.fraction <= 0.0 => {
                continued = None;
                st = shared.changed.wait(st).unwrap();
            }
            Mode::Running => {
                let stop_for = stop_time(st.fraction, continued.map(|c| c.elapsed()));
                let start = Instant::now();
                if signal(pid, Signal::SIGSTOP).is_err() {
                    return; // the guest is gone
                }
                st = wait_until(shared, st, start + stop_for);
                // Only continue if nobody paused (or dropped) us meanwhile.
                if st.mode == Mode::Running && signal(pid, Signal::SIGCONT).is_err() {
                    return;
                }
                if st.mode == Mode::Running {
                    let now = Instant::now();
                    continued = Some(now);
                    let run_for = PERIOD.mul_f64(1.0 - st.fraction);
                    st = wait_until(shared, st, now + run_for);
                }
            }
        }
    }
}

/// Sleep on the condvar until `deadline` or until the mode leaves `Running`.
fn wait_until<'a>(
    shared: &'a Shared,
    mut st: std::sync::MutexGuard<'a, State>,
    deadline: Instant,
) -> std::sync::MutexGuard<'a, State> {
    loop {
        let now = Instant::now();
        if now >= deadline || st.mode != Mode::Running {
            return st;
        }
        st = shared.changed.wait_timeout(st, deadline - now).unwrap().0;
    }
}

/// Wait until every thread of `pid` is in the stopped state (`T` in `/proc/PID/task/*/stat`).
pub fn wait_stopped(pid: u32, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if all_threads_stopped(pid)? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("process {pid} did not stop"),
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn all_threads_stopped(pid: u32) -> io::Result<bool> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        // The state follows the parenthesised command name, which may contain spaces.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        match state {
            Some('T') => {}
            // A dead process never stops: say so now rather than at the timeout.
            Some('Z' | 'X') => {
                return Err(io::Error::other(format!(
                    "process {pid} has exited, it cannot be stopped"
                )))
            }
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Process state letter of `pid` (R, S, T, Z, ...), from `/proc/PID/stat`.
pub fn process_state(pid: u32) -> io::Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .ok_or_else(|| io::Error::other("unparsable /proc stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn on_time_periods_stop_the_fraction_of_the_period() {
        assert_eq!(stop_time(0.5, None), 5 * MS);
        assert_eq!(stop_time(0.5, Some(5 * MS)), 5 * MS);
        // Waking early owes nothing back.
        assert_eq!(stop_time(0.9, Some(MS / 2)), 9 * MS);
    }

    #[test]
    fn a_late_wake_up_is_paid_back_in_proportion() {
        // At 90% the guest may run 1 ms per 9 ms stopped; it ran 4 ms: 3 ms too long, 27 ms
        // more stopped, and over the whole period it kept to 10%.
        let stop = stop_time(0.9, Some(4 * MS));
        assert_eq!(stop, 36 * MS);
        let share = 4.0 / (4.0 + stop.as_secs_f64() * 1e3);
        assert!((share - 0.1).abs() < 1e-9, "{share}");
        // At 99% a 5 ms overrun costs 99 times that, up to the cap.
        assert_eq!(stop_time(0.99, Some(MS * 5 / 10 + MS / 10)), MS * 594 / 10);
        assert_eq!(stop_time(0.99, Some(50 * MS)), MAX_STOP);
    }

    #[test]
    fn waiting_for_a_dead_process_to_stop_fails_at_once() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie.
        while process_state(pid).unwrap() != 'Z' {
            std::thread::sleep(Duration::from_millis(1));
        }
        let err = wait_stopped(pid, Duration::from_secs(600)).unwrap_err();
        assert!(err.to_string().contains("has exited"), "{err}");
        child.wait().unwrap();
    }

    #[test]
    fn fractions_outside_the_range_are_clamped() {
        assert_eq!(stop_time(5.0, None), stop_time(MAX_FRACTION, None));
        assert_eq!(stop_time(-1.0, Some(100 * MS)), Duration::ZERO);
    }
}
