//! `cgvm`: the command line. Parses arguments into a `VmConfig`, runs the machine, and turns
//! the outcome into the process exit status. Everything else lives in the `vmm` crate.

mod doctor;
mod jail;
mod seccomp_report;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use devices::rate_limiter::RateLimiterConfig;
use serve::ServeArgs;
use vmm::builder::{build, ConsoleIo};
use vmm::config::{
    parse_size, per_second, ConsoleConfig, DiskConfig, NetBackend, NetIfaceConfig, VmConfig,
    VsockConfig, DEFAULT_CMDLINE,
};
use vmm::outcome::EXIT_VMM_ERROR;
use vmm::timeline::{monotonic_ns, Timeline};

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0      the guest powered off (ACPI) or reset (i8042, ACPI reset register)
  V      the guest wrote the byte V to the exit device (I/O port 0xf4)
  120    the guest kernel panicked (pvpanic)
  121    a vCPU stopped in a way cgvm cannot continue: triple fault, KVM internal or
         emulation error (the message names the exit, the vCPU, RIP and instruction bytes)
  124    --timeout expired
  125    cgvm failed before or while starting the guest (bad option, kernel, memory, KVM)
  130    you quit from the console with Ctrl-A x
  128+N  cgvm was stopped by signal N

Console: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A to the guest.";

/// A minimal, hardened KVM virtual machine monitor.
///
/// Without a subcommand, cgvm takes Firecracker's flags and behaves like Firecracker: an API
/// socket (default /run/firecracker.socket) and/or --config-file describe the machine.
#[derive(Parser)]
#[command(
    name = "cgvm",
    version,
    about,
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true,
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    /// Log level on stderr: error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "warn", value_parser = parse_level)]
    log_level: log::LevelFilter,
    #[command(flatten)]
    firecracker: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The command line when cgvm is invoked as `firecracker`: Firecracker's flags only.
#[derive(Parser)]
#[command(name = "firecracker", version, about = "cgvm, invoked as Firecracker")]
struct FirecrackerCli {
    #[command(flatten)]
    args: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel; the exit status is the guest's verdict.
    #[command(after_help = EXIT_STATUS_HELP)]
    Run(RunArgs),
    /// Serve the Firecracker-compatible API on a Unix socket (and/or boot a --config-file);
    /// the exit status is the guest's verdict, as with `run`.
    #[command(after_help = EXIT_STATUS_HELP)]
    Serve(ServeArgs),
    /// Tell whether this host can run microVMs, and boot the built-in probe guest.
    Doctor,
    /// Print every thread kind with the system calls its seccomp filter allows.
    SeccompReport {
        /// Print the vmm, api and vcpu filters in Firecracker's JSON format instead (a
        /// starting point for --seccomp-filter).
        #[arg(long)]
        firecracker_json: bool,
    },
    /// As root: run cgvm confined (chroot, namespaces, cgroup, rlimits, uid/gid), as
    /// Firecracker's jailer does.
    Jail(jail::JailArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Kernel image: an ELF vmlinux or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (initramfs).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8))]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Serial console: tty (this terminal), file:PATH, or none.
    #[arg(long, default_value = "tty")]
    console: ConsoleConfig,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Print when the VMM started, the guest first ran, boot completed and the guest stopped.
    #[arg(long)]
    timeline: bool,
    /// Enter an ELF kernel through its PVH entry point when it has one.
    #[arg(long)]
    pvh: bool,
    /// A disk, PATH[,ro|,persist][,id=ID][,engine=sync|uring][,bw=SIZE][,iops=N]; repeat for
    /// more (up to 16, vda, vdb, ... in order). The image is never written unless `persist` is
    /// given: guest writes go to a throw-away overlay. `ro` makes a read-only disk; bw and iops
    /// limit bytes and requests per second.
    #[arg(long = "disk", value_name = "SPEC", value_parser = DiskConfig::parse_cli)]
    disks: Vec<DiskConfig>,
    /// Boot from the first disk: adds root=/dev/vda (with ro or rw) to the command line.
    #[arg(long)]
    root: bool,
    /// Add a virtio-rng entropy device (backed by the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// Limit the entropy device to SIZE bytes per second (e.g. 4K).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "rng")]
    rng_rate: Option<u64>,
    /// A virtio-vsock device, CID[,uds=PATH]: host programs connect to PATH and write
    /// `CONNECT <port>`; guest connections to host port P go to PATH_P (Firecracker's model).
    #[arg(long, value_name = "SPEC", value_parser = VsockConfig::parse_cli)]
    vsock: Option<VsockConfig>,
    /// A network interface: tap:NAME uses an existing TAP interface; user starts passt for
    /// rootless NAT'd networking (no root needed). Options: ,mac=M (the guest's MAC), ,id=ID.
    /// Repeat for more (eth0, eth1, ... in order).
    #[arg(long = "net", value_name = "SPEC", value_parser = NetIfaceConfig::parse_cli)]
    nets: Vec<NetIfaceConfig>,
    /// Forward host TCP port HOST to guest port GUEST (with --net user); repeat for more.
    #[arg(long = "publish", value_name = "HOST:GUEST")]
    publish: Vec<vmm::passt::Publish>,
    /// How the guest finds its virtio devices: pci (virtio-pci with MSI-X, what distribution
    /// kernels expect) or mmio (virtio-mmio, microVM kernels). Default: pci for a bzImage,
    /// mmio for an ELF vmlinux.
    #[arg(long, value_name = "mmio|pci")]
    transport: Option<vmm::config::Transport>,
    #[command(flatten)]
    seccomp: SeccompArgs,
}

/// The seccomp flags of `run` and `serve`.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct SeccompArgs {
    /// Run every thread without its seccomp filter (debugging only: a guest that takes over a
    /// device thread is then confined by nothing).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Before a forbidden system call kills the process, print the thread kind and the call
    /// (the filters trap with SIGSYS instead of killing at once; the process still dies).
    #[arg(long, conflicts_with = "no_seccomp")]
    pub seccomp_log: bool,
    /// Replace the filters of the vmm, api and vcpu threads with those of FILE, in
    /// Firecracker's JSON filter format (device threads keep cgvm's own).
    #[arg(long, value_name = "FILE", conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,
}

impl SeccompArgs {
    /// Sets the process-wide seccomp options before any thread is confined.
    pub(crate) fn apply(&self) -> Result<(), String> {
        devices::seccomp::set_enabled(!self.no_seccomp);
        if self.no_seccomp {
            log::warn!("--no-seccomp: no thread is confined; use it for debugging only");
            return Ok(());
        }
        if self.seccomp_log {
            devices::seccomp::set_log(true);
            devices::seccomp::install_sigsys_reporter()
                .map_err(|e| format!("--seccomp-log: cannot install the SIGSYS handler: {e}"))?;
        }
        if let Some(path) = &self.seccomp_filter {
            let json = std::fs::read(path)
                .map_err(|e| format!("--seccomp-filter {}: {e}", path.display()))?;
            let filters = devices::seccomp::compile_json(&json)
                .map_err(|e| format!("--seccomp-filter {}: {e}", path.display()))?;
            devices::seccomp::set_overrides(filters);
        }
        Ok(())
    }
}

impl RunArgs {
    fn to_config(&self) -> Result<VmConfig, String> {
        let timeout = match self.timeout {
            Some(t) if !(t > 0.0 && t.is_finite() && t < 1e9) => {
                return Err(format!(
                    "--timeout {t}: must be a number of seconds above 0"
                ));
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        let mut cmdline = self.cmdline.clone();
        if self.root {
            let first = self
                .disks
                .first()
                .ok_or("--root needs a --disk to boot from")?;
            let mode = if first.read_only { "ro" } else { "rw" };
            cmdline = format!("{cmdline} root=/dev/vda {mode}");
        }
        let mut nets = self.nets.clone();
        if !self.publish.is_empty() {
            let mut users = nets
                .iter_mut()
                .filter(|n| matches!(n.backend, NetBackend::User { .. }));
            match (users.next(), users.next()) {
                (Some(n), None) => {
                    n.backend = NetBackend::User {
                        publish: self.publish.clone(),
                    }
                }
                (None, _) => return Err("--publish needs a --net user interface".into()),
                (Some(_), Some(_)) => {
                    return Err(
                        "--publish with two --net user interfaces: which one is meant?".into(),
                    )
                }
            }
        }
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline,
            vcpus: self.cpus,
            mem_mib: self.memory,
            console: self.console.clone(),
            timeout,
            pvh: self.pvh,
            rng: self.rng,
            rng_rate_limiter: self.rng_rate.map(|n| RateLimiterConfig {
                bandwidth: Some(per_second(n)),
                ops: None,
            }),
            disks: self.disks.clone(),
            vsock: self.vsock.clone(),
            nets,
            transport: self.transport,
            seccomp: !self.seccomp.no_seccomp,
        })
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}': expected off, error, warn, info, debug or trace"))
}

/// Prints a parse error (or help) and gives the exit status for it.
fn parse_failure(e: clap::Error) -> ExitCode {
    let _ = e.print();
    // --help and --version are not errors; a bad option is cgvm's 125.
    match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            ExitCode::SUCCESS
        }
        _ => ExitCode::from(EXIT_VMM_ERROR as u8),
    }
}

/// True when the program was started under the name `firecracker`.
fn invoked_as_firecracker() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "firecracker"))
        .unwrap_or(false)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let start_ns = monotonic_ns();
    let timeline = Arc::new(Timeline::starting_at(start, start_ns));
    let setup = |level: log::LevelFilter| -> Result<(), ExitCode> {
        vmm::logger::init(level);
        devices::install_panic_hook();
        vmm::runner::block_exit_signals().map_err(|e| {
            eprintln!("cgvm: error: cannot block signals: {e}");
            ExitCode::from(EXIT_VMM_ERROR as u8)
        })
    };
    if invoked_as_firecracker() {
        let cli = match FirecrackerCli::try_parse() {
            Ok(c) => c,
            Err(e) => return parse_failure(e),
        };
        if let Err(code) = setup(log::LevelFilter::Warn) {
            return code;
        }
        let code = serve::serve(&cli.args, "Firecracker", true, timeline);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return parse_failure(e),
    };
    if let Err(code) = setup(cli.log_level) {
        return code;
    }
    let code = match cli.command {
        Some(Command::Run(args)) => run(&args, timeline),
        Some(Command::Serve(args)) => serve::serve(&args, "cgvm", false, timeline),
        Some(Command::Doctor) => doctor::run(),
        Some(Command::SeccompReport { firecracker_json }) => seccomp_report::run(firecracker_json),
        Some(Command::Jail(args)) => jail::run(&args),
        None => serve::serve(&cli.firecracker, "cgvm", true, timeline),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn run(args: &RunArgs, timeline: Arc<Timeline>) -> i32 {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cgvm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    if let Err(e) = args.seccomp.apply() {
        eprintln!("cgvm: error: {e}");
        return EXIT_VMM_ERROR;
    }
    let result = ConsoleIo::from_config(&config.console).and_then(|console| {
        let read_stdin = console.read_stdin;
        build(&config, timeline.clone(), console, Arc::default()).map(|vmm| (vmm, read_stdin))
    });
    let (vmm, read_stdin) = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cgvm: error: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let raw = if read_stdin {
        vmm::console::RawTerminal::enter()
    } else {
        None
    };
    let outcome = vmm.run();
    drop(raw);
    eprintln!("cgvm: {outcome}");
    if args.timeline {
        eprint!("{}", timeline.render());
    }
    outcome.exit_code()
}
