//! virtio-vsock through the real binary and the probe guest, Firecracker's model: host
//! programs connect to the device's Unix socket and write `CONNECT <port>`; the guest's
//! connections to host port P reach the Unix socket `<uds_path>_P`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::vsock::{connect, echo};
use common::*;

fn start(dir: &Path, cmdline: &str) -> (Child, std::path::PathBuf, std::path::PathBuf) {
    let uds = dir.join("v.sock");
    let console = dir.join("console.txt");
    let child = Command::new(env!("CARGO_BIN_EXE_cgvm"))
        .args(probe_run_args(&console))
        .args([
            "--vsock",
            &format!("3,uds={}", uds.display()),
            "--cmdline",
            cmdline,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cgvm");
    let t = Instant::now();
    while !uds.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no vsock socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, uds, console)
}

fn finish(child: Child) -> (Option<i32>, String) {
    finish_child(child, Duration::from_secs(60))
}

#[test]
fn streams_cross_both_ways_with_concurrent_connections_and_a_client_that_dies() {
    let d = scratch("vsock-e2e");
    let host_port = d.join("v.sock_4000");
    let listener = UnixListener::bind(&host_port).expect("bind the host port socket");
    let (child, uds, console) = start(
        &d,
        "probe.tests=vsock probe.vsock_conns=4 probe.vsock_host_port=4000",
    );

    // A client that dies mid-stream: the device must go on.
    let mut dying = connect(&uds, 52);
    dying.write_all(&[7u8; 3000]).expect("write");
    drop(dying);

    // Three concurrent connections, each its own pattern, larger than the guest's buffer.
    let clients: Vec<_> = (0..3u8)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let mut s = connect(&uds, 52);
                let payload: Vec<u8> = (0..20_000u32).map(|n| (n as u8) ^ (i * 37)).collect();
                echo(&mut s, &payload);
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    // The guest's own connection to host port 4000.
    listener.set_nonblocking(false).expect("blocking listener");
    let (mut from_guest, _) = listener.accept().expect("the guest connects");
    from_guest
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut line = String::new();
    from_guest.read_to_string(&mut line).expect("read");
    assert_eq!(line, "probe vsock ok\n");
    let (status, err) = finish(child);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(status, Some(0), "{err}\n{text}");
    assert!(text.contains("probe: vsock ok (cid 3"), "{text}");
    assert!(!uds.exists(), "the vsock socket was left behind");
}

#[test]
fn large_guest_buffers_stream_64k_packets_under_the_device_filter() {
    // The vsockbench check posts 64 KiB receive buffers and sends 64 KiB packets: the device
    // thread copies whole packets, which once grew its heap with a syscall (mprotect) its
    // seccomp filter lacked and killed the VMM. The filters are on here, as by default.
    let d = scratch("vsock-large");
    let (child, uds, console) = start(
        &d,
        "probe.tests=vsockbench probe.vsockbench=source probe.vsockbench_ms=300",
    );
    let mut s = connect(&uds, 52);
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("read after {total} bytes: {e}"),
        }
    }
    drop(s);
    let (code, err) = finish(child);
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(code, Some(0), "{err}\n{out}");
    assert!(out.contains("probe: vsockbench ok"), "{out}");
    assert!(total > 1 << 20, "only {total} bytes arrived");
}

#[test]
fn bad_vsock_settings_are_refused_before_the_guest_starts() {
    let d = scratch("vsock-bad");
    let in_use = d.join("in-use.sock");
    let _holder = UnixListener::bind(&in_use).expect("bind");
    for (spec, words) in [
        ("2,uds=/tmp/x.sock".to_string(), vec!["CID", "3"]),
        (
            "3,uds=/nonexistent/dir/v.sock".to_string(),
            vec!["/nonexistent/dir"],
        ),
        (format!("3,uds={}", in_use.display()), vec!["in-use.sock"]),
        ("3,bogus".to_string(), vec!["bogus"]),
    ] {
        let r = cgvm_run(&[
            "--kernel",
            probe_elf().to_str().expect("utf-8"),
            "--vsock",
            &spec,
            "--cmdline",
            "probe.tests=boot",
        ]);
        assert_eq!(r.status, Some(125), "{spec}: {}", r.both());
        for w in words {
            assert!(r.stderr.contains(w), "{spec}: no {w:?} in {}", r.both());
        }
        assert!(
            !r.stdout.contains("probe: started"),
            "{spec}: the guest ran"
        );
    }
    assert!(in_use.exists(), "the other program's socket was removed");
}
