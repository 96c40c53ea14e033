//! The connection state machine against real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::virtio::vsock::test_util::GUEST_CID;

use crate::temp_dir::TempDir;

struct Env {
    dir: TempDir,
    uds: PathBuf,
    mux: Muxer,
}

impl Env {
    fn new() -> Self {
        let dir = TempDir::new("vsock");
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let mux = Muxer::new(GUEST_CID, &uds, listener).unwrap();
        Env { dir, uds, mux }
    }

    /// A host listener for guest connections to host port `port`.
    fn host_listener(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.dir.path().join(format!("v.sock_{port}"))).unwrap()
    }

    /// Processes host events until the muxer has a packet for the guest (10 s at most).
    fn wait_rx(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.mux.process_host_events();
            if let Some(p) = self.mux.next_rx(MAX_DATA_LEN as usize) {
                return p;
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Asserts that nothing is for the guest after host events settle.
    fn assert_no_rx(&mut self) {
        std::thread::sleep(Duration::from_millis(20));
        self.mux.process_host_events();
        assert_eq!(self.mux.next_rx(MAX_DATA_LEN as usize), None);
        assert!(!self.mux.has_rx());
    }

    fn guest(&mut self, op: Op, key: ConnKey, flags: u32, buf_alloc: u32, fwd: u32, data: &[u8]) {
        let hdr = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: key.1,
            dst_port: key.0,
            len: data.len() as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt: fwd,
        };
        self.mux.handle_guest_packet(&hdr, op, data);
    }

    /// A host client connected to the guest's `port` (the guest accepted); its key.
    fn host_connection(&mut self, port: u32) -> (UnixStream, ConnKey) {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (h, _) = self.wait_rx();
        assert_eq!(Op::from_u16(h.op), Some(Op::Request));
        assert_eq!(
            (h.src_cid, h.dst_cid, h.dst_port),
            (HOST_CID, GUEST_CID, port)
        );
        let key = (h.src_port, port);
        assert_eq!(self.mux.connection_state(key), Some(ConnState::LocalInit));
        self.guest(Op::Response, key, 0, 1 << 20, 0, b"");
        assert_eq!(self.mux.connection_state(key), Some(ConnState::Established));
        let mut ok = vec![0u8; format!("OK {}\n", key.0).len()];
        client.read_exact(&mut ok).unwrap();
        assert_eq!(ok, format!("OK {}\n", key.0).as_bytes());
        (client, key)
    }
}

fn op(h: &Header) -> Op {
    Op::from_u16(h.op).unwrap()
}

#[test]
fn connect_lines_are_parsed_strictly() {
    assert_eq!(parse_connect(b"CONNECT 52\n"), Ok(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Ok(u32::MAX));
    assert_eq!(
        parse_connect(b"CONNECT 4294967296\n"),
        Err(HandshakeError::BadPort)
    );
    assert_eq!(parse_connect(b"CONNECT \n"), Err(HandshakeError::BadPort));
    assert_eq!(parse_connect(b"CONNECT -1\n"), Err(HandshakeError::BadPort));
    assert_eq!(
        parse_connect(b"CONNECT 1 2\n"),
        Err(HandshakeError::BadPort)
    );
    assert_eq!(parse_connect(b"CONNECT 52"), Err(HandshakeError::Garbage));
    assert_eq!(parse_connect(b"connect 52\n"), Err(HandshakeError::Garbage));
    assert_eq!(parse_connect(b"\n"), Err(HandshakeError::Garbage));
    let long = format!("CONNECT {}\n", "0".repeat(40));
    assert_eq!(parse_connect(long.as_bytes()), Err(HandshakeError::TooLong));
}

#[test]
fn a_host_client_reaches_the_guest_and_data_flows_both_ways() {
    let mut env = Env::new();
    let (mut client, key) = env.host_connection(52);
    assert!(key.0 >= FIRST_LOCAL_PORT);
    client.write_all(b"ping").unwrap();
    let (h, d) = env.wait_rx();
    assert_eq!(
        (op(&h), d.as_slice(), h.src_port, h.dst_port),
        (Op::Rw, &b"ping"[..], key.0, 52)
    );
    assert_eq!((h.len, h.buf_alloc), (4, CONN_BUF_SIZE));
    env.guest(Op::Rw, key, 0, 1 << 20, 4, b"pong");
    let mut b = [0u8; 4];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    env.assert_no_rx();
    // Bytes pipelined after the CONNECT line reach the guest too.
    let mut c2 = UnixStream::connect(&env.uds).unwrap();
    c2.write_all(b"CONNECT 53\nearly").unwrap();
    let (h, _) = env.wait_rx();
    let key2 = (h.src_port, 53);
    assert_ne!(key2.0, key.0);
    env.guest(Op::Response, key2, 0, 1 << 20, 0, b"");
    let (h, d) = env.wait_rx();
    assert_eq!((op(&h), d.as_slice()), (Op::Rw, &b"early"[..]));
}

#[test]
fn a_guest_reset_closes_the_host_client() {
    let mut env = Env::new();
    let mut client = UnixStream::connect(&env.uds).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let (h, _) = env.wait_rx();
    env.guest(Op::Rst, (h.src_port, 9), 0, 0, 0, b"");
    assert_eq!(env.mux.connection_count(), 0);
    let mut b = [0u8; 8];
    assert_eq!(client.read(&mut b).unwrap(), 0);
    env.assert_no_rx();
}

#[test]
fn bad_handshakes_close_the_host_client() {
    let mut env = Env::new();
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 40]] {
        let mut client = UnixStream::connect(&env.uds).unwrap();
        client.write_all(line).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while env.mux.handshakes.is_empty() && Instant::now() < deadline {
            env.mux.process_host_events();
        }
        env.mux.process_host_events();
        // Closed: EOF, or a reset when bytes were left unread.
        let mut b = [0u8; 8];
        match client.read(&mut b) {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{line:?}"),
        }
    }
    // A client that leaves mid-line is dropped too.
    let mut client = UnixStream::connect(&env.uds).unwrap();
    client.write_all(b"CONN").unwrap();
    drop(client);
    env.assert_no_rx();
    env.mux.process_host_events();
    assert!(env.mux.handshakes.is_empty());
    assert_eq!(env.mux.connection_count(), 0);
}

#[test]
fn a_guest_connects_to_a_host_port() {
    let mut env = Env::new();
    let listener = env.host_listener(1234);
    let key = (1234, 5000);
    env.guest(Op::Request, key, 0, 1 << 20, 0, b"");
    let (h, _) = env.wait_rx();
    assert_eq!(
        (op(&h), h.src_port, h.dst_port, h.dst_cid),
        (Op::Response, 1234, 5000, GUEST_CID)
    );
    let (mut server, _) = listener.accept().unwrap();
    env.guest(Op::Rw, key, 0, 1 << 20, 0, b"hello");
    let mut b = [0u8; 5];
    server.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    server.write_all(b"world").unwrap();
    let (h, d) = env.wait_rx();
    assert_eq!(
        (op(&h), d.as_slice(), h.fwd_cnt),
        (Op::Rw, &b"world"[..], 5)
    );
    // No listener: refused.
    env.guest(Op::Request, (1235, 5000), 0, 1 << 20, 0, b"");
    let (h, _) = env.wait_rx();
    assert_eq!((op(&h), h.src_port, h.dst_port), (Op::Rst, 1235, 5000));
    assert_eq!(env.mux.connection_count(), 1);
    // A second REQUEST on a live connection resets it.
    env.guest(Op::Request, key, 0, 1 << 20, 0, b"");
    let (h, _) = env.wait_rx();
    assert_eq!(op(&h), Op::Rst);
    assert_eq!(env.mux.connection_count(), 0);
    assert_eq!(server.read(&mut b).unwrap(), 0);
}

#[test]
fn packets_of_unknown_connections_are_reset_but_resets_are_not() {
    let mut env = Env::new();
    for o in [
        Op::Rw,
        Op::Response,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
    ] {
        env.guest(o, (7, 8), 0, 0, 0, b"");
        let (h, _) = env.wait_rx();
        assert_eq!((op(&h), h.src_port, h.dst_port), (Op::Rst, 7, 8));
    }
    env.guest(Op::Rst, (7, 8), 0, 0, 0, b"");
    env.assert_no_rx();
    // Data on a connection still waiting for the guest's RESPONSE resets it.
    let mut client = UnixStream::connect(&env.uds).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let (h, _) = env.wait_rx();
    env.guest(Op::Rw, (h.src_port, 9), 0, 0, 0, b"x");
    assert_eq!(op(&env.wait_rx().0), Op::Rst);
    assert_eq!(env.mux.connection_count(), 0);
}

#[test]
fn the_guest_is_never_sent_more_than_its_credit() {
    let mut env = Env::new();
    let (mut client, key) = env.host_connection(52);
    // The guest now advertises 10 bytes of buffer.
    env.guest(Op::CreditUpdate, key, 0, 10, 0, b"");
    client.write_all(&[7u8; 100]).unwrap();
    let (h, d) = env.wait_rx();
    assert_eq!((op(&h), d.len()), (Op::Rw, 10));
    env.assert_no_rx();
    // It consumed 4: 4 more.
    env.guest(Op::CreditUpdate, key, 0, 10, 4, b"");
    let (_, d) = env.wait_rx();
    assert_eq!(d.len(), 4);
    env.assert_no_rx();
    // A bogus fwd_cnt ahead of what was sent gives no credit.
    env.guest(Op::CreditUpdate, key, 0, 10, 1000, b"");
    env.assert_no_rx();
    // max_data bounds a packet too.
    env.guest(Op::CreditUpdate, key, 0, 1000, 14, b"");
    env.mux.process_host_events();
    let (_, d) = env.mux.next_rx(3).unwrap();
    assert_eq!(d.len(), 3);
}

#[test]
fn credit_updates_follow_forwarded_data_and_requests() {
    let mut env = Env::new();
    let listener = env.host_listener(80);
    let key = (80, 6000);
    env.guest(Op::Request, key, 0, 1 << 20, 0, b"");
    assert_eq!(op(&env.wait_rx().0), Op::Response);
    let (mut server, _) = listener.accept().unwrap();
    env.guest(Op::CreditRequest, key, 0, 1 << 20, 0, b"");
    let (h, _) = env.wait_rx();
    assert_eq!(
        (op(&h), h.fwd_cnt, h.buf_alloc),
        (Op::CreditUpdate, 0, CONN_BUF_SIZE)
    );
    let chunk = vec![1u8; (CREDIT_UPDATE_THRESHOLD / 2) as usize];
    env.guest(Op::Rw, key, 0, 1 << 20, 0, &chunk);
    env.assert_no_rx();
    env.guest(Op::Rw, key, 0, 1 << 20, 0, &chunk);
    let (h, _) = env.wait_rx();
    assert_eq!(
        (op(&h), h.fwd_cnt),
        (Op::CreditUpdate, CREDIT_UPDATE_THRESHOLD)
    );
    let mut got = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
    server.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|&b| b == 1));
}

#[test]
fn a_guest_that_overruns_its_credit_is_reset() {
    let mut env = Env::new();
    let listener = env.host_listener(80);
    let key = (80, 6001);
    env.guest(Op::Request, key, 0, 1 << 20, 0, b"");
    assert_eq!(op(&env.wait_rx().0), Op::Response);
    // The host never reads: the socket buffer fills, then the device's buffer.
    let (_server, _) = listener.accept().unwrap();
    let chunk = vec![0u8; MAX_DATA_LEN as usize];
    let mut sent = 0u64;
    while env.mux.connection_count() == 1 {
        env.guest(Op::Rw, key, 0, 1 << 20, 0, &chunk);
        sent += chunk.len() as u64;
        assert!(sent < 64 << 20, "never reset");
    }
    assert!(sent > u64::from(CONN_BUF_SIZE));
    let (h, _) = env.wait_rx();
    assert_eq!((op(&h), h.src_port, h.dst_port), (Op::Rst, 80, 6001));
}

#[test]
fn orderly_shutdown_in_both_directions() {
    let mut env = Env::new();
    let (mut client, key) = env.host_connection(52);
    // Host EOF: SHUTDOWN(SEND) to the guest; the guest may still send.
    client.write_all(b"last").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, d) = env.wait_rx();
    assert_eq!((op(&h), d.as_slice()), (Op::Rw, &b"last"[..]));
    let (h, _) = env.wait_rx();
    assert_eq!((op(&h), h.flags), (Op::Shutdown, SHUTDOWN_SEND));
    env.guest(Op::Rw, key, 0, 1 << 20, 4, b"reply");
    // The guest stops sending: the host reads EOF after the data.
    env.guest(Op::Shutdown, key, SHUTDOWN_SEND, 1 << 20, 4, b"");
    let mut all = Vec::new();
    client.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"reply");
    // The guest closes: the device resets and frees the connection.
    env.guest(
        Op::Shutdown,
        key,
        SHUTDOWN_RCV | SHUTDOWN_SEND,
        1 << 20,
        4,
        b"",
    );
    let (h, _) = env.wait_rx();
    assert_eq!(op(&h), Op::Rst);
    assert_eq!(env.mux.connection_count(), 0);
}

#[test]
fn a_host_client_that_dies_resets_the_guest_connection() {
    let mut env = Env::new();
    let (mut client, key) = env.host_connection(52);
    client.write_all(b"bye").unwrap();
    drop(client);
    let (h, d) = env.wait_rx();
    assert_eq!((op(&h), d.as_slice()), (Op::Rw, &b"bye"[..]));
    let (h, _) = env.wait_rx();
    assert_eq!((op(&h), h.src_port, h.dst_port), (Op::Rst, key.0, key.1));
    assert_eq!(env.mux.connection_count(), 0);
    env.assert_no_rx();
    // Gone while waiting for the guest's RESPONSE: reset at once.
    let mut client = UnixStream::connect(&env.uds).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let (h, _) = env.wait_rx();
    drop(client);
    let (r, _) = env.wait_rx();
    assert_eq!((op(&r), r.src_port), (Op::Rst, h.src_port));
    assert_eq!(env.mux.connection_count(), 0);
}

#[test]
fn the_connection_limit_holds() {
    let mut env = Env::new();
    env.mux.set_max_connections(2);
    let _l = env.host_listener(80);
    env.guest(Op::Request, (80, 1), 0, 1 << 20, 0, b"");
    env.guest(Op::Request, (80, 2), 0, 1 << 20, 0, b"");
    env.guest(Op::Request, (80, 3), 0, 1 << 20, 0, b"");
    assert_eq!(env.mux.connection_count(), 2);
    let mut ops: Vec<(Op, u32)> = (0..3)
        .map(|_| env.wait_rx())
        .map(|(h, _)| (op(&h), h.dst_port))
        .collect();
    ops.sort_by_key(|&(_, p)| p);
    assert_eq!(ops, [(Op::Response, 1), (Op::Response, 2), (Op::Rst, 3)]);
    // A host client over the limit is closed.
    let mut client = UnixStream::connect(&env.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    env.mux.process_host_events();
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0);
}

#[test]
fn no_room_for_data_gives_control_packets_only() {
    let mut env = Env::new();
    let (mut client, key) = env.host_connection(52);
    client.write_all(b"data").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    env.mux.process_host_events();
    assert!(env.mux.has_rx());
    assert_eq!(env.mux.next_rx(0), None);
    env.guest(Op::CreditRequest, key, 0, 1 << 20, 0, b"");
    assert_eq!(op(&env.mux.next_rx(0).unwrap().0), Op::CreditUpdate);
    assert_eq!(env.mux.next_rx(0), None);
    assert_eq!(env.wait_rx().1, b"data");
}

#[test]
fn unanswered_requests_and_silent_clients_time_out() {
    let mut env = Env::new();
    env.mux
        .set_timeouts(Duration::from_millis(100), Duration::from_millis(300));
    // A client whose connection the guest never answers: REQUEST, then after the timeout an
    // RST for the guest and EOF for the client.
    let mut client = UnixStream::connect(&env.uds).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let (h, _) = env.wait_rx();
    assert_eq!(op(&h), Op::Request);
    let key = (h.src_port, 52);
    // A client that never sends its CONNECT line.
    let mut silent = UnixStream::connect(&env.uds).unwrap();
    let started = Instant::now();
    let (h, _) = env.wait_rx();
    assert_eq!((op(&h), h.src_port, h.dst_port), (Op::Rst, key.0, key.1));
    assert!(started.elapsed() >= Duration::from_millis(60));
    assert_eq!(env.mux.connection_state(key), None);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        client.read(&mut [0u8; 8]).unwrap(),
        0,
        "the client sees EOF"
    );
    // The silent one is closed after its own, longer timeout.
    silent
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        env.mux.process_host_events();
        match silent.read(&mut [0u8; 8]) {
            Ok(0) => break true,
            Ok(_) => break false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break true,
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(closed, "the silent client was closed");
    assert!(started.elapsed() >= Duration::from_millis(200));
    env.assert_no_rx();
    // An answered request is not timed out.
    let (mut c, key) = env.host_connection(53);
    std::thread::sleep(Duration::from_millis(250));
    env.mux.process_host_events();
    assert_eq!(env.mux.connection_state(key), Some(ConnState::Established));
    c.write_all(b"still here").unwrap();
    let (h, data) = env.wait_rx();
    assert_eq!((op(&h), &data[..]), (Op::Rw, &b"still here"[..]));
}
