//! The device-thread helper: one thread per active virtio device, waiting (epoll) on the
//! device's queue eventfds, its backend's fds and a stop eventfd. The thread installs its
//! seccomp filter before it touches anything the guest controls. A worker that returns an
//! error or panics marks its device as needing a reset and ends; the VMM keeps running.

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
    /// The system calls this kind needs beyond those every device thread has
    /// ([`seccomp::DEVICE_THREAD_BASE`]).
    fn syscalls(&self) -> &'static [i64];
    /// The descriptor of `token` is readable. An error ends the worker and marks the device
    /// as needing a reset.
    fn handle(&mut self, token: u32) -> Result<(), String>;
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
    let filter = seccomp::device_thread_filter(worker.syscalls())?;
    let thread = std::thread::Builder::new()
        .name(format!("cgvm-{kind}"))
        .spawn(move || {
            if let Some(f) = filter {
                if let Err(e) = seccompiler::apply_filter(&f) {
                    log::error!("{kind}: cannot install the seccomp filter: {e}");
                    health.mark_broken();
                    let _ = interrupt.trigger(InterruptReason::Config);
                    return;
                }
                crate::mark_confined_thread();
            }
            if run(worker, &epoll, &thread_stop) == Ended::Broken {
                health.mark_broken();
                let _ = interrupt.trigger(InterruptReason::Config);
                // Stop watching the device's sources and wait to be stopped, without spinning.
                for (fd, _) in sources {
                    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
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

fn run<W: DeviceWorker>(mut worker: W, epoll: &Epoll, stop: &EventFd) -> Ended {
    let kind = worker.kind();
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                log::error!("{kind}: epoll failed: {e}; the device needs a reset");
                return Ended::Broken;
            }
        };
        for ev in &events[..n] {
            let token = ev.data() as u32;
            if token == STOP_TOKEN {
                let _ = stop.read();
                return Ended::Stopped;
            }
            let why = match catch_unwind(AssertUnwindSafe(|| worker.handle(token))) {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(panic) => format!("panicked: {}", crate::panic_message(panic.as_ref())),
            };
            log::error!("{kind}: {why}; the device needs a reset");
            return Ended::Broken;
        }
    }
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
        fn syscalls(&self) -> &'static [i64] {
            &[]
        }
        fn handle(&mut self, _token: u32) -> Result<(), String> {
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
