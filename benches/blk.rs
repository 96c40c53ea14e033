//! Block benchmark: how many virtio-blk requests the VMM serves, per engine, against what the
//! host itself gets from the same file with fio.
//!
//! ```text
//! cargo bench --bench blk -- [--seconds N] [--qd N] [--engines sync,uring] [--file PATH]
//!                            [--workloads a,b] [--vmm PATH] [--kernel PATH]
//! ```
//!
//! For each engine, one run of `VMM run --kernel PROBE --disk FILE,persist,engine=E --cmdline
//! "probe.tests=blkbench probe.bench_ms=... probe.bench_qd=..." --cpus 2 --memory 512 --console
//! tty --timeout T`: the probe guest's `blkbench` check drives the disk for N seconds per
//! workload (4 KiB random reads, 4 KiB random writes, 1 MiB sequential reads), its requests
//! kept in flight at the queue depth, and prints `probe: blkbench NAME ops=N bytes=B ns=T
//! qd=Q` (T from the guest's TSC). `wait4` gives the VMM process's CPU time (user + system, all
//! its threads); CPU per operation is that over the run's operations, boot included. As each
//! probe line arrives, the benchmark also reads the CPU time of the VMM's threads from
//! `/proc/PID/task/*/stat`, so that each workload gets the CPU its device thread (and io_uring
//! workers) spent per operation, apart from the vCPU threads (which the polling probe keeps
//! busy all the time).
//!
//! Then the ceiling: `fio` on the host on the same file, the same workloads and queue depths,
//! `--ioengine=io_uring --direct=0 --invalidate=0`: buffered I/O from the host page cache, as
//! the VMM does (it opens disks without O_DIRECT). The file is read once before the runs so
//! that it is in the page cache for everyone, and synced after every run so that dirty pages
//! from the write workload do not spill into the next one.
//!
//! Without `--file`, a 1 GiB file of non-zero data (not sparse: reads hit real blocks) is made
//! in a temporary directory under the target directory and removed at the end. Without
//! `--kernel`, the probe guest is built with `resources/probe-guest/build.sh` into a temporary
//! directory. Without fio on the host, the VMM's figures are printed alone. A failed run is
//! reported, and the benchmark then exits with status 1, after printing what it has.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::{env, thread};

mod common;

use common::{
    at_least_one, check_vmm, clock_ticks_per_s, cpu_seconds, kernel_or_probe, names_some,
    parse_checked, parse_number, parse_task_stat, pick, tail, wait_for, Request, Result, TempDir,
    ThreadCpu,
};

const USAGE: &str = "\
usage: cargo bench --bench blk -- [OPTIONS]
  --seconds N         seconds per workload (default 5, at least 1)
  --qd N              requests in flight (default 32; 1 MiB reads use at most 8)
  --engines LIST      the VMM's disk engines to measure, comma-separated (default sync,uring)
  --workloads LIST    rand-read-4k, rand-write-4k, seq-read-1m, comma-separated (default all)
  --file PATH         the disk image, written to (default: a 1 GiB file of non-zero data in a
                      temporary directory under the target directory, removed at the end)
  --vmm PATH          the VMM binary (default: the cgvm that cargo built for this benchmark)
  --kernel PATH       the probe guest (default: build it with resources/probe-guest/build.sh)
  --help              this text";

/// Every workload the probe knows: its name, fio's `--rw`, `--bs`, and whether it writes.
const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "rand-read-4k",
        fio_rw: "randread",
        fio_bs: "4k",
        write: false,
    },
    Workload {
        name: "rand-write-4k",
        fio_rw: "randwrite",
        fio_bs: "4k",
        write: true,
    },
    Workload {
        name: "seq-read-1m",
        fio_rw: "read",
        fio_bs: "1m",
        write: false,
    },
];
/// The probe's limit on 1 MiB requests in flight (its 8 MiB of DMA buffers).
const SEQ_MAX_QD: u32 = 8;
/// The default disk image's size.
const DEFAULT_FILE_BYTES: u64 = 1 << 30;
/// The VMM's time limit for one run is at least this, seconds.
const MIN_RUN_TIMEOUT_S: u64 = 120;
/// How many lines of a failed run's output are shown.
const TAIL_LINES: usize = 8;
/// The probe's line prefix for this check.
const PROBE_PREFIX: &str = "probe: blkbench ";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Workload {
    name: &'static str,
    fio_rw: &'static str,
    fio_bs: &'static str,
    write: bool,
}

// --- options ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Options {
    seconds: u64,
    qd: u32,
    engines: Vec<String>,
    workloads: Vec<&'static Workload>,
    file: Option<PathBuf>,
    vmm: PathBuf,
    kernel: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seconds: 5,
            qd: 32,
            engines: vec!["sync".to_string(), "uring".to_string()],
            workloads: WORKLOADS.iter().collect(),
            file: None,
            vmm: PathBuf::from(env!("CARGO_BIN_EXE_cgvm")),
            kernel: None,
        }
    }
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Request<Options>> {
    let set = |opts: &mut Options, flag: &str, value: &mut dyn FnMut() -> Result<String>| {
        match flag {
            "--seconds" => opts.seconds = parse_number(flag, &value()?)?,
            "--qd" => opts.qd = parse_number(flag, &value()?)?,
            "--engines" => opts.engines = parse_list(&value()?),
            "--workloads" => {
                opts.workloads = pick(&value()?, &WORKLOADS, |w| w.name, "workload", USAGE)?;
            }
            "--file" => opts.file = Some(PathBuf::from(value()?)),
            "--vmm" => opts.vmm = PathBuf::from(value()?),
            "--kernel" => opts.kernel = Some(PathBuf::from(value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    parse_checked(args, USAGE, Options::default(), set, |opts| {
        at_least_one("--seconds", opts.seconds)?;
        if !(1..=256).contains(&opts.qd) {
            return Err("--qd must be 1..=256".to_string());
        }
        names_some("--engines", &opts.engines, "engine")?;
        if let Some(e) = opts
            .engines
            .iter()
            .find(|e| !["sync", "uring"].contains(&e.as_str()))
        {
            return Err(format!("unknown engine {e:?} (sync or uring)"));
        }
        names_some("--workloads", &opts.workloads, "workload")
    })
}

fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// --- files --------------------------------------------------------------------------------------

/// Writes `bytes` of non-zero, non-repeating data to a new file at `path` and syncs it.
fn make_disk_image(path: &Path, bytes: u64) -> Result<()> {
    eprintln!(
        "blk bench: writing a {} MiB disk image {}",
        bytes >> 20,
        path.display()
    );
    let fail = |e: io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = File::create(path).map_err(fail)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = 0u64;
    while written < bytes {
        for word in chunk.chunks_exact_mut(8) {
            // xorshift64: never 0, so no 8-byte word of the image is zero.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = (bytes - written).min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).map_err(fail)?;
        written += n as u64;
    }
    file.sync_all().map_err(fail)
}

/// Reads the whole file (into the host page cache); its size.
fn warm_page_cache(path: &Path) -> Result<u64> {
    let fail = |e: io::Error| format!("cannot read {}: {e}", path.display());
    let mut file = File::open(path).map_err(fail)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
    }
}

/// Writes the file's dirty pages back (between runs).
fn sync_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

// --- one VMM run --------------------------------------------------------------------------------

/// What the probe reported for one workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Measured {
    ops: u64,
    bytes: u64,
    ns: u64,
    qd: u32,
}

impl Measured {
    fn iops(&self) -> f64 {
        self.ops as f64 * 1e9 / self.ns.max(1) as f64
    }

    fn mib_s(&self) -> f64 {
        self.bytes as f64 * 1e9 / self.ns.max(1) as f64 / (1u64 << 20) as f64
    }
}

/// A workload's line from the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProbeLine {
    Measured(String, Measured),
    Skipped(String, String),
    Ok(String),
    Fail(String),
}

/// Parses a `probe: blkbench ...` line (`None` for any other line).
fn parse_probe_line(line: &str) -> Option<ProbeLine> {
    let rest = line.trim_end().strip_prefix(PROBE_PREFIX)?;
    if let Some(details) = rest.strip_prefix("ok ") {
        return Some(ProbeLine::Ok(details.to_string()));
    }
    if let Some(why) = rest.strip_prefix("FAIL ") {
        return Some(ProbeLine::Fail(why.to_string()));
    }
    let (name, fields) = rest.split_once(' ')?;
    if let Some(why) = fields.strip_prefix("skipped ") {
        return Some(ProbeLine::Skipped(name.to_string(), why.to_string()));
    }
    let (mut ops, mut bytes, mut ns, mut qd) = (None, None, None, None);
    for field in fields.split_whitespace() {
        let (key, value) = field.split_once('=')?;
        match key {
            "ops" => ops = value.parse().ok(),
            "bytes" => bytes = value.parse().ok(),
            "ns" => ns = value.parse().ok(),
            "qd" => qd = value.parse().ok(),
            _ => {} // a newer probe's figure
        }
    }
    Some(ProbeLine::Measured(
        name.to_string(),
        Measured {
            ops: ops?,
            bytes: bytes?,
            ns: ns?,
            qd: qd?,
        },
    ))
}

/// What one VMM run gave.
#[derive(Debug)]
struct VmmRun {
    engine: String,
    status: ExitStatus,
    /// User + system CPU time of the VMM process (all threads), seconds.
    cpu_s: f64,
    /// Wall-clock seconds from spawn to exit.
    wall_s: f64,
    /// The probe's lines for this check, in order.
    lines: Vec<ProbeLine>,
    /// Per workload: the CPU time of the VMM's threads while it ran (from the probe line
    /// before its own to its own).
    workload_cpu: Vec<(String, ThreadCpu)>,
    stdout: String,
    stderr: String,
}

impl VmmRun {
    /// The CPU time the device thread (and io_uring workers) spent per operation of
    /// `workload`, µs.
    fn device_us_per_op(&self, workload: &str) -> Option<f64> {
        let ops = self.measured(workload)?.ops;
        let cpu = self
            .workload_cpu
            .iter()
            .find_map(|(name, cpu)| (name == workload).then_some(cpu))?;
        (ops > 0).then(|| cpu.device_s * 1e6 / ops as f64)
    }

    fn measured(&self, workload: &str) -> Option<&Measured> {
        self.lines.iter().find_map(|l| match l {
            ProbeLine::Measured(name, m) if name == workload => Some(m),
            _ => None,
        })
    }

    fn skipped(&self, workload: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            ProbeLine::Skipped(name, why) if name == workload => Some(why.as_str()),
            _ => None,
        })
    }

    fn total_ops(&self) -> u64 {
        self.lines
            .iter()
            .map(|l| match l {
                ProbeLine::Measured(_, m) => m.ops,
                _ => 0,
            })
            .sum()
    }

    /// The nanoseconds the probe measured, all workloads.
    fn total_probe_s(&self) -> f64 {
        self.lines
            .iter()
            .map(|l| match l {
                ProbeLine::Measured(_, m) => m.ns as f64 / 1e9,
                _ => 0.0,
            })
            .sum()
    }

    /// The VMM's CPU time per operation, µs (boot included).
    fn cpu_us_per_op(&self) -> Option<f64> {
        let ops = self.total_ops();
        (ops > 0).then(|| self.cpu_s * 1e6 / ops as f64)
    }

    /// Why the run counts as failed, if it does.
    fn failure(&self, workloads: &[&Workload]) -> Option<String> {
        if !self.status.success() {
            return Some(describe_status(self.status));
        }
        if let Some(why) = self.lines.iter().find_map(|l| match l {
            ProbeLine::Fail(why) => Some(why),
            _ => None,
        }) {
            return Some(format!("the probe's check failed: {why}"));
        }
        if let Some(w) = workloads
            .iter()
            .find(|w| self.measured(w.name).is_none() && self.skipped(w.name).is_none())
        {
            return Some(format!("no figures for {} in the probe's output", w.name));
        }
        None
    }
}

/// The guest command line for the probe.
fn probe_cmdline(opts: &Options) -> String {
    let names: Vec<&str> = opts.workloads.iter().map(|w| w.name).collect();
    format!(
        "probe.tests=blkbench probe.bench_ms={} probe.bench_qd={} probe.bench_workloads={}",
        opts.seconds * 1000,
        opts.qd,
        names.join(",")
    )
}

/// The arguments of `cgvm run` for one engine.
fn cgvm_args(opts: &Options, kernel: &Path, file: &Path, engine: &str) -> Vec<OsString> {
    let mut disk = OsString::from(file);
    disk.push(format!(",persist,engine={engine}"));
    let timeout = (opts.seconds * opts.workloads.len() as u64 + 60).max(MIN_RUN_TIMEOUT_S);
    let mut args: Vec<OsString> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.into(),
        "--disk".into(),
        disk,
    ];
    for (flag, value) in [
        ("--cmdline", probe_cmdline(opts)),
        ("--cpus", "2".to_string()),
        ("--memory", "512".to_string()),
        ("--console", "tty".to_string()),
        ("--timeout", timeout.to_string()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args
}

/// The CPU time of `pid`'s threads now, from `/proc/PID/task/*/stat` (`None` once it is gone).
fn thread_cpu(pid: u32) -> Option<ThreadCpu> {
    let ticks_per_s = clock_ticks_per_s();
    let mut cpu = ThreadCpu::default();
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let Some((comm, ticks)) = parse_task_stat(&stat) else {
            continue;
        };
        let seconds = ticks as f64 / ticks_per_s;
        if comm.starts_with("cgvm-vcpu") {
            cpu.vcpu_s += seconds;
        } else if comm.starts_with("cgvm-virtio") || comm.starts_with("iou-") {
            cpu.device_s += seconds;
        } else {
            cpu.other_s += seconds;
        }
    }
    Some(cpu)
}

/// The VMM's console output, and the CPU time of its threads when each probe line of interest
/// (`probe: started`, then this check's) arrived.
type Console = (String, Vec<(String, Option<ThreadCpu>)>);

/// Reads the VMM's console (stdout) on a thread, line by line, taking [`thread_cpu`] of `pid`
/// at the probe's lines.
fn read_console<R: Read + Send + 'static>(
    pipe: R,
    pid: u32,
) -> thread::JoinHandle<io::Result<Console>> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut text = String::new();
        let mut marks = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok((text, marks));
            }
            let decoded = String::from_utf8_lossy(&line);
            let trimmed = decoded.trim_end();
            if trimmed.starts_with("probe: started") || trimmed.starts_with(PROBE_PREFIX) {
                marks.push((trimmed.to_string(), thread_cpu(pid)));
            }
            text.push_str(&decoded);
        }
    })
}

/// Per measured workload, the thread CPU time from the mark before its line to its line.
fn workload_cpu(marks: &[(String, Option<ThreadCpu>)]) -> Vec<(String, ThreadCpu)> {
    let mut out = Vec::new();
    for pair in marks.windows(2) {
        let (Some(before), (line, Some(after))) = (pair[0].1, (&pair[1].0, pair[1].1)) else {
            continue;
        };
        if let Some(ProbeLine::Measured(name, _)) = parse_probe_line(line) {
            out.push((name, after.since(&before)));
        }
    }
    out
}

/// Drains a pipe on a thread, so that a chatty child never blocks on it while we wait.
fn drain<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<io::Result<String>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    })
}

fn joined<T>(reader: thread::JoinHandle<io::Result<T>>, what: &str) -> Result<T> {
    reader
        .join()
        .map_err(|_| format!("the {what} reader panicked"))?
        .map_err(|e| format!("reading the {what}: {e}"))
}

/// Runs the VMM once with `engine` and measures it.
fn run_vmm(opts: &Options, kernel: &Path, file: &Path, engine: &str) -> Result<VmmRun> {
    eprintln!("blk bench: engine {engine}: booting the probe guest");
    let mut command = Command::new(&opts.vmm);
    command
        .args(cgvm_args(opts, kernel, file, engine))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = std::time::Instant::now();
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", opts.vmm.display()))?;
    let stdout = read_console(
        child.stdout.take().ok_or("the VMM has no stdout pipe")?,
        child.id(),
    );
    let stderr = drain(child.stderr.take().ok_or("the VMM has no stderr pipe")?);
    let (status, usage) = wait_for(child.id())?;
    let wall_s = started.elapsed().as_secs_f64();
    let (stdout, marks) = joined(stdout, "VMM's stdout")?;
    let stderr = joined(stderr, "VMM's stderr")?;
    Ok(VmmRun {
        engine: engine.to_string(),
        status,
        cpu_s: cpu_seconds(&usage),
        wall_s,
        lines: stdout.lines().filter_map(parse_probe_line).collect(),
        workload_cpu: workload_cpu(&marks),
        stdout,
        stderr,
    })
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

// --- fio ----------------------------------------------------------------------------------------

/// fio's figures for one workload.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FioResult {
    iops: f64,
    bytes_per_s: f64,
    /// User + system CPU per I/O, µs.
    cpu_us_per_op: Option<f64>,
    qd: u32,
}

/// Whether fio can be run.
fn fio_available() -> bool {
    Command::new("fio")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs fio for `w` on `file` at queue depth `qd` for `seconds`.
fn run_fio(file: &Path, w: &Workload, qd: u32, seconds: u64) -> Result<FioResult> {
    eprintln!("blk bench: fio {} qd {qd}", w.fio_rw);
    let mut filename = OsString::from("--filename=");
    filename.push(file);
    let output = Command::new("fio")
        .arg(format!("--name={}", w.name))
        .arg(filename)
        .arg(format!("--rw={}", w.fio_rw))
        .arg(format!("--bs={}", w.fio_bs))
        .arg(format!("--iodepth={qd}"))
        .args([
            "--ioengine=io_uring",
            "--direct=0",
            "--invalidate=0",
            "--norandommap",
            "--randrepeat=0",
            "--time_based",
        ])
        .arg(format!("--runtime={seconds}"))
        .arg("--output-format=json")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "fio {} failed ({}): {}",
            w.fio_rw,
            describe_status(output.status),
            tail(&stderr, TAIL_LINES).join(" / ")
        ));
    }
    parse_fio(&stdout, if w.write { "write" } else { "read" }, qd)
        .ok_or_else(|| format!("fio {}: no figures in its JSON output", w.fio_rw))
}

/// The figures of the first job's `direction` ("read" or "write") in fio's JSON output.
fn parse_fio(stdout: &str, direction: &str, qd: u32) -> Option<FioResult> {
    let root = &stdout[stdout.find('{')?..];
    let jobs = json::member(root, "jobs")?;
    let job = json::first_element(jobs)?;
    if json::number(job, "error")? != 0.0 {
        return None;
    }
    let dir = json::member(job, direction)?;
    let iops = json::number(dir, "iops")?;
    let bytes_per_s = json::number(dir, "bw_bytes")?;
    let total_ios = json::number(dir, "total_ios")?;
    let runtime_ms = json::number(dir, "runtime")?;
    let cpu_percent = json::number(job, "usr_cpu")? + json::number(job, "sys_cpu")?;
    let cpu_us_per_op =
        (total_ios > 0.0).then(|| cpu_percent / 100.0 * runtime_ms * 1000.0 / total_ios);
    Some(FioResult {
        iops,
        bytes_per_s,
        cpu_us_per_op,
        qd,
    })
}

/// Just enough JSON to read fio's output: members of objects and the first element of an
/// array, by skipping balanced values.
mod json {
    /// The text of the value of `key`, a member at the top level of the object `obj`.
    pub fn member<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
        let b = obj.as_bytes();
        let mut i = skip_ws(b, 0);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i += 1;
        loop {
            i = skip_ws(b, i);
            if b.get(i) == Some(&b'}') {
                return None;
            }
            let key_end = skip_string(b, i)?;
            let name = &obj[i + 1..key_end - 1];
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(b, i + 1);
            let end = skip_value(b, start)?;
            if name == key {
                return Some(&obj[start..end]);
            }
            i = skip_ws(b, end);
            match b.get(i) {
                Some(b',') => i += 1,
                _ => return None,
            }
        }
    }

    /// The text of the first element of the array `arr`.
    pub fn first_element(arr: &str) -> Option<&str> {
        let b = arr.as_bytes();
        let i = skip_ws(b, 0);
        if b.get(i) != Some(&b'[') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        if b.get(start) == Some(&b']') {
            return None;
        }
        let end = skip_value(b, start)?;
        Some(&arr[start..end])
    }

    /// The number that is the value of `key` in the object `obj`.
    pub fn number(obj: &str, key: &str) -> Option<f64> {
        member(obj, key)?.trim().parse().ok()
    }

    fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
            i += 1;
        }
        i
    }

    /// The index after the string that starts at `i`.
    fn skip_string(b: &[u8], i: usize) -> Option<usize> {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let mut j = i + 1;
        loop {
            match b.get(j)? {
                b'\\' => j += 2,
                b'"' => return Some(j + 1),
                _ => j += 1,
            }
        }
    }

    /// The index after the value that starts at `i`.
    fn skip_value(b: &[u8], i: usize) -> Option<usize> {
        match b.get(i)? {
            b'"' => skip_string(b, i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    match b.get(j)? {
                        b'"' => {
                            j = skip_string(b, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            _ => {
                let mut j = i;
                while b
                    .get(j)
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    j += 1;
                }
                (j > i).then_some(j)
            }
        }
    }
}

// --- report -------------------------------------------------------------------------------------

/// The queue depth the probe used for `w` (what fio gets too): from a run's line, else what
/// the probe would use.
fn queue_depth(opts: &Options, runs: &[VmmRun], w: &Workload) -> u32 {
    runs.iter()
        .find_map(|r| r.measured(w.name).map(|m| m.qd))
        .unwrap_or(match w.name {
            "seq-read-1m" => opts.qd.min(SEQ_MAX_QD),
            _ => opts.qd,
        })
}

struct Report<'a> {
    opts: &'a Options,
    kernel: &'a Path,
    file: &'a Path,
    file_bytes: u64,
    runs: &'a [VmmRun],
    /// Per workload: fio's figures, or why there are none.
    fio: &'a [(&'a Workload, std::result::Result<FioResult, String>)],
}

fn report(r: &Report<'_>) -> String {
    let mut out = String::new();
    let opts = r.opts;
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        out,
        "cgvm block benchmark: {}, kernel {}, {cpus} host CPUs",
        opts.vmm.display(),
        r.kernel.display()
    );
    let _ = writeln!(
        out,
        "disk {} ({} MiB), {} s per workload, queue depth {} (1 MiB reads: at most {SEQ_MAX_QD})",
        r.file.display(),
        r.file_bytes >> 20,
        opts.seconds,
        opts.qd
    );
    let _ = writeln!(out, "guest command line: {:?}", probe_cmdline(opts));
    let _ = writeln!(
        out,
        "{:14} {:6} {:>4} {:>11} {:>10} {:>9} {:>16} {:>13}",
        "workload", "engine", "qd", "IOPS", "MiB/s", "% of fio", "CPU us/op", "dev us/op"
    );
    for w in &opts.workloads {
        let fio = r
            .fio
            .iter()
            .find(|(fw, _)| fw.name == w.name)
            .map(|(_, f)| f);
        let fio_ok = fio.and_then(|f| f.as_ref().ok());
        for run in r.runs {
            let cpu = run
                .cpu_us_per_op()
                .map_or("-".to_string(), |c| format!("{c:.2} (VMM)"));
            match (run.measured(w.name), run.skipped(w.name)) {
                (Some(m), _) => {
                    let pct = fio_ok
                        .filter(|f| f.iops > 0.0)
                        .map_or("-".to_string(), |f| {
                            format!("{:.0} %", m.iops() / f.iops * 100.0)
                        });
                    let device = run
                        .device_us_per_op(w.name)
                        .map_or("-".to_string(), |c| format!("{c:.2}"));
                    let _ = writeln!(
                        out,
                        "{:14} {:6} {:>4} {:>11.0} {:>10.1} {:>9} {:>16} {:>13}",
                        w.name,
                        run.engine,
                        m.qd,
                        m.iops(),
                        m.mib_s(),
                        pct,
                        cpu,
                        device
                    );
                }
                (None, Some(why)) => {
                    let _ = writeln!(out, "{:14} {:6} skipped {why}", w.name, run.engine);
                }
                (None, None) => {
                    let _ = writeln!(out, "{:14} {:6} no figures", w.name, run.engine);
                }
            }
        }
        match fio {
            Some(Ok(f)) => {
                let cpu = f
                    .cpu_us_per_op
                    .map_or("-".to_string(), |c| format!("{c:.2} (fio)"));
                let _ = writeln!(
                    out,
                    "{:14} {:6} {:>4} {:>11.0} {:>10.1} {:>9} {:>16}",
                    w.name,
                    "fio",
                    f.qd,
                    f.iops,
                    f.bytes_per_s / (1u64 << 20) as f64,
                    "100 %",
                    cpu
                );
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "{:14} {:6} {e}", w.name, "fio");
            }
            None => {}
        }
    }
    let _ = writeln!(
        out,
        "CPU us/op: the VMM process's user + system CPU time (all threads, from wait4) over \
         all operations of its run, boot and every workload included; the vCPU thread, busy \
         all the time because the probe polls, counts too. For fio: its own CPU time."
    );
    let _ = writeln!(
        out,
        "dev us/op: the CPU time of the VMM's device thread and io_uring workers during that \
         workload (from /proc/PID/task, read as the probe's lines arrive) per operation."
    );
    let _ = writeln!(
        out,
        "Both the VMM and fio do buffered I/O (the VMM opens disks without O_DIRECT; fio \
         --direct=0 --invalidate=0) on a file that is in the host page cache."
    );
    for run in r.runs {
        let probe_s = run.total_probe_s();
        let _ = writeln!(
            out,
            "engine {}: {}, {:.2} s CPU in {:.2} s wall-clock, {} operations",
            run.engine,
            describe_status(run.status),
            run.cpu_s,
            run.wall_s,
            run.total_ops()
        );
        for (name, cpu) in &run.workload_cpu {
            let _ = writeln!(
                out,
                "    {name}: CPU {:.2} s vCPU threads, {:.2} s device thread + io_uring workers, \
                 {:.2} s other",
                cpu.vcpu_s, cpu.device_s, cpu.other_s
            );
        }
        if probe_s > run.wall_s {
            let _ = writeln!(
                out,
                "    the probe measured {probe_s:.2} s, more than the run took: its TSC rate \
                 (see its ok line) is off"
            );
        }
        if let Some(ok) = run.lines.iter().find_map(|l| match l {
            ProbeLine::Ok(d) => Some(d),
            _ => None,
        }) {
            let _ = writeln!(out, "    probe: {ok}");
        }
        if let Some(why) = run.failure(&opts.workloads) {
            let _ = writeln!(out, "    FAILED: {why}");
            for line in tail(&run.stdout, TAIL_LINES) {
                let _ = writeln!(out, "    stdout: {line}");
            }
            for line in tail(&run.stderr, TAIL_LINES) {
                let _ = writeln!(out, "    stderr: {line}");
            }
        }
    }
    out
}

// --- main ---------------------------------------------------------------------------------------

fn bench(opts: &Options) -> Result<bool> {
    check_vmm(&opts.vmm)?;
    let temp = TempDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "blk-bench")?;
    let kernel = kernel_or_probe(opts.kernel.as_deref(), &temp.0, "blk bench")?;
    let file = match &opts.file {
        Some(file) => file.clone(),
        None => {
            let file = temp.0.join("disk.img");
            make_disk_image(&file, DEFAULT_FILE_BYTES)?;
            file
        }
    };
    let file_bytes = warm_page_cache(&file)?;

    let mut runs = Vec::new();
    for engine in &opts.engines {
        let run = run_vmm(opts, &kernel, &file, engine)?;
        sync_file(&file)?;
        runs.push(run);
    }

    let mut fio = Vec::new();
    let have_fio = fio_available();
    if have_fio {
        for w in &opts.workloads {
            let qd = queue_depth(opts, &runs, w);
            let result = run_fio(&file, w, qd, opts.seconds);
            sync_file(&file)?;
            fio.push((*w, result));
        }
    }
    print!(
        "{}",
        report(&Report {
            opts,
            kernel: &kernel,
            file: &file,
            file_bytes,
            runs: &runs,
            fio: &fio,
        })
    );
    if !have_fio {
        println!(
            "fio is not installed: no host ceiling (apt-get install fio), the VMM's figures only"
        );
    }
    let runs_ok = runs.iter().all(|r| r.failure(&opts.workloads).is_none());
    let fio_ok = fio.iter().all(|(_, r)| r.is_ok());
    Ok(runs_ok && fio_ok)
}

fn main() -> ExitCode {
    let request = parse_args(env::args_os().skip(1));
    common::finish("blk bench", USAGE, request, bench)
}
