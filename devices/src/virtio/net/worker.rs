//! The virtio-net device thread.
//!
//! Receive: a frame is read from the backend (from a tap with its header; from a stream to
//! passt behind a zeroed header) into a host buffer, then copied into as many receive chains
//! as it needs (one without MRG_RXBUF), with `num_buffers` set in its header. A frame is
//! never read while the previous one waits: when the guest has posted too little room, or
//! the receive limiter holds it back, the frame stays pending and the backend leaves the
//! epoll set; the receive queue's notification (or the limiter's timer) brings it back. So
//! the thread never spins and never drops a frame it has room for.
//!
//! Transmit: each chain (header and frame, device-readable, at most [`MAX_TX_FRAME`] bytes)
//! is gathered into a host buffer and written to the tap in one write, or, header stripped,
//! to the stream behind its length. When the stream's socket is full, what it did not take
//! is kept, no further chain is taken, and the thread waits for the socket to be writable
//! (through [`FrameStream::writable_fd`](super::FrameStream::writable_fd)) with the transmit
//! queue's notifications off: nothing is dropped and nothing spins.
//!
//! A failing stream (passt gone, a frame length out of range) fails the worker: the framing
//! cannot be recovered.
//!
//! A malformed chain costs only its own frame: it goes back to the guest with a used length
//! of 0 and is counted; the thread goes on.
//!
//! A worker started by [`Net`](super::Net) also waits on the control eventfd: a
//! [`NetControl`](super::NetControl) left a rate limiter change in the mailbox. The worker
//! makes it, moves its epoll set from the old timers to the new ones, and retries at once
//! what a limiter held back (the pending frame, the transmit ring). When it stops, it gives
//! its limiters back to the device.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::control::{Limiters, Shared};
use super::stream::MAX_STREAM_FRAME;
use super::tap::VNET_HDR_LEN;
use super::{Backend, NetMetrics};
use crate::rate_limiter::RateLimiter;
use crate::seccomp::DeviceKind;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, InterruptReason, VirtioInterrupt};

/// The largest frame (header included) read from the tap: a 64 KiB GSO packet behind an
/// Ethernet header with a VLAN tag.
pub const MAX_RX_FRAME: usize = VNET_HDR_LEN + 65535 + 18;
/// The largest transmit chain (header included) the device sends; longer ones are dropped.
pub const MAX_TX_FRAME: usize = VNET_HDR_LEN + 65535 + 18;
/// The most frames read from the tap for one event, so transmit is not starved (the tap
/// stays in the epoll set, which is level-triggered, so the rest follow).
pub const RX_BATCH: usize = 64;

const RX_QUEUE_TOKEN: u32 = 0;
const TX_QUEUE_TOKEN: u32 = 1;
const TAP_TOKEN: u32 = 2;
const RX_LIMITER_TOKEN: u32 = 3;
const TX_LIMITER_TOKEN: u32 = 4;
const STREAM_WRITABLE_TOKEN: u32 = 5;
const COMMAND_TOKEN: u32 = 6;

/// The device thread over a tap: frames are read and written with read and write (in the
/// base list); the limiters' timerfds.
pub(crate) static TAP_KIND: DeviceKind = DeviceKind {
    name: "virtio-net-tap",
    calls: &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime],
    args: &[],
};

/// The device thread over passt's stream socket: its recv and sendmsg, and the limiters'
/// timerfds.
pub(crate) static PASST_KIND: DeviceKind = DeviceKind {
    name: "virtio-net-passt",
    calls: &[
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
    ],
    args: &[],
};

/// What one read from the backend gave.
enum Read {
    /// A frame of this length (header included) is in the buffer.
    Frame(usize),
    /// Nothing to read now.
    Empty,
    /// A frame was lost (a tap read error about that frame alone).
    Dropped,
}

impl Backend {
    /// Reads one frame, with its virtio-net header, into `buf`.
    fn read_into(&self, buf: &mut [u8]) -> Result<Read, String> {
        match self {
            Backend::Tap(tap) => match tap.read_frame(buf) {
                Ok(Some(n)) => Ok(Read::Frame(n)),
                Ok(None) => Ok(Read::Empty),
                Err(e) => match e.raw_os_error() {
                    // The frame did not fit or was malformed; it is gone.
                    Some(libc::EFAULT) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) => {
                        Ok(Read::Dropped)
                    }
                    _ => Err(format!("tap {}: read: {e}", tap.name())),
                },
            },
            Backend::Stream(s) => match s.read_frame(buf) {
                Ok(Some(n)) => Ok(Read::Frame(n)),
                Ok(None) => Ok(Read::Empty),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Whether frames wait inside the backend, where epoll cannot see them.
    fn has_buffered_frame(&self) -> bool {
        match self {
            Backend::Tap(_) => false,
            Backend::Stream(s) => s.has_buffered_frame(),
        }
    }

    /// Sends what the backend kept from earlier; true when it takes new frames.
    fn flush(&self) -> Result<bool, String> {
        match self {
            Backend::Tap(_) => Ok(true),
            Backend::Stream(s) => s.flush().map_err(|e| e.to_string()),
        }
    }

    /// Whether the backend holds bytes its socket did not take yet.
    fn is_blocked(&self) -> bool {
        match self {
            Backend::Tap(_) => false,
            Backend::Stream(s) => s.is_blocked(),
        }
    }

    /// Sends one frame, `buf` being its virtio-net header and the Ethernet frame. `Ok(false)`
    /// when the frame was lost (a tap write error); `Err` when the backend failed for good.
    fn write_from(&self, buf: &[u8]) -> Result<bool, String> {
        match self {
            Backend::Tap(tap) => match tap.write_frame(buf) {
                Ok(_) => Ok(true),
                Err(e) => {
                    log::debug!("virtio-net: tap {}: write: {e}", tap.name());
                    Ok(false)
                }
            },
            Backend::Stream(s) => {
                let frame = &buf[VNET_HDR_LEN..];
                if frame.is_empty() || frame.len() > MAX_STREAM_FRAME {
                    log::debug!("virtio-net: {}-byte frame not sent to passt", frame.len());
                    return Ok(false);
                }
                s.send_frame(frame)
                    .map(|()| true)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// A receive chain checked for use: its head and its device-writable pieces.
struct RxChain {
    head: u16,
    pieces: Vec<(GuestAddress, usize)>,
}

/// What became of the pending frame.
enum Rx {
    /// Delivered, or dropped for good: read the next one.
    Done,
    /// No room or throttled: keep it, stop reading the tap.
    Wait,
}

fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The network device's worker.
pub struct NetWorker {
    mem: GuestMemoryMmap,
    rx: ActiveQueue,
    tx: ActiveQueue,
    backend: Arc<Backend>,
    interrupt: Arc<dyn VirtioInterrupt>,
    limiters: Limiters,
    /// Where rate limiter changes come from and the limiters go back to (a worker started
    /// by [`Net`](super::Net)).
    control: Option<Arc<Shared>>,
    mergeable: bool,
    metrics: Arc<NetMetrics>,
    rx_buf: Vec<u8>,
    /// The length of the frame in `rx_buf` that waits for the guest.
    pending: Option<usize>,
    /// Whether the backend is in the epoll set (for reading).
    reading_tap: bool,
    tx_buf: Vec<u8>,
}

impl NetWorker {
    /// A worker for the receive and transmit queues over `backend`; `mergeable` is whether
    /// the driver accepted MRG_RXBUF.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemoryMmap,
        rx: ActiveQueue,
        tx: ActiveQueue,
        backend: Arc<Backend>,
        interrupt: Arc<dyn VirtioInterrupt>,
        rx_limiter: Option<RateLimiter>,
        tx_limiter: Option<RateLimiter>,
        mergeable: bool,
        metrics: Arc<NetMetrics>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            backend,
            interrupt,
            limiters: Limiters {
                rx: rx_limiter,
                tx: tx_limiter,
            },
            control: None,
            mergeable,
            metrics,
            rx_buf: vec![0; MAX_RX_FRAME],
            pending: None,
            reading_tap: true,
            tx_buf: vec![0; MAX_TX_FRAME],
        }
    }

    /// The same worker, taking rate limiter changes from `shared` and giving its limiters
    /// back to it when dropped.
    pub(crate) fn with_control(mut self, shared: Arc<Shared>) -> Self {
        self.control = Some(shared);
        self
    }

    /// Whether the worker waits on the backend for frames (false while a frame waits for
    /// the guest).
    pub fn is_reading_tap(&self) -> bool {
        self.reading_tap
    }

    /// Whether a frame read from the backend waits for room in the guest.
    pub fn has_pending_frame(&self) -> bool {
        self.pending.is_some()
    }

    fn notify(&mut self, tx: bool) -> Result<(), String> {
        let queue = if tx { &mut self.tx } else { &mut self.rx };
        if queue
            .queue
            .needs_notification(&self.mem)
            .map_err(|e| format!("queue {}: {e}", queue.index))?
        {
            self.interrupt
                .trigger(InterruptReason::Queue(queue.index))
                .map_err(|e| format!("interrupt: {e}"))?;
        }
        Ok(())
    }

    /// Moves frames from the backend to the guest until it is empty, the guest has no room,
    /// the limiter says wait, or [`RX_BATCH`] frames were read.
    fn process_rx(&mut self, sources: &Sources<'_>) -> Result<(), String> {
        let mut used_any = false;
        let mut read = 0;
        let want_tap = loop {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    if read == RX_BATCH {
                        if self.backend.has_buffered_frame() {
                            // Frames epoll cannot see: come back after the other events.
                            self.rx
                                .notify
                                .write(1)
                                .map_err(|e| format!("rx queue eventfd: {e}"))?;
                        }
                        break true;
                    }
                    match self.backend.read_into(&mut self.rx_buf)? {
                        Read::Frame(n) => {
                            read += 1;
                            self.pending = Some(n);
                            n
                        }
                        Read::Empty => break true,
                        Read::Dropped => {
                            read += 1;
                            count(&self.metrics.rx_dropped, 1);
                            continue;
                        }
                    }
                }
            };
            if len <= VNET_HDR_LEN {
                count(&self.metrics.rx_dropped, 1);
                self.pending = None;
                continue;
            }
            match self.deliver(len, &mut used_any)? {
                Rx::Done => self.pending = None,
                Rx::Wait => break false,
            }
        };
        if want_tap != self.reading_tap {
            let fd = self.backend.as_raw_fd();
            let r = if want_tap {
                sources.add(fd, TAP_TOKEN)
            } else {
                sources.remove(fd)
            };
            r.map_err(|e| format!("{}: epoll: {e}", self.backend.describe()))?;
            self.reading_tap = want_tap;
        }
        if used_any {
            self.notify(false)?;
        }
        Ok(())
    }

    /// Pops and checks one receive chain; `Err(head)` for a malformed one.
    fn pop_rx_chain(&mut self) -> Option<Result<RxChain, u16>> {
        let chain = self.rx.queue.pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        let mut pieces = Vec::new();
        for d in chain {
            let len = d.len() as usize;
            if !d.is_write_only() || !GuestMemoryBackend::check_range(&self.mem, d.addr(), len) {
                return Some(Err(head));
            }
            if len > 0 {
                pieces.push((d.addr(), len));
            }
        }
        let room: usize = pieces.iter().map(|p| p.1).sum();
        if room < VNET_HDR_LEN {
            return Some(Err(head));
        }
        Some(Ok(RxChain { head, pieces }))
    }

    /// Puts the frame of `len` bytes in `rx_buf` into the guest's receive chains.
    fn deliver(&mut self, len: usize, used_any: &mut bool) -> Result<Rx, String> {
        let mut chains: Vec<RxChain> = Vec::new();
        let mut room = 0usize;
        let mut popped = 0u16;
        // Times the ring looked empty; bounded, so that a broken avail index cannot make
        // this loop spin.
        let mut empty = 0;
        while room < len && (self.mergeable || popped == 0) {
            match self.pop_rx_chain() {
                None => {
                    empty += 1;
                    // Out of buffers: ask for a notification when the driver adds one (with
                    // EVENT_IDX, for the entry after the last one taken: the next_avail now),
                    // unless it added some meanwhile.
                    if self
                        .rx
                        .queue
                        .enable_notification(&self.mem)
                        .map_err(|e| format!("rx queue: {e}"))?
                        && empty < 4
                    {
                        continue;
                    }
                    break;
                }
                Some(Ok(c)) => {
                    popped += 1;
                    room += c.pieces.iter().map(|p| p.1).sum::<usize>();
                    chains.push(c);
                }
                Some(Err(bad)) => {
                    // The frame is dropped; every chain taken for it goes back unused.
                    log::debug!("virtio-net: malformed receive chain {bad}; frame dropped");
                    count(&self.metrics.rx_errors, 1);
                    count(&self.metrics.rx_dropped, 1);
                    for head in chains.iter().map(|c| c.head).chain([bad]) {
                        self.rx
                            .queue
                            .add_used(&self.mem, head, 0)
                            .map_err(|e| format!("rx used ring: {e}"))?;
                    }
                    *used_any = true;
                    return Ok(Rx::Done);
                }
            }
        }
        if room < len {
            let all = popped >= self.rx.queue.size();
            if !self.mergeable && popped == 1 {
                // One chain is all a frame may have, and this one is too short for it.
                log::debug!("virtio-net: receive buffer of {room} bytes for a {len}-byte frame");
                count(&self.metrics.rx_errors, 1);
                count(&self.metrics.rx_dropped, 1);
                self.rx
                    .queue
                    .add_used(&self.mem, chains[0].head, 0)
                    .map_err(|e| format!("rx used ring: {e}"))?;
                *used_any = true;
                return Ok(Rx::Done);
            }
            self.rewind_rx(popped);
            if all {
                // Every buffer the ring can hold is too little: waiting would never end.
                count(&self.metrics.rx_dropped, 1);
                return Ok(Rx::Done);
            }
            return Ok(Rx::Wait);
        }
        if let Some(l) = self.limiters.rx.as_mut() {
            let bytes = (len - VNET_HDR_LEN) as u64;
            if !l.admit(bytes) {
                count(&self.metrics.rx_throttled, 1);
                self.rewind_rx(popped);
                return Ok(Rx::Wait);
            }
        }
        // num_buffers (le16 at offset 10 of the header): how many chains the frame uses.
        self.rx_buf[10..12].copy_from_slice(&popped.to_le_bytes());
        let mut off = 0usize;
        for c in &chains {
            let start = off;
            for &(addr, plen) in &c.pieces {
                if off == len {
                    break;
                }
                let n = plen.min(len - off);
                if self
                    .mem
                    .write_slice(&self.rx_buf[off..off + n], addr)
                    .is_err()
                {
                    // Checked above, so only a guest that changed its memory map gets here.
                    count(&self.metrics.rx_errors, 1);
                    break;
                }
                off += n;
            }
            let used = u32::try_from(off - start).unwrap_or(u32::MAX);
            self.rx
                .queue
                .add_used(&self.mem, c.head, used)
                .map_err(|e| format!("rx used ring: {e}"))?;
        }
        *used_any = true;
        count(&self.metrics.rx_frames, 1);
        count(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(Rx::Done)
    }

    /// Makes the rate limiter change a control call left in the mailbox, if any, moves the
    /// epoll set to the new timers before the old ones close, and retries what the old
    /// limiters held back.
    fn take_command(&mut self, sources: &Sources<'_>) -> Result<(), String> {
        let Some(shared) = self.control.clone() else {
            return Ok(());
        };
        shared.clear_command_event();
        let Some(taken) = shared.take_command(&mut self.limiters) else {
            return Ok(());
        };
        sources.replace(taken.before.0, taken.after.0, RX_LIMITER_TOKEN)?;
        sources.replace(taken.before.1, taken.after.1, TX_LIMITER_TOKEN)?;
        // Closes the timers of the limiters that were replaced or removed.
        drop(taken.retired);
        // A frame held back under the old buckets goes now if the new ones let it.
        self.process_rx(sources)?;
        self.process_tx()
    }

    fn rewind_rx(&mut self, n: u16) {
        for _ in 0..n {
            self.rx.queue.go_to_previous_position();
        }
    }

    /// Sends the guest's transmit chains until the ring is empty, the limiter says wait, or
    /// the backend takes no more (a full stream).
    fn process_tx(&mut self) -> Result<(), String> {
        let mut used_any = false;
        'ring: loop {
            self.tx
                .queue
                .disable_notification(&self.mem)
                .map_err(|e| format!("tx queue: {e}"))?;
            if !self.backend.flush()? {
                // Full: chains stay on the ring, notifications off; writability resumes us.
                break 'ring;
            }
            while let Some(chain) = self.tx.queue.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                if let Some(l) = self.limiters.tx.as_mut() {
                    let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
                    let bytes = bytes
                        .min(MAX_TX_FRAME as u64)
                        .saturating_sub(VNET_HDR_LEN as u64);
                    if !l.admit(bytes) {
                        // Back on the ring, notifications off: the limiter's timer resumes us.
                        self.tx.queue.go_to_previous_position();
                        count(&self.metrics.tx_throttled, 1);
                        break 'ring;
                    }
                }
                let mut total = 0usize;
                let mut why = None;
                for d in chain {
                    let len = d.len() as usize;
                    if d.is_write_only() {
                        why = Some("device-writable descriptor");
                        break;
                    }
                    if len > MAX_TX_FRAME - total {
                        why = Some("frame too long");
                        break;
                    }
                    if self
                        .mem
                        .read_slice(&mut self.tx_buf[total..total + len], d.addr())
                        .is_err()
                    {
                        why = Some("buffer outside guest memory");
                        break;
                    }
                    total += len;
                }
                if why.is_none() && total < VNET_HDR_LEN {
                    why = Some("shorter than the virtio-net header");
                }
                match why {
                    Some(why) => {
                        log::debug!("virtio-net: transmit chain {head} dropped: {why}");
                        count(&self.metrics.tx_errors, 1);
                        count(&self.metrics.tx_dropped, 1);
                    }
                    None => {
                        if self.backend.write_from(&self.tx_buf[..total])? {
                            count(&self.metrics.tx_frames, 1);
                            count(&self.metrics.tx_bytes, (total - VNET_HDR_LEN) as u64);
                        } else {
                            count(&self.metrics.tx_dropped, 1);
                        }
                    }
                }
                self.tx
                    .queue
                    .add_used(&self.mem, head, 0)
                    .map_err(|e| format!("tx used ring: {e}"))?;
                used_any = true;
                if self.backend.is_blocked() {
                    // The frame is kept, the socket is full: wait until it is writable.
                    break 'ring;
                }
            }
            if !self
                .tx
                .queue
                .enable_notification(&self.mem)
                .map_err(|e| format!("tx queue: {e}"))?
            {
                break;
            }
        }
        if used_any {
            self.notify(true)?;
        }
        Ok(())
    }
}

impl DeviceWorker for NetWorker {
    fn kind(&self) -> &'static str {
        "virtio-net"
    }

    fn sources(&self) -> Vec<(RawFd, u32)> {
        let mut s = vec![
            (self.rx.notify.as_raw_fd(), RX_QUEUE_TOKEN),
            (self.tx.notify.as_raw_fd(), TX_QUEUE_TOKEN),
        ];
        if self.reading_tap {
            s.push((self.backend.as_raw_fd(), TAP_TOKEN));
        }
        if let Backend::Stream(stream) = &*self.backend {
            s.push((stream.writable_fd(), STREAM_WRITABLE_TOKEN));
        }
        if let Some(l) = &self.limiters.rx {
            s.push((l.as_raw_fd(), RX_LIMITER_TOKEN));
        }
        if let Some(l) = &self.limiters.tx {
            s.push((l.as_raw_fd(), TX_LIMITER_TOKEN));
        }
        if let Some(c) = &self.control {
            s.push((c.command_fd(), COMMAND_TOKEN));
        }
        s
    }

    fn seccomp(&self) -> &'static DeviceKind {
        match &*self.backend {
            Backend::Tap(_) => &TAP_KIND,
            Backend::Stream(_) => &PASST_KIND,
        }
    }

    fn handle(&mut self, token: u32, sources: &Sources<'_>) -> Result<(), String> {
        match token {
            RX_QUEUE_TOKEN => {
                let _ = self.rx.notify.read();
                self.process_rx(sources)
            }
            TX_QUEUE_TOKEN => {
                let _ = self.tx.notify.read();
                self.process_tx()
            }
            TAP_TOKEN => self.process_rx(sources),
            STREAM_WRITABLE_TOKEN => self.process_tx(),
            RX_LIMITER_TOKEN => {
                if let Some(l) = &mut self.limiters.rx {
                    if let Err(e) = l.event_handler() {
                        log::debug!("virtio-net: rx limiter: {e}");
                    }
                }
                self.process_rx(sources)
            }
            TX_LIMITER_TOKEN => {
                if let Some(l) = &mut self.limiters.tx {
                    if let Err(e) = l.event_handler() {
                        log::debug!("virtio-net: tx limiter: {e}");
                    }
                }
                self.process_tx()
            }
            COMMAND_TOKEN => self.take_command(sources),
            _ => Ok(()),
        }
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        if let Some(shared) = self.control.take() {
            shared.give_back(std::mem::take(&mut self.limiters));
        }
    }
}
