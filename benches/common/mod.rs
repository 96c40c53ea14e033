//! What the benchmark programs share: walking the command line, a scratch directory and
//! building the probe guest.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

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
