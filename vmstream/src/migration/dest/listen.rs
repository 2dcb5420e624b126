//! Listening for the source: the receive's settings checked, its target claimed, its socket
//! bound, one source admitted (and SIGINT/SIGTERM watched while it migrates); the migration
//! itself is the state machine's ([`super::machine`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::memory::PAGE_SIZE;
use crate::migration::config::RecvConfig;
use crate::migration::connect::admission::Admissions;
use crate::migration::connect::exposure::{check_keyless, RECV_RISK};
use crate::migration::dest::machine::{self, Received};
use crate::migration::error::RecvError;
use crate::migration::image::{check_target, Reservation};
use crate::migration::interrupt;
use crate::migration::transport::{unix_path, Endpoint, Listener, Socket};
use crate::telemetry::notice::Notice;
use crate::telemetry::stats::MigrationStats;

/// Parses `--listen`: `PORT` or `:PORT` listen on 127.0.0.1; `HOST:PORT` is explicit.
/// Returns the address and whether it was given explicitly.
pub fn listen_addr(s: &str) -> Result<(SocketAddr, bool), RecvError> {
    let bad = || {
        RecvError::Config(format!(
            "bad listen address {s:?} (PORT, :PORT or HOST:PORT, the port 0 to 65535)"
        ))
    };
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok((
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            false,
        ));
    }
    let addr: SocketAddr = s.parse().map_err(|_| bad())?;
    Ok((addr, true))
}

/// Parses `--listen` as [`listen_addr`] does, or a unix socket `unix:PATH` (local: never a
/// warning). Returns the endpoint and whether a TCP address was given explicitly.
pub fn listen_endpoint(s: &str) -> Result<(Endpoint, bool), RecvError> {
    if let Some(path) = unix_path(s) {
        if path.as_os_str().is_empty() {
            return Err(RecvError::Config(format!(
                "bad listen address {s:?}: unix:PATH needs a path"
            )));
        }
        return Ok((Endpoint::Unix(path.to_path_buf()), false));
    }
    listen_addr(s).map(|(a, explicit)| (Endpoint::Tcp(a), explicit))
}

/// Checks a receive's settings before anything is created or bound: the listen address
/// (without a key: loopback unless `insecure`, [`check_keyless`]), the expected size and the target path ([`check_target`]: not a directory or a device,
/// in a directory that exists). Errors are [`RecvError::Config`] and
/// [`RecvError::Image`] (`Unusable`, `BadPath`): bad arguments.
pub fn check_config(cfg: &RecvConfig) -> Result<(), RecvError> {
    let (endpoint, _) = listen_endpoint(&cfg.listen)?;
    if let (Endpoint::Tcp(addr), None) = (&endpoint, &cfg.auth_key) {
        check_keyless(
            &[*addr],
            cfg.insecure,
            &format!("--listen {}", cfg.listen),
            RECV_RISK,
        )
        .map_err(RecvError::Config)?;
    }
    if cfg.io_timeout.is_zero() {
        // Every connection would be dropped for it, and the receive never end.
        return Err(RecvError::Config("--io-timeout must be above 0".into()));
    }
    if cfg.max_size == Some(0) {
        return Err(RecvError::Config("--max-guest-size must be above 0".into()));
    }
    if let Some(size) = cfg.expect_size {
        let (cap, _) = cfg.size_cap();
        if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) || size > cap {
            return Err(RecvError::Config(format!(
                "expected guest size {size} (--size) must be a non-zero multiple of \
                 {PAGE_SIZE} bytes, at most {cap} (--max-guest-size)"
            )));
        }
    }
    super::disks::check_disk_targets(cfg)?;
    super::hello::check_region_targets(cfg)?;
    if let Some(target) = &cfg.memory_file {
        check_target(target)?;
    } else if !cfg.resume {
        // A handover's memory stays the source's file or memfd: without a name for it and
        // without a guest running on it, it would vanish with this process.
        return Err(RecvError::Config(
            "--memory-file is required without --resume (a handed-over guest needs a name or \
             a run)"
                .into(),
        ));
    }
    Ok(())
}

/// A receive that listens: its settings checked, its target claimed (no other receive
/// can write it meanwhile, see [`Reservation`]), its socket bound. [`receive_on`](super::receive_on) takes
/// the migration; dropped unused, it releases the target.
#[derive(Debug)]
pub struct Listening {
    /// The target's claim (None without `--memory-file`).
    claim: Option<Reservation>,
    /// The claims of memory's regions after the first (`--memory-file` again).
    region_claims: Vec<Reservation>,
    /// The disk targets' claims (`--disk`).
    disk_claims: Vec<Reservation>,
    listener: Listener,
    local: Endpoint,
}

impl Listening {
    /// The bound address (a TCP port 0 resolved), or unix socket.
    pub fn local_addr(&self) -> &Endpoint {
        &self.local
    }
}

/// Prepares a receive into `cfg.memory_file`: checks the settings ([`check_config`]),
/// claims the target (refused with [`crate::migration::image::ImageError::Busy`] while another
/// receiver writes it) and binds the listening socket, then tells [`Notice::Listening`].
/// Nothing has been received when this fails.
pub fn listen(cfg: &RecvConfig) -> Result<Listening, RecvError> {
    check_config(cfg)?;
    let (endpoint, explicit) = listen_endpoint(&cfg.listen)?;
    let claim = cfg
        .memory_file
        .as_ref()
        .map(|target| Reservation::claim(target, &cfg.notices))
        .transpose()?;
    let region_claims = super::hello::claim_regions(cfg)?;
    let disk_claims = super::disks::claim_disks(cfg)?;
    for stale in claim
        .iter()
        .chain(&region_claims)
        .chain(&disk_claims)
        .flat_map(Reservation::removed)
    {
        cfg.notices.info(format!(
            "removed {}, left by a receiver that no longer runs",
            stale.display()
        ));
    }
    let remote = matches!(&endpoint, Endpoint::Tcp(addr) if !addr.ip().is_loopback());
    if explicit && remote && cfg.auth_key.is_none() {
        cfg.notices.warning(format!(
            "listening on {endpoint}: the migration stream is unauthenticated, anyone who \
             connects can write this guest's memory (--auth-key-file admits only sources \
             that hold a shared key)"
        ));
    }
    let listener =
        Listener::bind(&endpoint).map_err(|e| RecvError::Listen(endpoint.to_string(), e))?;
    let local = listener
        .local_endpoint()
        .map_err(|e| RecvError::Listen(endpoint.to_string(), e))?;
    cfg.notices.tell(match &local {
        Endpoint::Tcp(a) => Notice::Listening(*a),
        Endpoint::Unix(p) => Notice::ListeningUnix(p.clone()),
    });
    Ok(Listening {
        claim,
        region_claims,
        disk_claims,
        listener,
        local,
    })
}

/// Accepts one source on `listening` and receives its guest into `cfg.memory_file`, filling
/// `stats` ([`receive_on`](super::receive_on) makes and finishes them); on success returns
/// the resumed guest (with `cfg.resume`).
pub(super) fn receive_into(
    cfg: &RecvConfig,
    listening: Listening,
    stats: &mut MigrationStats,
) -> Result<Received, RecvError> {
    let Listening {
        claim,
        region_claims,
        disk_claims,
        listener,
        local,
    } = listening;
    // Connections are read concurrently (`crate::migration::connect::admission`): the first opening is the
    // source's; with a key, the first that proved it, while the others are refused.
    let mut admissions = Admissions::new(
        listener,
        cfg.auth_key.clone(),
        cfg.io_timeout,
        cfg.notices.clone(),
    )
    .map_err(|e| RecvError::Listen(local.to_string(), e))?;
    let source = loop {
        if interrupt::requested(cfg.cancel.as_ref()) {
            return Err(RecvError::Interrupted);
        }
        match admissions.next(Duration::from_millis(200)) {
            Ok(Some(opening)) => break opening,
            Ok(None) => {}
            Err(e) => return Err(RecvError::Listen(local.to_string(), e)),
        }
    };
    let _watch = cfg
        .cancel
        .as_ref()
        .map(|flag| InterruptWatch::start(flag.clone(), source.reader.get_ref()))
        .transpose()
        .map_err(RecvError::Socket)?;
    let claims = (claim, region_claims);
    machine::receive_from(cfg, source, claims, disk_claims, admissions, stats)
}

/// Ends a receive that is waiting for the source once `RecvConfig::cancel` is set: shuts
/// the read side of channel 0, so a blocked read ends (with more channels, the others are
/// shut when the rounds end early). Writes still work: the source is told why. Stops
/// watching when dropped.
struct InterruptWatch {
    done: Arc<AtomicBool>,
}

impl InterruptWatch {
    fn start(flag: Arc<AtomicBool>, channel0: &Socket) -> std::io::Result<InterruptWatch> {
        let socket = channel0.try_clone()?;
        let done = Arc::new(AtomicBool::new(false));
        let watching = done.clone();
        std::thread::Builder::new()
            .name("vmstream-interrupt".into())
            .spawn(move || {
                while !watching.load(Ordering::Relaxed) {
                    if flag.load(Ordering::Relaxed) {
                        let _ = socket.shutdown(std::net::Shutdown::Read);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })?;
        Ok(InterruptWatch { done })
    }
}

impl Drop for InterruptWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The temporary file a receive into `target` uses (for tests and cleanup tools).
pub fn temp_image_path(target: &Path) -> Option<PathBuf> {
    crate::migration::image::temp_path(target).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_defaults_to_loopback() {
        assert_eq!(
            listen_addr("7000").unwrap(),
            ("127.0.0.1:7000".parse().unwrap(), false)
        );
        assert_eq!(
            listen_addr(":0").unwrap(),
            ("127.0.0.1:0".parse().unwrap(), false)
        );
        assert_eq!(
            listen_addr("0.0.0.0:9").unwrap(),
            ("0.0.0.0:9".parse().unwrap(), true)
        );
        assert!(listen_addr("nonsense").is_err());
        assert_eq!(
            listen_endpoint("unix:/run/v.sock").unwrap(),
            (Endpoint::Unix("/run/v.sock".into()), false)
        );
        assert!(listen_endpoint("unix:").is_err());
    }
}
