//! A real HTTP/1.1 client over the API's Unix socket, and a `cgvm serve` process with its
//! console in a file, for the API tests and benchmarks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The body as JSON (Null when empty).
    pub fn json(&self) -> serde_json::Value {
        if self.body.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {:?}", self.body))
    }

    /// The `fault_message` of an error answer.
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?}", self.body))
            .to_string()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one HTTP response from `s` (Content-Length framed).
pub fn read_answer(s: &mut UnixStream) -> std::io::Result<Answer> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before the end of the headers: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A client on one connection (keep-alive).
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self { stream })
    }

    /// Sends one request and reads its answer.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Answer {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.stream
            .write_all(req.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: write: {e}"));
        read_answer(&mut self.stream).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The raw stream (for hand-made requests).
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }
}

/// A running `cgvm` API process.
pub struct Served {
    /// The process.
    pub child: Option<Child>,
    /// The API socket.
    pub sock: PathBuf,
    /// Where its stdout (the guest console unless PUT /serial moved it) goes.
    pub stdout: PathBuf,
    /// Where its stderr goes.
    pub stderr: PathBuf,
}

/// How a served process ended.
#[derive(Debug)]
pub struct Ended {
    /// The exit status.
    pub status: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Served {
    /// Starts `binary` with `args` in `dir`, waits for the socket `sock` to accept.
    pub fn start_with(binary: &Path, args: &[&str], dir: &Path, sock: &Path) -> Self {
        let stdout = dir.join("stdout.txt");
        let stderr = dir.join("stderr.txt");
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn cgvm");
        let mut s = Self {
            child: Some(child),
            sock: sock.to_path_buf(),
            stdout,
            stderr,
        };
        let start = Instant::now();
        while UnixStream::connect(sock).is_err() {
            if let Some(st) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "cgvm exited ({st}) before its socket was ready: {}",
                    s.stderr_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the API socket never accepted: {}",
                s.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        s
    }

    /// `cgvm serve --api-sock DIR/api.sock` plus `extra`.
    pub fn serve(dir: &Path, extra: &[&str]) -> Self {
        let sock = dir.join("api.sock");
        let mut args = vec!["serve", "--api-sock", sock.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::start_with(Path::new(env!("CARGO_BIN_EXE_cgvm")), &args, dir, &sock)
    }

    /// `cgvm serve --api-sock DIR/api.sock` plus `extra`, run in the network namespace `ns`
    /// (`ip netns exec`, which execs cgvm: the process is cgvm itself). The socket is a path,
    /// so the test reaches it from its own namespace.
    pub fn serve_in_netns(ns: &str, dir: &Path, extra: &[&str]) -> Self {
        let sock = dir.join("api.sock");
        let mut args = vec![
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_cgvm"),
            "serve",
            "--api-sock",
            sock.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        Self::start_with(Path::new("ip"), &args, dir, &sock)
    }

    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(&self.sock).expect("connect to the API socket")
    }

    /// One request on a new connection.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        self.client().request(method, path, body)
    }

    /// Its stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to end on its own (fails the test after `limit`).
    pub fn wait(&mut self, limit: Duration) -> Ended {
        let mut child = self
            .child
            .take()
            .expect("the process was already waited for");
        let Some(status) = super::wait_with_limit(&mut child, limit) else {
            panic!(
                "cgvm still running after {limit:?}; stderr:\n{}",
                self.stderr_text()
            );
        };
        Ended {
            status: status.code(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: self.stderr_text(),
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: kill only sends a signal to the child we started.
        unsafe { libc::kill(pid as i32, signal) };
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `file` contains `needle`; returns the file's text. Fails after `limit`.
pub fn wait_for_text(file: &Path, needle: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < limit,
            "{needle:?} never appeared in {} after {limit:?}; it holds:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
