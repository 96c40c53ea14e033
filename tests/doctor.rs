//! `cgvm doctor` through the real binary: it reports the host's KVM and boots the probe guest
//! embedded in the binary.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn doctor_reports_kvm_and_boots_the_embedded_probe() {
    let mut c = cgvm();
    c.arg("doctor");
    let r = run_with_limit(c, Duration::from_secs(60));
    assert!(
        r.stdout.contains("[ ok ] /dev/kvm: KVM API 12"),
        "{}",
        r.both()
    );
    if pvm_host() {
        assert!(r.stdout.contains("through the PVM module"), "{}", r.both());
    }
    assert!(r.stdout.contains("probe: boot ok"), "{}", r.both());
    assert!(
        r.stdout
            .contains("[ ok ] probe guest: guest exited with status 0 (exit device)"),
        "{}",
        r.both()
    );
    assert!(
        r.stdout.contains("timeline first-instruction"),
        "{}",
        r.both()
    );
    // The other checks depend on the host (passt may be missing): each is reported either way,
    // and the status says whether any failed.
    for what in ["/dev/net/tun", "seccomp", "io_uring", "passt"] {
        assert!(
            r.stdout.contains(&format!("] {what}: ")),
            "{what}: {}",
            r.both()
        );
    }
    let failed = r.stdout.contains("[FAIL]");
    assert_eq!(r.status, Some(if failed { 1 } else { 0 }), "{}", r.both());
}
