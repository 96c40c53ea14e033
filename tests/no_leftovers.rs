//! The embedding API leaves nothing behind: after `Vmm::run` returns, the process has the
//! threads and file descriptors it had before the machine was built (vCPU threads, device
//! threads, KVM, eventfds, io_uring rings, disks and overlays all gone), and no overlay file
//! sits next to the images. One test in this binary, so that nothing else runs beside it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmm::builder::{build, ConsoleIo};
use vmm::config::{BlockEngine, ConsoleConfig, DiskConfig, VmConfig};
use vmm::outcome::RunOutcome;
use vmm::timeline::Timeline;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_finished_machine_leaves_no_thread_fd_or_file() {
    let kernel = probe_elf().to_path_buf();
    let d = scratch("leftovers");
    let eph = d.join("ephemeral.img");
    let per = d.join("persist.img");
    std::fs::write(&eph, vec![7u8; 8 << 20]).unwrap();
    std::fs::write(&per, vec![0u8; 8 << 20]).unwrap();
    let files_before = dir_listing(&d);
    let disk = |path: &std::path::Path, ephemeral: bool, engine| DiskConfig {
        path: path.to_path_buf(),
        read_only: false,
        ephemeral,
        id: None,
        engine,
        rate_limiter: None,
    };
    let config = VmConfig {
        kernel,
        cmdline: "probe.tests=blk,rng".into(),
        vcpus: 2,
        mem_mib: 128,
        console: ConsoleConfig::None,
        timeout: Some(Duration::from_secs(60)),
        rng: true,
        disks: vec![
            disk(&eph, true, BlockEngine::Sync),
            disk(&per, false, BlockEngine::Uring),
        ],
        // The machine runs on this test's thread, which the VMM filter would confine (and
        // then kill for reading /proc); the filters have tests of their own.
        seccomp: false,
        ..Default::default()
    };

    // Twice: the second run shows the first one's state is really gone, not merely reused.
    let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));
    for round in 0..2 {
        let console = ConsoleIo {
            output: Box::new(std::io::sink()),
            read_stdin: false,
        };
        let vmm =
            build(&config, Arc::new(Timeline::new()), console, Arc::default()).expect("build");
        assert!(count("/proc/self/task") > threads, "vCPU threads run");
        let outcome = vmm.run();
        assert_eq!(
            outcome,
            RunOutcome::Guest(devices::stop::GuestStop::ExitDevice(0)),
            "round {round}"
        );
        assert_eq!(
            count("/proc/self/task"),
            threads,
            "round {round}: threads left"
        );
        assert_eq!(
            count("/proc/self/fd"),
            fds,
            "round {round}: descriptors left"
        );
        assert_eq!(dir_listing(&d), files_before, "round {round}: files left");
    }
    assert!(
        std::fs::read(&eph).unwrap().iter().all(|&b| b == 7),
        "ephemeral image untouched"
    );
}
