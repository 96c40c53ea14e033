//! What the benchmark programs share: walking the command line, a scratch directory,
//! building the probe guest, waiting for the VMM (wait4) and reading its threads' CPU time.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::thread;

/// A benchmark's error: a sentence for the user.
pub type Result<T> = std::result::Result<T, String>;

/// What a command line asks for.
pub enum Request<O> {
    Run(O),
    Help,
}

/// Walks `--flag [value]` arguments into `opts`: `set(opts, flag, value)` applies a flag and
/// says whether it knows it, where `value()` takes the next argument as the flag's value.
/// `--help` or `-h` stops the walk; an unknown flag is an error that shows `usage`; the `--bench`
/// that `cargo bench` passes to benchmarks without a harness is skipped.
pub fn parse_flags<O>(
    args: impl IntoIterator<Item = OsString>,
    usage: &str,
    mut opts: O,
    mut set: impl FnMut(&mut O, &str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
) -> Result<Request<O>> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let mut value = || -> Result<String> {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value"))?
                .into_string()
                .map_err(|v| format!("the value of {arg}, {v:?}, is not UTF-8"))
        };
        match arg.as_str() {
            "--help" | "-h" => return Ok(Request::Help),
            "--bench" => {}
            flag => {
                if !set(&mut opts, flag, &mut value)? {
                    return Err(format!("unknown argument {flag:?}\n{usage}"));
                }
            }
        }
    }
    Ok(Request::Run(opts))
}

/// [`parse_flags`], then `check` on the options of a run (not for `--help`): its error is the
/// command line's.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn parse_checked<O>(
    args: impl IntoIterator<Item = OsString>,
    usage: &str,
    opts: O,
    set: impl FnMut(&mut O, &str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
    check: impl FnOnce(&O) -> Result<()>,
) -> Result<Request<O>> {
    let request = parse_flags(args, usage, opts, set)?;
    if let Request::Run(opts) = &request {
        check(opts)?;
    }
    Ok(request)
}

/// The items of `all` that the comma-separated `list` names (`name`: an item's), in the list's
/// order; an unknown name is an error that shows `usage` (`what`: what an item is).
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn pick<'a, T>(
    list: &str,
    all: &'a [T],
    name: impl Fn(&T) -> &str,
    what: &str,
    usage: &str,
) -> Result<Vec<&'a T>> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|wanted| {
            all.iter()
                .find(|item| name(item) == wanted)
                .ok_or_else(|| format!("unknown {what} {wanted:?}\n{usage}"))
        })
        .collect()
}

/// `Err("OPTION must be at least 1")` for a zero `value`.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn at_least_one(option: &str, value: u64) -> Result<()> {
    if value == 0 {
        return Err(format!("{option} must be at least 1"));
    }
    Ok(())
}

/// `Err("OPTION names no WHAT")` for an empty `list`.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn names_some<T>(option: &str, list: &[T], what: &str) -> Result<()> {
    if list.is_empty() {
        return Err(format!("{option} names no {what}"));
    }
    Ok(())
}

/// A benchmark's `main` once its command line is parsed: prints `usage` for `--help`, or runs
/// `bench`. A bad command line is exit status 2; `bench` failing, or finding a fault, status 1.
/// `who` names the benchmark in messages.
pub fn finish<O>(
    who: &str,
    usage: &str,
    request: Result<Request<O>>,
    bench: impl FnOnce(&O) -> Result<bool>,
) -> ExitCode {
    let opts = match request {
        Ok(Request::Run(opts)) => opts,
        Ok(Request::Help) => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{who}: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{who}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A directory removed (best effort) when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory `<parent>/cgvm-<name>.<pid>`.
    pub fn new(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(format!("cgvm-{name}.{}", std::process::id()));
        fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds the probe guest into `dir` with resources/probe-guest/build.sh and returns the
/// ELF's path; `who` names the benchmark in the message.
pub fn build_probe_guest(dir: &Path, who: &str) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/probe-guest/build.sh");
    if !script.is_file() {
        return Err(format!(
            "{} does not exist: pass the guest with --kernel PATH",
            script.display()
        ));
    }
    let elf = dir.join("probe.elf");
    eprintln!("{who}: building the probe guest with {}", script.display());
    let status = Command::new(&script)
        .arg(&elf)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed ({status})", script.display()));
    }
    if !elf.is_file() {
        return Err(format!("{} made no {}", script.display(), elf.display()));
    }
    Ok(elf)
}

/// Checks that the VMM binary `vmm` exists.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn check_vmm(vmm: &Path) -> Result<()> {
    if !vmm.is_file() {
        return Err(format!(
            "{} does not exist: build it (cargo build --release) or pass --vmm PATH",
            vmm.display()
        ));
    }
    Ok(())
}

/// The guest: `kernel` (`--kernel`) if given, else the probe guest built into `dir` (`who`
/// names the benchmark in the message).
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn kernel_or_probe(kernel: Option<&Path>, dir: &Path, who: &str) -> Result<PathBuf> {
    match kernel {
        Some(kernel) => Ok(kernel.to_path_buf()),
        None => build_probe_guest(dir, who),
    }
}

/// A virtio transport of `cgvm run --transport`, as a benchmark asks for it and checks that the
/// probe guest used it.
#[allow(dead_code)] // not every benchmark that includes this module uses it
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio.
    Mmio,
    /// virtio-pci (MSI-X, behind a PCI host bridge).
    Pci,
}

#[allow(dead_code)] // not every benchmark that includes this module uses it
impl Transport {
    /// Every transport, in the order of `--transports`' default.
    pub const ALL: [Transport; 2] = [Transport::Mmio, Transport::Pci];

    /// The name `cgvm run --transport` and `probe.transport` take.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mmio => "mmio",
            Self::Pci => "pci",
        }
    }

    /// `--transport NAME`, for `cgvm run`.
    pub fn vmm_args(self) -> [OsString; 2] {
        ["--transport".into(), self.name().into()]
    }

    /// The guest command line's `probe.transport=NAME`: the probe takes its devices from this
    /// transport only.
    pub fn probe_word(self) -> String {
        format!("probe.transport={}", self.name())
    }

    /// The transports `--transports LIST` names, in its order.
    pub fn parse_list(list: &str, usage: &str) -> Result<Vec<Transport>> {
        let picked = pick(list, &Self::ALL, |t| t.name(), "transport", usage)?;
        Ok(picked.into_iter().copied().collect())
    }
}

/// The transport of the device that a probe line names first: "virtio-mmio at 0xc0001000" and
/// "virtio-net at 0xc0001000" are virtio-mmio, "virtio-pci 00:01.0" and "virtio-net at 00:01.0"
/// virtio-pci (see resources/probe-guest/README.md); `None` if it names none.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn transport_named(line: &str) -> Option<Transport> {
    let is_bdf = |s: &str| {
        let b = s.as_bytes();
        b.len() >= 7
            && b[2] == b':'
            && b[5] == b'.'
            && [0, 1, 3, 4, 6].iter().all(|&i| b[i].is_ascii_hexdigit())
    };
    line.match_indices("virtio-").find_map(|(i, _)| {
        let rest = &line[i + "virtio-".len()..];
        if let Some(bdf) = rest.strip_prefix("pci ") {
            return is_bdf(bdf).then_some(Transport::Pci);
        }
        let (_kind, place) = rest.split_once(' ')?;
        let place = place.strip_prefix("at ")?;
        if place.starts_with("0x") {
            Some(Transport::Mmio)
        } else {
            is_bdf(place).then_some(Transport::Pci)
        }
    })
}

/// Checks that the probe's `probe: CHECK ok (...)` line in `console` (the VMM's console
/// output) names a device on `wanted`: the run used the transport it asked for.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn check_transport(console: &str, check: &str, wanted: Transport) -> Result<()> {
    let prefix = format!("probe: {check} ok ");
    let line = console
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with(&prefix))
        .ok_or_else(|| format!("no `{}` line from the probe", prefix.trim_end()))?;
    match transport_named(line) {
        Some(seen) if seen == wanted => Ok(()),
        Some(seen) => Err(format!(
            "asked for virtio-{}, but the probe used virtio-{}: {line}",
            wanted.name(),
            seen.name()
        )),
        None => Err(format!("the probe's line names no transport: {line}")),
    }
}

/// A figure against the same figure on another transport (`base`), for a "vs mmio" column:
/// "+12 %", "-3 %"; "-" without both.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn relative(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:+.0} %", (v / b - 1.0) * 100.0),
        _ => "-".to_string(),
    }
}

/// The host's load averages (`/proc/loadavg`'s first three fields), to show how busy the
/// machine was.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_string())
}

/// How far a time the guest measured may be from the host's time around it: at most `over` (a
/// fraction) plus `slack_s` longer, at least `under` plus `slack_s` shorter.
#[allow(dead_code)] // not every benchmark that includes this module uses it
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockBounds {
    pub over: f64,
    pub under: f64,
    pub slack_s: f64,
}

/// Checks a time the guest measured with its TSC, `guest_s`, against the host's, `host_s`,
/// between the guest's lines around it: the probe's TSC rate (see its `tsc` module) is wrong
/// when it timed the PIT while its vCPU thread was kept off the CPU (a busy host), and its
/// figures are wrong by as much.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn clock_agrees(guest_s: f64, host_s: f64, bounds: ClockBounds) -> Result<()> {
    let ok = guest_s <= host_s * (1.0 + bounds.over) + bounds.slack_s
        && guest_s >= host_s * (1.0 - bounds.under) - bounds.slack_s;
    if ok {
        return Ok(());
    }
    Err(format!(
        "the guest's clock is off: it timed {guest_s:.3} s where the host saw {host_s:.3} s \
         between its lines, so its figures are off as much (its TSC rate, timed against the \
         PIT, is wrong when its vCPU waited for a CPU then: run it on a quieter host)"
    ))
}

/// Parses the number given to `option`.
pub fn parse_number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| format!("{option} wants a number, not {value:?}"))
}

/// The line `--timeline` (and `--boot-timer`) prints with the events' CLOCK_MONOTONIC times.
/// (The timeline items are unused by the block benchmark, which includes this module too.)
#[allow(dead_code)]
const TIMELINE_PREFIX: &str = "cgvm: timeline-monotonic-ns ";

/// The VMM's events, CLOCK_MONOTONIC nanoseconds; `None`: the event did not happen.
#[allow(dead_code)]
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Timeline {
    /// The VMM process started.
    pub vmm_start: Option<u64>,
    /// vCPU 0 first entered the guest.
    pub first_instruction: Option<u64>,
    /// The guest wrote "boot complete" to the boot timer.
    pub boot_complete: Option<u64>,
    /// The run ended.
    pub guest_stop: Option<u64>,
}

/// Finds and parses the timeline line in the VMM's stderr.
#[allow(dead_code)]
pub fn parse_timeline(stderr: &str) -> Option<Timeline> {
    let line = stderr
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(TIMELINE_PREFIX))?;
    let mut timeline = Timeline::default();
    for field in line.split_whitespace() {
        let (key, value) = field.split_once('=')?;
        let value = match value {
            "-" => None,
            v => Some(v.parse::<u64>().ok()?),
        };
        match key {
            "vmm-start" => timeline.vmm_start = value,
            "first-instruction" => timeline.first_instruction = value,
            "boot-complete" => timeline.boot_complete = value,
            "guest-stop" => timeline.guest_stop = value,
            _ => {} // a newer VMM's event: not measured here
        }
    }
    Some(timeline)
}

/// The median of sorted values (the mean of the middle two for an even count).
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The p-th percentile (0 < p <= 100) of sorted values by the nearest-rank method: the smallest
/// value that at least p % of the values are less than or equal to.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The last `n` non-empty lines of `text`.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Reads a pipe to its end on a thread, so that a chatty child never blocks on a full pipe
/// while the benchmark waits for it.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn drain<R: io::Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<io::Result<String>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    })
}

/// What a reader thread (`what`: of which pipe, in the error) gave.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn joined<T>(reader: thread::JoinHandle<io::Result<T>>, what: &str) -> Result<T> {
    reader
        .join()
        .map_err(|_| format!("the {what} reader panicked"))?
        .map_err(|e| format!("reading the {what}: {e}"))
}

/// Waits for the child `pid` with wait4: its exit status and resource usage.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn wait_for(pid: u32) -> Result<(ExitStatus, libc::rusage)> {
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

/// User + system CPU time of a [`wait_for`]'s usage, seconds.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn cpu_seconds(usage: &libc::rusage) -> f64 {
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU time (user + system) of the VMM's threads, seconds, by kind.
#[allow(dead_code)] // not every benchmark that includes this module uses it
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ThreadCpu {
    /// `cgvm-vcpu*`.
    pub vcpu_s: f64,
    /// `cgvm-virtio*`, the device threads (and, for the block benchmark, io_uring's `iou-*`
    /// workers).
    pub device_s: f64,
    /// The rest (the VMM thread).
    pub other_s: f64,
}

#[allow(dead_code)] // not every benchmark that includes this module uses it
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

/// The vCPU threads' CPU time over `seconds` of wall-clock time, as a percentage ("-" without
/// it): the probe polls all the time on one vCPU, so much under 100 % means that vCPU waited for
/// a CPU (a busy host), and the figures of that time are the worse for it.
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn vcpu_share(cpu: Option<ThreadCpu>, seconds: f64) -> String {
    match cpu {
        Some(c) if seconds > 0.0 => format!("{:.0} %", c.vcpu_s / seconds * 100.0),
        _ => "-".to_string(),
    }
}

/// Clock ticks per second of `/proc/.../stat` times (100 where sysconf does not say).
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_s > 0 {
        ticks_per_s as f64
    } else {
        100.0
    }
}

/// A thread's name and utime + stime (clock ticks) from its `/proc/.../stat` line: `TID
/// (COMM) STATE ...`, utime and stime the 14th and 15th fields (COMM may hold spaces and
/// parentheses, so fields are counted from the last ')').
#[allow(dead_code)] // not every benchmark that includes this module uses it
pub fn parse_task_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((comm, utime + stime))
}
