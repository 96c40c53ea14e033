//! The VMM thread's side of the API: it owns the [`VmResources`] being described, answers
//! every [`VmmAction`] as soon as it is read, starts the machine on `InstanceStart` (or at
//! once, from a config file) and then drives the running machine: pause, resume,
//! Ctrl+Alt+Del, drive and network rate-limiter updates, metrics.
//!
//! Before the start it runs its own small poll loop (API eventfd, exit signals, metrics
//! timer); after, the [`Vmm`](crate::runner::Vmm) event loop calls it for the same events.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::timerfd::TimerFd;

use crate::builder::{build, ConsoleIo};
use crate::config::VmConfig;
use crate::metrics::{Metrics, MetricsSink, FLUSH_INTERVAL};
use crate::outcome::RunOutcome;
use crate::resources::{InstanceInfo, ResourceError, VmResources, VmStateName};
use crate::rpc::{ApiReceiver, VmmAction, VmmActionError, VmmData, VmmResponse};
use crate::runner::{RuntimeHandles, Vmm};
use crate::timeline::Timeline;

/// Firecracker's message for a pre-boot request after the start.
pub const MSG_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
/// Firecracker's message for a post-boot request before the start.
pub const MSG_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// The machine's state as `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Configuring.
    NotStarted,
    /// Running.
    Running,
    /// vCPUs paused.
    Paused,
}

impl InstanceState {
    fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "Not started",
            Self::Running => "Running",
            Self::Paused => "Paused",
        }
    }
}

/// Who this instance is (for `GET /`, logs and metrics lines).
#[derive(Debug, Clone)]
pub struct Identity {
    /// `--id`.
    pub id: String,
    /// "cgvm", or "Firecracker" when invoked under that name.
    pub app_name: String,
    /// The version reported.
    pub version: String,
}

/// The VMM thread's API handler.
pub struct Controller {
    api: Option<ApiReceiver>,
    resources: VmResources,
    base: VmConfig,
    identity: Identity,
    metrics: Arc<Metrics>,
    sink: Option<MetricsSink>,
    timer: TimerFd,
    state: InstanceState,
    timeline: Arc<Timeline>,
}

/// What the pre-boot loop ended with.
pub enum Preboot {
    /// The machine is built and its vCPUs are waiting; run it.
    Start(Box<Vmm>),
    /// The process should end with this outcome (a signal before the start).
    Stop(RunOutcome),
}

fn action_error(e: ResourceError) -> VmmActionError {
    VmmActionError(e.0)
}

impl Controller {
    /// A controller for `resources`, answering `api` (none with `--no-api`). `base` gives
    /// what the Firecracker model does not (seccomp, console default).
    pub fn new(
        api: Option<ApiReceiver>,
        resources: VmResources,
        base: VmConfig,
        identity: Identity,
        metrics: Arc<Metrics>,
        timeline: Arc<Timeline>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            api,
            resources,
            base,
            identity,
            metrics,
            sink: None,
            timer: TimerFd::new().map_err(std::io::Error::from)?,
            state: InstanceState::NotStarted,
            timeline,
        })
    }

    /// Opens the metrics file (`--metrics-path`, `PUT /metrics`); only once per process,
    /// as in Firecracker.
    pub fn set_metrics(
        &mut self,
        c: crate::resources::MetricsConfig,
    ) -> Result<(), VmmActionError> {
        if self.sink.is_some() {
            return Err(VmmActionError::new(
                "metrics: the metrics file is already set; it can be set once per process",
            ));
        }
        let id = c.emit_id.unwrap_or(false).then(|| self.identity.id.clone());
        let sink = MetricsSink::open(
            &c.metrics_path,
            id,
            c.properties.clone().unwrap_or_default(),
        )
        .map_err(|e| {
            VmmActionError(format!(
                "metrics_path: cannot open {}: {e}",
                c.metrics_path.display()
            ))
        })?;
        self.timer
            .reset(FLUSH_INTERVAL, Some(FLUSH_INTERVAL))
            .map_err(|e| VmmActionError(format!("metrics: cannot arm the flush timer: {e}")))?;
        self.sink = Some(sink);
        self.resources.metrics = Some(c);
        Ok(())
    }

    /// Applies a logger configuration (`--log-path` and friends, `PUT /logger`).
    pub fn set_logger(&mut self, c: crate::resources::LoggerConfig) -> Result<(), VmmActionError> {
        crate::logger::configure(&c).map_err(VmmActionError)?;
        self.resources.logger = Some(c);
        Ok(())
    }

    fn flush_metrics(&mut self) -> Result<(), VmmActionError> {
        let Some(sink) = self.sink.as_mut() else {
            return Err(VmmActionError::new(
                "FlushMetrics: no metrics file is set; PUT /metrics or --metrics-path first",
            ));
        };
        sink.flush(&self.metrics).map_err(|e| {
            VmmActionError(format!(
                "FlushMetrics: cannot write {}: {e}",
                sink.path().display()
            ))
        })
    }

    /// The metrics timer fired: write a line.
    pub fn on_metrics_timer(&mut self) {
        let _ = self.timer.wait();
        if let Err(e) = self.flush_metrics() {
            log::warn!("{e}");
        }
    }

    /// The metrics timer's fd.
    pub fn metrics_timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The API eventfd, if there is an API.
    pub fn api_fd(&self) -> Option<RawFd> {
        self.api.as_ref().map(|a| a.event.as_raw_fd())
    }

    fn info(&self) -> VmmData {
        VmmData::InstanceInfo(InstanceInfo {
            app_name: self.identity.app_name.clone(),
            id: self.identity.id.clone(),
            state: self.state.as_str().to_string(),
            vmm_version: self.identity.version.clone(),
        })
    }

    /// Requests waiting on the channel (the eventfd is read first).
    fn pending(&mut self) -> Vec<crate::rpc::VmmRequest> {
        let Some(api) = &self.api else {
            return Vec::new();
        };
        let _ = api.event.read();
        api.requests.try_iter().collect()
    }

    /// Builds and starts the machine described so far.
    pub fn start(&mut self) -> Result<Vmm, VmmActionError> {
        let config = self
            .resources
            .to_vm_config(&self.base)
            .map_err(action_error)?;
        let console = ConsoleIo::from_config(&config.console)
            .map_err(|e| VmmActionError(format!("Cannot start microvm: {e}")))?;
        let vmm = build(
            &config,
            self.timeline.clone(),
            console,
            self.metrics.clone(),
        )
        .map_err(|e| VmmActionError(format!("Cannot start microvm: {e}")))?;
        self.state = InstanceState::Running;
        log::info!(
            "instance {} started: {} vCPUs, {} MiB",
            self.identity.id,
            config.vcpus,
            config.mem_mib
        );
        Ok(vmm)
    }

    /// Answers a request that does not need the running machine; `None` means it does.
    fn common(&mut self, action: &VmmAction) -> Option<VmmResponse> {
        let started = self.state != InstanceState::NotStarted;
        let pre_boot_only = || Err(VmmActionError::new(MSG_AFTER_START));
        Some(match action {
            VmmAction::GetInstanceInfo => Ok(self.info()),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.resources.machine.clone()))
            }
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.resources.full_config()))),
            VmmAction::FlushMetrics => self.flush_metrics().map(|()| VmmData::Empty),
            VmmAction::PutLogger(c) => self.set_logger(c.clone()).map(|()| VmmData::Empty),
            VmmAction::PutMetrics(c) => self.set_metrics(c.clone()).map(|()| VmmData::Empty),
            VmmAction::PutMachineConfig(_)
            | VmmAction::PatchMachineConfig(_)
            | VmmAction::PutBootSource(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNetworkInterface(_)
            | VmmAction::PutVsock(_)
            | VmmAction::PutEntropy(_)
            | VmmAction::PutSerial(_)
            | VmmAction::StartInstance
                if started =>
            {
                pre_boot_only()
            }
            VmmAction::PutMachineConfig(m) => self
                .resources
                .set_machine_config(m.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::PatchMachineConfig(m) => self
                .resources
                .update_machine_config(m.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::PutBootSource(b) => self
                .resources
                .set_boot_source(b.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::PutDrive(d) => self
                .resources
                .insert_drive(d.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::PutNetworkInterface(n) => self
                .resources
                .insert_net_iface(n.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::PutVsock(v) => self
                .resources
                .set_vsock(v.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::PutEntropy(e) => self
                .resources
                .set_entropy(e.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::PutSerial(s) => self
                .resources
                .set_serial(s.clone())
                .map(|()| VmmData::Empty)
                .map_err(action_error),
            VmmAction::SendCtrlAltDel
            | VmmAction::SetVmState(_)
            | VmmAction::PatchDrive(_)
            | VmmAction::PatchNetworkInterface(_)
                if !started =>
            {
                Err(VmmActionError::new(MSG_BEFORE_START))
            }
            VmmAction::StartInstance
            | VmmAction::SendCtrlAltDel
            | VmmAction::SetVmState(_)
            | VmmAction::PatchDrive(_)
            | VmmAction::PatchNetworkInterface(_) => return None,
        })
    }

    /// Before the start: waits for API requests (and exit signals, and the metrics timer)
    /// until `InstanceStart` builds the machine.
    pub fn run_preboot(&mut self) -> Preboot {
        let signals = match crate::runner::exit_signalfd() {
            Ok(s) => s,
            Err(e) => {
                return Preboot::Stop(RunOutcome::VmmError(format!(
                    "cannot watch exit signals: {e}"
                )))
            }
        };
        loop {
            let mut fds = vec![
                libc::pollfd {
                    fd: signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.timer.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if let Some(fd) = self.api_fd() {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: fds is a valid array of fds.len() pollfd structures we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Preboot::Stop(RunOutcome::VmmError(format!("poll failed: {e}")));
            }
            if fds[0].revents != 0 {
                if let Some(sig) = crate::runner::read_signal(&signals) {
                    return Preboot::Stop(RunOutcome::Signal(sig));
                }
            }
            if fds[1].revents != 0 {
                self.on_metrics_timer();
            }
            if fds.get(2).is_some_and(|p| p.revents != 0) {
                for req in self.pending() {
                    let answer = match self.common(&req.action) {
                        Some(a) => a,
                        None => match self.start() {
                            Ok(vmm) => {
                                let _ = req.reply.send(Ok(VmmData::Empty));
                                return Preboot::Start(Box::new(vmm));
                            }
                            Err(e) => Err(e),
                        },
                    };
                    log_answer(&req.action, &answer);
                    let _ = req.reply.send(answer);
                }
            }
        }
    }

    /// After the start: answers every waiting request against the running machine.
    pub fn serve_running(&mut self, vm: &RuntimeHandles) {
        for req in self.pending() {
            let answer = match self.common(&req.action) {
                Some(a) => a,
                None => self.runtime(&req.action, vm),
            };
            log_answer(&req.action, &answer);
            let _ = req.reply.send(answer);
        }
    }

    fn runtime(&mut self, action: &VmmAction, vm: &RuntimeHandles) -> VmmResponse {
        match action {
            VmmAction::SendCtrlAltDel => vm.ctrl_alt_del().map(|()| VmmData::Empty),
            VmmAction::SetVmState(s) => match s.state {
                VmStateName::Paused => {
                    vm.pause()?;
                    self.state = InstanceState::Paused;
                    Ok(VmmData::Empty)
                }
                VmStateName::Resumed => {
                    vm.resume();
                    self.state = InstanceState::Running;
                    Ok(VmmData::Empty)
                }
            },
            VmmAction::PatchDrive(p) => {
                vm.patch_drive(p)?;
                if let Some(d) = self
                    .resources
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == p.drive_id)
                {
                    if let Some(path) = &p.path_on_host {
                        d.path_on_host = Some(path.clone());
                    }
                    if let Some(rl) = p.rate_limiter {
                        d.rate_limiter = Some(rl);
                    }
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNetworkInterface(p) => {
                let (rx, tx) = vm.patch_net(p)?;
                // GET /vm/config reports the limits in force, as Firecracker does.
                if let Some(n) = self
                    .resources
                    .net_ifaces
                    .iter_mut()
                    .find(|n| n.iface_id == p.iface_id)
                {
                    n.rx_rate_limiter = rx;
                    n.tx_rate_limiter = tx;
                }
                Ok(VmmData::Empty)
            }
            other => Err(VmmActionError(format!(
                "{}: not handled while running",
                other.name()
            ))),
        }
    }

    /// Writes a last metrics line (at exit), if metrics are configured.
    pub fn final_flush(&mut self) {
        if self.sink.is_some() {
            if let Err(e) = self.flush_metrics() {
                log::warn!("{e}");
            }
        }
    }
}

fn log_answer(action: &VmmAction, answer: &VmmResponse) {
    match answer {
        Ok(_) => log::debug!("API: {} done", action.name()),
        Err(e) => log::info!("API: {} refused: {e}", action.name()),
    }
}
