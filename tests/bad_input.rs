//! Bad input gets a clear error and status 125 before any guest runs.

mod common;

use common::*;

fn refused(args: &[&str], why: &str) {
    let r = cgvm_run(args);
    assert_eq!(r.status, Some(125), "{args:?}: {}", r.both());
    assert!(
        r.stderr.contains(why),
        "{args:?} should say '{why}': {}",
        r.both()
    );
    assert!(!r.stdout.contains("probe:"), "no guest ran: {}", r.both());
}

#[test]
fn missing_empty_truncated_and_non_kernel_files_are_refused() {
    let d = scratch("bad-kernels");
    let missing = d.join("nope/vmlinux");
    refused(&["--kernel", missing.to_str().unwrap()], "No such file");
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &["--kernel", empty.to_str().unwrap()],
        "is not a Linux kernel",
    );
    let text = d.join("notes.txt");
    std::fs::write(&text, "just some text, not a kernel\n".repeat(100)).unwrap();
    refused(
        &["--kernel", text.to_str().unwrap()],
        "is not a Linux kernel",
    );
    let full = std::fs::read(probe_elf()).unwrap();
    let trunc = d.join("truncated.elf");
    std::fs::write(&trunc, &full[..full.len() / 3]).unwrap();
    refused(&["--kernel", trunc.to_str().unwrap()], "cannot load kernel");
    refused(&["--kernel", d.to_str().unwrap()], "not a regular file");
}

#[test]
fn memory_and_vcpu_counts_out_of_range_are_refused() {
    let k = probe_elf().to_str().unwrap().to_owned();
    refused(
        &["--kernel", &k, "--memory", "0"],
        "memory size must be at least 1 MiB",
    );
    refused(
        &["--kernel", &k, "--memory", "100000000"],
        "more than this host's",
    );
    refused(
        &["--kernel", &k, "--cpus", "0"],
        "vcpu count 0 is out of range",
    );
    refused(
        &["--kernel", &k, "--cpus", "33"],
        "vcpu count 33 is out of range",
    );
    refused(&["--kernel", &k, "--timeout", "0"], "--timeout");
    refused(
        &["--kernel", &k, "--console", "file:/nonexistent-dir/x.log"],
        "console file",
    );
}

#[test]
fn a_kernel_that_does_not_fit_in_memory_is_refused() {
    // The probe loads at 16 MiB: 8 MiB of guest memory cannot hold it.
    let k = probe_elf().to_str().unwrap().to_owned();
    refused(&["--kernel", &k, "--memory", "8"], "cannot load kernel");
}

#[test]
fn an_initrd_too_large_for_guest_memory_is_refused() {
    let d = scratch("big-initrd");
    let initrd = d.join("initrd.img");
    std::fs::write(&initrd, vec![0u8; 48 << 20]).unwrap();
    let k = probe_elf().to_str().unwrap().to_owned();
    refused(
        &[
            "--kernel",
            &k,
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "48",
        ],
        "does not fit in guest memory",
    );
    refused(
        &["--kernel", &k, "--initrd", d.join("none").to_str().unwrap()],
        "cannot read initrd",
    );
}

#[test]
fn malformed_options_are_refused_with_125() {
    let k = probe_elf().to_str().unwrap().to_owned();
    refused(
        &["--kernel", &k, "--disk", "/x,bogus"],
        "unknown option 'bogus'",
    );
    refused(&["--kernel", &k, "--disk", "/x,ro,persist"], "contradict");
    refused(&["--kernel", &k, "--root"], "--root needs a --disk");
    refused(&["--kernel", &k, "--cpus", "many"], "invalid value");
    refused(&["--kernel", &k, "--no-such-flag"], "unexpected argument");
}

#[test]
fn help_documents_the_exit_statuses() {
    let mut c = cgvm();
    c.args(["run", "--help"]);
    let r = run_with_limit(c, std::time::Duration::from_secs(10));
    assert_eq!(r.status, Some(0));
    for s in ["124", "121", "120", "125", "exit device", "Ctrl-A x"] {
        assert!(r.stdout.contains(s), "help lacks {s}: {}", r.stdout);
    }
}
