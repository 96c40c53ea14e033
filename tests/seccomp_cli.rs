//! The seccomp command line: `cgvm seccomp-report` prints exactly the policies the threads
//! get, `--seccomp-filter` takes Firecracker's JSON format for the vmm, api and vcpu kinds
//! (a file that drops KVM_RUN kills the vCPU's process; one with errors is refused before
//! anything starts), and `--no-seccomp` conflicts with the other two.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::*;
use devices::seccomp::Policy;

fn every_policy() -> Vec<Policy> {
    let mut v = vec![
        vmm::seccomp::vmm_policy(),
        ::api::seccomp::policy(),
        vmm::seccomp::vcpu_policy(),
        vmm::seccomp::passt_log_policy(),
    ];
    v.extend(devices::virtio::device_kinds().iter().map(|k| k.policy()));
    v
}

/// Runs the probe (boot and rng checks) with `extra` flags; its exit status and stderr.
fn probe_with(extra: &[&str]) -> (ExitStatus, String) {
    let mut c = cgvm();
    c.arg("run")
        .args(["--kernel", probe_elf().to_str().expect("utf-8")])
        .args(["--cmdline", "probe.tests=boot,rng", "--rng"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("start cgvm");
    let status = wait_with_limit(&mut child, Duration::from_secs(60)).expect("cgvm ended");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

#[test]
fn the_report_prints_every_kind_with_exactly_its_calls() {
    let mut c = cgvm();
    c.arg("seccomp-report");
    let r = run_with_limit(c, Duration::from_secs(10));
    assert_eq!(r.status, Some(0), "{}", r.both());
    let policies = every_policy();
    assert_eq!(
        policies.len(),
        10,
        "vmm, api, vcpu, passt-log and six device kinds"
    );
    for p in &policies {
        let section = format!("[{}] {} system calls", p.kind, p.syscall_count());
        let start = r.stdout.find(&section).unwrap_or_else(|| {
            panic!("no section {section:?} in:\n{}", r.stdout);
        });
        let body: Vec<&str> = r.stdout[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .map(str::trim)
            .collect();
        assert_eq!(body, p.describe(), "the calls of {}", p.kind);
    }
    // The table side by side with Firecracker's counts.
    let row = |kind: &str| {
        r.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(kind))
            .unwrap_or_else(|| panic!("no row for {kind}"))
            .to_string()
    };
    assert!(row("vcpu").ends_with("27"), "{}", row("vcpu"));
    assert!(row("api").ends_with("31"), "{}", row("api"));
    assert!(row("vmm").ends_with("about 50"), "{}", row("vmm"));
    // README.md's table gives the same counts.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    for p in &policies {
        let row = format!("| `{}` | {} |", p.kind, p.syscall_count());
        assert!(readme.contains(&row), "README.md lacks {row:?}");
    }
    // A device kind's calls are in the VMM's list: device threads run under both filters.
    let vmm = vmm::seccomp::vmm_policy();
    assert!(vmm.allows(libc::SYS_io_uring_enter) && vmm.allows(libc::SYS_getrandom));
    let vcpu = vmm::seccomp::vcpu_policy();
    for nr in [
        libc::SYS_clone3,
        libc::SYS_openat,
        libc::SYS_socket,
        libc::SYS_execve,
    ] {
        assert!(!vcpu.allows(nr), "a vCPU thread may not make call {nr}");
    }
}

#[test]
fn a_firecracker_filter_file_replaces_the_vcpu_filter() {
    let d = scratch("seccomp-json");
    let mut c = cgvm();
    c.args(["seccomp-report", "--firecracker-json"]);
    let r = run_with_limit(c, Duration::from_secs(10));
    assert_eq!(r.status, Some(0), "{}", r.both());
    let mut json: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON");
    let mut kinds: Vec<&String> = json.as_object().expect("an object").keys().collect();
    kinds.sort();
    assert_eq!(kinds, ["api", "vcpu", "vmm"]);

    // cgvm's own lists, given back as a file: the probe runs as usual.
    let same = d.join("same.json");
    std::fs::write(&same, json.to_string()).expect("write");
    let (st, err) = probe_with(&["--seccomp-filter", same.to_str().expect("utf-8")]);
    assert_eq!(st.code(), Some(0), "{err}");

    // The vCPU's list without KVM_RUN: the first KVM_RUN kills the process. The file says
    // what a forbidden call does: "trap" gets the --seccomp-log line.
    json["vcpu"]["default_action"] = "trap".into();
    let rules = json["vcpu"]["filter"].as_array_mut().expect("rules");
    let before = rules.len();
    rules.retain(|r| r["args"][0]["comment"] != "KVM_RUN");
    assert_eq!(rules.len(), before - 1);
    let no_run = d.join("no-run.json");
    std::fs::write(&no_run, json.to_string()).expect("write");
    let (st, err) = probe_with(&[
        "--seccomp-log",
        "--seccomp-filter",
        no_run.to_str().expect("utf-8"),
    ]);
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}\n{err}");
    assert!(
        err.contains("kind 'vcpu' made system call ioctl (16, arguments"),
        "{err}"
    );
    assert!(err.contains(", 0xae80, "), "the request is KVM_RUN: {err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_filter_files_and_flag_mixes_are_refused_before_anything_starts() {
    let d = scratch("seccomp-bad");
    let garbled = d.join("garbled.json");
    std::fs::write(&garbled, "{ \"vcpu\": [").expect("write");
    let other_kind = d.join("other-kind.json");
    std::fs::write(
        &other_kind,
        r#"{"virtio-rng": {"default_action": "trap", "filter_action": "allow", "filter": []}}"#,
    )
    .expect("write");
    let unknown_call = d.join("unknown-call.json");
    std::fs::write(
        &unknown_call,
        r#"{"vcpu": {"default_action": "trap", "filter_action": "allow",
                     "filter": [{"syscall": "no_such_call"}]}}"#,
    )
    .expect("write");
    let missing = d.join("missing.json");
    let cases: [(&std::path::Path, &str); 4] = [
        (&garbled, "not valid"),
        (&other_kind, "\"virtio-rng\""),
        (&unknown_call, "no_such_call"),
        (&missing, "No such file"),
    ];
    for (file, why) in cases {
        let (st, err) = probe_with(&["--seccomp-filter", file.to_str().expect("utf-8")]);
        assert_eq!(st.code(), Some(125), "{file:?}: {err}");
        assert!(err.contains(file.to_str().expect("utf-8")), "{err}");
        assert!(err.contains(why), "{file:?} should say {why:?}: {err}");
        assert!(
            !err.contains("probe:"),
            "refused before the guest ran: {err}"
        );
    }
    for flag in ["--seccomp-log", "--seccomp-filter=x.json"] {
        let (st, err) = probe_with(&["--no-seccomp", flag]);
        assert_eq!(st.code(), Some(125), "{flag}: {err}");
        assert!(err.contains("cannot be used with"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
