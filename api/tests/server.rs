//! The server under load and misbehaving clients: concurrency, pipelining, keep-alive,
//! `Expect: 100-continue`, clients that stop halfway or never read, the connection cap, the
//! counters and shutdown.

#[path = "support/harness.rs"]
mod harness;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use api::ServerOptions;
use harness::{request_bytes, start, test_options, Client};

#[test]
fn concurrent_clients_are_all_served() {
    const THREADS: usize = 16;
    const REQUESTS: usize = 150;
    let mut server = start(test_options());
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let server = &server;
            s.spawn(move || {
                let mut client = Client::new(server.connect());
                for i in 0..REQUESTS {
                    // Every tenth request on a connection of its own.
                    let reply = if i % 10 == 9 {
                        server.request("GET", "/machine-config", None)
                    } else if i % 2 == 0 {
                        let body = format!(r#"{{"vcpu_count":{},"mem_size_mib":128}}"#, t + 1);
                        client.send("PUT", "/machine-config", Some(&body));
                        client.read_reply()
                    } else {
                        client.send("GET", "/", None);
                        client.read_reply()
                    };
                    assert!(
                        reply.status == 200 || reply.status == 204,
                        "thread {t} request {i}: {} {}",
                        reply.status,
                        reply.fault()
                    );
                }
            });
        }
    });
    // A request is counted just after its answer is written: stop the server to see them all.
    server.stop().expect("the server failed");
    let m = &server.metrics;
    assert_eq!(
        m.requests.load(Ordering::Relaxed),
        (THREADS * REQUESTS) as u64
    );
    assert_eq!(m.failed_requests.load(Ordering::Relaxed), 0);
    assert_eq!(
        m.connections.load(Ordering::Relaxed),
        (THREADS + THREADS * REQUESTS / 10) as u64
    );
    assert_eq!(server.vmm_calls.load(Ordering::Relaxed), THREADS * REQUESTS);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = start(test_options());
    let mut client = Client::new(server.connect());
    let mut batch = Vec::new();
    batch.extend(request_bytes("GET", "/version", None, &[]));
    batch.extend(request_bytes(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":2,"mem_size_mib":64}"#),
        &[],
    ));
    batch.extend(request_bytes("GET", "/nope", None, &[]));
    batch.extend(request_bytes("PUT", "/vsock", Some("{}"), &[]));
    batch.extend(request_bytes("GET", "/machine-config", None, &[]));
    batch.extend(request_bytes("GET", "/", None, &["Connection: close"]));
    // A request after Connection: close is never answered.
    batch.extend(request_bytes("GET", "/version", None, &[]));
    client.send_raw(&batch);
    let statuses: Vec<u16> = (0..6).map(|_| client.read_reply().status).collect();
    assert_eq!(statuses, [200, 204, 404, 400, 200, 200]);
    assert_eq!(client.read_to_end().expect("EOF"), b"");

    // Many small requests in one write, and one request split across many writes.
    let mut client = Client::new(server.connect());
    let many: Vec<u8> = (0..200)
        .flat_map(|_| request_bytes("GET", "/version", None, &[]))
        .collect();
    client.send_raw(&many);
    for _ in 0..200 {
        assert_eq!(client.read_reply().status, 200);
    }
    let one = request_bytes(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path":"/vmlinux"}"#),
        &[],
    );
    for b in &one {
        client.send_raw(std::slice::from_ref(b));
    }
    assert_eq!(client.read_reply().status, 204);
}

#[test]
fn expect_100_continue_is_answered() {
    let server = start(test_options());
    let mut client = Client::new(server.connect());
    let body = format!(
        r#"{{"kernel_image_path":"/vmlinux","boot_args":"{}"}}"#,
        "x".repeat(2000)
    );
    let head = format!(
        "PUT /boot-source HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.send_raw(head.as_bytes());
    let interim = client.read_reply();
    assert_eq!(interim.status, 100);
    // Half the body, then the rest: no second 100.
    client.send_raw(&body.as_bytes()[..1000]);
    client.send_raw(&body.as_bytes()[1000..]);
    assert_eq!(client.read_reply().status, 204);
    // The next request on the connection gets its own 100.
    client.send_raw(head.as_bytes());
    assert_eq!(client.read_reply().status, 100);
    client.send_raw(body.as_bytes());
    assert_eq!(client.read_reply().status, 204);
    // A body too large is refused at once, without a 100.
    let server = start(ServerOptions {
        max_payload: 100,
        ..test_options()
    });
    let mut client = Client::new(server.connect());
    client.send_raw(head.as_bytes());
    let reply = client.read_reply();
    assert_eq!(reply.status, 400);
    assert!(
        reply.fault().contains("limit of 100 bytes"),
        "{}",
        reply.fault()
    );
}

#[test]
fn connection_close_and_http_1_0_close_after_the_answer() {
    let server = start(test_options());
    for extra in [
        &["Connection: close"][..],
        &["Connection: keep-alive, close"],
    ] {
        let mut client = Client::new(server.connect());
        client.send_raw(&request_bytes("GET", "/version", None, extra));
        let r = client.read_reply();
        assert_eq!((r.status, r.header("connection")), (200, Some("close")));
        assert_eq!(client.read_to_end().expect("EOF"), b"");
    }
    let mut client = Client::new(server.connect());
    client.send_raw(b"GET /version HTTP/1.0\r\n\r\n");
    assert_eq!(client.read_reply().status, 200);
    assert_eq!(client.read_to_end().expect("EOF"), b"");
    let mut client = Client::new(server.connect());
    client.send_raw(b"GET /version HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(client.read_reply().header("connection"), Some("keep-alive"));
    client.send_raw(b"GET /version HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(client.read_reply().status, 200);
}

#[test]
fn half_requests_and_stuck_clients_do_not_stop_others() {
    let server = start(test_options());
    // Half a request, then gone.
    {
        let mut s = server.connect();
        s.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
            .expect("write");
    }
    // Half the headers, then gone.
    {
        let mut s = server.connect();
        s.write_all(b"GET /machine-con").expect("write");
    }
    // Half a request, then silence, connection kept open.
    let mut stuck = server.connect();
    stuck
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .expect("write");
    // A request sent, the client half-closes: the answer still comes.
    let mut s = server.connect();
    s.write_all(&request_bytes("GET", "/version", None, &[]))
        .expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut all = String::new();
    s.read_to_string(&mut all).expect("read");
    assert!(all.starts_with("HTTP/1.1 200 OK"), "{all}");
    // A request sent, the client leaves before the answer.
    {
        let mut s = server.connect();
        s.write_all(&request_bytes("GET", "/vm/config", None, &[]))
            .expect("write");
    }
    // A client that sends many requests and never reads an answer.
    let greedy = server.connect();
    greedy.set_nonblocking(true).expect("nonblocking");
    let one = request_bytes("GET", "/vm/config", None, &[]);
    let mut sent = 0usize;
    let started = Instant::now();
    'fill: while started.elapsed() < Duration::from_secs(5) {
        let mut off = 0;
        while off < one.len() {
            match (&greedy).write(&one[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break 'fill,
                Err(e) => panic!("{e}"),
            }
        }
        sent += 1;
    }
    assert!(sent > 100, "the greedy client sent only {sent} requests");
    // Everyone else is still served, promptly.
    for _ in 0..20 {
        let r = server.request("GET", "/machine-config", None);
        assert_eq!(r.status, 200);
    }
    let mut client = Client::new(server.connect());
    for _ in 0..50 {
        client.send("GET", "/", None);
        assert_eq!(client.read_reply().status, 200);
    }
    drop(greedy);
    drop(stuck);
    assert_eq!(server.request("GET", "/version", None).status, 200);
}

#[test]
fn the_connection_cap_holds_new_clients_until_a_slot_frees() {
    let server = start(ServerOptions {
        max_connections: 2,
        ..test_options()
    });
    let mut a = Client::new(server.connect());
    a.send("GET", "/version", None);
    assert_eq!(a.read_reply().status, 200);
    let mut b = Client::new(server.connect());
    b.send("GET", "/version", None);
    assert_eq!(b.read_reply().status, 200);
    // The third waits in the backlog.
    let third = server.connect();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut c = Client::new(third);
    c.send("GET", "/version", None);
    let mut byte = [0u8; 1];
    let waited = c.stream().read(&mut byte);
    assert!(
        matches!(&waited, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "the third client was served past the cap: {waited:?}"
    );
    drop(a);
    c.stream()
        .set_read_timeout(Some(harness::CLIENT_TIMEOUT))
        .expect("timeout");
    assert_eq!(c.read_reply().status, 200);
}

#[test]
fn counters_follow_the_requests() {
    let mut server = start(test_options());
    let mut client = Client::new(server.connect());
    client.send("GET", "/machine-config", None);
    client.read_reply();
    client.send("PUT", "/machine-config", Some("{}"));
    client.read_reply();
    client.send("PATCH", "/machine-config", Some(r#"{"vcpu_count":2}"#));
    client.read_reply();
    client.send_raw(b"NOT HTTP\r\n\r\n");
    assert_eq!(client.read_reply().status, 400);
    server.stop().expect("the server failed");
    let m = &server.metrics;
    assert_eq!(m.connections.load(Ordering::Relaxed), 1);
    assert_eq!(m.requests.load(Ordering::Relaxed), 4);
    assert_eq!(m.get_requests.load(Ordering::Relaxed), 1);
    assert_eq!(m.put_requests.load(Ordering::Relaxed), 1);
    assert_eq!(m.patch_requests.load(Ordering::Relaxed), 1);
    assert_eq!(m.failed_requests.load(Ordering::Relaxed), 2);
    assert_eq!(m.malformed_requests.load(Ordering::Relaxed), 1);
    assert!(m.latency_us_max.load(Ordering::Relaxed) < 10_000_000);
}

#[test]
fn shutdown_stops_the_thread_and_closes_connections() {
    let mut server = start(test_options());
    let mut idle = Client::new(server.connect());
    idle.send("GET", "/version", None);
    assert_eq!(idle.read_reply().status, 200);
    let started = Instant::now();
    server.stop().expect("the server failed");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The idle connection sees EOF; the socket is no longer served.
    assert_eq!(idle.read_to_end().expect("EOF"), b"");
    match UnixStream::connect(&server.path) {
        Err(_) => {}
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let _ = s.write_all(&request_bytes("GET", "/version", None, &[]));
            let mut buf = [0u8; 16];
            let r = s.read(&mut buf);
            assert!(!matches!(r, Ok(n) if n > 0), "answered after shutdown");
        }
    }
}

fn bare_server(dir_name: &str) -> (api::ApiServer, vmm::rpc::ApiReceiver, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("cgvm-api-{dir_name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let listener = std::os::unix::net::UnixListener::bind(dir.join("s")).expect("bind");
    let (tx, rx) = vmm::rpc::channel().expect("channel");
    let server = api::ApiServer::new(
        listener,
        tx,
        std::sync::Arc::default(),
        ServerOptions::default(),
    );
    (server, rx, dir)
}

#[test]
fn the_thread_has_its_name_and_stops_on_request() {
    let (server, _rx, dir) = bare_server("name");
    let handle = server.spawn().expect("spawn");
    assert_eq!(handle.thread().name(), Some(api::THREAD_NAME));
    let started = Instant::now();
    handle.shutdown();
    assert!(started.elapsed() < api::server::SHUTDOWN_WAIT);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn run_serves_on_the_callers_thread_and_a_failed_init_is_reported() {
    let (mut server, rx, dir) = bare_server("run");
    let stop = server.shutdown_handle().expect("handle");
    let t = std::thread::spawn(move || server.run());
    let mut c = Client::new(UnixStream::connect(dir.join("s")).expect("connect"));
    c.send("GET", "/version", None);
    assert_eq!(c.read_reply().status, 200);
    stop.shutdown().expect("shutdown");
    t.join().expect("join").expect("run");
    drop(rx);
    std::fs::remove_dir_all(&dir).expect("cleanup");

    let (server, _rx, dir) = bare_server("init");
    let handle = server
        .spawn_with(|| Err(std::io::Error::other("no filter for you")))
        .expect("spawn");
    let e = handle.join().expect_err("the init failed");
    assert!(e.to_string().contains("no filter"), "{e}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
