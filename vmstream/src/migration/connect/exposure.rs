//! Where a migration without a key is safe: only with a peer on this host. Without a key a
//! receiver writes a guest image for whoever connects, and a source hands its guest's memory
//! (and, at the commit, its guest's life) to whatever answers; so a keyless migration with
//! an address others can reach is refused unless the operator says `--insecure`.

use std::net::{IpAddr, SocketAddr};

/// What anything answering at a keyless source's destination could do (for the refusal).
pub const SEND_RISK: &str =
    "whatever answers there gets the guest's memory and can have the guest ended as if it \
     had migrated";

/// What anyone reaching a keyless receiver could do (for the refusal).
pub const RECV_RISK: &str = "anyone who can reach it can write a guest image here";

/// Whether a keyless migration with a peer at `addr` is exposed to others: every address
/// but loopback (127.0.0.0/8, ::1, and 127.0.0.0/8 mapped into IPv6). The one place that
/// decides it (a local transport, e.g. a unix socket, would be another case here).
pub fn requires_key(addr: &SocketAddr) -> bool {
    !match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Refuses a keyless migration with a peer at any of `addrs` that [`requires_key`], unless
/// `insecure`. `given`: the option as the user wrote it (`--listen 0.0.0.0:7000`), `risk`:
/// what anyone could do there. The error says how to go on.
pub fn check_keyless(
    addrs: &[SocketAddr],
    insecure: bool,
    given: &str,
    risk: &str,
) -> Result<(), String> {
    match addrs.iter().find(|a| requires_key(a)) {
        Some(exposed) if !insecure => Err(format!(
            "{given}: {exposed} is not a loopback address, and without --auth-key-file {risk}; \
             give both sides the same --auth-key-file (or --insecure, on a network only \
             trusted hosts can reach)"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_loopback_is_safe_without_a_key() {
        for local in [
            "127.0.0.1:7000",
            "127.3.2.1:1",
            "[::1]:7000",
            "[::ffff:127.0.0.1]:7000",
        ] {
            assert!(!requires_key(&addr(local)), "{local}");
        }
        for exposed in [
            "0.0.0.0:7000",
            "[::]:7000",
            "10.0.0.5:7000",
            "192.168.1.2:1",
            "[fe80::1]:7000",
            "[::ffff:10.0.0.1]:7000",
        ] {
            assert!(requires_key(&addr(exposed)), "{exposed}");
        }
    }

    #[test]
    fn a_keyless_exposed_address_is_refused_unless_insecure() {
        let addrs = [addr("127.0.0.1:1"), addr("10.1.2.3:7000")];
        let e = check_keyless(&addrs, false, "--to h:7000", "anyone could X").unwrap_err();
        assert!(
            e.starts_with("--to h:7000: 10.1.2.3:7000 is not a loopback address"),
            "{e}"
        );
        assert!(
            e.contains("anyone could X") && e.contains("--insecure"),
            "{e}"
        );
        assert_eq!(check_keyless(&addrs, true, "--to h:7000", "x"), Ok(()));
        assert_eq!(
            check_keyless(&addrs[..1], false, "--to h:7000", "x"),
            Ok(())
        );
    }
}
