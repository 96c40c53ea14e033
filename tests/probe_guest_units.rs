//! The probe guest's own host unit tests (its parsers of the zero page, the command line, the
//! ACPI tables and AML), run through its build script so that `cargo test --workspace` covers
//! them although the probe is not a workspace member.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::run_with_limit;

#[test]
fn probe_guest_unit_tests_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = Command::new("bash");
    c.arg(root.join("resources/probe-guest/build.sh"))
        .arg("--test")
        .env(
            "PROBE_TARGET_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe-target"),
        );
    let r = run_with_limit(c, Duration::from_secs(300));
    let text = r.both();
    assert_eq!(r.status, Some(0), "{text}");
    let passed: u32 = text
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<u32>().ok())
        .sum();
    assert!(
        passed >= 20,
        "expected the probe's parser tests to run: {text}"
    );
}
