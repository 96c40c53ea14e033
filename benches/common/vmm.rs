//! Running the VMM under a benchmark that talks to the guest while it runs (the network and
//! vsock benchmarks): the VMM's console lines arrive as they are printed, each probe line
//! marked with the CPU time of the VMM's threads (from `/proc/PID/task/*/stat`, threads that
//! ended included: [`CpuTracker`]) when it came, so that the benchmark can act on a line
//! (`probe: netbench ready ...`) and measure the CPU spent between two lines; `wait4` gives
//! the whole run's CPU time at the end. [`Pinning`] gives the VMM's device thread a CPU of its
//! own on a small machine.
//!
//! Included by the benchmarks that need it with `#[path = "common/vmm.rs"] mod vmm;` (beside
//! `mod common;`), so that the others do not compile it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::Result;

/// CPU time (user + system) of the VMM's threads, seconds, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ThreadCpu {
    /// `cgvm-vcpu*`.
    pub vcpu_s: f64,
    /// `cgvm-virtio*`: the device threads.
    pub device_s: f64,
    /// The rest (the VMM thread).
    pub other_s: f64,
}

impl ThreadCpu {
    /// `self - earlier`: what was spent in between (threads that ended in between are lost).
    pub fn since(&self, earlier: &ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            vcpu_s: self.vcpu_s - earlier.vcpu_s,
            device_s: self.device_s - earlier.device_s,
            other_s: self.other_s - earlier.other_s,
        }
    }

    /// All threads.
    pub fn total_s(&self) -> f64 {
        self.vcpu_s + self.device_s + self.other_s
    }
}

/// What kind of VMM thread a name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vcpu,
    Device,
    Other,
}

fn kind_of(comm: &str) -> Kind {
    if comm.starts_with("cgvm-vcpu") {
        Kind::Vcpu
    } else if comm.starts_with("cgvm-virtio") {
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
        // SAFETY: sysconf only reads a configuration value.
        let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            pid,
            ticks_per_s: if ticks_per_s > 0 {
                ticks_per_s as f64
            } else {
                100.0
            },
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Looks at the threads now; the CPU time of every thread seen so far, by kind (`None`
    /// once the process is gone).
    pub fn sample(&self) -> Option<ThreadCpu> {
        let tasks = fs::read_dir(format!("/proc/{}/task", self.pid)).ok()?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
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
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(|e| format!("cannot list the VMM's threads: {e}"))?;
        let mut devices = 0;
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(comm) = fs::read_to_string(task.path().join("comm")) else {
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

/// A thread's name and utime + stime (clock ticks) from its `/proc/.../stat` line: `TID
/// (COMM) STATE ...`, utime and stime the 14th and 15th fields (COMM may hold spaces and
/// parentheses, so fields are counted from the last ')').
pub fn parse_task_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

/// A console line and what was measured when it arrived.
#[derive(Debug, Clone)]
pub struct Mark {
    /// The line, without its line end.
    pub line: String,
    /// The VMM's thread CPU time then (`None`: not a probe line, or the VMM was gone).
    pub cpu: Option<ThreadCpu>,
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

    /// Kills the VMM (SIGKILL; it is our child and not yet waited for).
    pub fn kill(&mut self) {
        if !self.waited {
            let _ = self.child.kill();
        }
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
            cpu_s: timeval_s(usage.ru_utime) + timeval_s(usage.ru_stime),
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
    let Some(reader) = reader else {
        return Ok(String::new());
    };
    reader
        .join()
        .map_err(|_| format!("the {what} reader panicked"))?
        .map_err(|e| format!("reading the {what}: {e}"))
}

/// Waits for the child `pid` with wait4: its exit status and resource usage.
fn wait_for(pid: u32) -> Result<(ExitStatus, libc::rusage)> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a C struct of integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our child, not waited for yet (std's Child never waits on drop);
        // `status` and `usage` are valid and writable for the whole call.
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if waited == pid {
            return Ok((ExitStatus::from_raw(status), usage));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(format!("wait4 on the VMM (pid {pid}): {err}"));
        }
    }
}

fn timeval_s(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
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

/// The last `n` non-empty lines of `text`.
pub fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The host's load averages (`/proc/loadavg`'s first three fields), to show how busy the
/// machine was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The value of `key=` in a line of `key=value` words, parsed.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}
