//! The device-thread helper: one thread per active virtio device, waiting (epoll) on the
//! device's queue eventfds, its backend's fds and a stop eventfd. The thread installs its
//! seccomp filter before it touches anything the guest controls. A worker that returns an
//! error or panics marks its device as needing a reset and ends; the VMM keeps running.
//!
//! A worker may change what it waits on while it runs ([`Sources`]): a backend replaced at
//! run time (a disk's new io_uring ring, a new rate limiter) brings new descriptors, created
//! on another thread and handed over; the worker adds them to its epoll set and removes the
//! old ones before it closes them.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceHealth, InterruptReason, VirtioInterrupt};
use crate::seccomp;

/// The token of the stop eventfd; workers must not use it.
pub const STOP_TOKEN: u32 = u32::MAX;

/// The work of one device thread.
pub trait DeviceWorker: Send + 'static {
    /// The thread kind, for its name, its logs and its seccomp filter ("virtio-rng").
    fn kind(&self) -> &'static str;
    /// The descriptors to wait on, each with the token `handle` gets back.
    fn sources(&self) -> Vec<(RawFd, u32)>;
    /// The seccomp kind of this thread: the calls it needs beyond those every device thread
    /// has ([`seccomp::THREAD_BASE`], [`seccomp::THREAD_BASE_ARGS`],
    /// [`seccomp::DEVICE_THREAD_BASE`]).
    fn seccomp(&self) -> &'static seccomp::DeviceKind;
    /// The descriptor of `token` is readable. `sources` changes what the thread waits on.
    /// An error ends the worker and marks the device as needing a reset.
    fn handle(&mut self, token: u32, sources: &Sources<'_>) -> Result<(), String>;
}

/// The epoll set of a running device thread, as its worker may change it.
pub struct Sources<'a> {
    epoll: Option<&'a Epoll>,
    /// What is in the set besides the stop eventfd (removed from it if the worker fails).
    registered: RefCell<Vec<RawFd>>,
}

impl Sources<'_> {
    /// The sources of a worker driven without a thread (tests): changes are not made
    /// anywhere; whoever drives the worker asks [`DeviceWorker::sources`] again.
    pub fn detached() -> Sources<'static> {
        Sources {
            epoll: None,
            registered: RefCell::new(Vec::new()),
        }
    }

    /// Starts waiting on `fd`; its events come back to the worker as `token`.
    pub fn add(&self, fd: RawFd, token: u32) -> std::io::Result<()> {
        if let Some(e) = self.epoll {
            e.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, u64::from(token)),
            )?;
            self.registered.borrow_mut().push(fd);
        }
        Ok(())
    }

    /// Moves `token` from the descriptor `before` to `after` (either may be absent: a limiter
    /// created or removed); nothing when they are the same. Call it before `before` is
    /// closed.
    pub fn replace(
        &self,
        before: Option<RawFd>,
        after: Option<RawFd>,
        token: u32,
    ) -> Result<(), String> {
        if before == after {
            return Ok(());
        }
        if let Some(fd) = before {
            if let Err(e) = self.remove(fd) {
                log::debug!("device thread: cannot stop watching descriptor {fd}: {e}");
            }
        }
        if let Some(fd) = after {
            self.add(fd, token)
                .map_err(|e| format!("cannot watch the new descriptor {fd}: {e}"))?;
        }
        Ok(())
    }

    /// Stops waiting on `fd`; call it before `fd` is closed. Events of `fd` that were already
    /// collected may still reach the worker once, with the token `fd` had.
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        let Some(e) = self.epoll else {
            return Ok(());
        };
        self.registered.borrow_mut().retain(|&r| r != fd);
        e.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// A running device thread; dropping it stops the thread and waits for it.
pub struct WorkerHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                log::error!("cannot stop a device thread: {e}");
                return;
            }
            let _ = t.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts `worker` on its own thread.
pub fn spawn<W: DeviceWorker>(
    worker: W,
    health: DeviceHealth,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> std::io::Result<WorkerHandle> {
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let thread_stop = stop.try_clone()?;
    let kind = worker.kind();
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        thread_stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, u64::from(STOP_TOKEN)),
    )?;
    let sources = worker.sources();
    for &(fd, token) in &sources {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, u64::from(token)),
        )?;
    }
    let filter = seccomp::prepare(&worker.seccomp().policy())?;
    let thread = std::thread::Builder::new()
        .name(format!("cgvm-{kind}"))
        .spawn(move || {
            if let Some(f) = filter {
                if let Err(e) = f.install() {
                    log::error!("{kind}: {e}");
                    health.mark_broken();
                    let _ = interrupt.trigger(InterruptReason::Config);
                    return;
                }
            }
            let registered = sources.iter().map(|&(fd, _)| fd).collect();
            if run(worker, &epoll, &thread_stop, registered) == Ended::Broken {
                health.mark_broken();
                let _ = interrupt.trigger(InterruptReason::Config);
                wait_for_stop(&epoll, &thread_stop);
            }
        })?;
    Ok(WorkerHandle {
        stop,
        thread: Some(thread),
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Stopped,
    Broken,
}

/// Runs `worker` until it is stopped or fails; `registered` is what the epoll set holds
/// besides the stop eventfd. A failed worker's sources leave the set (so that waiting to be
/// stopped does not spin) before the worker is dropped.
fn run<W: DeviceWorker>(
    mut worker: W,
    epoll: &Epoll,
    stop: &EventFd,
    registered: Vec<RawFd>,
) -> Ended {
    let kind = worker.kind();
    let sources = Sources {
        epoll: Some(epoll),
        registered: RefCell::new(registered),
    };
    let mut events = vec![EpollEvent::default(); 16];
    let ended = 'wait: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                log::error!("{kind}: epoll failed: {e}; the device needs a reset");
                break Ended::Broken;
            }
        };
        for ev in &events[..n] {
            let token = ev.data() as u32;
            if token == STOP_TOKEN {
                let _ = stop.read();
                break 'wait Ended::Stopped;
            }
            let why = match catch_unwind(AssertUnwindSafe(|| worker.handle(token, &sources))) {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(panic) => format!("panicked: {}", crate::panic_message(panic.as_ref())),
            };
            log::error!("{kind}: {why}; the device needs a reset");
            break 'wait Ended::Broken;
        }
    };
    if ended == Ended::Broken {
        // While the descriptors are still open: one closed first would stay in the set for as
        // long as a duplicate of it lives (the transport keeps the queue eventfds).
        for fd in sources.registered.take() {
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }
    drop(worker);
    ended
}

fn wait_for_stop(epoll: &Epoll, stop: &EventFd) {
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        match epoll.wait(-1, &mut events) {
            Ok(n) if events[..n].iter().any(|e| e.data() as u32 == STOP_TOKEN) => {
                let _ = stop.read();
                return;
            }
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST_KIND: seccomp::DeviceKind = seccomp::DeviceKind {
        name: "test-device",
        calls: &[],
        args: &[],
    };
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct CountingInterrupt {
        config: AtomicU32,
        queue: AtomicU32,
    }

    impl VirtioInterrupt for CountingInterrupt {
        fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
            match reason {
                InterruptReason::Config => self.config.fetch_add(1, Ordering::SeqCst),
                InterruptReason::Queue(_) => self.queue.fetch_add(1, Ordering::SeqCst),
            };
            Ok(())
        }
    }

    /// A worker that fails on its first event, by panicking or by returning an error.
    struct Failing {
        evt: EventFd,
        panic: bool,
    }

    impl DeviceWorker for Failing {
        fn kind(&self) -> &'static str {
            "test-device"
        }
        fn sources(&self) -> Vec<(RawFd, u32)> {
            vec![(self.evt.as_raw_fd(), 0)]
        }
        fn seccomp(&self) -> &'static seccomp::DeviceKind {
            &TEST_KIND
        }
        fn handle(&mut self, _token: u32, _sources: &Sources<'_>) -> Result<(), String> {
            let _ = self.evt.read();
            if self.panic {
                panic!("boom");
            }
            Err("backend gone".into())
        }
    }

    fn fails_into_needs_reset(panic: bool) {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(crate::install_panic_hook);
        let health = DeviceHealth::new();
        let intr = Arc::new(CountingInterrupt::default());
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let worker = Failing {
            evt: evt.try_clone().unwrap(),
            panic,
        };
        let handle = spawn(worker, health.clone(), intr.clone()).unwrap();
        evt.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !health.is_broken() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            health.is_broken(),
            "the device is marked as needing a reset"
        );
        assert_eq!(
            intr.config.load(Ordering::SeqCst),
            1,
            "one configuration interrupt"
        );
        // Further notifications are ignored, and stopping still joins the thread.
        evt.write(1).unwrap();
        handle.stop();
    }

    #[test]
    fn a_panicking_worker_marks_its_device_needs_reset_and_stops_cleanly() {
        fails_into_needs_reset(true);
    }

    #[test]
    fn a_worker_error_marks_its_device_needs_reset() {
        fails_into_needs_reset(false);
    }

    /// A worker that, on an event of its first eventfd, starts waiting on its second, and
    /// stops waiting on it after one event.
    struct Switching {
        first: EventFd,
        second: EventFd,
        seen: Arc<AtomicU32>,
    }

    impl DeviceWorker for Switching {
        fn kind(&self) -> &'static str {
            "test-switching"
        }
        fn sources(&self) -> Vec<(RawFd, u32)> {
            vec![(self.first.as_raw_fd(), 0)]
        }
        fn seccomp(&self) -> &'static seccomp::DeviceKind {
            &TEST_KIND
        }
        fn handle(&mut self, token: u32, sources: &Sources<'_>) -> Result<(), String> {
            match token {
                0 => {
                    let _ = self.first.read();
                    sources
                        .add(self.second.as_raw_fd(), 1)
                        .map_err(|e| e.to_string())
                }
                _ => {
                    let _ = self.second.read();
                    self.seen.fetch_add(1, Ordering::SeqCst);
                    sources
                        .remove(self.second.as_raw_fd())
                        .map_err(|e| e.to_string())
                }
            }
        }
    }

    #[test]
    fn a_worker_changes_what_its_thread_waits_on() {
        let health = DeviceHealth::new();
        let intr = Arc::new(CountingInterrupt::default());
        let first = EventFd::new(EFD_NONBLOCK).unwrap();
        let second = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU32::new(0));
        let worker = Switching {
            first: first.try_clone().unwrap(),
            second: second.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let handle = spawn(worker, health.clone(), intr).unwrap();
        let wait_for = |n: u32| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.load(Ordering::SeqCst) != n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(seen.load(Ordering::SeqCst), n);
        };
        // Not a source yet: nothing seen.
        second.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        // Added: its pending event arrives; then removed, further events do not.
        first.write(1).unwrap();
        wait_for(1);
        second.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        // And again.
        first.write(1).unwrap();
        wait_for(2);
        assert!(!health.is_broken());
        handle.stop();
        // Detached sources change nothing and never fail.
        let d = Sources::detached();
        d.add(first.as_raw_fd(), 0).unwrap();
        d.remove(first.as_raw_fd()).unwrap();
    }

    #[test]
    fn stopping_a_healthy_worker_joins_it() {
        let health = DeviceHealth::new();
        let intr = Arc::new(CountingInterrupt::default());
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let handle = spawn(Failing { evt, panic: true }, health.clone(), intr).unwrap();
        drop(handle);
        assert!(!health.is_broken());
    }
}
