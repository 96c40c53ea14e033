//! `cgvm serve` and Firecracker's command line: an API socket and/or a config file describe
//! the machine; the process ends when the guest does, with the status `cgvm run` gives.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use vmm::config::{ConsoleConfig, VmConfig};
use vmm::controller::{Controller, Identity, Preboot};
use vmm::metrics::Metrics;
use vmm::outcome::{RunOutcome, EXIT_VMM_ERROR};
use vmm::resources::{LogLevel, LoggerConfig, MetricsConfig, VmResources};
use vmm::timeline::Timeline;

/// Firecracker's default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker's default instance id.
pub const DEFAULT_ID: &str = "anonymous-instance";
/// Firecracker's default limit on an API request body.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;

/// Firecracker's flags (cgvm's `serve` takes the same).
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The API socket to create (an existing file there is an error); removed at exit.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The instance id, shown by GET / and in logs.
    #[arg(long, default_value = DEFAULT_ID)]
    pub id: String,
    /// Firecracker's config-file JSON: boot without API calls.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// Print the boot timeline (start, first instruction, boot complete, stop) at exit.
    #[arg(long)]
    pub boot_timer: bool,
    /// Write logs to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long)]
    pub level: Option<LogLevel>,
    /// Put the level on each log line.
    #[arg(long)]
    pub show_level: bool,
    /// Put the source file and line on each log line.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Only log messages from module paths starting with this.
    #[arg(long)]
    pub module: Option<String>,
    /// Write metrics (JSON lines) to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    #[command(flatten)]
    pub seccomp: crate::SeccompArgs,
    /// Put the virtio devices on a PCI bus (virtio-pci with MSI-X), as Firecracker's flag
    /// does; the same as --transport pci.
    #[arg(long, conflicts_with = "transport")]
    pub enable_pci: bool,
    /// The virtio transport, mmio or pci (a cgvm extension; machine-config's `transport`
    /// overrides it). Default: pci for a bzImage, mmio for an ELF vmlinux.
    #[arg(long, value_name = "mmio|pci")]
    pub transport: Option<vmm::config::Transport>,
    /// Largest API request body, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,
    /// Stop the guest after this many seconds (exit status 124); a cgvm extension.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Process start time in µs, as Firecracker's jailer passes it (logged only).
    #[arg(long, hide = true)]
    pub start_time_us: Option<u64>,
    /// Process start CPU time in µs, as the jailer passes it (logged only).
    #[arg(long, hide = true)]
    pub start_time_cpu_us: Option<u64>,
    /// The jailer's CPU time in µs (logged only).
    #[arg(long, hide = true)]
    pub parent_cpu_time_us: Option<u64>,
}

/// Removes the API socket when dropped, whatever path the process leaves by.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("cgvm: error: {msg}");
    EXIT_VMM_ERROR
}

/// Binds the API socket; an existing file at `path` is an error, as in Firecracker.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(format!(
            "API socket {}: the path already exists; remove it or choose another --api-sock",
            path.display()
        ));
    }
    UnixListener::bind(path).map_err(|e| format!("API socket {}: cannot bind: {e}", path.display()))
}

/// Runs the API-driven VMM; returns the process exit status.
pub fn serve(args: &ServeArgs, app_name: &str, default_sock: bool, timeline: Arc<Timeline>) -> i32 {
    vmm::logger::set_instance_id(&args.id);
    if let Err(e) = args.seccomp.apply() {
        eprintln!("cgvm: error: {e}");
        return vmm::outcome::EXIT_VMM_ERROR;
    }
    if let Some(us) = args.start_time_us {
        log::debug!("started by a jailer at {us} µs");
    }
    let logger = LoggerConfig {
        log_path: args.log_path.clone(),
        level: args.level,
        show_level: args.show_level.then_some(true),
        show_log_origin: args.show_log_origin.then_some(true),
        module: args.module.clone(),
    };
    let timeout = match args.timeout {
        Some(t) if !(t > 0.0 && t.is_finite() && t < 1e9) => {
            return fail(format!(
                "--timeout {t}: must be a number of seconds above 0"
            ));
        }
        Some(t) => Some(std::time::Duration::from_secs_f64(t)),
        None => None,
    };
    let resources = match &args.config_file {
        None => VmResources::default(),
        Some(p) => {
            let text = match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) => return fail(format!("config file {}: {e}", p.display())),
            };
            match VmResources::from_config_json(&text) {
                Ok(r) => r,
                Err(e) => return fail(format!("{}: {e}", p.display())),
            }
        }
    };
    let metrics = Arc::new(Metrics::default());

    // The socket exists from here until the process ends.
    let mut api = None;
    let mut _socket_file = None;
    if !args.no_api {
        let path = match (&args.api_sock, default_sock) {
            (Some(p), _) => p.clone(),
            (None, true) => PathBuf::from(DEFAULT_API_SOCK),
            (None, false) => {
                return fail("serve needs --api-sock PATH (or --no-api with --config-file)")
            }
        };
        let listener = match bind(&path) {
            Ok(l) => l,
            Err(e) => return fail(e),
        };
        _socket_file = Some(SocketFile(path));
        let (tx, rx) = match vmm::rpc::channel() {
            Ok(c) => c,
            Err(e) => return fail(format!("cannot create the API channel: {e}")),
        };
        let server = api::ApiServer::new(
            listener,
            tx,
            metrics.api.clone(),
            api::ServerOptions {
                max_payload: args.http_api_max_payload_size,
                app_name: app_name.to_string(),
                ..api::ServerOptions::default()
            },
        );
        let confine = !args.seccomp.no_seccomp;
        let handle = match server.spawn_with(move || {
            if confine {
                api::seccomp::confine_api_thread()
            } else {
                Ok(())
            }
        }) {
            Ok(h) => h,
            Err(e) => return fail(format!("cannot start the API thread: {e}")),
        };
        api = Some((rx, handle));
    }
    let (rx, server) = match api {
        Some((rx, h)) => (Some(rx), Some(h)),
        None => (None, None),
    };

    let base = VmConfig {
        console: ConsoleConfig::Tty,
        timeout,
        seccomp: !args.seccomp.no_seccomp,
        transport: if args.enable_pci {
            Some(vmm::config::Transport::Pci)
        } else {
            args.transport
        },
        ..VmConfig::default()
    };
    let identity = Identity {
        id: args.id.clone(),
        app_name: app_name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let file_logger = resources.logger.clone();
    let file_metrics = resources.metrics.clone();
    let mut controller =
        match Controller::new(rx, resources, base, identity, metrics, timeline.clone()) {
            Ok(c) => c,
            Err(e) => return fail(format!("cannot set up the VMM: {e}")),
        };
    let has_logger_flags = logger != LoggerConfig::default();
    for l in [has_logger_flags.then_some(logger), file_logger]
        .into_iter()
        .flatten()
    {
        if let Err(e) = controller.set_logger(l) {
            return fail(e);
        }
    }
    let metrics_cfg = args.metrics_path.clone().map(|p| MetricsConfig {
        metrics_path: p,
        emit_id: None,
        properties: None,
    });
    if let Some(m) = metrics_cfg.or(file_metrics) {
        if let Err(e) = controller.set_metrics(m) {
            return fail(e);
        }
    }

    let vmm = if args.config_file.is_some() {
        match controller.start() {
            Ok(v) => v,
            Err(e) => return fail(e),
        }
    } else {
        match controller.run_preboot() {
            Preboot::Start(v) => *v,
            Preboot::Stop(outcome) => {
                eprintln!("cgvm: {outcome}");
                // The API thread may wait on the VMM's answer: close the channel first.
                drop(controller);
                stop_server(server);
                return outcome.exit_code();
            }
        }
    };
    let raw = if vmm.reads_console_input() {
        vmm::console::RawTerminal::enter()
    } else {
        None
    };
    let (outcome, controller) = vmm.run_with(Some(controller));
    drop(raw);
    if let Some(mut c) = controller {
        c.final_flush();
    }
    // The API thread may wait on the VMM's answer: close the channel (inside the
    // controller, dropped above) before stopping it.
    report(&outcome, args.boot_timer, &timeline);
    stop_server(server);
    outcome.exit_code()
}

fn stop_server(server: Option<api::ServerHandle>) {
    if let Some(s) = server {
        s.shutdown();
    }
}

fn report(outcome: &RunOutcome, timeline: bool, t: &Timeline) {
    eprintln!("cgvm: {outcome}");
    if timeline {
        eprint!("{}", t.render());
    }
}
