//! A polling virtio-vsock driver (device type 19, Firecracker's model: the guest CID in the
//! configuration space, the host at CID 2) for the `vsock` check: the packet header codec, and
//! stream connections with credit-based flow control over the rx (0), tx (1) and event (2)
//! queues. Generic over [`Transport`], unit-tested against a fake device (`vsock/tests.rs`).
//!
//! Buffers: up to 8 receive chains of two descriptors (a 44-byte header, 512 bytes of data),
//! up to 8 transmit slots (a header, optionally followed by up to 512 bytes of data), 2 event
//! buffers. Each connection has a [`BUF_ALLOC`]-byte ring for the bytes received and not yet
//! sent back; we advertise that as buf_alloc, and fwd_cnt counts the bytes taken out of it.
//!
//! Flow control: every packet we send carries buf_alloc and fwd_cnt; once the ring drained
//! with bytes consumed since the last packet, an OP_CREDIT_UPDATE tells the peer; an
//! OP_CREDIT_REQUEST is answered with one. We send no more than the peer's credit
//! (buf_alloc - (bytes sent - its fwd_cnt)); with none left and data waiting we send
//! OP_CREDIT_REQUEST once per update. A peer that sends past our credit fails the check.
//!
//! Closing: after the peer's OP_SHUTDOWN (and the ring drained, unless it will not receive)
//! we send OP_SHUTDOWN (both directions) and wait up to [`CLOSE_MS`] for its OP_RST, then
//! send OP_RST ourselves; an OP_RST from the peer closes at once.
//!
//! `bench`: the `vsockbench` check's driver (one connection, 64 KiB buffers; echo, sink or
//! source). The two drivers share the [`Problem`]s, the device's start (`start_queues`), the
//! first publication of its buffers (`publish_posted`), the transmit queue's reaping
//! (`reap_tx`), the status look (`check_status`) and the OP_RST reply
//! ([`Header::reset_reply`]).

use core::fmt;

use crate::tsc::{self, Deadline};
use crate::virtio::{
    self, DmaBuf, DmaPool, SplitQueue, Transport, VirtioError, STATUS_DEVICE_NEEDS_RESET,
};

/// Length of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Socket type: stream.
pub const TYPE_STREAM: u16 = 1;
/// Operations.
pub const OP_REQUEST: u16 = 1;
/// See [`OP_REQUEST`].
pub const OP_RESPONSE: u16 = 2;
/// See [`OP_REQUEST`].
pub const OP_RST: u16 = 3;
/// See [`OP_REQUEST`].
pub const OP_SHUTDOWN: u16 = 4;
/// See [`OP_REQUEST`].
pub const OP_RW: u16 = 5;
/// See [`OP_REQUEST`].
pub const OP_CREDIT_UPDATE: u16 = 6;
/// See [`OP_REQUEST`].
pub const OP_CREDIT_REQUEST: u16 = 7;
/// Shutdown flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// See [`SHUTDOWN_RCV`].
pub const SHUTDOWN_SEND: u32 = 2;

/// Bytes of data in a receive or transmit buffer.
pub const DATA_LEN: usize = 512;
/// What each connection can hold (advertised as buf_alloc).
pub const BUF_ALLOC: u32 = 2048;
/// Connections at once.
pub const MAX_CONNS: usize = 4;
/// How long we wait for the peer's RST after our SHUTDOWN, ms.
pub const CLOSE_MS: u64 = 2000;
/// How long a connect waits for OP_RESPONSE, and a send for credit, ms.
pub const CONNECT_MS: u64 = 5000;
/// How long a send waits for a free transmit slot, ms.
const TX_WAIT_MS: u64 = 1000;
/// Receive chains and transmit slots (at most; half the queue size each).
const RX_CHAINS: usize = 8;
const TX_SLOTS: usize = 8;
/// Event buffers (`struct virtio_vsock_event`: a u32 id).
const EVENT_BUFS: u16 = 2;
/// Queue entries at most: rx and tx, event.
const QUEUE_LIMIT: u16 = 16;
const EVENT_LIMIT: u16 = 4;
/// The local port of our outgoing connection.
pub const CLIENT_PORT: u32 = 49_152;
/// Device status checked every this many idle polls.
const STATUS_POLL_INTERVAL: u32 = 4096;

/// `struct virtio_vsock_hdr` (little-endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Flags (shutdown flags for OP_SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from it.
    pub fwd_cnt: u32,
}

impl Header {
    /// The 44 wire bytes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the first 44 bytes of `b` (`None` if shorter).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..HDR_LEN)?;
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// The OP_RST from `cid` that answers this packet.
    pub fn reset_reply(&self, cid: u64) -> Header {
        Header {
            src_cid: cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

/// What went wrong, in either driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// In the virtio machinery, at a step.
    Virtio(&'static str, VirtioError),
    /// The configured guest CID is reserved (0, 1, 2, u32::MAX) or above 32 bits.
    BadCid(u64),
    /// A used receive element names no posted chain, or its length does not cover the header
    /// and the payload it announces (or the payload is longer than the buffer).
    RxUsed {
        /// Used element id.
        id: u32,
        /// Used length.
        len: u32,
        /// The header's len (0 if no header).
        payload: u32,
        /// Data bytes of a chain.
        data: usize,
    },
    /// A packet for another CID than ours.
    WrongCid {
        /// Its dst_cid.
        dst: u64,
    },
    /// The peer sent past the credit we gave it.
    CreditOverrun {
        /// The connection's peer port.
        port: u32,
        /// Bytes sent beyond what fits.
        len: u32,
        /// Room left.
        room: u32,
    },
    /// The host sent past the credit of the benchmark's echo ring.
    RingOverrun {
        /// Bytes in the packet.
        len: u32,
        /// Room left.
        room: u32,
    },
    /// No transmit slot came free.
    TxStuck,
    /// The echo phase ran out of time.
    ServeTimeout {
        /// Connections served and closed.
        served: u32,
        /// Connections wanted.
        wanted: u32,
        /// Bytes echoed.
        echoed: u64,
        /// The timeout, s.
        secs: u64,
    },
    /// The host answered our OP_REQUEST with OP_RST.
    Refused {
        /// The host port.
        port: u32,
    },
    /// No OP_RESPONSE in time.
    NoResponse {
        /// The host port.
        port: u32,
    },
    /// The host gave no credit for our line in time, or reset the connection before it left.
    ClientSend {
        /// The host port.
        port: u32,
    },
    /// The benchmark's connection did not come in time.
    NoConnection {
        /// The port listened on.
        port: u32,
        /// Seconds waited.
        secs: u64,
    },
    /// The benchmark's connection did not end in time.
    NoEnd {
        /// Seconds waited.
        secs: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::Virtio(step, e) => write!(f, "{step}: {e}"),
            Problem::BadCid(cid) => {
                write!(f, "configured guest CID {cid} is reserved or too large")
            }
            Problem::RxUsed {
                id,
                len,
                payload,
                data,
            } => write!(
                f,
                "receive queue: used element id {id} len {len} (header len {payload}) does not \
                 match a posted chain of {HDR_LEN} + {data} bytes"
            ),
            Problem::WrongCid { dst } => write!(f, "received a packet for CID {dst}"),
            Problem::CreditOverrun { port, len, room } => write!(
                f,
                "host port {port} sent {len} bytes with {room} bytes of credit left"
            ),
            Problem::RingOverrun { len, room } => write!(
                f,
                "the host sent {len} bytes with {room} bytes of credit left"
            ),
            Problem::TxStuck => write!(
                f,
                "transmit queue: no buffer came back within {TX_WAIT_MS} ms"
            ),
            Problem::ServeTimeout {
                served,
                wanted,
                echoed,
                secs,
            } => write!(
                f,
                "served {served} of {wanted} connections within {secs} s (echoed {echoed} bytes)"
            ),
            Problem::Refused { port } => {
                write!(f, "host port {port} refused the connection (OP_RST)")
            }
            Problem::NoResponse { port } => write!(
                f,
                "no OP_RESPONSE from host port {port} within {} s",
                CONNECT_MS / 1000
            ),
            Problem::ClientSend { port } => write!(
                f,
                "could not send the line to host port {port} (no credit within {} s, or reset)",
                CONNECT_MS / 1000
            ),
            Problem::NoConnection { port, secs } => {
                write!(f, "no connection to port {port} within {secs} s")
            }
            Problem::NoEnd { secs } => write!(f, "the connection did not end within {secs} s"),
        }
    }
}

/// A virtio error at `step` as a [`Problem`].
fn at(step: &'static str) -> impl Fn(VirtioError) -> Problem {
    move |e| Problem::Virtio(step, e)
}

/// A started device: the guest CID and its three queues.
struct Queues<'p> {
    cid: u64,
    rx: SplitQueue<'p>,
    tx: SplitQueue<'p>,
    ev: SplitQueue<'p>,
}

/// Initializes the device (VIRTIO_F_VERSION_1 only), reads the guest CID, sets up the rx and
/// tx queues (`limit` entries at most) and the event queue (`event_limit`) in memory from
/// `pool`, and sets DRIVER_OK.
fn start_queues<'p, T: Transport>(
    t: &T,
    pool: &'p DmaPool,
    limit: u16,
    event_limit: u16,
) -> Result<Queues<'p>, Problem> {
    let no_dma = Problem::Virtio("setup", VirtioError::NoDma);
    virtio::negotiate(t, 0).map_err(at("init"))?;
    let cid = virtio::config_u64(t, 0);
    if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
        return Err(Problem::BadCid(cid));
    }
    let ring = |limit| virtio::queue_memory(pool, limit).ok_or(no_dma);
    let rx = virtio::setup_queue(t, 0, limit, ring(limit)?).map_err(at("queue 0"))?;
    let tx = virtio::setup_queue(t, 1, limit, ring(limit)?).map_err(at("queue 1"))?;
    let ev = virtio::setup_queue(t, 2, event_limit, ring(event_limit)?).map_err(at("queue 2"))?;
    virtio::driver_ok(t).map_err(at("init"))?;
    Ok(Queues { cid, rx, tx, ev })
}

/// Shows the device the receive and event buffers posted at the start, notifying it where it
/// asks.
fn publish_posted<T: Transport>(t: &T, rx: &mut SplitQueue<'_>, ev: &mut SplitQueue<'_>) {
    if rx.publish(false) {
        t.notify(0);
    }
    if ev.publish(false) {
        t.notify(2);
    }
}

/// Takes back the transmit slots the device used: slot `k` is descriptors 2k (its header) and
/// 2k+1, and `busy[k]` comes free.
fn reap_tx(tx: &mut SplitQueue<'_>, busy: &mut [bool]) -> Result<(), Problem> {
    while let Some(used) = tx.pop_used().map_err(at("transmit queue"))? {
        let k = (used.id / 2) as usize;
        if used.id % 2 == 0 && k < busy.len() {
            busy[k] = false;
        }
    }
    Ok(())
}

/// Counts a poll in `polls` and, every `interval` of them, looks at the device status:
/// DEVICE_NEEDS_RESET fails.
fn check_status<T: Transport>(t: &T, polls: &mut u32, interval: u32) -> Result<(), Problem> {
    *polls = polls.wrapping_add(1);
    if polls.is_multiple_of(interval) {
        let status = t.status();
        if status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err(Problem::Virtio(
                "polling",
                VirtioError::NeedsReset { status },
            ));
        }
    }
    Ok(())
}

/// A connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Slot free.
    Free,
    /// We sent OP_REQUEST.
    Connecting,
    /// Data flows.
    Established,
    /// We sent OP_SHUTDOWN; waiting for the peer's OP_RST until the deadline (TSC).
    Closing { since: u64 },
}

/// One stream connection.
struct Conn {
    state: State,
    /// Echo connection (accepted), else our outgoing one (its data is discarded).
    echo: bool,
    local_port: u32,
    peer_cid: u64,
    peer_port: u32,
    /// Received bytes not yet sent back.
    ring: [u8; BUF_ALLOC as usize],
    head: usize,
    len: usize,
    /// Bytes taken out of the ring (ours, advertised).
    fwd_cnt: u32,
    /// fwd_cnt as last sent to the peer.
    advertised: u32,
    /// The peer's buf_alloc and fwd_cnt, from its last packet.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent (OP_RW payload).
    tx_cnt: u32,
    /// OP_CREDIT_REQUEST sent since the peer's last packet.
    credit_requested: bool,
    /// The peer's shutdown flags.
    peer_shutdown: u32,
}

impl Conn {
    const FREE: Conn = Conn {
        state: State::Free,
        echo: false,
        local_port: 0,
        peer_cid: 0,
        peer_port: 0,
        ring: [0; BUF_ALLOC as usize],
        head: 0,
        len: 0,
        fwd_cnt: 0,
        advertised: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
        credit_requested: false,
        peer_shutdown: 0,
    };

    /// The peer's credit: what we may still send.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Room left in the ring (our credit as the peer should see it).
    fn room(&self) -> u32 {
        BUF_ALLOC - self.len as u32
    }
}

/// What the driver counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Echo connections served and closed.
    pub served: u32,
    /// Bytes sent back on echo connections.
    pub echoed: u64,
    /// Packets answered with OP_RST (no such connection, port not listened on, ...).
    pub resets_sent: u32,
    /// OP_CREDIT_UPDATE packets sent.
    pub credit_updates: u32,
    /// OP_CREDIT_REQUEST packets sent.
    pub credit_requests: u32,
    /// Events received on the event queue.
    pub events: u32,
}

/// A started vsock device.
pub struct Driver<'p, 't, T: Transport> {
    t: &'t T,
    cid: u64,
    rx: SplitQueue<'p>,
    tx: SplitQueue<'p>,
    ev: SplitQueue<'p>,
    rx_hdr: [Option<DmaBuf<'p>>; RX_CHAINS],
    rx_data: [Option<DmaBuf<'p>>; RX_CHAINS],
    tx_hdr: [Option<DmaBuf<'p>>; TX_SLOTS],
    tx_data: [Option<DmaBuf<'p>>; TX_SLOTS],
    tx_busy: [bool; TX_SLOTS],
    ev_bufs: [Option<DmaBuf<'p>>; EVENT_BUFS as usize],
    conns: [Conn; MAX_CONNS],
    /// The port accepted on, while listening.
    listen: Option<u32>,
    /// What happened.
    pub stats: Stats,
    /// The first problem met while handling a packet.
    fault: Option<Problem>,
    polls: u32,
}

impl<'p, 't, T: Transport> Driver<'p, 't, T> {
    /// Initializes the device (VIRTIO_F_VERSION_1 only), reads the guest CID, sets up the three
    /// queues in memory from `pool` and gives the device its receive and event buffers.
    pub fn start(t: &'t T, pool: &'p DmaPool) -> Result<Self, Problem> {
        let no_dma = Problem::Virtio("setup", VirtioError::NoDma);
        let Queues { cid, rx, tx, ev } = start_queues(t, pool, QUEUE_LIMIT, EVENT_LIMIT)?;
        let mut d = Self {
            t,
            cid,
            rx,
            tx,
            ev,
            rx_hdr: [None; RX_CHAINS],
            rx_data: [None; RX_CHAINS],
            tx_hdr: [None; TX_SLOTS],
            tx_data: [None; TX_SLOTS],
            tx_busy: [false; TX_SLOTS],
            ev_bufs: [None; EVENT_BUFS as usize],
            conns: [Conn::FREE; MAX_CONNS],
            listen: None,
            stats: Stats::default(),
            fault: None,
            polls: 0,
        };
        let rx_chains = usize::from(d.rx.size() / 2).min(RX_CHAINS);
        for k in 0..rx_chains {
            d.rx_hdr[k] = Some(pool.alloc(HDR_LEN, 8).ok_or(no_dma)?);
            d.rx_data[k] = Some(pool.alloc(DATA_LEN, 8).ok_or(no_dma)?);
            d.give_rx(k).map_err(at("receive queue"))?;
        }
        let tx_slots = usize::from(d.tx.size() / 2).min(TX_SLOTS);
        for k in 0..tx_slots {
            d.tx_hdr[k] = Some(pool.alloc(HDR_LEN, 8).ok_or(no_dma)?);
            d.tx_data[k] = Some(pool.alloc(DATA_LEN, 8).ok_or(no_dma)?);
        }
        for k in 0..EVENT_BUFS.min(d.ev.size()) {
            let buf = pool.alloc(8, 8).ok_or(no_dma)?;
            d.ev_bufs[usize::from(k)] = Some(buf);
            d.ev.set_descriptor(k, buf.writable(8), None);
            d.ev.offer(k).map_err(at("event queue"))?;
        }
        publish_posted(t, &mut d.rx, &mut d.ev);
        Ok(d)
    }

    /// The guest CID from the configuration space.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Offers receive chain `k` (descriptors 2k: header, 2k+1: data).
    fn give_rx(&mut self, k: usize) -> Result<(), VirtioError> {
        let (Some(h), Some(d)) = (self.rx_hdr[k], self.rx_data[k]) else {
            return Ok(());
        };
        let i = 2 * k as u16;
        self.rx.set_descriptor(i, h.writable(HDR_LEN), Some(i + 1));
        self.rx.set_descriptor(i + 1, d.writable(DATA_LEN), None);
        self.rx.offer(i)
    }

    /// Sends a packet (waiting up to [`TX_WAIT_MS`] for a free slot).
    fn send(&mut self, hdr: Header, data: &[u8]) -> Result<(), Problem> {
        let deadline = Deadline::after_ms(TX_WAIT_MS);
        let k = loop {
            reap_tx(&mut self.tx, &mut self.tx_busy)?;
            let free = (0..TX_SLOTS).find(|&k| self.tx_hdr[k].is_some() && !self.tx_busy[k]);
            if let Some(k) = free {
                break k;
            }
            if deadline.expired() {
                return Err(Problem::TxStuck);
            }
            core::hint::spin_loop();
        };
        let (Some(h), Some(d)) = (self.tx_hdr[k], self.tx_data[k]) else {
            return Err(Problem::TxStuck);
        };
        let data = &data[..data.len().min(DATA_LEN)];
        let hdr = Header {
            len: data.len() as u32,
            ..hdr
        };
        h.write_bytes(0, &hdr.encode());
        let i = 2 * k as u16;
        if data.is_empty() {
            self.tx.set_descriptor(i, h.readable(HDR_LEN), None);
        } else {
            d.write_bytes(0, data);
            self.tx.set_descriptor(i, h.readable(HDR_LEN), Some(i + 1));
            self.tx.set_descriptor(i + 1, d.readable(data.len()), None);
        }
        self.tx.offer(i).map_err(at("transmit queue"))?;
        self.tx_busy[k] = true;
        if self.tx.publish(false) {
            self.t.notify(1);
        }
        Ok(())
    }

    /// A header from connection `c` with its credit fields (and records them as advertised).
    fn conn_header(&mut self, c: usize, op: u16, flags: u32) -> Header {
        let cid = self.cid;
        let conn = &mut self.conns[c];
        conn.advertised = conn.fwd_cnt;
        Header {
            src_cid: cid,
            dst_cid: conn.peer_cid,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.fwd_cnt,
        }
    }

    /// Answers `hdr` with OP_RST.
    fn reset_reply(&mut self, hdr: &Header) -> Result<(), Problem> {
        self.stats.resets_sent += 1;
        self.send(hdr.reset_reply(self.cid), &[])
    }

    /// Frees connection `c`; an echo connection that was set up counts as served.
    fn close(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.echo && conn.state != State::Free {
            self.stats.served += 1;
        }
        conn.state = State::Free;
        conn.len = 0;
        conn.head = 0;
    }

    /// One round: packets received, transmit slots back, events, then each connection's echo,
    /// credit and closing. Fails on the first problem.
    pub fn poll(&mut self) -> Result<(), Problem> {
        if let Some(p) = self.fault {
            return Err(p);
        }
        reap_tx(&mut self.tx, &mut self.tx_busy)?;
        let mut gave = false;
        while let Some(used) = self.rx.pop_used().map_err(at("receive queue"))? {
            let k = (used.id / 2) as usize;
            let bufs = (used.id % 2 == 0).then(|| {
                (
                    self.rx_hdr.get(k).copied().flatten(),
                    self.rx_data.get(k).copied().flatten(),
                )
            });
            let Some((Some(h), Some(d))) = bufs else {
                return Err(Problem::RxUsed {
                    id: used.id,
                    len: used.len,
                    payload: 0,
                    data: DATA_LEN,
                });
            };
            let mut raw = [0u8; HDR_LEN];
            h.read_bytes(0, &mut raw);
            let hdr = Header::decode(&raw).unwrap_or_default();
            let n = hdr.len as usize;
            if (used.len as usize) < HDR_LEN || n > DATA_LEN || (used.len as usize) < HDR_LEN + n {
                return Err(Problem::RxUsed {
                    id: used.id,
                    len: used.len,
                    payload: hdr.len,
                    data: DATA_LEN,
                });
            }
            let mut data = [0u8; DATA_LEN];
            d.read_bytes(0, &mut data[..n]);
            self.give_rx(k).map_err(at("receive queue"))?;
            gave = true;
            self.handle(&hdr, &data[..n])?;
        }
        if gave && self.rx.publish(false) {
            self.t.notify(0);
        }
        let mut events = false;
        while let Some(used) = self.ev.pop_used().map_err(at("event queue"))? {
            // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (the only event): the connections are gone.
            self.stats.events += 1;
            for c in 0..MAX_CONNS {
                if self.conns[c].state != State::Free {
                    self.close(c);
                }
            }
            let k = used.id as u16;
            if let Some(buf) = self.ev_bufs.get(usize::from(k)).copied().flatten() {
                self.ev.set_descriptor(k, buf.writable(8), None);
                self.ev.offer(k).map_err(at("event queue"))?;
                events = true;
            }
        }
        if events && self.ev.publish(false) {
            self.t.notify(2);
        }
        for c in 0..MAX_CONNS {
            self.pump(c)?;
        }
        check_status(self.t, &mut self.polls, STATUS_POLL_INTERVAL)
    }

    /// Handles one received packet.
    fn handle(&mut self, hdr: &Header, data: &[u8]) -> Result<(), Problem> {
        if hdr.dst_cid != self.cid {
            return Err(Problem::WrongCid { dst: hdr.dst_cid });
        }
        let found = (0..MAX_CONNS).find(|&c| {
            let conn = &self.conns[c];
            conn.state != State::Free
                && conn.local_port == hdr.dst_port
                && conn.peer_port == hdr.src_port
                && conn.peer_cid == hdr.src_cid
        });
        if hdr.kind != TYPE_STREAM {
            return if hdr.op == OP_RST {
                Ok(())
            } else {
                self.reset_reply(hdr)
            };
        }
        let Some(c) = found else {
            let free = (0..MAX_CONNS).find(|&c| self.conns[c].state == State::Free);
            return match (hdr.op, free) {
                (OP_RST, _) => Ok(()),
                (OP_REQUEST, Some(c)) if self.listen == Some(hdr.dst_port) => {
                    let conn = &mut self.conns[c];
                    *conn = Conn {
                        state: State::Established,
                        echo: true,
                        local_port: hdr.dst_port,
                        peer_cid: hdr.src_cid,
                        peer_port: hdr.src_port,
                        peer_buf_alloc: hdr.buf_alloc,
                        peer_fwd_cnt: hdr.fwd_cnt,
                        ..Conn::FREE
                    };
                    let h = self.conn_header(c, OP_RESPONSE, 0);
                    self.send(h, &[])
                }
                _ => self.reset_reply(hdr),
            };
        };
        let conn = &mut self.conns[c];
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.credit_requested = false;
        match (hdr.op, conn.state) {
            (OP_RST, _) => {
                self.close(c);
                Ok(())
            }
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                Ok(())
            }
            (OP_RW, State::Established | State::Closing { .. }) => {
                if conn.echo {
                    if data.len() as u32 > conn.room() {
                        return Err(Problem::CreditOverrun {
                            port: conn.peer_port,
                            len: data.len() as u32,
                            room: conn.room(),
                        });
                    }
                    let cap = conn.ring.len();
                    for &b in data {
                        let at = (conn.head + conn.len) % cap;
                        conn.ring[at] = b;
                        conn.len += 1;
                    }
                } else {
                    // Our outgoing connection discards what it receives.
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(data.len() as u32);
                }
                Ok(())
            }
            (OP_CREDIT_UPDATE, _) => Ok(()),
            (OP_CREDIT_REQUEST, _) => {
                let h = self.conn_header(c, OP_CREDIT_UPDATE, 0);
                self.stats.credit_updates += 1;
                self.send(h, &[])
            }
            (OP_SHUTDOWN, _) => {
                conn.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                Ok(())
            }
            // A REQUEST on an open connection, a RESPONSE out of turn, ...: reset it.
            _ => {
                let h = self.conn_header(c, OP_RST, 0);
                self.close(c);
                self.send(h, &[])
            }
        }
    }

    /// Echoes what connection `c` holds within the peer's credit, tells the peer of freed
    /// room, and moves the closing along.
    fn pump(&mut self, c: usize) -> Result<(), Problem> {
        let conn = &mut self.conns[c];
        match conn.state {
            State::Free | State::Connecting => return Ok(()),
            State::Closing { since } => {
                let limit = tsc::ticks_per_ms().saturating_mul(CLOSE_MS);
                if tsc::now().wrapping_sub(since) >= limit {
                    let h = self.conn_header(c, OP_RST, 0);
                    self.close(c);
                    return self.send(h, &[]);
                }
                return Ok(());
            }
            State::Established => {}
        }
        if conn.peer_shutdown & SHUTDOWN_RCV != 0 {
            // The peer reads no more: what we hold is consumed unsent.
            conn.fwd_cnt = conn.fwd_cnt.wrapping_add(conn.len as u32);
            conn.len = 0;
        }
        while self.conns[c].len > 0 {
            let conn = &mut self.conns[c];
            let credit = conn.peer_credit() as usize;
            if credit == 0 {
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    self.stats.credit_requests += 1;
                    let h = self.conn_header(c, OP_CREDIT_REQUEST, 0);
                    self.send(h, &[])?;
                }
                break;
            }
            let cap = conn.ring.len();
            let n = conn.len.min(DATA_LEN).min(credit).min(cap - conn.head);
            let mut chunk = [0u8; DATA_LEN];
            chunk[..n].copy_from_slice(&conn.ring[conn.head..conn.head + n]);
            let h = self.conn_header(c, OP_RW, 0);
            self.send(h, &chunk[..n])?;
            let conn = &mut self.conns[c];
            conn.head = (conn.head + n) % cap;
            conn.len -= n;
            conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
            conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
            if conn.echo {
                self.stats.echoed += n as u64;
            }
        }
        let conn = &self.conns[c];
        if conn.len == 0 && conn.fwd_cnt != conn.advertised {
            self.stats.credit_updates += 1;
            let h = self.conn_header(c, OP_CREDIT_UPDATE, 0);
            self.send(h, &[])?;
        }
        let conn = &mut self.conns[c];
        if conn.peer_shutdown != 0 && conn.len == 0 {
            conn.state = State::Closing { since: tsc::now() };
            let h = self.conn_header(c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
            self.send(h, &[])?;
        }
        Ok(())
    }

    /// Accepts connections on `port` and echoes them until `wanted` were served and closed
    /// (connections beyond [`MAX_CONNS`] at once are refused with OP_RST), or `timeout_ms`
    /// pass. Stops listening afterwards.
    pub fn serve(&mut self, port: u32, wanted: u32, timeout_ms: u64) -> Result<(), Problem> {
        self.listen = Some(port);
        let deadline = Deadline::after_ms(timeout_ms);
        let result = loop {
            if let Err(p) = self.poll() {
                break Err(p);
            }
            if self.stats.served >= wanted {
                break Ok(());
            }
            if deadline.expired() {
                break Err(Problem::ServeTimeout {
                    served: self.stats.served,
                    wanted,
                    echoed: self.stats.echoed,
                    secs: timeout_ms / 1000,
                });
            }
            core::hint::spin_loop();
        };
        self.listen = None;
        result
    }

    /// Connects to the host's `port`, sends `line`, shuts the connection down and waits for the
    /// host's OP_RST (at most [`CLOSE_MS`], then resets it).
    pub fn connect_and_send(&mut self, port: u32, line: &[u8]) -> Result<(), Problem> {
        let Some(c) = (0..MAX_CONNS).find(|&c| self.conns[c].state == State::Free) else {
            return Err(Problem::NoResponse { port });
        };
        self.conns[c] = Conn {
            state: State::Connecting,
            echo: false,
            local_port: CLIENT_PORT,
            peer_cid: HOST_CID,
            peer_port: port,
            ..Conn::FREE
        };
        let h = self.conn_header(c, OP_REQUEST, 0);
        self.send(h, &[])?;
        let deadline = Deadline::after_ms(CONNECT_MS);
        loop {
            self.poll()?;
            match self.conns[c].state {
                State::Established => break,
                State::Free => return Err(Problem::Refused { port }),
                _ => {}
            }
            if deadline.expired() {
                let h = self.conn_header(c, OP_RST, 0);
                self.close(c);
                self.send(h, &[])?;
                return Err(Problem::NoResponse { port });
            }
            core::hint::spin_loop();
        }
        // Send the line within the host's credit.
        let mut sent = 0;
        let deadline = Deadline::after_ms(CONNECT_MS);
        while sent < line.len() {
            let conn = &mut self.conns[c];
            if conn.state != State::Established || conn.peer_shutdown & SHUTDOWN_RCV != 0 {
                return Err(Problem::ClientSend { port });
            }
            let n = (conn.peer_credit() as usize)
                .min(line.len() - sent)
                .min(DATA_LEN);
            if n > 0 {
                let h = self.conn_header(c, OP_RW, 0);
                self.send(h, &line[sent..sent + n])?;
                let conn = &mut self.conns[c];
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                sent += n;
                continue;
            }
            if !conn.credit_requested {
                conn.credit_requested = true;
                self.stats.credit_requests += 1;
                let h = self.conn_header(c, OP_CREDIT_REQUEST, 0);
                self.send(h, &[])?;
            }
            if deadline.expired() {
                return Err(Problem::ClientSend { port });
            }
            self.poll()?;
        }
        let conn = &mut self.conns[c];
        conn.state = State::Closing { since: tsc::now() };
        let h = self.conn_header(c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.send(h, &[])?;
        // Closed by the host's RST, or by ours after CLOSE_MS (pump).
        while self.conns[c].state != State::Free {
            self.poll()?;
            core::hint::spin_loop();
        }
        Ok(())
    }
}

pub mod bench;

#[cfg(test)]
mod tests;
