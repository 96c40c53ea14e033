//! The virtio-vsock device thread: guest packets from the tx queue go to the [`Muxer`];
//! what the muxer has for the guest fills the rx queue's buffers. Host sockets are watched
//! through the muxer's own epoll set, one source of this thread's.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{read_tx, rx_capacity, write_rx, HDR_LEN};
use crate::seccomp::DeviceKind;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, InterruptReason, VirtioInterrupt};

const RX_TOKEN: u32 = 0;
const TX_TOKEN: u32 = 1;
const EVENT_TOKEN: u32 = 2;
const MUXER_TOKEN: u32 = 3;

/// The vsock device's worker.
pub struct VsockWorker {
    mem: GuestMemoryMmap,
    rx: ActiveQueue,
    tx: ActiveQueue,
    event: ActiveQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    muxer: Muxer,
    guest_cid: u64,
}

impl VsockWorker {
    /// A worker over the rx, tx and event queues and the connections of `muxer`.
    pub fn new(
        mem: GuestMemoryMmap,
        [rx, tx, event]: [ActiveQueue; 3],
        interrupt: Arc<dyn VirtioInterrupt>,
        muxer: Muxer,
        guest_cid: u64,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            event,
            interrupt,
            muxer,
            guest_cid,
        }
    }

    /// The muxer (tests look at its connections).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    fn notify(&self, q: &ActiveQueue) -> Result<(), String> {
        self.interrupt
            .trigger(InterruptReason::Queue(q.index))
            .map_err(|e| format!("interrupt: {e}"))
    }

    /// Hands every tx packet to the muxer; each chain is returned with length 0.
    fn process_tx(&mut self) -> Result<(), String> {
        let mem = &self.mem;
        let q = &mut self.tx.queue;
        let mut used_any = false;
        loop {
            q.disable_notification(mem)
                .map_err(|e| format!("tx queue: {e}"))?;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match read_tx(mem, chain, self.guest_cid) {
                    Ok(p) => self.muxer.handle_guest_packet(&p.hdr, p.op, &p.data),
                    Err(e) => log::debug!("virtio-vsock: tx packet dropped: {e}"),
                }
                q.add_used(mem, head, 0)
                    .map_err(|e| format!("tx used ring: {e}"))?;
                used_any = true;
            }
            if !q
                .enable_notification(mem)
                .map_err(|e| format!("tx queue: {e}"))?
            {
                break;
            }
        }
        if used_any && q.needs_notification(mem).map_err(|e| e.to_string())? {
            self.notify(&self.tx)?;
        }
        Ok(())
    }

    /// Fills rx buffers with the muxer's packets while it has some and the guest has
    /// buffers; with none, it waits for the guest's notification.
    fn process_rx(&mut self) -> Result<(), String> {
        let mem = &self.mem;
        let q = &mut self.rx.queue;
        let mut used_any = false;
        loop {
            let mut stalled = false;
            q.disable_notification(mem)
                .map_err(|e| format!("rx queue: {e}"))?;
            while self.muxer.has_rx() {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let cap = match rx_capacity(&chain) {
                    Ok(c) if c >= HDR_LEN as u64 => c,
                    Ok(_) | Err(_) => {
                        log::debug!("virtio-vsock: unusable rx buffer returned empty");
                        q.add_used(mem, head, 0)
                            .map_err(|e| format!("rx used ring: {e}"))?;
                        used_any = true;
                        continue;
                    }
                };
                let max_data = usize::try_from(cap - HDR_LEN as u64).unwrap_or(usize::MAX);
                let Some((hdr, data)) = self.muxer.next_rx(max_data) else {
                    // Nothing after all (a read would block, or the buffer is too small
                    // for the data waiting): the chain goes back on the ring.
                    q.go_to_previous_position();
                    stalled = true;
                    break;
                };
                let len = match write_rx(mem, chain, &hdr, &data) {
                    Ok(n) => n,
                    Err(e) => {
                        log::debug!("virtio-vsock: rx packet lost: {e}");
                        0
                    }
                };
                q.add_used(mem, head, len)
                    .map_err(|e| format!("rx used ring: {e}"))?;
                used_any = true;
            }
            let more_buffers = q
                .enable_notification(mem)
                .map_err(|e| format!("rx queue: {e}"))?;
            // Buffers the guest has while the muxer has nothing stay on the ring: looking
            // again only helps when the loop stopped for want of buffers.
            if stalled || !more_buffers || !self.muxer.has_rx() {
                break;
            }
        }
        if used_any && q.needs_notification(mem).map_err(|e| e.to_string())? {
            self.notify(&self.rx)?;
        }
        Ok(())
    }
}

/// The vsock device thread: the host side's Unix sockets (creating, accepting, connecting,
/// streaming, shutting down) and the muxer's timer for handshakes and unanswered connection requests.
pub(crate) static KIND: DeviceKind = DeviceKind {
    name: "virtio-vsock",
    calls: &[
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_shutdown,
        libc::SYS_timerfd_settime,
    ],
    // Connecting to the host's listeners: Unix sockets only.
    args: &[crate::seccomp::ArgRule {
        nr: libc::SYS_socket,
        arg: 0,
        values: &[(libc::AF_UNIX as u64, "AF_UNIX")],
    }],
};

impl DeviceWorker for VsockWorker {
    fn kind(&self) -> &'static str {
        "virtio-vsock"
    }

    fn sources(&self) -> Vec<(RawFd, u32)> {
        vec![
            (self.rx.notify.as_raw_fd(), RX_TOKEN),
            (self.tx.notify.as_raw_fd(), TX_TOKEN),
            (self.event.notify.as_raw_fd(), EVENT_TOKEN),
            (self.muxer.as_raw_fd(), MUXER_TOKEN),
        ]
    }

    fn seccomp(&self) -> &'static DeviceKind {
        &KIND
    }

    fn handle(&mut self, token: u32, _sources: &Sources<'_>) -> Result<(), String> {
        match token {
            RX_TOKEN => {
                let _ = self.rx.notify.read();
            }
            TX_TOKEN => {
                let _ = self.tx.notify.read();
                self.process_tx()?;
            }
            EVENT_TOKEN => {
                // The device sends no events (transport resets are for migration).
                let _ = self.event.notify.read();
                return Ok(());
            }
            MUXER_TOKEN => self.muxer.process_host_events(),
            _ => return Ok(()),
        }
        self.process_rx()
    }
}
