//! virtio-blk and virtio-rng through the real binary with the probe guest: the guest's view
//! (its `blk` and `rng` checks) and the host's (bytes in the image files, nothing left over).

mod common;

use std::path::Path;

use common::*;

fn image(dir: &Path, name: &str, mib: u64, fill: u8) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; (mib << 20) as usize]).expect("write the image");
    p
}

fn probe() -> String {
    probe_elf().to_string_lossy().into_owned()
}

#[test]
fn rng_delivers_bytes_to_the_guest() {
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--rng",
        "--cmdline",
        "probe.tests=rng",
        "--timeout",
        "30",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
    assert!(r.stdout.contains("probe: rng ok"), "{}", r.both());
}

#[test]
fn ephemeral_disks_are_written_by_the_guest_but_never_on_the_host() {
    for engine in ["sync", "uring"] {
        let d = scratch(&format!("blk-ephemeral-{engine}"));
        let img = image(&d, "base.img", 16, 0x5a);
        let before = std::fs::read(&img).unwrap();
        let listing = dir_listing(&d);
        let disk = format!("{},id=base,engine={engine}", img.display());
        let r = cgvm_run(&[
            "--kernel",
            &probe(),
            "--disk",
            &disk,
            "--cmdline",
            "probe.tests=blk probe.blk_id=base probe.blk_sector=8",
            "--timeout",
            "60",
        ]);
        assert_eq!(r.status, Some(0), "{engine}: {}", r.both());
        assert!(r.stdout.contains("probe: blk ok"), "{engine}: {}", r.both());
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{engine}: the base image changed"
        );
        assert_eq!(
            dir_listing(&d),
            listing,
            "{engine}: an overlay file was left behind"
        );
    }
}

#[test]
fn persist_disks_keep_the_guests_writes() {
    for engine in ["sync", "uring"] {
        let d = scratch(&format!("blk-persist-{engine}"));
        let img = image(&d, "data.img", 16, 0);
        let disk = format!("{},persist,engine={engine}", img.display());
        let r = cgvm_run(&[
            "--kernel",
            &probe(),
            "--disk",
            &disk,
            "--cmdline",
            "probe.tests=blk probe.blk_sector=16",
            "--timeout",
            "60",
        ]);
        assert_eq!(r.status, Some(0), "{engine}: {}", r.both());
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(
            &bytes[16 * 512..16 * 512 + 4096],
            &probe_pattern(16)[..],
            "{engine}"
        );
        assert!(
            bytes[..16 * 512].iter().all(|&b| b == 0),
            "{engine}: nothing else written"
        );
    }
}

#[test]
fn read_only_disks_refuse_writes_and_keep_their_bytes() {
    let d = scratch("blk-ro");
    let rw = image(&d, "rw.img", 8, 0);
    let ro = image(&d, "ro.img", 8, 0x33);
    let before = std::fs::read(&ro).unwrap();
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--disk",
        &format!("{},id=rw", rw.display()),
        "--disk",
        &format!("{},ro,id=ro", ro.display()),
        "--rng",
        "--cmdline",
        "probe.tests=blk,rng probe.blk_id=rw,ro",
        "--timeout",
        "60",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
    assert!(r.stdout.contains("probe: blk ok"), "{}", r.both());
    assert!(std::fs::read(&ro).unwrap() == before);
}

#[test]
fn a_missing_or_unreadable_disk_is_refused_before_the_guest_runs() {
    let d = scratch("blk-bad");
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--disk",
        d.join("none.img").to_str().unwrap(),
    ]);
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(
        r.stderr.contains("none.img"),
        "names the file: {}",
        r.both()
    );
    assert!(!r.stdout.contains("probe:"), "{}", r.both());
}

#[test]
fn an_iops_limit_bounds_what_the_guest_gets() {
    // The bucket holds 200 ops and refills 200 a second: over t seconds the guest can
    // complete at most 200 + 200 t requests, however fast the host is. Unlimited, this
    // workload completes hundreds of thousands.
    let d = scratch("blk-iops");
    let img = image(&d, "limited.img", 16, 1);
    let r = cgvm_run(&[
        "--kernel",
        &probe(),
        "--disk",
        &format!("{},persist,iops=200", img.display()),
        "--cmdline",
        "probe.tests=blkbench probe.bench_ms=1000 probe.bench_workloads=rand-read-4k",
        "--timeout",
        "60",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.both());
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("probe: blkbench rand-read-4k "))
        .unwrap_or_else(|| panic!("no workload line: {}", r.both()));
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    // The window is measured by the host: the whole run (the guest's own clock, calibrated
    // in the guest, can be off on a loaded host). Every request completed inside it.
    let ops = field("ops=");
    let secs = r.took.as_secs_f64();
    let bound = 200.0 + 200.0 * secs + 40.0; // + requests in flight
    assert!(
        ops > 0.0 && ops <= bound,
        "{ops} ops while cgvm ran {secs:.3} s (bound {bound:.0}): {line}"
    );
}
