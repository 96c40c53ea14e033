//! The host side of Firecracker's vsock model: `CONNECT <port>` on the device's Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Connects to guest port `port` through the vsock socket `uds`, retrying for up to 20 s
/// while the socket does not exist yet (cgvm is starting) or the guest does not listen yet
/// (the device then closes the client).
pub fn connect(uds: &Path, port: u32) -> UnixStream {
    let start = Instant::now();
    loop {
        let mut s = match UnixStream::connect(uds) {
            Ok(s) => s,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "connect to the vsock socket {}: {e}",
                    uds.display()
                );
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("write CONNECT");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\n") {
            match s.read(&mut b) {
                Ok(1) => line.push(b[0]),
                _ => break,
            }
        }
        if line.starts_with(b"OK ") && line.ends_with(b"\n") {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "CONNECT {port} answered {:?}",
            String::from_utf8_lossy(&line)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `payload` and reads back as many bytes, which must be the same.
pub fn echo(s: &mut UnixStream, payload: &[u8]) {
    let mut w = s.try_clone().expect("clone");
    let data = payload.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&data).expect("write"));
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).expect("read the echo");
    writer.join().expect("writer");
    assert!(got == payload, "the echo differs from what was sent");
}
