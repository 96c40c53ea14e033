//! The VMM thread's event loop: it waits (event-manager, epoll) for the guest to stop, for a
//! vCPU to fail, for the time limit, for a terminating signal and for console input, then
//! stops the vCPU threads and returns the [`RunOutcome`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::activator::Activator;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use devices::legacy::I8042Device;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::block::BlockControl;
use devices::virtio::net::NetControl;
use devices::virtio::pci::VirtioPciInterrupt;

use crate::console::EscapeFilter;
use crate::controller::Controller;
use crate::outcome::RunOutcome;
use crate::resources::{PartialDrive, PartialNetworkInterface};
use crate::rpc::VmmActionError;
use crate::vstate::vcpu::{kick_signal, VcpuShared};
use crate::vstate::vm::Vm;

/// Signals that end a run cleanly (terminal restored, timeline printed, status 128+N).
pub const EXIT_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
/// How long to wait for vCPU threads to leave KVM_RUN once stopped.
const VCPU_STOP_GRACE: Duration = Duration::from_secs(2);

/// Feeds bytes to the guest; returns how many it took (the FIFO may be full).
pub type InputFeed = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// Where console input goes: the UART's receive FIFO.
pub struct ConsoleInput {
    /// Feeds the FIFO.
    pub feed: InputFeed,
    /// Readable when the guest has emptied the FIFO: the moment to offer the rest.
    pub drained: EventFd,
}

/// Blocks [`EXIT_SIGNALS`] in the calling thread (and the threads it starts later), so that
/// the event loop receives them through a signalfd. Call before starting any thread.
pub fn block_exit_signals() -> std::io::Result<()> {
    let set = vmm_sys_util::signal::create_sigset(&EXIT_SIGNALS).map_err(std::io::Error::from)?;
    // SAFETY: pthread_sigmask reads the set we built and writes no old set.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A signalfd for [`EXIT_SIGNALS`] (which must be blocked).
pub(crate) fn exit_signalfd() -> std::io::Result<OwnedFd> {
    let set = vmm_sys_util::signal::create_sigset(&EXIT_SIGNALS).map_err(std::io::Error::from)?;
    // SAFETY: signalfd reads the set; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one signal from a signalfd; its number, or None if nothing was there.
pub(crate) fn read_signal(fd: &OwnedFd) -> Option<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: read writes at most info.len() bytes into the buffer we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    if n == info.len() as isize {
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        Some(signo as i32)
    } else {
        None
    }
}

/// A disk of the running machine, by drive id, with the handle that changes it.
pub struct DriveHandle {
    /// The drive id.
    pub id: String,
    /// Swaps the backing file and the rate limiter.
    pub control: BlockControl,
}

/// A network interface of the running machine, by interface id, with the handle that
/// changes its rate limiters.
pub struct NetHandle {
    /// The interface id.
    pub id: String,
    /// Changes the receive and transmit rate limiters.
    pub control: NetControl,
}

/// The receive and transmit limits in force on an interface (`None`: not limited).
pub type NetLimits = (Option<RateLimiterConfig>, Option<RateLimiterConfig>);

/// What the API may act on in a running machine.
pub struct RuntimeHandles {
    shared: Arc<VcpuShared>,
    vcpu_threads: Vec<libc::pthread_t>,
    i8042: Arc<Mutex<I8042Device>>,
    drives: Vec<DriveHandle>,
    nets: Vec<NetHandle>,
}

impl RuntimeHandles {
    fn kick_vcpus(&self) {
        for &t in &self.vcpu_threads {
            // SAFETY: the vCPU threads are joined only after the event loop ends, so each
            // pthread_t is still valid (a finished, unjoined thread keeps its id); the kick
            // signal has a handler that does nothing.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Parks every vCPU (`PATCH /vm` Paused); idempotent.
    pub fn pause(&self) -> Result<(), VmmActionError> {
        self.shared.request_pause();
        let deadline = Instant::now() + PAUSE_LIMIT;
        loop {
            self.kick_vcpus();
            if self
                .shared
                .wait_parked(self.vcpu_threads.len(), Duration::from_millis(20))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.shared.resume();
                return Err(VmmActionError(format!(
                    "cannot pause: the vCPUs did not stop within {PAUSE_LIMIT:?}"
                )));
            }
        }
    }

    /// Lets the vCPUs run again (`PATCH /vm` Resumed); idempotent.
    pub fn resume(&self) {
        self.shared.resume();
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    pub fn ctrl_alt_del(&self) -> Result<(), VmmActionError> {
        let sent = self
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trigger_ctrl_alt_del();
        if sent {
            Ok(())
        } else {
            Err(VmmActionError::new(
                "SendCtrlAltDel: the guest has disabled its keyboard or its keyboard buffer is full",
            ))
        }
    }

    /// `PATCH /drives/{id}`: a new backing file and/or rate limiter.
    pub fn patch_drive(&self, p: &PartialDrive) -> Result<(), VmmActionError> {
        let Some(d) = self.drives.iter().find(|d| d.id == p.drive_id) else {
            return Err(VmmActionError(format!(
                "drive {}: no such drive in this machine",
                p.drive_id
            )));
        };
        if p.path_on_host.is_none() && p.rate_limiter.is_none() {
            return Err(VmmActionError(format!(
                "drive {}: give path_on_host and/or rate_limiter to change",
                p.drive_id
            )));
        }
        if let Some(path) = &p.path_on_host {
            let sectors = d
                .control
                .swap_backing_file(path.clone())
                .map_err(|e| VmmActionError(format!("drive {}: {e}", p.drive_id)))?;
            log::info!(
                "drive {}: now backed by {} ({sectors} sectors)",
                p.drive_id,
                path.display()
            );
        }
        if let Some(rl) = p.rate_limiter {
            d.control
                .update_rate_limiter(Some(rl))
                .map_err(|e| VmmActionError(format!("drive {}: {e}", p.drive_id)))?;
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}`: updates the receive and/or transmit rate limiter
    /// (Firecracker's semantics: what is absent stays as it is). Returns the limits in force
    /// afterwards.
    pub fn patch_net(&self, p: &PartialNetworkInterface) -> Result<NetLimits, VmmActionError> {
        let Some(n) = self.nets.iter().find(|n| n.id == p.iface_id) else {
            return Err(VmmActionError(format!(
                "network interface {}: no such network interface in this machine",
                p.iface_id
            )));
        };
        if p.rx_rate_limiter.is_none() && p.tx_rate_limiter.is_none() {
            return Err(VmmActionError(format!(
                "network interface {}: give rx_rate_limiter and/or tx_rate_limiter to change",
                p.iface_id
            )));
        }
        n.control
            .update_rate_limiters(p.rx_rate_limiter, p.tx_rate_limiter)
            .map_err(|e| VmmActionError(format!("network interface {}: {e}", p.iface_id)))?;
        Ok(n.control.rate_limiters())
    }
}

/// How long `PATCH /vm` Paused waits for the vCPUs to park.
const PAUSE_LIMIT: Duration = Duration::from_secs(2);

/// A machine ready to run: VM, vCPU threads waiting to start, devices on the buses.
pub struct Vmm {
    /// Keeps the KVM fds and guest memory alive while vCPU threads run.
    _vm: Vm,
    shared: Arc<VcpuShared>,
    vcpus: Vec<JoinHandle<()>>,
    timeout: Option<Duration>,
    console_input: Option<ConsoleInput>,
    i8042: Arc<Mutex<I8042Device>>,
    drives: Vec<DriveHandle>,
    nets: Vec<NetHandle>,
    /// The passt processes of `user` network interfaces; dropped (killed) with the machine.
    _passts: Vec<crate::passt::Passt>,
    /// The virtio-pci devices' interrupts, whose INTx resample eventfds the loop watches.
    pci_interrupts: Vec<Arc<VirtioPciInterrupt>>,
    /// Where the transports send DRIVER_OK; the loop runs the activations.
    activator: Arc<Activator>,
}

/// The parts [`Vmm::new`] assembles.
pub(crate) struct VmmParts {
    pub vm: Vm,
    pub shared: Arc<VcpuShared>,
    pub vcpus: Vec<JoinHandle<()>>,
    pub timeout: Option<Duration>,
    pub console_input: Option<ConsoleInput>,
    pub i8042: Arc<Mutex<I8042Device>>,
    pub drives: Vec<DriveHandle>,
    pub nets: Vec<NetHandle>,
    pub passts: Vec<crate::passt::Passt>,
    pub pci_interrupts: Vec<Arc<VirtioPciInterrupt>>,
    pub activator: Arc<Activator>,
}

impl Vmm {
    /// Assembles a machine from its built parts (see `builder`).
    pub(crate) fn new(p: VmmParts) -> Self {
        Self {
            _vm: p.vm,
            shared: p.shared,
            vcpus: p.vcpus,
            timeout: p.timeout,
            console_input: p.console_input,
            i8042: p.i8042,
            drives: p.drives,
            nets: p.nets,
            _passts: p.passts,
            pci_interrupts: p.pci_interrupts,
            activator: p.activator,
        }
    }

    /// Whether the guest's console reads this process's stdin.
    pub fn reads_console_input(&self) -> bool {
        self.console_input.is_some()
    }

    /// Runs the event loop until the guest stops, then stops the vCPUs.
    pub fn run(self) -> RunOutcome {
        self.run_with(None).0
    }

    /// Runs the event loop, with `controller` answering API requests and writing metrics,
    /// until the guest stops; then stops the vCPUs and gives the controller back.
    pub fn run_with(mut self, controller: Option<Controller>) -> (RunOutcome, Option<Controller>) {
        let slot = Arc::new(Mutex::new(controller));
        let outcome = self.wait_for_stop(slot.clone());
        self.shared.timeline.stopped(&outcome.to_string());
        self.stop_vcpus();
        let controller = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        (outcome, controller)
    }

    fn wait_for_stop(&mut self, controller: Arc<Mutex<Option<Controller>>>) -> RunOutcome {
        let mut em = match EventManager::<Box<dyn MutEventSubscriber + Send>>::new() {
            Ok(em) => em,
            Err(e) => return RunOutcome::VmmError(format!("cannot create the event loop: {e}")),
        };
        let handles = RuntimeHandles {
            shared: self.shared.clone(),
            vcpu_threads: self.vcpus.iter().map(|h| h.as_pthread_t()).collect(),
            i8042: self.i8042.clone(),
            drives: std::mem::take(&mut self.drives),
            nets: std::mem::take(&mut self.nets),
        };
        let events = match LoopEvents::new(
            self.shared.clone(),
            self.timeout,
            self.console_input.take(),
            handles,
            controller,
        ) {
            Ok(ev) => ev,
            Err(e) => return RunOutcome::VmmError(format!("cannot set up the event loop: {e}")),
        };
        let outcome = events.outcome.clone();
        em.add_subscriber(Box::new(events));
        if !self.pci_interrupts.is_empty() {
            em.add_subscriber(Box::new(IntxResampler(self.pci_interrupts.clone())));
        }
        em.add_subscriber(Box::new(Activations(self.activator.clone())));
        // From here on the VMM thread makes only the calls of its policy; the device threads
        // it starts carry this filter as well as their own.
        if let Err(e) = devices::seccomp::confine(&crate::seccomp::vmm_policy()) {
            return RunOutcome::VmmError(e.to_string());
        }
        loop {
            if let Some(o) = outcome.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return o;
            }
            if let Err(e) = em.run() {
                if !matches!(&e, event_manager::Error::Epoll(err) if err.errno() == libc::EINTR) {
                    return RunOutcome::VmmError(format!("event loop failed: {e}"));
                }
            }
        }
    }

    /// Sets the stop flag and kicks every vCPU thread until it leaves KVM_RUN.
    fn stop_vcpus(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake_parked();
        let deadline = Instant::now() + VCPU_STOP_GRACE;
        for h in self.vcpus.drain(..) {
            while !h.is_finished() && Instant::now() < deadline {
                // SAFETY: the thread is alive (not finished) and joinable, so its pthread_t
                // is valid; the kick signal has a handler installed that does nothing.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_micros(200));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                log::warn!("a vCPU thread did not leave KVM_RUN within {VCPU_STOP_GRACE:?}");
            }
        }
    }
}

/// Starts the devices whose drivers wrote DRIVER_OK (see `devices::virtio::activator`).
struct Activations(Arc<Activator>);

impl MutEventSubscriber for Activations {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.0.event().as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::error!("cannot watch the device activation eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.run_pending();
    }
}

/// Watches the INTx resample eventfds of the virtio-pci devices: after the guest's EOI, KVM
/// lowers the line and signals the eventfd, and a device whose ISR is still set raises it
/// again (a level-triggered line shared by devices through KVM_IRQFD_FLAG_RESAMPLE).
struct IntxResampler(Vec<Arc<VirtioPciInterrupt>>);

impl MutEventSubscriber for IntxResampler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, irq) in self.0.iter().enumerate() {
            let fd = irq.intx_resample_event().as_raw_fd();
            if let Err(e) = ops.add(Events::with_data_raw(fd, i as u32, EventSet::IN)) {
                log::error!("cannot watch the INTx resample eventfd of PCI device {i}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(irq) = self.0.get(events.data() as usize) {
            let _ = irq.intx_resample_event().read();
            irq.resample_intx();
        }
    }
}

const TOKEN_GUEST_STOP: u32 = 1;
const TOKEN_VCPU_STOP: u32 = 2;
const TOKEN_TIMEOUT: u32 = 3;
const TOKEN_SIGNAL: u32 = 4;
const TOKEN_STDIN: u32 = 5;
const TOKEN_INPUT_DRAINED: u32 = 6;
const TOKEN_API: u32 = 7;
const TOKEN_METRICS: u32 = 8;

/// The one subscriber of the VMM loop for this events.
struct LoopEvents {
    shared: Arc<VcpuShared>,
    timeout: Option<(Duration, TimerFd)>,
    signals: OwnedFd,
    console: Option<ConsoleInput>,
    escape: EscapeFilter,
    pending_input: Vec<u8>,
    outcome: Arc<std::sync::Mutex<Option<RunOutcome>>>,
    handles: RuntimeHandles,
    controller: Arc<Mutex<Option<Controller>>>,
}

impl LoopEvents {
    fn new(
        shared: Arc<VcpuShared>,
        timeout: Option<Duration>,
        console: Option<ConsoleInput>,
        handles: RuntimeHandles,
        controller: Arc<Mutex<Option<Controller>>>,
    ) -> std::io::Result<Self> {
        let timeout = match timeout {
            Some(d) => {
                let mut t = TimerFd::new().map_err(std::io::Error::from)?;
                t.reset(d, None).map_err(std::io::Error::from)?;
                Some((d, t))
            }
            None => None,
        };
        Ok(Self {
            shared,
            timeout,
            signals: exit_signalfd()?,
            console,
            escape: EscapeFilter::default(),
            pending_input: Vec::new(),
            outcome: Arc::new(std::sync::Mutex::new(None)),
            handles,
            controller,
        })
    }

    fn finish(&self, o: RunOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(o);
        }
    }

    /// Reads console input, runs it through the escape filter and feeds the guest.
    fn on_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 512];
        // SAFETY: read writes at most buf.len() bytes into the buffer we own.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // End of input (or an error): stop watching stdin, the guest keeps running.
            let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
            return;
        }
        let filtered = self.escape.feed(&buf[..n as usize]);
        if filtered.quit {
            self.finish(RunOutcome::UserQuit);
            return;
        }
        self.pending_input.extend_from_slice(&filtered.to_guest);
        self.push_input(ops);
    }

    /// Gives the guest what its FIFO can take. What is left waits, and stdin is not read,
    /// until the guest empties the FIFO (its drained event), so a guest that does not read
    /// its console neither loses input nor makes the loop spin.
    fn push_input(&mut self, ops: &mut EventOps) {
        let Some(console) = self.console.as_mut() else {
            return;
        };
        let taken = (console.feed)(&self.pending_input);
        self.pending_input
            .drain(..taken.min(self.pending_input.len()));
        let stdin = Events::with_data_raw(libc::STDIN_FILENO, TOKEN_STDIN, EventSet::IN);
        // Adding what is already watched, or removing what is not, fails harmlessly.
        if self.pending_input.is_empty() {
            let _ = ops.add(stdin);
        } else {
            let _ = ops.remove(stdin);
        }
    }
}

impl MutEventSubscriber for LoopEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch = vec![
            (self.shared.guest_stop.event().as_raw_fd(), TOKEN_GUEST_STOP),
            (self.shared.vcpu_event.as_raw_fd(), TOKEN_VCPU_STOP),
            (self.signals.as_raw_fd(), TOKEN_SIGNAL),
        ];
        if let Some((_, t)) = &self.timeout {
            watch.push((t.as_raw_fd(), TOKEN_TIMEOUT));
        }
        if let Some(c) = self
            .controller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if let Some(fd) = c.api_fd() {
                watch.push((fd, TOKEN_API));
            }
            watch.push((c.metrics_timer_fd(), TOKEN_METRICS));
        }
        if let Some(console) = &self.console {
            // Not every stdin can be polled (a regular file, /dev/null): then there is no input.
            let stdin = Events::with_data_raw(libc::STDIN_FILENO, TOKEN_STDIN, EventSet::IN);
            if ops.add(stdin).is_err() {
                log::debug!("stdin cannot be polled; the console has no input");
                self.console = None;
            } else {
                watch.push((console.drained.as_raw_fd(), TOKEN_INPUT_DRAINED));
            }
        }
        for (fd, token) in watch {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_GUEST_STOP => {
                let _ = self.shared.guest_stop.event().read();
                if let Some(s) = self.shared.guest_stop.reason() {
                    self.finish(RunOutcome::Guest(s));
                }
            }
            TOKEN_VCPU_STOP => {
                let _ = self.shared.vcpu_event.read();
                let s = self
                    .shared
                    .vcpu_stop
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(s) = s {
                    self.finish(RunOutcome::Vcpu(s));
                }
            }
            TOKEN_TIMEOUT => {
                if let Some((d, t)) = &mut self.timeout {
                    let _ = t.wait();
                    let d = *d;
                    self.finish(RunOutcome::Timeout(d));
                }
            }
            TOKEN_SIGNAL => {
                if let Some(signo) = read_signal(&self.signals) {
                    self.finish(RunOutcome::Signal(signo));
                }
            }
            TOKEN_API => {
                let mut c = self.controller.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = c.as_mut() {
                    c.serve_running(&self.handles);
                }
            }
            TOKEN_METRICS => {
                let mut c = self.controller.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = c.as_mut() {
                    c.on_metrics_timer();
                }
            }
            TOKEN_STDIN => {
                if events
                    .event_set()
                    .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
                {
                    self.on_stdin(ops);
                }
            }
            TOKEN_INPUT_DRAINED => {
                if let Some(c) = &self.console {
                    let _ = c.drained.read();
                }
                if !self.pending_input.is_empty() {
                    self.push_input(ops);
                }
            }
            other => log::warn!("event loop: unknown token {other}"),
        }
    }
}
