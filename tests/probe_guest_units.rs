//! The probe guest's own host unit tests (its parsers of the zero page, the command line, the
//! ACPI tables and AML), run through its build script so that `cargo test --workspace` covers
//! them although the probe is not a workspace member.

use std::path::Path;
use std::process::Command;

#[test]
fn probe_guest_unit_tests_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("resources/probe-guest/build.sh"))
        .arg("--test")
        .env(
            "PROBE_TARGET_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe-target"),
        )
        .output()
        .expect("run resources/probe-guest/build.sh --test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
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
