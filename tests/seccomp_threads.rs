//! Which of a running VMM's threads are confined: the probe guest booted by `cgvm serve`
//! (API socket, a disk, an entropy device), then every thread's `Seccomp:` line read from
//! /proc/<pid>/task/*/status. With filters on, the API thread and the device threads run in
//! filter mode (2); with `--no-seccomp`, no thread does (0). The vCPU threads are not confined
//! yet: they activate devices (spawning device threads) on the guest's register writes.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::*;
use common::*;

/// A Firecracker config file: the probe (waiting when done), a disk and an entropy device.
fn config_file(d: &Path) -> PathBuf {
    let disk = d.join("root.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("write the image");
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_elf(),
            "boot_args": "probe.tests=boot,blk,rng probe.exit=hang probe.blk_id=rootfs",
        },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
        }],
        "entropy": {},
        "machine-config": { "vcpu_count": 2, "mem_size_mib": 64 },
    });
    let p = d.join("vm.json");
    std::fs::write(&p, cfg.to_string()).expect("write the config");
    p
}

/// Each thread of `pid`: its name and the number on its `Seccomp:` line.
fn thread_modes(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the threads") {
        let dir = e.expect("a thread").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a Seccomp: line");
        out.push((name.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// Boots the probe with `extra` flags, waits for it to finish its tests, returns the modes.
fn boot_and_read_modes(name: &str, extra: &[&str]) -> Vec<(String, u32)> {
    let d = scratch(name);
    let cfg = config_file(&d);
    let mut args = vec!["--config-file", cfg.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let s = Served::serve(&d, &args);
    let text = wait_for_text(&s.stdout, "probe: waiting", Duration::from_secs(60));
    assert!(text.contains("probe: 3 passed, 0 failed"), "{text}");
    // The API thread has answered a request under its filter.
    assert_eq!(s.call("GET", "/", None).json()["state"], "Running");
    let modes = thread_modes(s.child.as_ref().expect("running").id());
    assert_eq!(s.call("GET", "/machine-config", None).status, 200);
    modes
}

/// The modes of the threads named `prefix`*; fails when there is none.
fn modes_of<'a>(modes: &'a [(String, u32)], prefix: &str) -> Vec<&'a (String, u32)> {
    let found: Vec<_> = modes
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .collect();
    assert!(!found.is_empty(), "no thread named {prefix}*: {modes:?}");
    found
}

/// The thread kinds that run under a filter.
const CONFINED: &[&str] = &["cgvm-api", "cgvm-virtio"];

#[test]
fn api_and_device_threads_run_under_their_filters() {
    let modes = boot_and_read_modes("seccomp-threads-on", &[]);
    for kind in CONFINED {
        for (n, m) in modes_of(&modes, kind) {
            assert_eq!(*m, 2, "{n} is not under a filter: {modes:?}");
        }
    }
}

#[test]
fn no_seccomp_leaves_every_thread_unconfined() {
    let modes = boot_and_read_modes("seccomp-threads-off", &["--no-seccomp"]);
    for kind in CONFINED {
        modes_of(&modes, kind);
    }
    for (n, m) in &modes {
        assert_eq!(*m, 0, "{n} is under a filter with --no-seccomp: {modes:?}");
    }
}
