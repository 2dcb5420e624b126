//! Post-copy of KVM guests through the real binary (`send --kvm --postcopy`,
//! `vmstream/POSTCOPY.md`): the receiving VMM maps the committed image as guest RAM with
//! its owed pages missing, registers that mapping with userfaultfd, restores the vCPUs and
//! runs them at once; a vCPU (or the VMM) touching an owed page waits until it is placed.
//! Images live on tmpfs (`TmpDir` is under /dev/shm). Skipped (with the reason printed)
//! only where /dev/kvm is unusable.

use std::path::Path;

use vmstream::guest::kvm::abi::{VCPU_AREA_GPA, VCPU_AREA_STRIDE, VCPU_TX_COUNT};
use vmstream::migration::digest::{hex, memory_digest};
use vmstream_tests::*;

fn skip() -> bool {
    if let Err(why) = vmstream::guest::kvm::kvm_available() {
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

/// Sum of the two vCPUs' transaction counters in the guest RAM file at `path`.
fn kvm_tx(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    (0..2)
        .map(|i| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, VCPU_AREA_GPA + i * VCPU_AREA_STRIDE + VCPU_TX_COUNT)
                .expect("read vCPU counter");
            u64::from_le_bytes(b)
        })
        .sum()
}

/// `vmstream send --kvm` of a 2-vCPU dbsim guest of `size` on `src` to `port` ([`kvm_sender`]),
/// warmed up for 300 ms, its statistics in `stats`, with `extra`.
fn kvm_postcopy_sender(
    src: &Path,
    size: &str,
    port: u16,
    stats: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let mut args = vec!["--warmup", "300ms", "--stats-json", stats.to_str().unwrap()];
    args.extend_from_slice(extra);
    kvm_sender(src, size, port, &args, envs)
}

/// What a KVM post-copy that must have succeeded shows: committed on both sides, every
/// owed page placed once, the digests equal (and that of the source's memory at the pause),
/// the ledger checked once the last page landed, and the guest ran on from the source's
/// counters and verified at its end. Returns the destination's `postcopy` statistics.
fn assert_verified_kvm_postcopy(
    send: &mut Proc,
    recv: &mut Proc,
    dir: &TmpDir,
    mode: &str,
) -> serde_json::Value {
    let (s_status, _) = send.wait_exit();
    assert!(s_status.success(), "send failed: {}", send.stderr());
    let (r_status, lines) = recv.wait_exit();
    assert!(r_status.success(), "recv failed: {}", recv.stderr());
    let (s, r) = (
        read_stats(&dir.path("send.json")),
        read_stats(&dir.path("recv.json")),
    );
    for st in [&s, &r] {
        assert_eq!(st["outcome"], "committed", "{st}");
        assert_eq!(st["postcopy"]["digest"], "match", "{st}");
        assert!(st["downtime_ms"].as_f64().is_some(), "{st}");
    }
    assert_eq!(s["postcopy"]["mode"], mode);
    assert_eq!(s["digest"], r["digest"]);
    // The source's memory file keeps the memory at the pause: the digest both agreed on.
    let at_pause = std::fs::read(dir.path("src.img")).unwrap();
    assert_eq!(
        s["digest"].as_str().unwrap(),
        hex(&memory_digest(&at_pause, 4096))
    );
    let pc = &r["postcopy"];
    let owed = pc["pages_owed"].as_u64().unwrap();
    assert!(owed > 0, "a running dbsim guest owes pages: {pc}");
    assert_eq!(
        pc["pages_faulted"].as_u64().unwrap() + pc["pages_streamed"].as_u64().unwrap(),
        owed,
        "every owed page placed exactly once: {pc}"
    );
    // Resumed from the source's counters before the last page came; the ledger checked
    // at the last page; still counting at the end of the run, and verified there.
    let tx_at_pause = kvm_tx(&dir.path("src.img"));
    let resumed = line_starting(&lines, "resumed kind=kvm");
    assert!(resumed.contains("verify=postcopy"), "{resumed}");
    assert_eq!(field(resumed, "tx="), tx_at_pause, "{resumed}");
    let checked = line_starting(&lines, "postcopy verify ok kind=kvm");
    assert!(field(checked, "blocks=") > 0, "{checked}");
    let ok = line_starting(&lines, "verify ok");
    assert_eq!(field(ok, "resumed_from="), tx_at_pause);
    assert!(
        field(ok, "tx=") > field(checked, "tx="),
        "the guest kept running after the last page: {checked} / {ok}"
    );
    assert!(
        s["tps"]["after"].as_f64().is_some_and(|t| t > 0.0),
        "the destination sampled the running guest: {}",
        s["tps"]
    );
    pc.clone()
}

#[test]
fn kvm_postcopy_now_resumes_a_guest_that_keeps_running_and_verifies() {
    if skip() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-postcopy-now");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_resuming_receiver(&dst, "2s", &dir.path("recv.json"));
    let sj = dir.path("send.json");
    let mut send = kvm_postcopy_sender(&src, "64M", port, &sj, &["--postcopy", "now"], &[]);
    let pc = assert_verified_kvm_postcopy(&mut send, &mut recv, &dir, "now");
    assert_eq!(pc["pages_refused"], 0);
    // Round 0 and the empty round that switched: no pre-copy iteration.
    assert_eq!(read_stats(&sj)["rounds"], 2);
}

#[test]
fn kvm_postcopy_auto_switches_instead_of_throttling() {
    if skip() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-postcopy-auto");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_resuming_receiver(&dst, "2s", &dir.path("recv.json"));
    // Raw pages over a 20 MB/s link from a VM that dirties far more: pre-copy cannot
    // converge, and the qemu strategy would throttle the vCPUs (the timeout is a backstop);
    // auto switches to post-copy instead.
    let extra = [
        "--postcopy",
        "auto",
        "--max-bandwidth",
        "20M",
        "--xbzrle",
        "off",
        "--compress",
        "none",
        "--converge",
        "qemu",
        "--timeout",
        "10s",
        "--postcopy-preempt",
        "off",
    ];
    let sj = dir.path("send.json");
    // Requested pages share channel 0 with the stream here (the other tests use their own
    // connection, the default).
    let mut send = kvm_postcopy_sender(&src, "32M", port, &sj, &extra, &[]);
    let pc = assert_verified_kvm_postcopy(&mut send, &mut recv, &dir, "auto");
    assert_eq!(pc["pages_preempted"], 0, "{pc}");
    let stats = read_stats(&sj);
    let throttled = stats["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["throttle"].as_f64().unwrap() > 0.0);
    assert!(!throttled, "the guest was never throttled: {stats}");
}

/// The link drops mid post-copy of a KVM guest (the source cuts its connection after 50
/// pages): the destination keeps the vCPUs blocked on their faults, the source reconnects,
/// both agree on the pages still owed, and the migration completes verified. The requested
/// pages' own connection carries the faulted pages throughout.
#[test]
fn a_link_dropped_mid_kvm_postcopy_reconnects_and_verifies() {
    if skip() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-postcopy-recover");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_resuming_receiver(&dst, "8s", &dir.path("recv.json"));
    let extra = ["--postcopy", "now", "--postcopy-bandwidth", "4M"];
    let envs = [("VMSTREAM_TEST_DROP_POSTCOPY_LINK_AFTER", "50")];
    let sj = dir.path("send.json");
    let mut send = kvm_postcopy_sender(&src, "16M", port, &sj, &extra, &envs);
    let pc = assert_verified_kvm_postcopy(&mut send, &mut recv, &dir, "now");
    // Requested pages travel on their own connection (`--postcopy-preempt`, on by default),
    // which outlives channel 0's cut, while the stream is slow.
    let preempted = pc["pages_preempted"].as_u64().unwrap();
    assert!(
        preempted > 0 && preempted <= pc["pages_faulted"].as_u64().unwrap(),
        "{pc}"
    );
    for st in [read_stats(&sj), read_stats(&dir.path("recv.json"))] {
        assert_eq!(st["postcopy"]["reconnects"], 1, "{st}");
    }
    assert!(send.stderr().contains("reconnected"), "{}", send.stderr());
    assert!(
        recv.stderr().contains("the source reconnected"),
        "{}",
        recv.stderr()
    );
}

/// A source that cannot come back (no reconnection allowed) leaves a KVM guest that cannot
/// continue: both sides say so and fail, and the destination does not hang on the vCPUs
/// blocked on their faults.
#[test]
fn a_lost_source_says_the_kvm_guest_cannot_continue() {
    if skip() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-postcopy-lost");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_receiver(&[
        "--memory-file",
        dst.to_str().unwrap(),
        "--resume",
        "--io-timeout",
        "3s",
    ]);
    let extra = [
        "--postcopy",
        "now",
        "--postcopy-bandwidth",
        "2M",
        "--postcopy-recover-timeout",
        "0s",
    ];
    let envs = [("VMSTREAM_TEST_DROP_POSTCOPY_LINK_AFTER", "20")];
    let sj = dir.path("send.json");
    let mut send = kvm_postcopy_sender(&src, "16M", port, &sj, &extra, &envs);
    let (s_status, _) = send.wait_exit();
    assert!(!s_status.success());
    assert!(
        send.stderr().contains("cannot continue"),
        "{}",
        send.stderr()
    );
    let (r_status, _) = recv
        .exit_within(std::time::Duration::from_secs(30))
        .expect("the destination exits");
    assert!(!r_status.success());
    assert!(
        recv.stderr().contains("cannot continue"),
        "{}",
        recv.stderr()
    );
}

/// The double-delivery stress on a KVM guest: the background stream is slowed to about 250
/// pages a second, so the vCPUs fault on most owed pages and write them long before the
/// stream's copies arrive. Those copies are dropped, never placed over what the guest wrote
/// since: the ledger verifies at the last page and at the end, and the digests are equal.
#[test]
fn late_stream_copies_of_pages_a_kvm_guest_faulted_are_dropped() {
    if skip() {
        return;
    }
    let _g = serial();
    let dir = TmpDir::new("kvm-postcopy-double");
    let (src, dst) = (dir.path("src.img"), dir.path("dst.img"));
    let (mut recv, port) = start_resuming_receiver(&dst, "8s", &dir.path("recv.json"));
    let extra = ["--postcopy", "now", "--postcopy-bandwidth", "1M"];
    let sj = dir.path("send.json");
    let mut send = kvm_postcopy_sender(&src, "16M", port, &sj, &extra, &[]);
    let pc = assert_verified_kvm_postcopy(&mut send, &mut recv, &dir, "now");
    assert!(
        pc["pages_faulted"].as_u64().unwrap() > 0,
        "the guest faulted: {pc}"
    );
    assert!(
        pc["pages_dropped"].as_u64().unwrap() > 0,
        "stream copies of faulted pages arrived after them: {pc}"
    );
}
