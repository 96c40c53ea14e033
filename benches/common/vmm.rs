//! Running the VMM under a benchmark that talks to the guest while it runs (the network and
//! vsock benchmarks): the VMM's console lines arrive as they are printed, each probe line
//! marked with the CPU time of the VMM's threads (from `/proc/PID/task/*/stat`, threads that
//! ended included: [`CpuTracker`]) when it came, so that the benchmark can act on a line
//! (`probe: netbench ready ...`) and measure the CPU spent between two lines; `wait4` gives
//! the whole run's CPU time at the end. [`Pinning`] gives the VMM's device thread a CPU of its
//! own on a small machine. What such a benchmark's scenarios share besides: the options
//! ([`RunOptions`]), the host's state in the report ([`HostState`]), what a run records beside
//! the benchmark's own figures ([`RunLog`]), and the run from the guest's ready line
//! ([`Vmm::wait_ready`]) to its figures ([`Vmm::wait_figures`]) and the VMM's exit
//! ([`Vmm::conclude`]).
//!
//! Included by the benchmarks that need it with `#[path = "common/vmm.rs"] mod vmm;` (beside
//! `mod common;`), so that the others do not compile it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{
    at_least_one, clock_agrees, clock_ticks_per_s, cpu_seconds, load_average, names_some,
    parse_number, parse_task_stat, tail, vcpu_share, wait_for, ClockBounds, Result, ThreadCpu,
    Transport,
};

/// How long the guest has to get ready, and what its figures may take beyond the time.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const RESULT_SLACK: Duration = Duration::from_secs(40);
/// How many lines of a failed run's output are shown.
const TAIL_LINES: usize = 8;
/// How far the guest's time between its ready and result lines may be from the host's
/// ([`RunLog::check_clock`]).
const CLOCK_BOUNDS: ClockBounds = ClockBounds {
    over: 0.05,
    under: 0.15,
    slack_s: 0.3,
};

/// What kind of VMM thread a name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vcpu,
    Device,
    Other,
}

/// `cgvm-vcpu*`; `cgvm-virtio*` and io_uring's `iou-*` workers (a disk's `engine=uring`), the
/// devices'; the rest.
fn kind_of(comm: &str) -> Kind {
    if comm.starts_with("cgvm-vcpu") {
        Kind::Vcpu
    } else if comm.starts_with("cgvm-virtio") || comm.starts_with("iou-") {
        Kind::Device
    } else {
        Kind::Other
    }
}

/// The CPU time of a process's threads, remembering those that ended: every look at
/// `/proc/PID/task/*/stat` records each thread's time, and a thread that is gone keeps what
/// was last seen of it. The VMM looks every [`TRACK_PERIOD`] (from a thread of its own), so a
/// device thread that ends when its guest resets the device right after printing its figures
/// still counts, short of its last few milliseconds.
pub struct CpuTracker {
    pid: u32,
    ticks_per_s: f64,
    seen: Mutex<HashMap<u32, (Kind, u64)>>,
}

/// How often a running VMM's threads are looked at.
pub const TRACK_PERIOD: Duration = Duration::from_millis(20);

impl CpuTracker {
    /// A tracker of `pid`.
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            ticks_per_s: clock_ticks_per_s(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Looks at the threads now; the CPU time of every thread seen so far, by kind (`None`
    /// once the process is gone).
    pub fn sample(&self) -> Option<ThreadCpu> {
        let tasks = tasks(self.pid).ok()?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (tid, task) in tasks {
            let Ok(stat) = fs::read_to_string(task.join("stat")) else {
                continue; // the thread ended meanwhile
            };
            let Some((comm, ticks)) = parse_task_stat(&stat) else {
                continue;
            };
            let entry = seen.entry(tid).or_insert((kind_of(comm), 0));
            // A thread names itself after it started: keep the latest name.
            *entry = (kind_of(comm), entry.1.max(ticks));
        }
        let mut cpu = ThreadCpu::default();
        for &(kind, ticks) in seen.values() {
            let seconds = ticks as f64 / self.ticks_per_s;
            match kind {
                Kind::Vcpu => cpu.vcpu_s += seconds,
                Kind::Device => cpu.device_s += seconds,
                Kind::Other => cpu.other_s += seconds,
            }
        }
        Some(cpu)
    }
}

/// The threads of process `pid`: each one's id and its `/proc/PID/task/TID` directory.
fn tasks(pid: u32) -> io::Result<impl Iterator<Item = (u32, PathBuf)>> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))?;
    Ok(tasks.flatten().filter_map(|task| {
        let tid = task.file_name().to_str()?.parse::<u32>().ok()?;
        Some((tid, task.path()))
    }))
}

/// The CPUs of this machine, as `sched_getaffinity` gives them to this process.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a bit array, for which all zeroes is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads one bit of `set`, within CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Binds thread `tid` (0: the calling thread) to `cpus`.
fn bind(tid: u32, cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is a bit array, for which all zeroes is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET writes one bit of `set`; the CPUs come from allowed_cpus (below
        // CPU_SETSIZE).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let tid =
        libc::pid_t::try_from(tid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: sched_setaffinity reads size_of::<cpu_set_t>() bytes from `set`.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the threads of a benchmark run: the VMM's device threads on the last CPU, alone;
/// its other threads and the benchmark's own busy threads on the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinning {
    /// For the device threads.
    pub device: Vec<usize>,
    /// For everything else.
    pub rest: Vec<usize>,
}

impl Pinning {
    /// The plan for this machine; `None` with fewer than two CPUs.
    pub fn plan() -> Option<Self> {
        let cpus = allowed_cpus();
        let (last, rest) = cpus.split_last()?;
        (!rest.is_empty()).then(|| Self {
            device: vec![*last],
            rest: rest.to_vec(),
        })
    }

    /// Binds the threads of process `pid`: `cgvm-virtio*` to [`device`](Self::device), the
    /// others to [`rest`](Self::rest). Returns how many device threads were bound.
    pub fn apply(&self, pid: u32) -> Result<usize> {
        let tasks = tasks(pid).map_err(|e| format!("cannot list the VMM's threads: {e}"))?;
        let mut devices = 0;
        for (tid, task) in tasks {
            let Ok(comm) = fs::read_to_string(task.join("comm")) else {
                continue;
            };
            let device = kind_of(comm.trim_end()) == Kind::Device;
            let cpus = if device { &self.device } else { &self.rest };
            bind(tid, cpus).map_err(|e| format!("cannot pin the VMM's thread {tid}: {e}"))?;
            devices += usize::from(device);
        }
        Ok(devices)
    }

    /// Binds the calling thread to [`rest`](Self::rest).
    pub fn apply_here(&self) -> Result<()> {
        bind(0, &self.rest).map_err(|e| format!("cannot pin a benchmark thread: {e}"))
    }

    /// Binds the calling thread to [`device`](Self::device), beside the device threads.
    #[allow(dead_code)] // not every benchmark that includes this module uses it
    pub fn apply_here_device(&self) -> Result<()> {
        bind(0, &self.device).map_err(|e| format!("cannot pin a benchmark thread: {e}"))
    }

    /// "device thread on CPU 1, the rest on 0".
    pub fn describe(&self) -> String {
        let list = |c: &[usize]| {
            c.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "the VMM's device thread pinned to CPU {}, its other threads and the benchmark's \
             to CPU {}",
            list(&self.device),
            list(&self.rest)
        )
    }
}

/// A console line and what was measured when it arrived.
#[derive(Debug, Clone)]
pub struct Mark {
    /// The line, without its line end.
    pub line: String,
    /// The VMM's thread CPU time then (`None`: not a probe line, or the VMM was gone).
    pub cpu: Option<ThreadCpu>,
    /// When it arrived.
    pub at: Instant,
}

/// How a VMM run ended.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// User + system CPU time of the whole run (all threads, from wait4), seconds.
    pub cpu_s: f64,
    /// Wall-clock time from the start to the exit, seconds.
    pub wall_s: f64,
    /// Its console output (stdout).
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// A VMM running with its console (stdout) read line by line.
pub struct Vmm {
    child: Child,
    tracking: Arc<AtomicBool>,
    started: Instant,
    lines: Receiver<Mark>,
    stdout: Option<thread::JoinHandle<io::Result<String>>>,
    stderr: Option<thread::JoinHandle<io::Result<String>>>,
    waited: bool,
}

impl Vmm {
    /// Starts `program args...` with stdout and stderr piped.
    pub fn spawn(program: &std::path::Path, args: &[OsString]) -> Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let started = Instant::now();
        let tracker = Arc::new(CpuTracker::new(child.id()));
        let tracking = Arc::new(AtomicBool::new(true));
        {
            let (tracker, tracking) = (tracker.clone(), tracking.clone());
            thread::spawn(move || {
                while tracking.load(Ordering::Relaxed) && tracker.sample().is_some() {
                    thread::sleep(TRACK_PERIOD);
                }
            });
        }
        let (tx, lines) = mpsc::channel();
        let marks = tracker.clone();
        let out = child.stdout.take().ok_or("the VMM has no stdout pipe")?;
        let err = child.stderr.take().ok_or("the VMM has no stderr pipe")?;
        let stdout = thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut text = String::new();
            let mut line = Vec::new();
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    return Ok(text);
                }
                let decoded = String::from_utf8_lossy(&line);
                let trimmed = decoded.trim_end();
                let cpu = trimmed
                    .starts_with("probe: ")
                    .then(|| marks.sample())
                    .flatten();
                // The receiver may be gone (the benchmark gave up): keep draining.
                let _ = tx.send(Mark {
                    line: trimmed.to_string(),
                    cpu,
                    at: Instant::now(),
                });
                text.push_str(&decoded);
            }
        });
        let stderr = thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut err = err;
            err.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        });
        Ok(Self {
            child,
            tracking,
            started,
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
            waited: false,
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a console line that `wanted` accepts (earlier lines are
    /// passed over); `Err` when the time runs out or the console closes first.
    pub fn wait_line(&self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> Result<Mark> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(mark) if wanted(&mark.line) => return Ok(mark),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no such line within {} s", timeout.as_secs()))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the VMM's console closed before that line".to_string())
                }
            }
        }
    }

    /// Waits up to `timeout` for the guest's line that starts with `prefix` (`what`: that line,
    /// in the error); a FAIL line first, or none in time, is an error.
    pub fn wait_guest(&self, prefix: &str, timeout: Duration, what: &str) -> Result<Mark> {
        let mark = self
            .wait_line(|l| l.starts_with(prefix) || l.contains(" FAIL "), timeout)
            .map_err(|e| format!("waiting for {what}: {e}"))?;
        if !mark.line.starts_with(prefix) {
            return Err(format!("the guest failed: {}", mark.line));
        }
        Ok(mark)
    }

    /// Waits for the guest's ready line (starting with `prefix`), records it in `log`, then
    /// pins the VMM's threads as `pinning` says.
    pub fn wait_ready(
        &self,
        prefix: &str,
        log: &mut RunLog,
        pinning: Option<&Pinning>,
    ) -> Result<Mark> {
        let ready = self.wait_guest(prefix, READY_TIMEOUT, "the guest to get ready")?;
        log.ready = Some(ready.line.clone());
        if let Some(p) = pinning {
            p.apply(self.pid())?;
        }
        Ok(ready)
    }

    /// Waits for the guest's figures, its line starting with `prefix`, which a scenario of
    /// `seconds` gives after its ready line.
    pub fn wait_figures(&self, prefix: &str, seconds: u64) -> Result<Mark> {
        let timeout = Duration::from_secs(seconds) + RESULT_SLACK;
        self.wait_guest(prefix, timeout, "the guest's figures")
    }

    /// Ends a run once the benchmark's exchange with the guest gave `talked`: kills the VMM if
    /// that failed, waits for it to exit and records how in `log`. The error: `talked`'s, else
    /// an unsuccessful exit.
    pub fn conclude(mut self, talked: Result<()>, log: &mut RunLog) -> Result<()> {
        if talked.is_err() {
            self.kill();
        }
        let finished = self.finish()?;
        log.ended = Some((
            describe_status(finished.status),
            finished.cpu_s,
            finished.wall_s,
        ));
        log.stdout = finished.stdout;
        log.stderr = finished.stderr;
        talked?;
        if !finished.status.success() {
            return Err(format!(
                "the VMM ended with {}",
                describe_status(finished.status)
            ));
        }
        Ok(())
    }

    /// Kills the VMM (SIGKILL; it is our child and not yet waited for).
    pub fn kill(&mut self) {
        if !self.waited {
            let _ = self.child.kill();
        }
    }

    /// Waits for the VMM to exit: how it ended, and its console lines not waited for yet (with
    /// what was measured when each came).
    #[allow(dead_code)] // not every benchmark that includes this module uses it
    pub fn finish_with_marks(self) -> Result<(Finished, Vec<Mark>)> {
        // Ends when the console reader does, at the VMM's exit.
        let marks = self.lines.iter().collect();
        Ok((self.finish()?, marks))
    }

    /// Waits for the VMM to exit and collects its output.
    pub fn finish(mut self) -> Result<Finished> {
        let (status, usage) = wait_for(self.child.id())?;
        self.waited = true;
        self.tracking.store(false, Ordering::Relaxed);
        let wall_s = self.started.elapsed().as_secs_f64();
        let stdout = joined(self.stdout.take(), "VMM's stdout")?;
        let stderr = joined(self.stderr.take(), "VMM's stderr")?;
        Ok(Finished {
            status,
            cpu_s: cpu_seconds(&usage),
            wall_s,
            stdout,
            stderr,
        })
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.tracking.store(false, Ordering::Relaxed);
        if !self.waited {
            // A benchmark that gave up: the VMM must not outlive it.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn joined(reader: Option<thread::JoinHandle<io::Result<String>>>, what: &str) -> Result<String> {
    reader.map_or(Ok(String::new()), |reader| {
        crate::common::joined(reader, what)
    })
}

/// An exit status in words.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(libc::SIGSYS)) => format!(
            "killed by signal {} (SIGSYS: a seccomp filter refused a system call; --no-seccomp \
             runs the VMM without its filters)",
            libc::SIGSYS
        ),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

/// The value of `key=` in a line of `key=value` words, parsed.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// What the benchmarks that run the VMM for a time take on their command lines besides their
/// own options: `--seconds`, `--transports`, `--vmm`, `--kernel`, `--pin` and `--no-seccomp`.
#[derive(Debug)]
pub struct RunOptions {
    /// Seconds each scenario runs.
    pub seconds: u64,
    /// The virtio transports each scenario runs on.
    pub transports: Vec<Transport>,
    /// The VMM binary.
    pub vmm: PathBuf,
    /// The probe guest (`None`: build it).
    pub kernel: Option<PathBuf>,
    /// Give the VMM's device thread a CPU of its own ([`Pinning`]).
    pub pin: bool,
    /// Run the VMM with `--no-seccomp`.
    pub no_seccomp: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            seconds: 3,
            transports: Transport::ALL.to_vec(),
            vmm: PathBuf::from(env!("CARGO_BIN_EXE_cgvm")),
            kernel: None,
            pin: false,
            no_seccomp: false,
        }
    }
}

impl RunOptions {
    /// Applies `flag` if it is one of these, taking its value from `value()`; whether it was
    /// (`usage`: shown for an unknown transport).
    pub fn set(
        &mut self,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String>,
        usage: &str,
    ) -> Result<bool> {
        match flag {
            "--seconds" => self.seconds = parse_number(flag, &value()?)?,
            "--transports" => self.transports = Transport::parse_list(&value()?, usage)?,
            "--vmm" => self.vmm = PathBuf::from(value()?),
            "--kernel" => self.kernel = Some(PathBuf::from(value()?)),
            "--pin" => self.pin = true,
            "--no-seccomp" => self.no_seccomp = true,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks what every such benchmark needs: `--seconds` and `--transports` not empty.
    pub fn check(&self) -> Result<()> {
        at_least_one("--seconds", self.seconds)?;
        names_some("--transports", &self.transports, "transport")
    }

    /// Writes a report's first line: `cgvm WHAT benchmark: VMM, kernel KERNEL, N host CPUs`.
    pub fn write_title(&self, out: &mut String, what: &str, kernel: &Path) {
        let cpus = thread::available_parallelism().map_or(0, |n| n.get());
        let _ = writeln!(
            out,
            "cgvm {what} benchmark: {}, kernel {}, {cpus} host CPUs",
            self.vmm.display(),
            kernel.display()
        );
    }

    /// The arguments of `cgvm run` for one scenario on `transport`: the guest `kernel` and its
    /// `cmdline` (to which `probe.transport=T` is added), the `device` (a flag and its value),
    /// 1 vCPU, 128 MiB, the console on stdout and a time limit a minute past the scenario's.
    pub fn run_args(
        &self,
        kernel: &Path,
        transport: Transport,
        device: [OsString; 2],
        cmdline: &str,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["run".into()];
        if self.no_seccomp {
            args.push("--no-seccomp".into());
        }
        args.extend(["--kernel".into(), kernel.into()]);
        args.extend(transport.vmm_args());
        args.extend(device);
        let cmdline = format!("{cmdline} {}", transport.probe_word());
        for (flag, value) in [
            ("--cpus", "1".to_string()),
            ("--memory", "128".to_string()),
            ("--console", "tty".to_string()),
            ("--timeout", (self.seconds + 60).to_string()),
            ("--cmdline", cmdline),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        args
    }
}

/// The host before the first run: where the VMM's threads go (`--pin`) and how busy it is.
pub struct HostState {
    /// The threads' placement, if pinned.
    pub pinning: Option<Pinning>,
    /// The host's load averages.
    pub load: String,
}

impl HostState {
    /// The host now, with a placement planned if `pin` (applied by [`Vmm::wait_ready`]).
    pub fn now(pin: bool) -> Self {
        Self {
            pinning: if pin { Pinning::plan() } else { None },
            load: load_average(),
        }
    }
}

/// "load average before: L; PLACEMENT", for a report.
impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "load average before: {}; ", self.load)?;
        match &self.pinning {
            Some(p) => write!(f, "{}", p.describe()),
            None => write!(f, "threads not pinned"),
        }
    }
}

/// What a scenario's run records besides the benchmark's own figures.
#[derive(Debug, Default)]
pub struct RunLog {
    /// The guest's ready line.
    pub ready: Option<String>,
    /// The VMM's thread CPU from the ready line to the result line.
    pub cpu: Option<ThreadCpu>,
    /// Seconds from the ready line's arrival to the result line's.
    pub host_s: Option<f64>,
    /// Exit status, CPU and wall-clock time of the whole run.
    pub ended: Option<(String, f64, f64)>,
    /// Why the run failed.
    pub failure: Option<String>,
    /// The VMM's output.
    pub stdout: String,
    pub stderr: String,
}

impl RunLog {
    /// The guest's figures, `parse` of its `result` line (an error without them); records the
    /// VMM's thread CPU and the time from the `ready` line to it.
    pub fn figures<G>(
        &mut self,
        ready: &Mark,
        result: &Mark,
        parse: impl FnOnce(&str) -> Option<G>,
    ) -> Result<G> {
        let figures =
            parse(&result.line).ok_or_else(|| format!("no figures in {:?}", result.line))?;
        if let (Some(a), Some(b)) = (ready.cpu, result.cpu) {
            self.cpu = Some(b.since(&a));
        }
        self.host_s = Some(result.at.duration_since(ready.at).as_secs_f64());
        Ok(figures)
    }

    /// The vCPU threads' share of a CPU from the ready line to the result line
    /// ([`vcpu_share`]).
    pub fn vcpu_share(&self) -> String {
        vcpu_share(self.cpu, self.host_s.unwrap_or(0.0))
    }

    /// Checks the guest's clock: the `guest_ns` it measured between its ready and result lines
    /// (a part of that time) against the host's time between them. The probe's TSC rate may
    /// come from 10 ms of the PIT, which a vCPU thread kept off its CPU for a few ms on a busy
    /// host gets wrong; its figures are wrong by as much. The bounds are loose (the host's time
    /// holds the benchmark's own setup and ending): they catch a rate off by a third or so.
    pub fn check_clock(&self, guest_ns: u64) -> Result<()> {
        let Some(host_s) = self.host_s else {
            return Ok(());
        };
        clock_agrees(guest_ns as f64 / 1e9, host_s, CLOCK_BOUNDS)
    }

    /// Writes how the VMM ended and, for a failed run, why, with the last lines of the VMM's
    /// output.
    pub fn write_end(&self, out: &mut String) {
        if let Some((status, cpu_s, wall_s)) = &self.ended {
            let window = self.host_s.map_or(String::new(), |s| {
                format!("; {s:.3} s from the guest's ready line to its figures")
            });
            let _ = writeln!(
                out,
                "    VMM: {status}, {cpu_s:.2} s CPU in {wall_s:.2} s wall-clock (boot \
                 included){window}"
            );
        }
        if let Some(why) = &self.failure {
            let _ = writeln!(out, "    FAILED: {why}");
            for line in tail(&self.stdout, TAIL_LINES) {
                let _ = writeln!(out, "    stdout: {line}");
            }
            for line in tail(&self.stderr, TAIL_LINES) {
                let _ = writeln!(out, "    stderr: {line}");
            }
        }
    }
}
