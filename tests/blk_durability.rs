//! What a guest flushed is in the file even when the VMM is killed with SIGKILL right after,
//! and a killed run leaves no overlay file and an untouched ephemeral image.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

#[test]
fn flushed_writes_survive_a_sigkill_and_a_killed_run_leaves_no_overlay() {
    for engine in ["sync", "uring"] {
        let d = scratch(&format!("durability-{engine}"));
        let data = d.join("data.img");
        let base = d.join("base.img");
        std::fs::write(&data, vec![0u8; 16 << 20]).unwrap();
        std::fs::write(&base, vec![0x42u8; 16 << 20]).unwrap();
        let mut child = cgvm()
            .args([
                "run",
                "--kernel",
                probe_elf().to_str().unwrap(),
                "--timeout",
                "60",
            ])
            .arg("--disk")
            .arg(format!("{},persist,engine={engine}", data.display()))
            .arg("--disk")
            .arg(format!("{},engine={engine}", base.display()))
            .args([
                "--cmdline",
                "probe.tests=blk probe.blk_sector=24 probe.exit=hang",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The blk check writes, flushes and reads back before the probe starts to hang.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let hanging = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.starts_with("probe: waiting") => break true,
                Ok(l) => seen.push(l),
                Err(_) => break false,
            }
        };
        child.kill().unwrap(); // SIGKILL: nothing of cgvm's runs after this
        let status = child.wait().unwrap();
        assert!(
            hanging,
            "{engine}: the probe never reached its hang: {seen:?}"
        );
        assert!(
            seen.iter().any(|l| l.starts_with("probe: blk ok")),
            "{engine}: {seen:?}"
        );
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );

        let bytes = std::fs::read(&data).unwrap();
        assert_eq!(
            &bytes[24 * 512..24 * 512 + 4096],
            &probe_pattern(24)[..],
            "{engine}"
        );
        assert!(
            std::fs::read(&base).unwrap().iter().all(|&b| b == 0x42),
            "{engine}"
        );
        assert_eq!(
            dir_listing(&d),
            ["base.img", "data.img"],
            "{engine}: nothing left beside the images"
        );
    }
}
