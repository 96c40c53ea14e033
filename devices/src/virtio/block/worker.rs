//! The virtio-blk device thread: takes requests from the queue, checks them
//! ([`parse`](super::request::parse)), charges the rate limiter, hands them to the engine and
//! puts each finished one in the used ring with its status byte.
//!
//! Its sources: the queue's notification eventfd, the rate limiter's timerfd (when there is a
//! limiter) and the io_uring completion eventfd (with that engine). A request the limiter
//! refuses goes back to the available ring and the worker takes no more until the timer
//! fires; with io_uring, it also stops taking requests while all slots are in flight, and goes
//! on when completions free some. A broken queue (an available index more than the queue
//! size ahead, a head index out of range, a used ring outside guest memory) is fatal: the
//! worker returns an error and the device needs a reset.
//!
//! Its last source is the control eventfd: a [`BlockControl`](super::BlockControl) left a
//! change in the mailbox. A rate limiter update is made at once. A backing-file swap first
//! lets the requests in flight on the old disk finish (they complete as usual, and no new
//! request is started meanwhile), then the worker switches disk and engine, raises the
//! configuration interrupt, moves its epoll set to the new descriptors and drops the old
//! ones, and goes on with the queue.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::control::{Shared, Taken};
use super::request::{parse, status, Completion, Op};
use super::{engine, BlockMetrics, BlockState};
use crate::seccomp::DeviceKind;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, InterruptReason, VirtioInterrupt};

const QUEUE_TOKEN: u32 = 0;
const LIMITER_TOKEN: u32 = 1;
const COMPLETION_TOKEN: u32 = 2;
const COMMAND_TOKEN: u32 = 3;

/// The block device's worker.
pub struct BlockWorker {
    mem: GuestMemoryMmap,
    queue: ActiveQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    state: Option<BlockState>,
    shared: Arc<Shared>,
    metrics: Arc<BlockMetrics>,
    seccomp: &'static DeviceKind,
    /// A swap waits for the requests in flight: start no new ones.
    quiescing: bool,
}

/// Why taking requests stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The available ring is empty.
    Empty,
    /// The rate limiter or the engine has no room; something else will wake the worker.
    Held,
}

impl BlockWorker {
    /// A worker over the request queue, borrowing `state` until it stops (then it goes back
    /// into `shared`'s slot).
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        queue: ActiveQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
        state: BlockState,
        shared: Arc<Shared>,
        metrics: Arc<BlockMetrics>,
    ) -> Self {
        // What the configured engine needs, whichever executor runs now: a swap can bring
        // the other one (see engine::seccomp_kind).
        let seccomp = engine::seccomp_kind(shared.settings().engine);
        Self {
            mem,
            queue,
            interrupt,
            state: Some(state),
            shared,
            metrics,
            seccomp,
            quiescing: false,
        }
    }

    /// The borrowed state (tests).
    #[cfg(test)]
    pub(crate) fn borrowed_state(&self) -> Option<&BlockState> {
        self.state.as_ref()
    }

    fn state(&mut self) -> Result<&mut BlockState, String> {
        self.state
            .as_mut()
            .ok_or_else(|| "the disk is gone".to_string())
    }

    /// Takes and starts requests until the queue is empty or something holds them back, then
    /// signals the guest if it wants to be.
    /// `used_any` says whether used buffers were added already (completions).
    fn process_queue(&mut self, mut used_any: bool) -> Result<(), String> {
        loop {
            self.queue
                .queue
                .disable_notification(&self.mem)
                .map_err(|e| format!("queue: {e}"))?;
            let stop = self.take_requests(&mut used_any)?;
            self.state()?
                .executor
                .kick()
                .map_err(|e| format!("io_uring submit: {e}"))?;
            if stop == Stop::Held {
                break;
            }
            if !self
                .queue
                .queue
                .enable_notification(&self.mem)
                .map_err(|e| format!("queue: {e}"))?
            {
                break;
            }
        }
        self.signal(used_any)
    }

    fn take_requests(&mut self, used_any: &mut bool) -> Result<Stop, String> {
        let Self {
            mem,
            queue,
            state,
            metrics,
            quiescing,
            ..
        } = self;
        let state = state.as_mut().ok_or("the disk is gone")?;
        let q = &mut queue.queue;
        let info = state.disk.info();
        loop {
            if *quiescing
                || !state.executor.has_room()
                || state.limiter.as_ref().is_some_and(|l| l.is_blocked())
            {
                return Ok(Stop::Held);
            }
            let chain = {
                let mut iter = q.iter(&*mem).map_err(|e| format!("queue: {e}"))?;
                iter.next()
            };
            let Some(chain) = chain else {
                return Ok(Stop::Empty);
            };
            let head = chain.head_index();
            if head >= q.size() {
                return Err(format!("queue: head index {head} out of range"));
            }
            let req = match parse(mem, chain, &info) {
                Ok(req) => req,
                Err(c) => {
                    complete(mem, q, metrics, c)?;
                    *used_any = true;
                    continue;
                }
            };
            if let Some(limiter) = &mut state.limiter {
                let bytes = req.rate_limited_bytes();
                if !limiter.admit(bytes) {
                    q.go_to_previous_position();
                    BlockMetrics::add(&metrics.throttled, 1);
                    return Ok(Stop::Held);
                }
            }
            if let Some(c) = state.executor.submit(req, &mut state.disk, &state.serial) {
                complete(mem, q, metrics, c)?;
                *used_any = true;
            }
        }
    }

    /// Puts the engine's finished requests in the used ring.
    fn reap(&mut self) -> Result<bool, String> {
        let mut done = Vec::new();
        self.state()?
            .executor
            .reap(&mut done)
            .map_err(|e| format!("io_uring: {e}"))?;
        let any = !done.is_empty();
        for c in done {
            complete(&self.mem, &mut self.queue.queue, &self.metrics, c)?;
        }
        Ok(any)
    }

    /// Makes the change a control call left in the mailbox, if any (a swap once nothing is
    /// in flight), and moves the epoll set to the new descriptors before the old ones close.
    fn take_command(&mut self, sources: &Sources<'_>) -> Result<(), String> {
        let Self {
            state,
            shared,
            interrupt,
            quiescing,
            ..
        } = self;
        let state = state.as_mut().ok_or("the disk is gone")?;
        let taken = shared.take_command(state, || {
            interrupt
                .trigger(InterruptReason::Config)
                .map_err(|e| format!("configuration interrupt: {e}"))
        })?;
        *quiescing = matches!(taken, Taken::Waiting);
        let Taken::Done {
            before,
            after,
            retired,
            raised,
        } = taken
        else {
            return Ok(());
        };
        sources.replace(before.limiter, after.limiter, LIMITER_TOKEN)?;
        sources.replace(before.completion, after.completion, COMPLETION_TOKEN)?;
        // Closes the old files, the old ring (with nothing in flight) or the old timer.
        drop(retired);
        raised
    }

    fn signal(&mut self, used_any: bool) -> Result<(), String> {
        if used_any
            && self
                .queue
                .queue
                .needs_notification(&self.mem)
                .map_err(|e| format!("queue: {e}"))?
        {
            self.interrupt
                .trigger(InterruptReason::Queue(self.queue.index))
                .map_err(|e| format!("interrupt: {e}"))?;
        }
        Ok(())
    }
}

/// Writes `c`'s status byte, puts its chain in the used ring and counts it.
fn complete(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    metrics: &BlockMetrics,
    c: Completion,
) -> Result<(), String> {
    let mut used_len = c.used_len;
    if let Some(addr) = c.status_addr {
        if mem.write_obj(c.status, addr).is_err() {
            log::debug!("virtio-blk: status byte of request {} unwritable", c.head);
            used_len = 0;
        }
    }
    q.add_used(mem, c.head, used_len)
        .map_err(|e| format!("used ring: {e}"))?;
    if c.status != status::OK || c.status_addr.is_none() {
        BlockMetrics::add(&metrics.errors, 1);
        return Ok(());
    }
    match c.op {
        Op::Read => {
            BlockMetrics::add(&metrics.read_ops, 1);
            BlockMetrics::add(&metrics.read_bytes, c.bytes);
        }
        Op::Write => {
            BlockMetrics::add(&metrics.write_ops, 1);
            BlockMetrics::add(&metrics.write_bytes, c.bytes);
        }
        Op::Flush => BlockMetrics::add(&metrics.flush_ops, 1),
        Op::Other => {}
    }
    Ok(())
}

impl DeviceWorker for BlockWorker {
    fn kind(&self) -> &'static str {
        "virtio-blk"
    }

    fn sources(&self) -> Vec<(RawFd, u32)> {
        let mut s = vec![(self.queue.notify.as_raw_fd(), QUEUE_TOKEN)];
        if let Some(state) = &self.state {
            if let Some(l) = &state.limiter {
                s.push((l.as_raw_fd(), LIMITER_TOKEN));
            }
            if let Some(fd) = state.executor.completion_fd() {
                s.push((fd, COMPLETION_TOKEN));
            }
        }
        s.push((self.shared.command_fd(), COMMAND_TOKEN));
        s
    }

    fn seccomp(&self) -> &'static DeviceKind {
        self.seccomp
    }

    fn handle(&mut self, token: u32, sources: &Sources<'_>) -> Result<(), String> {
        let mut used_any = false;
        match token {
            QUEUE_TOKEN => {
                let _ = self.queue.notify.read();
            }
            LIMITER_TOKEN => {
                if let Some(l) = &mut self.state()?.limiter {
                    if let Err(e) = l.event_handler() {
                        log::debug!("virtio-blk: {e}");
                    }
                }
            }
            // Completions free slots: go on taking requests, or make the swap that waited.
            COMPLETION_TOKEN => {
                used_any = self.reap()?;
                if self.quiescing && self.state()?.executor.in_flight() == 0 {
                    self.take_command(sources)?;
                }
            }
            COMMAND_TOKEN => {
                self.shared.clear_command_event();
                self.take_command(sources)?;
            }
            _ => return Ok(()),
        }
        self.process_queue(used_any)
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take() {
            state.executor.drain();
            self.shared.give_back(state);
        }
    }
}
