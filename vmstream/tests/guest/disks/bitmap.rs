//! The dirty bitmap of a process guest's disk: what it marks, the granularity it keeps
//! across resumes, and the write limit the sender sets in it.

use super::*;

/// The bitmap, cleared, then a run: the granules marked are exactly those whose bytes
/// changed (every diskio write changes its block's stamp).
#[test]
fn the_bitmap_marks_exactly_the_granules_written() {
    let dir = Dir::new("bitmap");
    let (m, disks) = diskio_guest(&dir, 200);
    let before: Vec<Vec<u8>> = disks.iter().map(|d| std::fs::read(d).unwrap()).collect();
    for d in &disks {
        DirtyBitmap::open(&bitmap_path(Path::new(d)))
            .unwrap()
            .take_all();
    }
    resume(&m, &disks, 300);
    for (i, d) in disks.iter().enumerate() {
        let bitmap = DirtyBitmap::open(&bitmap_path(Path::new(d))).unwrap();
        let after = std::fs::read(d).unwrap();
        let g = bitmap.granularity() as usize;
        let changed: Vec<u64> = (0..bitmap.granules())
            .filter(|&k| {
                let r = k as usize * g..((k as usize + 1) * g).min(after.len());
                before[i][r.clone()] != after[r]
            })
            .collect();
        let marked: Vec<u64> = bitmap.take_all().into_iter().flatten().collect();
        assert!(!changed.is_empty());
        assert_eq!(marked, changed, "disk {i}");
        assert!(bitmap.in_flight().is_empty());
    }
}

/// The sender's write limit, set in the bitmap header while the guest runs, makes its
/// writes wait (the guest's own rate is unlimited).
#[test]
fn the_write_limit_makes_guest_writes_wait() {
    let dir = Dir::new("qos");
    let (m, disk) = (dir.path("mem"), dir.path("d0"));
    let mut guest = Running::spawn(
        &[
            "guest",
            "run",
            "--memory-file",
            &m,
            "--size",
            "4M",
            "--workload",
            "diskio",
            "--disk",
            &disk,
            "--disk-size",
            "4M",
            "--io-rate",
            "0",
            "--duration",
            "3s",
            "--no-track",
        ],
        std::process::Stdio::null(),
    );
    let path = bitmap_path(Path::new(&disk));
    let bitmap = loop {
        if let Ok(b) = DirtyBitmap::open(&path) {
            break b;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(bitmap.limit_wait(), Duration::ZERO);
    bitmap.set_write_limit(256 << 10);
    std::thread::sleep(Duration::from_millis(300));
    let (t0, b0) = (std::time::Instant::now(), bitmap.bytes_written());
    std::thread::sleep(Duration::from_millis(1000));
    let (dt, written) = (t0.elapsed(), bitmap.bytes_written() - b0);
    assert!(
        bitmap.limit_wait() > Duration::from_millis(300),
        "{:?}",
        bitmap.limit_wait()
    );
    // Generous: at most twice the limit over the window plus a burst.
    let bound = (2.0 * 256.0 * 1024.0 * dt.as_secs_f64()) as u64 + (256 << 10);
    assert!(written <= bound, "{written} bytes in {dt:?}");
    assert!(guest.0.wait().unwrap().success());
    verify(&m, &[&disk]).unwrap();
}

/// A disk's bitmap keeps the granularity it was created at: a resumed guest adopts it, and
/// one told another granularity refuses.
#[test]
fn the_bitmap_keeps_its_granularity_across_resumes() {
    let dir = Dir::new("granularity");
    let (m, d) = (dir.path("mem"), dir.path("d0"));
    run_ok(&[
        "--memory-file",
        &m,
        "--size",
        "4M",
        "--workload",
        "diskio",
        "--disk",
        &d,
        "--disk-size",
        "4M",
        "--disk-granularity",
        "4K",
        "--duration",
        "100ms",
        "--no-track",
    ]);
    resume(&m, std::slice::from_ref(&d), 100);
    let bitmap = DirtyBitmap::open(&bitmap_path(Path::new(&d))).unwrap();
    assert_eq!(bitmap.granularity(), 4096);
    let (code, _, err) = vmstream(&[
        "guest",
        "run",
        "--memory-file",
        &m,
        "--resume",
        "--disk",
        &d,
        "--disk-granularity",
        "64K",
        "--duration",
        "10ms",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("at granularity 4096, expected"), "{err}");
    verify(&m, &[&d]).unwrap();
}
