//! The polling virtio-vsock driver of the `vsockbench` check: one stream connection from the
//! host, served as fast as the guest can, in one of three modes ([`Mode`]):
//!
//! - `echo`: every byte received goes back (for round-trip latency);
//! - `sink`: what arrives is counted and dropped (host-to-guest throughput);
//! - `source`: the guest sends packets of up to 64 KiB, as the host's credit allows, for a
//!   given time (guest-to-host throughput).
//!
//! Unlike the `vsock` check's driver (512-byte buffers, 2 KiB of credit), it uses the large DMA
//! arena: 64 receive chains of one descriptor each (the header and 64 KiB of data, the most
//! the device puts in a packet), 32 transmit slots (a header and, for data, a second
//! descriptor: the slot's 4 KiB echo buffer or the one shared 64 KiB source buffer).
//! Interrupts are suppressed (the avail ring's NO_INTERRUPT: the device offers no
//! VIRTIO_F_EVENT_IDX) and QueueNotify written only when the used ring's flags ask.
//!
//! Flow control ([`Flow`]): every packet carries our buf_alloc and fwd_cnt; we never send past
//! the host's credit (buf_alloc - (bytes sent - its fwd_cnt)); an OP_CREDIT_REQUEST is
//! answered; a sink sends OP_CREDIT_UPDATE once a quarter of its buf_alloc was consumed
//! unannounced. An echo connection keeps the bytes not yet sent back in a 64 KiB ring
//! ([`Ring`]) and advertises that as buf_alloc: a host that sends past it fails the check.
//! The connection ends with the host's OP_SHUTDOWN (answered with OP_RST) or OP_RST; a
//! source sends OP_SHUTDOWN when its time is up and waits up to 2 s for the host's OP_RST.
//!
//! [`Flow`] and [`Ring`] are pure and unit-tested; the queue work is as in `vsock`, whose
//! [`Problem`]s, device start, transmit reaping and status look this driver uses.

use super::{
    at, check_status, publish_posted, reap_tx, start_queues, Header, Problem, Queues, HDR_LEN,
    HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::tsc::{self, Deadline};
use crate::virtio::{DmaBuf, DmaPool, Segment, SplitQueue, Transport, VirtioError};

/// The most data in one packet, either way (the device's limit too).
pub const MAX_DATA: usize = 64 * 1024;
/// Receive chains (each [`HDR_LEN`] + [`MAX_DATA`] bytes).
const RX_CHAINS: usize = 64;
/// The stride of receive chains in their buffer.
const RX_STRIDE: usize = 65_600;
/// Transmit slots (two descriptors each).
const TX_SLOTS: usize = 32;
/// Bytes an echo packet carries at most (a slot's buffer).
const ECHO_CHUNK: usize = 4096;
/// The echo ring: bytes received and not yet sent back (also the echo's buf_alloc).
pub const ECHO_RING: usize = 64 * 1024;
/// buf_alloc of a sink or a source (it consumes everything at once).
pub const SINK_BUF_ALLOC: u32 = 1 << 20;
/// Entries of the rx and tx queues at most, and of the event queue.
const QUEUE_LIMIT: u16 = 128;
const EVENT_LIMIT: u16 = 4;
/// Event buffers.
const EVENT_BUFS: u16 = 2;
/// How long a packet waits for a free transmit slot, ms.
const TX_WAIT_MS: u64 = 1000;
/// How long a source waits for the host's OP_RST after its OP_SHUTDOWN, ms.
const CLOSE_MS: u64 = 2000;
/// The device status is looked at every this many polls.
const STATUS_POLL_INTERVAL: u32 = 1 << 16;

/// What the connection does with data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends every byte back.
    Echo,
    /// Counts and drops what arrives.
    Sink,
    /// Sends for a time.
    Source,
}

impl Mode {
    /// Its name in `probe.vsockbench` and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Sink => "sink",
            Self::Source => "source",
        }
    }

    /// The mode called `name`.
    pub fn parse(name: &[u8]) -> Option<Self> {
        [Self::Echo, Self::Sink, Self::Source]
            .into_iter()
            .find(|m| m.name().as_bytes() == name)
    }

    /// The buf_alloc we advertise.
    pub fn buf_alloc(self) -> u32 {
        match self {
            Self::Echo => ECHO_RING as u32,
            Self::Sink | Self::Source => SINK_BUF_ALLOC,
        }
    }
}

/// Credit accounting of one connection (virtio 1.2, 5.10.6.3), both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flow {
    /// Our receive buffer, advertised.
    buf_alloc: u32,
    /// Bytes we consumed.
    fwd_cnt: u32,
    /// fwd_cnt as last sent to the peer.
    advertised: u32,
    /// The peer's buf_alloc and fwd_cnt, from its last packet.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent.
    tx_cnt: u32,
}

impl Flow {
    /// A connection whose receive buffer is `buf_alloc` bytes, accepted with the peer's
    /// `request` (its credit fields).
    pub fn new(buf_alloc: u32, request: &Header) -> Self {
        Self {
            buf_alloc,
            peer_buf_alloc: request.buf_alloc,
            peer_fwd_cnt: request.fwd_cnt,
            ..Self::default()
        }
    }

    /// Takes the credit fields of a packet from the peer.
    pub fn on_peer_packet(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// What we may still send.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records `n` bytes sent.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Records `n` bytes consumed (taken out of our receive buffer).
    pub fn consumed(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Whether the peer should hear of what we consumed: a quarter of buf_alloc unannounced.
    pub fn update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.advertised) >= self.buf_alloc / 4
    }

    /// `hdr` with our credit fields (recorded as advertised).
    pub fn stamp(&mut self, hdr: Header) -> Header {
        self.advertised = self.fwd_cnt;
        Header {
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..hdr
        }
    }
}

/// The indexes of a byte ring of `cap` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    cap: usize,
    head: usize,
    len: usize,
}

impl Ring {
    /// An empty ring of `cap` bytes (at least 1).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            head: 0,
            len: 0,
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes that still fit.
    pub fn room(&self) -> usize {
        self.cap - self.len
    }

    /// Adds `n` bytes at the tail; where they go: one or two (offset, length) spans (the
    /// second empty unless they wrap). `None`, nothing added, when they do not fit.
    pub fn push(&mut self, n: usize) -> Option<[(usize, usize); 2]> {
        if n > self.room() {
            return None;
        }
        let tail = (self.head + self.len) % self.cap;
        let first = n.min(self.cap - tail);
        self.len += n;
        Some([(tail, first), (0, n - first)])
    }

    /// The contiguous bytes at the head, at most `max`: (offset, length).
    pub fn front(&self, max: usize) -> (usize, usize) {
        (self.head, self.len.min(max).min(self.cap - self.head))
    }

    /// Drops `n` bytes (at most those held) from the head.
    pub fn pop(&mut self, n: usize) {
        let n = n.min(self.len);
        self.head = (self.head + n) % self.cap;
        self.len -= n;
    }
}

/// What the connection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Data bytes received.
    pub rx_bytes: u64,
    /// Data packets received.
    pub rx_packets: u64,
    /// Data bytes sent.
    pub tx_bytes: u64,
    /// Data packets sent.
    pub tx_packets: u64,
    /// OP_CREDIT_UPDATE packets sent.
    pub credit_updates: u64,
    /// TSC of the first and the last data packet (either way).
    pub first: Option<u64>,
    /// See `first`.
    pub last: u64,
}

impl Stats {
    fn data(&mut self, now: u64) {
        self.first.get_or_insert(now);
        self.last = now;
    }
}

/// The one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conn {
    peer_port: u32,
    /// The peer's shutdown flags.
    peer_shutdown: u32,
    /// Ended (RST either way).
    closed: bool,
}

/// A started vsock device serving one benchmark connection.
pub struct BenchDriver<'p, 't, T: Transport> {
    t: &'t T,
    cid: u64,
    mode: Mode,
    port: u32,
    rx: SplitQueue<'p>,
    tx: SplitQueue<'p>,
    ev: SplitQueue<'p>,
    rx_bufs: DmaBuf<'p>,
    rx_chains: usize,
    tx_hdrs: DmaBuf<'p>,
    tx_data: DmaBuf<'p>,
    tx_slots: usize,
    tx_busy: [bool; TX_SLOTS],
    source: DmaBuf<'p>,
    ring_buf: DmaBuf<'p>,
    ring: Ring,
    conn: Option<Conn>,
    flow: Flow,
    /// What happened.
    pub stats: Stats,
    polls: u32,
}

impl<'p, 't, T: Transport> BenchDriver<'p, 't, T> {
    /// Initializes the device (VIRTIO_F_VERSION_1 only), reads the guest CID, sets up the three
    /// queues and the buffers in `pool` and posts the receive and event buffers; it will
    /// accept one connection to `port` and serve it as `mode` says.
    pub fn start(t: &'t T, pool: &'p DmaPool, mode: Mode, port: u32) -> Result<Self, Problem> {
        let no_dma = Problem::Virtio("setup", VirtioError::NoDma);
        let Queues {
            cid,
            rx,
            tx,
            mut ev,
        } = start_queues(t, pool, QUEUE_LIMIT, EVENT_LIMIT)?;
        for k in 0..EVENT_BUFS.min(ev.size()) {
            let buf = pool.alloc(8, 8).ok_or(no_dma)?;
            ev.set_descriptor(k, buf.writable(8), None);
            ev.offer(k).map_err(at("event queue"))?;
        }
        let rx_chains = usize::from(rx.size()).min(RX_CHAINS);
        let tx_slots = usize::from(tx.size() / 2).min(TX_SLOTS);
        let mut d = Self {
            t,
            cid,
            mode,
            port,
            rx,
            tx,
            ev,
            rx_bufs: pool.alloc(rx_chains * RX_STRIDE, 64).ok_or(no_dma)?,
            rx_chains,
            tx_hdrs: pool.alloc(TX_SLOTS * 64, 64).ok_or(no_dma)?,
            tx_data: pool.alloc(TX_SLOTS * ECHO_CHUNK, 64).ok_or(no_dma)?,
            tx_slots,
            tx_busy: [false; TX_SLOTS],
            source: pool.alloc(MAX_DATA, 64).ok_or(no_dma)?,
            ring_buf: pool.alloc(ECHO_RING, 64).ok_or(no_dma)?,
            ring: Ring::new(ECHO_RING),
            conn: None,
            flow: Flow::default(),
            stats: Stats::default(),
            polls: 0,
        };
        for i in 0..MAX_DATA / 8 {
            d.source.write_u64(8 * i, 0x6367_766d_0000_0000 | i as u64);
        }
        for k in 0..rx_chains {
            d.give_rx(k).map_err(at("receive queue"))?;
        }
        d.rx.suppress_interrupts(false);
        d.tx.suppress_interrupts(false);
        d.ev.suppress_interrupts(false);
        publish_posted(t, &mut d.rx, &mut d.ev);
        Ok(d)
    }

    /// The guest CID from the configuration space.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Receive chains posted.
    pub fn rx_chains(&self) -> usize {
        self.rx_chains
    }

    /// The receive chain `k`: one device-writable descriptor of header and data.
    fn give_rx(&mut self, k: usize) -> Result<(), VirtioError> {
        let seg = Segment {
            addr: self.rx_bufs.addr() + (k * RX_STRIDE) as u64,
            len: (HDR_LEN + MAX_DATA) as u32,
            device_writes: true,
        };
        self.rx.set_descriptor(k as u16, seg, None);
        self.rx.offer(k as u16)
    }

    /// Takes back the transmit slots the device used.
    fn reap_tx(&mut self) -> Result<(), Problem> {
        reap_tx(&mut self.tx, &mut self.tx_busy[..self.tx_slots])
    }

    fn free_slot(&self) -> Option<usize> {
        (0..self.tx_slots).find(|&k| !self.tx_busy[k])
    }

    /// A header to the peer of the connection, stamped with our credit.
    fn header(&mut self, op: u16, flags: u32, len: u32) -> Header {
        let peer_port = self.conn.map_or(0, |c| c.peer_port);
        self.flow.stamp(Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: self.port,
            dst_port: peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            ..Header::default()
        })
    }

    /// Offers a packet in slot `k`: `hdr`, then `data` (address, length) if any. The caller
    /// publishes.
    fn offer(&mut self, k: usize, hdr: &Header, data: Option<(u64, u32)>) -> Result<(), Problem> {
        let at_hdr = 64 * k;
        self.tx_hdrs.write_bytes(at_hdr, &hdr.encode());
        let h = Segment {
            addr: self.tx_hdrs.addr() + at_hdr as u64,
            len: HDR_LEN as u32,
            device_writes: false,
        };
        let i = 2 * k as u16;
        match data {
            Some((addr, len)) if len > 0 => {
                self.tx.set_descriptor(i, h, Some(i + 1));
                let seg = Segment {
                    addr,
                    len,
                    device_writes: false,
                };
                self.tx.set_descriptor(i + 1, seg, None);
            }
            _ => self.tx.set_descriptor(i, h, None),
        }
        self.tx.offer(i).map_err(at("transmit queue"))?;
        self.tx_busy[k] = true;
        Ok(())
    }

    /// Shows the device the packets offered, notifying it if it asks.
    fn publish_tx(&mut self) {
        if self.tx.publish(false) {
            self.t.notify(1);
        }
    }

    /// A free transmit slot, waiting up to [`TX_WAIT_MS`] for one.
    fn wait_slot(&mut self) -> Result<usize, Problem> {
        let deadline = Deadline::after_ms(TX_WAIT_MS);
        loop {
            self.reap_tx()?;
            if let Some(k) = self.free_slot() {
                return Ok(k);
            }
            if deadline.expired() {
                return Err(Problem::TxStuck);
            }
            core::hint::spin_loop();
        }
    }

    /// Sends a control packet (no data) now, waiting up to [`TX_WAIT_MS`] for a slot.
    fn send_control(&mut self, op: u16, flags: u32) -> Result<(), Problem> {
        let k = self.wait_slot()?;
        let hdr = self.header(op, flags, 0);
        self.offer(k, &hdr, None)?;
        self.publish_tx();
        Ok(())
    }

    /// Answers a packet that has no connection with OP_RST.
    fn reset_reply(&mut self, hdr: &Header) -> Result<(), Problem> {
        let k = self.wait_slot()?;
        self.offer(k, &hdr.reset_reply(self.cid), None)?;
        self.publish_tx();
        Ok(())
    }

    /// One round: transmit slots back, packets received (their chains go straight back),
    /// events, then the echo or the sink's credit. Fails on the first problem.
    fn poll(&mut self) -> Result<(), Problem> {
        self.reap_tx()?;
        let mut gave = false;
        while let Some(used) = self.rx.pop_used().map_err(at("receive queue"))? {
            let k = used.id as usize;
            let mut raw = [0u8; HDR_LEN];
            if k < self.rx_chains {
                self.rx_bufs.read_bytes(k * RX_STRIDE, &mut raw);
            }
            let hdr = Header::decode(&raw).unwrap_or_default();
            let n = hdr.len as usize;
            if k >= self.rx_chains
                || (used.len as usize) < HDR_LEN
                || n > MAX_DATA
                || (used.len as usize) < HDR_LEN + n
            {
                return Err(Problem::RxUsed {
                    id: used.id,
                    len: used.len,
                    payload: hdr.len,
                    data: MAX_DATA,
                });
            }
            self.handle(&hdr, k)?;
            self.give_rx(k).map_err(at("receive queue"))?;
            gave = true;
        }
        if gave && self.rx.publish(false) {
            self.t.notify(0);
        }
        let mut events = false;
        while let Some(used) = self.ev.pop_used().map_err(at("event queue"))? {
            // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: the connection is gone.
            if let Some(c) = self.conn.as_mut() {
                c.closed = true;
            }
            let k = used.id as u16;
            if k < EVENT_BUFS {
                self.ev.offer(k).map_err(at("event queue"))?;
                events = true;
            }
        }
        if events && self.ev.publish(false) {
            self.t.notify(2);
        }
        match self.mode {
            Mode::Echo => self.pump_echo()?,
            Mode::Sink if self.conn.is_some() && self.flow.update_due() => {
                self.stats.credit_updates += 1;
                self.send_control(OP_CREDIT_UPDATE, 0)?;
            }
            Mode::Sink | Mode::Source => {}
        }
        check_status(self.t, &mut self.polls, STATUS_POLL_INTERVAL)
    }

    /// Handles one received packet (its data in receive chain `k`).
    fn handle(&mut self, hdr: &Header, k: usize) -> Result<(), Problem> {
        if hdr.dst_cid != self.cid {
            return Err(Problem::WrongCid { dst: hdr.dst_cid });
        }
        let ours = self.conn.filter(|c| {
            !c.closed
                && hdr.src_cid == HOST_CID
                && hdr.dst_port == self.port
                && hdr.src_port == c.peer_port
        });
        if hdr.kind != TYPE_STREAM {
            return if hdr.op == OP_RST {
                Ok(())
            } else {
                self.reset_reply(hdr)
            };
        }
        let Some(_) = ours else {
            let fresh = self.conn.is_none() && hdr.dst_port == self.port;
            return match hdr.op {
                OP_RST => Ok(()),
                OP_REQUEST if fresh && hdr.src_cid == HOST_CID => {
                    self.conn = Some(Conn {
                        peer_port: hdr.src_port,
                        peer_shutdown: 0,
                        closed: false,
                    });
                    self.flow = Flow::new(self.mode.buf_alloc(), hdr);
                    self.send_control(OP_RESPONSE, 0)
                }
                _ => self.reset_reply(hdr),
            };
        };
        self.flow.on_peer_packet(hdr);
        match hdr.op {
            OP_RW => {
                let n = hdr.len as usize;
                self.stats.rx_bytes += n as u64;
                self.stats.rx_packets += 1;
                self.stats.data(tsc::now());
                match self.mode {
                    Mode::Echo => {
                        let room = self.ring.room();
                        let Some(spans) = self.ring.push(n) else {
                            return Err(Problem::RingOverrun {
                                len: n as u32,
                                room: room as u32,
                            });
                        };
                        let mut from = k * RX_STRIDE + HDR_LEN;
                        for (off, len) in spans {
                            for i in 0..len {
                                let b = self.rx_bufs.read_u8(from + i);
                                self.ring_buf.write_u8(off + i, b);
                            }
                            from += len;
                        }
                    }
                    // Consumed at once.
                    Mode::Sink | Mode::Source => self.flow.consumed(n as u32),
                }
                Ok(())
            }
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                self.stats.credit_updates += 1;
                self.send_control(OP_CREDIT_UPDATE, 0)
            }
            OP_SHUTDOWN => {
                if let Some(c) = self.conn.as_mut() {
                    c.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                }
                Ok(())
            }
            OP_RST => {
                if let Some(c) = self.conn.as_mut() {
                    c.closed = true;
                }
                Ok(())
            }
            // A REQUEST on the open connection, a RESPONSE out of turn: reset it.
            _ => {
                if let Some(c) = self.conn.as_mut() {
                    c.closed = true;
                }
                self.send_control(OP_RST, 0)
            }
        }
    }

    /// Sends back what the echo ring holds, within the host's credit and the free slots.
    fn pump_echo(&mut self) -> Result<(), Problem> {
        if self.conn.is_none_or(|c| c.closed) {
            return Ok(());
        }
        let mut offered = false;
        while self.ring.len() > 0 {
            let credit = self.flow.peer_credit() as usize;
            let Some(k) = self.free_slot().filter(|_| credit > 0) else {
                break;
            };
            let (off, n) = self.ring.front(ECHO_CHUNK.min(credit));
            for i in 0..n {
                let b = self.ring_buf.read_u8(off + i);
                self.tx_data.write_u8(k * ECHO_CHUNK + i, b);
            }
            self.ring.pop(n);
            self.flow.consumed(n as u32);
            let hdr = self.header(OP_RW, 0, n as u32);
            let data = (self.tx_data.addr() + (k * ECHO_CHUNK) as u64, n as u32);
            self.offer(k, &hdr, Some(data))?;
            self.flow.sent(n as u32);
            self.stats.tx_bytes += n as u64;
            self.stats.tx_packets += 1;
            self.stats.data(tsc::now());
            offered = true;
        }
        if offered {
            self.publish_tx();
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for the host to connect.
    pub fn accept(&mut self, timeout_ms: u64) -> Result<(), Problem> {
        let deadline = Deadline::after_ms(timeout_ms);
        while self.conn.is_none() {
            self.poll()?;
            if deadline.expired() {
                return Err(Problem::NoConnection {
                    port: self.port,
                    secs: timeout_ms / 1000,
                });
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Echo or sink: serves the connection until the host shuts it down (answered with
    /// OP_RST) or resets it, at most `timeout_ms`.
    pub fn serve(&mut self, timeout_ms: u64) -> Result<(), Problem> {
        let deadline = Deadline::after_ms(timeout_ms);
        loop {
            self.poll()?;
            let Some(c) = self.conn else {
                return Ok(());
            };
            if c.closed {
                return Ok(());
            }
            let drained = self.mode != Mode::Echo || self.ring.len() == 0;
            if c.peer_shutdown & SHUTDOWN_SEND != 0 && drained
                || c.peer_shutdown & SHUTDOWN_RCV != 0
            {
                self.send_control(OP_RST, 0)?;
                if let Some(c) = self.conn.as_mut() {
                    c.closed = true;
                }
                return Ok(());
            }
            if deadline.expired() {
                return Err(Problem::NoEnd {
                    secs: timeout_ms / 1000,
                });
            }
            core::hint::spin_loop();
        }
    }

    /// Source: sends 64 KiB packets (fewer bytes when the credit is short) for `ms`, then
    /// OP_SHUTDOWN, and waits up to [`CLOSE_MS`] for the host's OP_RST (then sends its own).
    pub fn source(&mut self, ms: u64) -> Result<(), Problem> {
        let ticks = tsc::ticks_per_ms().saturating_mul(ms);
        let start = tsc::now();
        loop {
            self.poll()?;
            if self.conn.is_none_or(|c| c.closed || c.peer_shutdown != 0) {
                break;
            }
            if tsc::now().wrapping_sub(start) >= ticks {
                break;
            }
            let mut offered = false;
            while let Some(k) = self.free_slot() {
                let n = (self.flow.peer_credit() as usize).min(MAX_DATA);
                if n == 0 {
                    break;
                }
                let hdr = self.header(OP_RW, 0, n as u32);
                self.offer(k, &hdr, Some((self.source.addr(), n as u32)))?;
                self.flow.sent(n as u32);
                self.stats.tx_bytes += n as u64;
                self.stats.tx_packets += 1;
                offered = true;
            }
            if offered {
                self.stats.data(tsc::now());
                self.publish_tx();
            }
            core::hint::spin_loop();
        }
        if self.conn.is_some_and(|c| !c.closed) {
            self.send_control(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)?;
            let deadline = Deadline::after_ms(CLOSE_MS);
            while self.conn.is_some_and(|c| !c.closed) {
                self.poll()?;
                if deadline.expired() {
                    self.send_control(OP_RST, 0)?;
                    break;
                }
                core::hint::spin_loop();
            }
        }
        // Let the device take the last packets before it is reset.
        let deadline = Deadline::after_ms(TX_WAIT_MS);
        while self.tx.in_flight() > 0 && !deadline.expired() {
            self.reap_tx()?;
            core::hint::spin_loop();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn modes_by_name() {
        assert_eq!(Mode::parse(b"echo"), Some(Mode::Echo));
        assert_eq!(Mode::parse(b"sink"), Some(Mode::Sink));
        assert_eq!(Mode::parse(b"source"), Some(Mode::Source));
        assert_eq!(Mode::parse(b"Sink"), None);
        assert_eq!(Mode::parse(b""), None);
        assert_eq!(Mode::Echo.buf_alloc(), 65536);
        assert_eq!(Mode::Sink.buf_alloc(), 1 << 20);
    }

    #[test]
    fn credit_both_ways() {
        let mut f = Flow::new(1 << 20, &peer(128 * 1024, 0));
        assert_eq!(f.peer_credit(), 128 * 1024);
        f.sent(65536);
        f.sent(65536);
        assert_eq!(f.peer_credit(), 0);
        f.sent(1);
        assert_eq!(f.peer_credit(), 0, "never below zero");
        f.on_peer_packet(&peer(128 * 1024, 32 * 1024));
        assert_eq!(f.peer_credit(), 32 * 1024 - 1);
        // Our side: an update is due once a quarter of buf_alloc went unannounced.
        f.consumed(256 * 1024 - 1);
        assert!(!f.update_due());
        f.consumed(1);
        assert!(f.update_due());
        let h = f.stamp(Header {
            op: OP_CREDIT_UPDATE,
            ..Header::default()
        });
        assert_eq!(
            (h.buf_alloc, h.fwd_cnt, h.op),
            (1 << 20, 256 * 1024, OP_CREDIT_UPDATE)
        );
        assert!(!f.update_due());
    }

    #[test]
    fn credit_counters_wrap() {
        let mut f = Flow::new(4096, &peer(1000, u32::MAX - 99));
        f.sent(u32::MAX - 99);
        assert_eq!(f.peer_credit(), 1000);
        f.sent(300);
        assert_eq!(f.peer_credit(), 700);
        f.on_peer_packet(&peer(1000, 200));
        assert_eq!(f.peer_credit(), 1000);
        f.consumed(u32::MAX);
        let h = f.stamp(Header::default());
        f.consumed(1024);
        assert_eq!(h.fwd_cnt, u32::MAX);
        assert!(f.update_due());
    }

    #[test]
    fn ring_spans() {
        let mut r = Ring::new(10);
        assert_eq!(r.push(11), None);
        assert_eq!(r.push(6), Some([(0, 6), (0, 0)]));
        assert_eq!(r.front(4), (0, 4));
        r.pop(4);
        assert_eq!((r.len(), r.room()), (2, 8));
        // 8 more wrap: 4 at the end, 4 at the start.
        assert_eq!(r.push(8), Some([(6, 4), (0, 4)]));
        assert_eq!(r.room(), 0);
        assert_eq!(r.push(1), None);
        // The head's contiguous part stops at the end of the buffer.
        assert_eq!(r.front(100), (4, 6));
        r.pop(6);
        assert_eq!(r.front(100), (0, 4));
        r.pop(100);
        assert_eq!((r.len(), r.room()), (0, 10));
        assert_eq!(r.front(5), (4, 0));
    }
}
