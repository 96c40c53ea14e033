//! API benchmark: how fast the VMM's API socket is ready, how fast it answers, and how fast a
//! `--config-file` boot reaches the guest.
//!
//! ```text
//! cargo bench --bench api -- [--runs N] [--requests N] [--clients N] [--vmm PATH]
//!                            [--kernel PATH]
//! ```
//!
//! 1. Start → API ready, over `--runs` processes: `VMM serve --api-sock DIR/api.sock` is
//!    spawned; the benchmark reads CLOCK_MONOTONIC just before the spawn, then tries to connect
//!    every 50 µs and, once connected, sends `GET /`; the process is ready when that is answered
//!    200. At that moment the benchmark reads the process's CPU time twice: utime + stime from
//!    `/proc/PID/stat` (clock ticks, usually 10 ms each) and its CPU-time clock
//!    (`clock_getcpuclockid`, nanoseconds, all threads). Firecracker's published bound for the
//!    same interval is 8 ms of CPU. Then the process gets SIGTERM; it must exit with 143
//!    (128 + SIGTERM) and remove its socket.
//! 2. Request latency, one `serve` process: `GET /` and `PUT /machine-config` (body `{"vcpu_count":
//!    2, "mem_size_mib": 256}`, accepted before boot with 204), each with 1 client and with
//!    `--clients` clients at once, each client a thread with its own keep-alive connection
//!    sending `--requests` requests one after the other (after a few untimed ones). Latency is
//!    from just before the request's write to the end of its answer. The VMM's CPU time per
//!    request is the process's CPU time over the timed requests (both clocks as above) divided
//!    by their number.
//! 3. `--config-file` boot, over `--runs` processes: `VMM --no-api --config-file F --boot-timer`
//!    with F a Firecracker config file (boot-source: the probe guest, `probe.tests=boot`;
//!    machine-config: 1 vCPU, 64 MiB; no drives). `--boot-timer` prints the VMM's timeline at
//!    exit, whose `cgvm: timeline-monotonic-ns` line gives the first guest instruction in
//!    CLOCK_MONOTONIC; the benchmark adds the spawn and exit times.
//!
//! Figures are medians and 90th percentiles (nearest rank) unless named otherwise. Every wait
//! has a time limit; children are killed and the temporary directory removed on any error. A
//! run that fails (a bad status, a socket left behind) is reported, and the benchmark then
//! exits with status 1, after printing the figures. Without `--kernel` the probe guest is built
//! with `resources/probe-guest/build.sh` into the temporary directory.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use std::{env, thread};

mod common;

use common::{
    build_probe_guest, median, parse_flags, parse_number, parse_timeline, percentile, Request,
    Result, TempDir,
};

const USAGE: &str = "\
usage: cargo bench --bench api -- [OPTIONS]
  --runs N            processes started for the start-up figures (default 30, at least 1)
  --requests N        timed requests per client for the latency figures (default 2000)
  --clients N         clients at once in the concurrent latency figures (default 16)
  --vmm PATH          the VMM binary (default: the cgvm that cargo built for this benchmark)
  --kernel PATH       the probe guest (default: build it with resources/probe-guest/build.sh)
  --help              this text";

/// Firecracker's published bound on the CPU time from process start to API ready.
const FIRECRACKER_READY_CPU_MS: f64 = 8.0;
/// How long a process may take to answer its first `GET /`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `--config-file` boot of the probe guest may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The read and write limit of every API connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between two connection attempts while waiting for the socket.
const CONNECT_POLL: Duration = Duration::from_micros(50);
/// Untimed requests each client sends before the timed ones.
const WARMUP_REQUESTS: usize = 20;
/// How many lines of a failed process's stderr are shown.
const STDERR_TAIL_LINES: usize = 5;
/// The stderr line with the VMM's timeline in CLOCK_MONOTONIC nanoseconds.
/// The body of the timed `PUT /machine-config`.
const MACHINE_CONFIG_BODY: &str = r#"{"vcpu_count": 2, "mem_size_mib": 256}"#;

// --- options ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Options {
    runs: usize,
    requests: usize,
    clients: usize,
    vmm: PathBuf,
    kernel: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 30,
            requests: 2000,
            clients: 16,
            vmm: PathBuf::from(env!("CARGO_BIN_EXE_cgvm")),
            kernel: None,
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Request<Options>> {
    let request = parse_flags(args, USAGE, Options::default(), |opts, flag, value| {
        match flag {
            "--runs" => opts.runs = parse_number(flag, &value()?)?,
            "--requests" => opts.requests = parse_number(flag, &value()?)?,
            "--clients" => opts.clients = parse_number(flag, &value()?)?,
            "--vmm" => opts.vmm = PathBuf::from(value()?),
            "--kernel" => opts.kernel = Some(PathBuf::from(value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let Request::Run(opts) = request else {
        return Ok(request);
    };
    for (name, n) in [
        ("--runs", opts.runs),
        ("--requests", opts.requests),
        ("--clients", opts.clients),
    ] {
        if n == 0 {
            return Err(format!("{name} must be at least 1"));
        }
    }
    Ok(Request::Run(opts))
}

// --- clocks and the child's CPU time ------------------------------------------------------------

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of the VMM's timeline line).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which is valid and writable.
    // CLOCK_MONOTONIC always exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Milliseconds from `from` to `to` (CLOCK_MONOTONIC ns).
fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

/// The CPU time of a process, user + system, all its threads, by two clocks.
#[derive(Debug, Clone, Copy)]
struct CpuTime {
    /// utime + stime of `/proc/PID/stat`, in milliseconds (clock-tick resolution).
    stat_ms: f64,
    /// The process's CPU-time clock (`clock_getcpuclockid`), in milliseconds.
    clock_ms: f64,
}

impl CpuTime {
    fn minus(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            stat_ms: self.stat_ms - earlier.stat_ms,
            clock_ms: self.clock_ms - earlier.clock_ms,
        }
    }
}

/// Clock ticks per second, the unit of `/proc/PID/stat`'s times.
fn clock_ticks_per_second() -> Result<f64> {
    // SAFETY: sysconf reads a system value and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return Err(format!(
            "sysconf(_SC_CLK_TCK): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(ticks as f64)
}

/// utime + stime of process `pid` from `/proc/PID/stat`, in clock ticks.
fn stat_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    // After it come field 3 (state) onwards; utime and stime are fields 14 and 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{path}: no ')' in {text:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{path}: no field {n} in {text:?}"))
    };
    Ok(field(14)? + field(15)?)
}

/// The CPU time of process `pid` now, by both clocks.
fn cpu_time(pid: u32, ticks_per_second: f64) -> Result<CpuTime> {
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid only writes the clockid_t we pass, valid and writable.
    let rc = unsafe { libc::clock_getcpuclockid(raw_pid, &mut clock) };
    if rc != 0 {
        return Err(format!(
            "clock_getcpuclockid({pid}): {}",
            io::Error::from_raw_os_error(rc)
        ));
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, valid and writable.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(format!(
            "the CPU clock of pid {pid}: {}",
            io::Error::last_os_error()
        ));
    }
    let ticks = stat_cpu_ticks(pid)?;
    Ok(CpuTime {
        stat_ms: ticks as f64 * 1e3 / ticks_per_second,
        clock_ms: ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6,
    })
}

// --- child processes ----------------------------------------------------------------------------

/// A VMM process, killed and waited for when dropped unless it was waited for already.
struct Vmm {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Vmm {
    /// Starts `vmm` with `args`, its stdout discarded and its stderr in `stderr`.
    fn spawn(vmm: &Path, args: &[OsString], stderr: &Path) -> Result<Self> {
        let file =
            File::create(stderr).map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        let child = Command::new(vmm)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
        Ok(Self {
            child: Some(child),
            stderr: stderr.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last lines of its stderr (without timeline lines), indented, for an error message.
    fn stderr_tail(&self) -> String {
        let text = self.stderr_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("cgvm: timeline"))
            .collect();
        lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..]
            .iter()
            .map(|l| format!("\n    {l}"))
            .collect()
    }

    /// Its exit status if it has exited.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Err("the VMM was already waited for".to_string()),
            Some(child) => child
                .try_wait()
                .map_err(|e| format!("waiting for the VMM: {e}")),
        }
    }

    /// Waits at most `limit` for it to exit; kills it after that (and says so).
    fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > limit {
                self.kill();
                return Err(format!(
                    "the VMM (pid {}) was still running after {limit:?}, killed it{}",
                    self.pid(),
                    self.stderr_tail()
                ));
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn signal(&self, signal: i32) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid()).map_err(|_| "pid out of range".to_string())?;
        // SAFETY: kill sends a signal to our own child, not waited for yet (so the pid is
        // still ours); it touches no memory.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!(
                "kill({pid}, {signal}): {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

// --- the HTTP client ----------------------------------------------------------------------------

/// One keep-alive connection to the API socket.
struct Connection {
    stream: UnixStream,
    /// Bytes read but not yet consumed by an answer.
    buf: Vec<u8>,
}

impl Connection {
    fn new(stream: UnixStream) -> Result<Self> {
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("cannot set the socket's time limits: {e}"))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        Self::new(stream)
    }

    /// Sends one request and reads its answer: the status code.
    fn request(&mut self, request: &[u8]) -> Result<u16> {
        self.stream
            .write_all(request)
            .map_err(|e| format!("sending a request: {e}"))?;
        self.read_answer()
    }

    /// Reads one Content-Length framed answer; its status code.
    fn read_answer(&mut self) -> Result<u16> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut length = 0;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    length = value
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad Content-Length in {head:?}"))?;
                }
            }
        }
        while self.buf.len() < head_end + length {
            self.fill()?;
        }
        self.buf.drain(..head_end + length);
        Ok(status)
    }

    fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self
            .stream
            .read(&mut chunk)
            .map_err(|e| format!("reading an answer: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the VMM closed the connection in the middle of an answer: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// An HTTP/1.1 request's bytes.
fn http_request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(body) = body {
        let _ = write!(
            req,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or_default());
    req.into_bytes()
}

/// Connects to `sock` and has `GET /` answered 200, retrying every [`CONNECT_POLL`] while the
/// socket is not there or not listening yet. Fails when `vmm` exits or after `limit`.
fn wait_until_ready(vmm: &mut Vmm, sock: &Path, limit: Duration) -> Result<()> {
    let get = http_request("GET", "/", None);
    let start = Instant::now();
    loop {
        match UnixStream::connect(sock) {
            Ok(stream) => {
                let status = Connection::new(stream)?.request(&get)?;
                if status == 200 {
                    return Ok(());
                }
                return Err(format!(
                    "GET / was answered {status}, not 200{}",
                    vmm.stderr_tail()
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(format!("cannot connect to {}: {e}", sock.display())),
        }
        if let Some(status) = vmm.try_wait()? {
            return Err(format!(
                "the VMM ended ({}) before its API was ready{}",
                describe_status(status),
                vmm.stderr_tail()
            ));
        }
        if start.elapsed() > limit {
            return Err(format!(
                "the API socket {} was not ready after {limit:?}{}",
                sock.display(),
                vmm.stderr_tail()
            ));
        }
        thread::sleep(CONNECT_POLL);
    }
}

// --- statistics ---------------------------------------------------------------------------------

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// "median p90" of `values` in ms, or dashes when there are none.
fn median_p90_ms(values: Vec<f64>) -> String {
    let values = sorted(values);
    match (median(&values), percentile(&values, 90.0)) {
        (Some(m), Some(p)) => format!("{m:8.2} ms {p:8.2} ms"),
        _ => format!("{:>11} {:>11}", "-", "-"),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

// --- 1. start -> API ready ----------------------------------------------------------------------

/// One process from spawn to exit.
struct StartRun {
    ready_ms: f64,
    ready_cpu: CpuTime,
    /// From SIGTERM to the end of the process.
    term_to_exit_ms: f64,
    status: ExitStatus,
    socket_left: bool,
}

fn start_once(opts: &Options, dir: &Path, ticks_per_second: f64) -> Result<StartRun> {
    let sock = dir.join("api.sock");
    if sock.exists() {
        fs::remove_file(&sock).map_err(|e| format!("cannot remove {}: {e}", sock.display()))?;
    }
    let args: Vec<OsString> = vec!["serve".into(), "--api-sock".into(), sock.clone().into()];
    let spawn_ns = monotonic_ns();
    let mut vmm = Vmm::spawn(&opts.vmm, &args, &dir.join("serve-stderr.txt"))?;
    wait_until_ready(&mut vmm, &sock, READY_TIMEOUT)?;
    let ready_ns = monotonic_ns();
    let ready_cpu = cpu_time(vmm.pid(), ticks_per_second)?;
    let term_ns = monotonic_ns();
    vmm.signal(libc::SIGTERM)?;
    let status = vmm.wait(EXIT_TIMEOUT)?;
    let exit_ns = monotonic_ns();
    let socket_left = fs::symlink_metadata(&sock).is_ok();
    if socket_left {
        let _ = fs::remove_file(&sock);
    }
    Ok(StartRun {
        ready_ms: ms_between(spawn_ns, ready_ns),
        ready_cpu,
        term_to_exit_ms: ms_between(term_ns, exit_ns),
        status,
        socket_left,
    })
}

/// Measures start -> ready; prints the figures; false if a process misbehaved.
fn bench_start(opts: &Options, dir: &Path, ticks_per_second: f64) -> Result<bool> {
    let mut runs = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs {
        runs.push(start_once(opts, dir, ticks_per_second)?);
    }
    let of = |f: fn(&StartRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n1. process start -> API ready: `serve --api-sock`, {} run{}, ready = GET / answered 200",
        runs.len(),
        plural(runs.len())
    );
    let _ = writeln!(out, "{:46} {:>11} {:>11}", "", "median", "p90");
    let _ = writeln!(
        out,
        "{:46} {}",
        "wall time, spawn -> ready",
        median_p90_ms(of(|r| r.ready_ms))
    );
    let _ = writeln!(
        out,
        "{:46} {}   (Firecracker's bound: {FIRECRACKER_READY_CPU_MS} ms)",
        format!(
            "CPU to ready, /proc stat utime+stime ({} Hz)",
            ticks_per_second
        ),
        median_p90_ms(of(|r| r.ready_cpu.stat_ms))
    );
    let _ = writeln!(
        out,
        "{:46} {}   (Firecracker's bound: {FIRECRACKER_READY_CPU_MS} ms)",
        "CPU to ready, process CPU clock (ns)",
        median_p90_ms(of(|r| r.ready_cpu.clock_ms))
    );
    let _ = writeln!(
        out,
        "{:46} {}",
        "SIGTERM -> exit",
        median_p90_ms(of(|r| r.term_to_exit_ms))
    );
    let good_status = runs
        .iter()
        .filter(|r| r.status.code() == Some(128 + libc::SIGTERM))
        .count();
    let removed = runs.iter().filter(|r| !r.socket_left).count();
    let _ = writeln!(
        out,
        "after SIGTERM: exit status {} in {good_status} of {} runs, socket removed in {removed} of {}",
        128 + libc::SIGTERM,
        runs.len(),
        runs.len()
    );
    for (i, run) in runs.iter().enumerate() {
        if run.status.code() != Some(128 + libc::SIGTERM) || run.socket_left {
            let _ = writeln!(
                out,
                "run {}: {}{}",
                i + 1,
                describe_status(run.status),
                if run.socket_left {
                    ", left its socket behind"
                } else {
                    ""
                }
            );
        }
    }
    print!("{out}");
    Ok(good_status == runs.len() && removed == runs.len())
}

// --- 2. request latency -------------------------------------------------------------------------

/// The figures of one request kind at one concurrency.
struct Latency {
    label: &'static str,
    clients: usize,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    per_second: f64,
    cpu_per_request: CpuTime,
}

/// A request whose latency is measured.
struct Case {
    label: &'static str,
    /// The request's bytes.
    request: Vec<u8>,
    /// The status every answer must have.
    expect: u16,
}

/// Runs `clients` clients at once against `vmm`, each sending `case` `requests` times.
fn measure_latency(
    vmm: &Vmm,
    sock: &Path,
    case: &Case,
    clients: usize,
    requests: usize,
    ticks_per_second: f64,
) -> Result<Latency> {
    let (label, expect) = (case.label, case.expect);
    // Every client connects and warms up, then waits at `ready`; the CPU clock and the wall
    // clock are read, then `go` lets them all start their timed requests.
    let ready = Arc::new(Barrier::new(clients + 1));
    let go = Arc::new(Barrier::new(clients + 1));
    let mut threads = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (ready, go) = (ready.clone(), go.clone());
        let sock = sock.to_path_buf();
        let request = case.request.clone();
        let spawned = thread::Builder::new()
            .name("api-bench-client".into())
            .spawn(move || -> Result<Vec<f64>> {
                // The barriers are passed whatever happens, so that no thread waits forever.
                let conn = Connection::connect(&sock).and_then(|mut conn| {
                    for _ in 0..WARMUP_REQUESTS {
                        check_status(conn.request(&request)?, expect)?;
                    }
                    Ok(conn)
                });
                ready.wait();
                go.wait();
                let mut conn = conn?;
                let mut latencies = Vec::with_capacity(requests);
                for _ in 0..requests {
                    let start = Instant::now();
                    let status = conn.request(&request)?;
                    latencies.push(start.elapsed().as_secs_f64() * 1e6);
                    check_status(status, expect)?;
                }
                Ok(latencies)
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The threads already started wait at the barriers for clients that will never
                // come: this is fatal, and the process ends with its error.
                return Err(format!("cannot start a client thread: {e}"));
            }
        }
    }
    ready.wait();
    let cpu_before = cpu_time(vmm.pid(), ticks_per_second)?;
    let start = Instant::now();
    go.wait();
    let mut latencies = Vec::with_capacity(clients * requests);
    let mut error = None;
    for t in threads {
        match t.join() {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => error = Some(e),
            Err(_) => error = Some("a client thread panicked".to_string()),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_time(vmm.pid(), ticks_per_second)?.minus(cpu_before);
    if let Some(e) = error {
        return Err(format!("{label}, {clients} client{}: {e}", plural(clients)));
    }
    let total = latencies.len();
    let latencies = sorted(latencies);
    let per_request_us = |ms: f64| ms * 1e3 / total as f64;
    Ok(Latency {
        label,
        clients,
        p50_us: percentile(&latencies, 50.0).unwrap_or(f64::NAN),
        p99_us: percentile(&latencies, 99.0).unwrap_or(f64::NAN),
        mean_us: latencies.iter().sum::<f64>() / total as f64,
        per_second: total as f64 / wall,
        cpu_per_request: CpuTime {
            stat_ms: per_request_us(cpu.stat_ms),
            clock_ms: per_request_us(cpu.clock_ms),
        },
    })
}

fn check_status(status: u16, expect: u16) -> Result<()> {
    if status == expect {
        Ok(())
    } else {
        Err(format!("answered {status}, expected {expect}"))
    }
}

/// Measures request latency on one `serve` process; prints the figures.
fn bench_latency(opts: &Options, dir: &Path, ticks_per_second: f64) -> Result<()> {
    let sock = dir.join("api.sock");
    if sock.exists() {
        fs::remove_file(&sock).map_err(|e| format!("cannot remove {}: {e}", sock.display()))?;
    }
    let args: Vec<OsString> = vec!["serve".into(), "--api-sock".into(), sock.clone().into()];
    let mut vmm = Vmm::spawn(&opts.vmm, &args, &dir.join("latency-stderr.txt"))?;
    wait_until_ready(&mut vmm, &sock, READY_TIMEOUT)?;
    let cases = [
        Case {
            label: "GET /",
            request: http_request("GET", "/", None),
            expect: 200,
        },
        Case {
            label: "PUT /machine-config",
            request: http_request("PUT", "/machine-config", Some(MACHINE_CONFIG_BODY)),
            expect: 204,
        },
    ];
    let mut concurrency = vec![1];
    if opts.clients > 1 {
        concurrency.push(opts.clients);
    }
    let mut figures = Vec::new();
    for case in &cases {
        for &clients in &concurrency {
            figures.push(measure_latency(
                &vmm,
                &sock,
                case,
                clients,
                opts.requests,
                ticks_per_second,
            )?);
        }
    }
    // The process is still serving: nothing went wrong under load.
    if let Some(status) = vmm.try_wait()? {
        return Err(format!(
            "the VMM ended ({}) during the latency runs{}",
            describe_status(status),
            vmm.stderr_tail()
        ));
    }
    vmm.signal(libc::SIGTERM)?;
    vmm.wait(EXIT_TIMEOUT)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n2. request latency: one `serve` process (before boot), each client its own keep-alive \
         connection,\n   {} timed requests per client after {WARMUP_REQUESTS} untimed ones",
        opts.requests
    );
    let _ = writeln!(
        out,
        "{:22} {:>7} {:>9} {:>9} {:>9} {:>10} {:>12} {:>12}",
        "request", "clients", "p50 µs", "p99 µs", "mean µs", "req/s", "VMM CPU µs", "(stat) µs"
    );
    for f in &figures {
        let _ = writeln!(
            out,
            "{:22} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>12.2} {:>12.2}",
            f.label,
            f.clients,
            f.p50_us,
            f.p99_us,
            f.mean_us,
            f.per_second,
            f.cpu_per_request.clock_ms,
            f.cpu_per_request.stat_ms
        );
    }
    let _ = writeln!(
        out,
        "VMM CPU µs: the VMM process's CPU time (user + system, all threads) per timed request, \
         from its CPU clock; (stat): the same from /proc/PID/stat ({ticks_per_second} Hz ticks)"
    );
    print!("{out}");
    Ok(())
}

// --- 3. --config-file boot ----------------------------------------------------------------------

/// A Firecracker config file for the probe guest.
fn config_json(kernel: &Path) -> Result<String> {
    let kernel = kernel
        .to_str()
        .ok_or_else(|| format!("the kernel path {} is not UTF-8", kernel.display()))?;
    // The path goes into a JSON string: escape what JSON needs escaped.
    let mut escaped = String::new();
    for c in kernel.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(escaped, "\\u{:04x}", c as u32);
            }
            c => escaped.push(c),
        }
    }
    Ok(format!(
        r#"{{
  "boot-source": {{
    "kernel_image_path": "{escaped}",
    "boot_args": "probe.tests=boot"
  }},
  "machine-config": {{
    "vcpu_count": 1,
    "mem_size_mib": 64
  }},
  "drives": []
}}
"#
    ))
}

/// A figure of one boot, in ms; `None` when the run does not have it.
type BootFigure = fn(&BootRun) -> Option<f64>;

/// One `--config-file` boot.
struct BootRun {
    status: ExitStatus,
    first_instruction_ms: Option<f64>,
    boot_complete_ms: Option<f64>,
    exit_ms: f64,
    has_timeline: bool,
    stderr_tail: String,
}

fn boot_once(opts: &Options, dir: &Path, config: &Path) -> Result<BootRun> {
    let args: Vec<OsString> = vec![
        "--no-api".into(),
        "--config-file".into(),
        config.into(),
        "--boot-timer".into(),
    ];
    let spawn_ns = monotonic_ns();
    let mut vmm = Vmm::spawn(&opts.vmm, &args, &dir.join("boot-stderr.txt"))?;
    let status = vmm.wait(BOOT_TIMEOUT)?;
    let exit_ns = monotonic_ns();
    let stderr = vmm.stderr_text();
    let timeline = parse_timeline(&stderr);
    let since_spawn = |t: Option<u64>| t.map(|t| ms_between(spawn_ns, t));
    Ok(BootRun {
        status,
        first_instruction_ms: since_spawn(timeline.and_then(|t| t.first_instruction)),
        boot_complete_ms: since_spawn(timeline.and_then(|t| t.boot_complete)),
        exit_ms: ms_between(spawn_ns, exit_ns),
        has_timeline: timeline.is_some(),
        stderr_tail: vmm.stderr_tail(),
    })
}

/// Measures `--config-file` boots; prints the figures; false if a run failed.
fn bench_boot(opts: &Options, dir: &Path, kernel: &Path) -> Result<bool> {
    let config = dir.join("vm-config.json");
    fs::write(&config, config_json(kernel)?)
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let mut runs = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs {
        runs.push(boot_once(opts, dir, &config)?);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n3. --config-file boot: `--no-api --config-file F --boot-timer`, {} run{}, probe guest \
         {}, probe.tests=boot, 1 vCPU, 64 MiB, no drives",
        runs.len(),
        plural(runs.len()),
        kernel.display()
    );
    let _ = writeln!(out, "{:46} {:>11} {:>11}", "", "median", "p90");
    let rows: [(&str, BootFigure); 3] = [
        ("process start -> first guest instruction", |r| {
            r.first_instruction_ms
        }),
        ("process start -> boot complete", |r| r.boot_complete_ms),
        ("process start -> exit", |r| Some(r.exit_ms)),
    ];
    for (label, of) in rows {
        let values: Vec<f64> = runs.iter().filter_map(of).collect();
        let note = if values.len() < runs.len() {
            format!("  ({} of {} runs)", values.len(), runs.len())
        } else {
            String::new()
        };
        let _ = writeln!(out, "{label:46} {}{note}", median_p90_ms(values));
    }
    let mut ok = true;
    for (i, run) in runs.iter().enumerate() {
        if run.status.success() && run.has_timeline {
            continue;
        }
        ok = false;
        let timeline = if run.has_timeline {
            ""
        } else {
            ", no timeline line on stderr (does the VMM support --boot-timer?)"
        };
        let _ = writeln!(
            out,
            "run {}: {}{timeline}{}",
            i + 1,
            describe_status(run.status),
            run.stderr_tail
        );
    }
    print!("{out}");
    Ok(ok)
}

// --- main ---------------------------------------------------------------------------------------

/// The host: CPU model, CPUs, and which KVM.
fn host_line() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "PVM (kvm_pvm: guest kernel mode emulated)"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "hardware (kvm_intel)"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "hardware (kvm_amd)"
    } else if Path::new("/dev/kvm").exists() {
        "/dev/kvm (module unknown)"
    } else {
        "none (/dev/kvm missing)"
    };
    format!("host: {model}, {cpus} CPU{}, KVM: {kvm}", plural(cpus))
}

fn bench(opts: &Options) -> Result<bool> {
    if !opts.vmm.is_file() {
        return Err(format!(
            "{} does not exist: build it (cargo build --release) or pass --vmm PATH",
            opts.vmm.display()
        ));
    }
    let ticks_per_second = clock_ticks_per_second()?;
    let temp = TempDir::new(&env::temp_dir(), "api-bench")?;
    // Built first, so that its messages come before the figures.
    let kernel = match &opts.kernel {
        Some(kernel) => kernel.clone(),
        None => build_probe_guest(&temp.0, "api bench")?,
    };
    println!("cgvm API benchmark: {}", opts.vmm.display());
    println!("{}", host_line());
    let started = bench_start(opts, &temp.0, ticks_per_second)?;
    bench_latency(opts, &temp.0, ticks_per_second)?;
    let booted = bench_boot(opts, &temp.0, &kernel)?;
    Ok(started && booted)
}

fn main() -> ExitCode {
    let request = parse_args(env::args_os().skip(1));
    common::finish("api bench", USAGE, request, bench)
}
