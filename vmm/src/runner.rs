//! The VMM thread's event loop: it waits (event-manager, epoll) for the guest to stop, for a
//! vCPU to fail, for the time limit, for a terminating signal and for console input, then
//! stops the vCPU threads and returns the [`RunOutcome`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::console::EscapeFilter;
use crate::outcome::RunOutcome;
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
fn exit_signalfd() -> std::io::Result<OwnedFd> {
    let set = vmm_sys_util::signal::create_sigset(&EXIT_SIGNALS).map_err(std::io::Error::from)?;
    // SAFETY: signalfd reads the set; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A machine ready to run: VM, vCPU threads waiting to start, devices on the buses.
pub struct Vmm {
    /// Keeps the KVM fds and guest memory alive while vCPU threads run.
    _vm: Vm,
    shared: Arc<VcpuShared>,
    vcpus: Vec<JoinHandle<()>>,
    timeout: Option<Duration>,
    console_input: Option<ConsoleInput>,
}

impl Vmm {
    /// Assembles a machine from its built parts (see `builder`).
    pub(crate) fn new(
        vm: Vm,
        shared: Arc<VcpuShared>,
        vcpus: Vec<JoinHandle<()>>,
        timeout: Option<Duration>,
        console_input: Option<ConsoleInput>,
    ) -> Self {
        Self {
            _vm: vm,
            shared,
            vcpus,
            timeout,
            console_input,
        }
    }

    /// Runs the event loop until the guest stops, then stops the vCPUs.
    pub fn run(mut self) -> RunOutcome {
        let outcome = self.wait_for_stop();
        self.shared.timeline.stopped(&outcome.to_string());
        self.stop_vcpus();
        outcome
    }

    fn wait_for_stop(&mut self) -> RunOutcome {
        let mut em = match EventManager::<Box<dyn MutEventSubscriber + Send>>::new() {
            Ok(em) => em,
            Err(e) => return RunOutcome::VmmError(format!("cannot create the event loop: {e}")),
        };
        let events =
            match LoopEvents::new(self.shared.clone(), self.timeout, self.console_input.take()) {
                Ok(ev) => ev,
                Err(e) => {
                    return RunOutcome::VmmError(format!("cannot set up the event loop: {e}"))
                }
            };
        let outcome = events.outcome.clone();
        em.add_subscriber(Box::new(events));
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

const TOKEN_GUEST_STOP: u32 = 1;
const TOKEN_VCPU_STOP: u32 = 2;
const TOKEN_TIMEOUT: u32 = 3;
const TOKEN_SIGNAL: u32 = 4;
const TOKEN_STDIN: u32 = 5;
const TOKEN_INPUT_DRAINED: u32 = 6;

/// The one subscriber of the VMM loop for this events.
struct LoopEvents {
    shared: Arc<VcpuShared>,
    timeout: Option<(Duration, TimerFd)>,
    signals: OwnedFd,
    console: Option<ConsoleInput>,
    escape: EscapeFilter,
    pending_input: Vec<u8>,
    outcome: Arc<std::sync::Mutex<Option<RunOutcome>>>,
}

impl LoopEvents {
    fn new(
        shared: Arc<VcpuShared>,
        timeout: Option<Duration>,
        console: Option<ConsoleInput>,
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
                let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
                // SAFETY: read writes at most info.len() bytes into the buffer we own.
                let n = unsafe {
                    libc::read(
                        self.signals.as_raw_fd(),
                        info.as_mut_ptr().cast(),
                        info.len(),
                    )
                };
                if n == info.len() as isize {
                    let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                    self.finish(RunOutcome::Signal(signo as i32));
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
