//! How requests are executed: [`Engine::Sync`] does the I/O with blocking system calls on the
//! device thread; [`Engine::Uring`] submits reads, writes and flushes to an io_uring and
//! completes each request when its completion arrives, so that many requests are in flight at
//! once. GET_ID, DISCARD and WRITE_ZEROES are executed synchronously by both (they are rare
//! and their fallbacks are chains of calls), and a disk behind a sparse overlay, whose reads
//! and writes are split between two files and need read-modify-writes, always uses the sync
//! engine (a reflinked overlay and plain files use io_uring).

pub(crate) mod sync;
pub(crate) mod uring;

use crate::seccomp::DeviceKind;
use std::io;
use std::os::fd::RawFd;

use super::disk::Disk;
use super::request::{Completion, Request, ID_BYTES};

/// A disk's I/O engine, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Blocking system calls on the device thread.
    #[default]
    Sync,
    /// io_uring: many requests in flight.
    Uring,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Sync => "sync",
            Engine::Uring => "uring",
        })
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Engine::Sync),
            "uring" => Ok(Engine::Uring),
            other => Err(format!("unknown block engine {other:?} (sync or uring)")),
        }
    }
}

/// The system calls a device thread makes with a disk configured for `engine`. A disk set
/// up for io_uring may run the sync engine (behind a sparse overlay) and, after its backing
/// file is swapped, io_uring again (or the other way round), so the list follows what was
/// configured, not the executor of the moment: the io_uring list holds the sync one.
pub(crate) fn seccomp_kind(engine: Engine) -> &'static DeviceKind {
    match engine {
        Engine::Sync => &SYNC_KIND,
        Engine::Uring => &URING_KIND,
    }
}

/// The device thread of a disk on the sync engine.
pub(crate) static SYNC_KIND: DeviceKind = DeviceKind {
    name: "virtio-blk-sync",
    calls: sync::SYSCALLS,
    args: &[],
};

/// The device thread of a disk on io_uring.
pub(crate) static URING_KIND: DeviceKind = DeviceKind {
    name: "virtio-blk-uring",
    calls: uring::SYSCALLS,
    args: &[],
};

/// The engine of one disk, with its state.
pub(crate) enum Executor {
    /// Everything on the device thread.
    Sync,
    /// An io_uring.
    Uring(Box<uring::UringEngine>),
}

impl Executor {
    /// The engine `engine` asks for on `disk`; a sparse overlay always gets the sync engine.
    pub(crate) fn new(engine: Engine, disk: &Disk) -> io::Result<Self> {
        match (engine, disk.raw()) {
            (Engine::Sync, _) => Ok(Executor::Sync),
            (Engine::Uring, Some(_)) => Ok(Executor::Uring(Box::new(uring::UringEngine::new()?))),
            (Engine::Uring, None) => {
                log::info!(
                    "virtio-blk: a disk behind a sparse overlay uses the sync engine, not io_uring"
                );
                Ok(Executor::Sync)
            }
        }
    }

    /// The engine's name, for the log.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Executor::Sync => "sync",
            Executor::Uring(_) => "io_uring",
        }
    }

    /// Requests started and not yet reaped (always 0 for the sync engine).
    pub(crate) fn in_flight(&self) -> usize {
        match self {
            Executor::Sync => 0,
            Executor::Uring(u) => u.in_flight(),
        }
    }

    /// Starts `req`; returns its completion when it finished at once.
    pub(crate) fn submit(
        &mut self,
        req: Request,
        disk: &mut Disk,
        serial: &[u8; ID_BYTES],
    ) -> Option<Completion> {
        match self {
            Executor::Sync => Some(sync::execute(&req, disk, serial)),
            Executor::Uring(u) => u.submit(req, disk, serial),
        }
    }

    /// Whether another request can be started.
    pub(crate) fn has_room(&self) -> bool {
        match self {
            Executor::Sync => true,
            Executor::Uring(u) => u.has_room(),
        }
    }

    /// Hands what [`submit`](Self::submit) queued to the kernel.
    pub(crate) fn kick(&mut self) -> io::Result<()> {
        match self {
            Executor::Sync => Ok(()),
            Executor::Uring(u) => u.kick(),
        }
    }

    /// The descriptor that becomes readable when requests complete, if completions are
    /// asynchronous.
    pub(crate) fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Executor::Sync => None,
            Executor::Uring(u) => Some(u.completion_fd()),
        }
    }

    /// Collects the requests that finished into `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self {
            Executor::Sync => Ok(()),
            Executor::Uring(u) => u.reap(out),
        }
    }

    /// Waits for every request in flight and forgets them (the device is stopping: their
    /// guest buffers must not be touched once it has stopped).
    pub(crate) fn drain(&mut self) {
        if let Executor::Uring(u) = self {
            u.drain();
        }
    }
}
