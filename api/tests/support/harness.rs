//! The real server in-process on a temporary Unix socket, a fake VMM thread answering from
//! canned values, and a small HTTP client over `std::os::unix::net::UnixStream`.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use api::{ApiServer, ServerHandle, ServerOptions};
use vmm::metrics::ApiMetrics;
use vmm::resources::{
    BootSource, Drive, EntropyDevice, FullVmConfiguration, InstanceInfo, LoggerConfig,
    MachineConfig, MetricsConfig, SerialConfig, Vsock,
};
use vmm::rpc::{ApiReceiver, VmmAction, VmmActionError, VmmData, VmmResponse};

/// How long a test client waits for an answer before failing.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The version the test server reports.
pub const VERSION: &str = "9.8.7-test";

fn drive_json() -> Drive {
    serde_json::from_value(serde_json::json!({
        "drive_id": "rootfs",
        "is_root_device": true,
        "is_read_only": false,
        "path_on_host": "/images/rootfs.ext4",
        "cache_type": "Unsafe",
        "io_engine": "Async",
        "rate_limiter": {
            "bandwidth": {"size": 1048576, "refill_time": 1000, "one_time_burst": 4096},
            "ops": {"size": 100, "refill_time": 1000}
        }
    }))
    .expect("a valid drive")
}

/// The canned VMM: what a real VMM would answer, without a machine.
pub fn fake_answer(action: &VmmAction) -> VmmResponse {
    let refuse = |m: &str| Err(VmmActionError::new(m));
    match action {
        VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
            app_name: "cgvm".into(),
            id: "test-vm".into(),
            state: "Not started".into(),
            vmm_version: VERSION.into(),
        })),
        VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(MachineConfig::default())),
        VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(FullVmConfiguration {
            boot_source: Some(BootSource {
                kernel_image_path: "/images/vmlinux".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: None,
            }),
            drives: vec![drive_json()],
            machine_config: Some(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..Default::default()
            }),
            entropy: Some(EntropyDevice::default()),
            logger: Some(LoggerConfig {
                log_path: Some("/tmp/log".into()),
                level: Some(vmm::resources::LogLevel::Debug),
                ..Default::default()
            }),
            metrics: Some(MetricsConfig {
                metrics_path: "/tmp/metrics".into(),
                emit_id: Some(true),
                properties: Some([("team".to_string(), "ci".to_string())].into()),
            }),
            serial: Some(SerialConfig {
                serial_out_path: Some("/tmp/serial".into()),
                rate_limiter: None,
            }),
            network_interfaces: vec![serde_json::from_value(serde_json::json!({
                "iface_id": "eth0",
                "host_dev_name": "tap0",
                "guest_mac": "02:00:00:00:00:01",
                "rx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}
            }))
            .expect("a valid network interface")],
            vsock: Some(Vsock {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into(),
                vsock_id: None,
            }),
            ..Default::default()
        }))),
        VmmAction::PutMachineConfig(m) if m.vcpu_count == 0 || m.vcpu_count > 32 => refuse(
            &format!("vcpu_count {}: a machine has 1 to 32 vCPUs", m.vcpu_count),
        ),
        VmmAction::PatchMachineConfig(u) if *u == Default::default() => {
            refuse("the body changes nothing: give at least one machine-config field")
        }
        VmmAction::PutBootSource(b) if b.kernel_image_path.starts_with("/nonexistent") => {
            refuse("kernel_image_path: cannot open /nonexistent: No such file or directory")
        }
        VmmAction::PutDrive(d) if d.path_on_host.is_none() => {
            refuse(&format!("drive {}: path_on_host is required", d.drive_id))
        }
        VmmAction::SendCtrlAltDel | VmmAction::SetVmState(_) => {
            refuse("the machine is not running")
        }
        _ => Ok(VmmData::Empty),
    }
}

fn fake_vmm(rx: ApiReceiver, seen: Arc<AtomicUsize>) {
    // The eventfd only says "look at the channel"; a blocking recv does the same job here.
    while let Ok(req) = rx.requests.recv() {
        let _ = rx.event.read();
        seen.fetch_add(1, Ordering::Relaxed);
        let _ = req.reply.send(fake_answer(&req.action));
    }
}

/// A running server; stopped and joined on drop.
pub struct TestServer {
    /// The socket's path.
    pub path: PathBuf,
    /// The server's counters.
    pub metrics: Arc<ApiMetrics>,
    /// Requests the fake VMM answered.
    pub vmm_calls: Arc<AtomicUsize>,
    handle: Option<ServerHandle>,
    vmm: Option<JoinHandle<()>>,
    dir: PathBuf,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A server with a fake VMM behind it.
pub fn start(options: ServerOptions) -> TestServer {
    start_inner(options, true)
}

/// A server whose VMM has already gone away.
pub fn start_without_vmm() -> TestServer {
    start_inner(test_options(), false)
}

/// The options the tests use unless they need others.
pub fn test_options() -> ServerOptions {
    ServerOptions {
        version: VERSION.into(),
        ..Default::default()
    }
}

fn start_inner(options: ServerOptions, with_vmm: bool) -> TestServer {
    let dir = std::env::temp_dir().join(format!(
        "cgvm-api-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("api.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let (tx, rx) = vmm::rpc::channel().expect("channel");
    let metrics = Arc::new(ApiMetrics::default());
    let vmm_calls = Arc::new(AtomicUsize::new(0));
    let vmm = if with_vmm {
        let seen = vmm_calls.clone();
        Some(std::thread::spawn(move || fake_vmm(rx, seen)))
    } else {
        drop(rx);
        None
    };
    let handle = ApiServer::new(listener, tx, metrics.clone(), options)
        .spawn()
        .expect("spawn");
    TestServer {
        path,
        metrics,
        vmm_calls,
        handle: Some(handle),
        vmm,
        dir,
    }
}

impl TestServer {
    /// A new connection with the client timeout set.
    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).expect("connect");
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(CLIENT_TIMEOUT)).expect("timeout");
        s
    }

    /// One request on a new connection.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut c = Client::new(self.connect());
        c.send(method, path, body);
        c.read_reply()
    }

    /// Stops the server and returns what its thread returned.
    pub fn stop(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        if let Some(h) = self.handle.take() {
            result = h.stop();
        }
        if let Some(v) = self.vmm.take() {
            v.join().expect("the fake VMM panicked");
        }
        result
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let r = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            r.expect("the server failed");
        }
    }
}

/// One answer as the client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The header fields, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or None when there is no body.
    pub fn json(&self) -> Option<serde_json::Value> {
        if self.body.is_empty() {
            return None;
        }
        Some(serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        }))
    }

    /// The error text.
    pub fn fault(&self) -> String {
        self.json()
            .and_then(|v| v.get("fault_message")?.as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// A keep-alive client on one connection.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// A client on `stream`.
    pub fn new(stream: UnixStream) -> Self {
        let writer = stream.try_clone().expect("clone");
        Self {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    /// Sends one request (JSON body if given).
    pub fn send(&mut self, method: &str, path: &str, body: Option<&str>) {
        self.send_raw(&request_bytes(method, path, body, &[]));
    }

    /// Reads one answer (skipping nothing: a `100 Continue` is an answer here).
    pub fn read_reply(&mut self) -> Reply {
        read_reply(&mut self.reader).expect("an answer")
    }

    /// Reads until EOF; returns what came.
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest)?;
        Ok(rest)
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.writer
    }
}

/// The bytes of a request.
pub fn request_bytes(method: &str, path: &str, body: Option<&str>, extra: &[&str]) -> Vec<u8> {
    let mut r =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    for h in extra {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

/// Reads one answer from `r`.
pub fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no answer"));
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    assert_eq!(version, "HTTP/1.1", "status line {line:?}");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "headers cut"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').unwrap_or_else(|| panic!("header {h:?}"));
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse::<usize>().expect("Content-Length"));
    if status != 204 && status != 100 {
        assert!(len.is_some(), "a {status} answer without Content-Length");
    }
    let mut body = vec![0; len.unwrap_or(0)];
    r.read_exact(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}
