//! Unit tests of the vsock driver: the header codec, and connections against a fake
//! virtio-vsock device whose host side is a scripted peer (echo clients that honour and check
//! credit, a listener), served synchronously on notify and on interrupt acknowledgement, in
//! host memory standing in for the DMA arena.

use super::*;
use crate::virtio::{QueueAddresses, STATUS_DRIVER_OK};
use std::boxed::Box;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

const CID: u64 = 3;

#[test]
fn header_codec() {
    let h = Header {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 3,
        src_port: 0x1122_3344,
        dst_port: 52,
        len: 7,
        kind: TYPE_STREAM,
        op: OP_RW,
        flags: 3,
        buf_alloc: 0x1000,
        fwd_cnt: 0xdead_beef,
    };
    let b = h.encode();
    assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&b[8..16], &[3, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
    assert_eq!(&b[20..24], &[52, 0, 0, 0]);
    assert_eq!(&b[24..28], &[7, 0, 0, 0]);
    assert_eq!(&b[28..30], &[1, 0]);
    assert_eq!(&b[30..32], &[5, 0]);
    assert_eq!(&b[32..36], &[3, 0, 0, 0]);
    assert_eq!(&b[36..40], &[0, 0x10, 0, 0]);
    assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
    assert_eq!(Header::decode(&b), Some(h));
    let mut longer = b.to_vec();
    longer.extend_from_slice(&[9; 10]);
    assert_eq!(Header::decode(&longer), Some(h));
    for n in 0..HDR_LEN {
        assert_eq!(Header::decode(&b[..n]), None);
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

#[repr(C, align(4096))]
struct Region([u8; 4 * 4096]);

fn region() -> Box<Region> {
    Box::new(Region([0x55; 4 * 4096]))
}

fn pool(r: &mut Region) -> DmaPool {
    // SAFETY: the region is valid, page-aligned and outlives the pool in every test; only the
    // pool (and the fake device, through the addresses it is given) touches it.
    unsafe { DmaPool::over(r.0.as_mut_ptr(), r.0.len()) }
}

fn rd(addr: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: addresses come from the test pool (buffers the driver gave the device).
        *b = unsafe { ((addr + i as u64) as *const u8).read_volatile() };
    }
}
fn wr(addr: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: as above.
        unsafe { ((addr + i as u64) as *mut u8).write_volatile(b) }
    }
}
fn rd16(addr: u64) -> u16 {
    let mut b = [0; 2];
    rd(addr, &mut b);
    u16::from_le_bytes(b)
}
fn rd32(addr: u64) -> u32 {
    let mut b = [0; 4];
    rd(addr, &mut b);
    u32::from_le_bytes(b)
}
fn rd64(addr: u64) -> u64 {
    let mut b = [0; 8];
    rd(addr, &mut b);
    u64::from_le_bytes(b)
}

/// A descriptor: address, length, flags.
type Desc = (u64, u32, u16);

#[derive(Clone, Copy, Default)]
struct Q {
    num: u16,
    addr: Option<QueueAddresses>,
    ready: bool,
    seen: u16,
    used: u16,
}

impl Q {
    /// The next chain the driver made available: its descriptors (addr, len, flags).
    fn next_chain(&mut self) -> Option<(u16, Vec<Desc>)> {
        let a = self.addr?;
        if rd16(a.driver + 2) == self.seen {
            return None;
        }
        let slot = u64::from(self.seen % self.num);
        self.seen = self.seen.wrapping_add(1);
        let head = rd16(a.driver + 4 + 2 * slot);
        let mut chain = Vec::new();
        let mut i = head;
        loop {
            let d = a.desc + 16 * u64::from(i);
            let flags = rd16(d + 12);
            chain.push((rd64(d), rd32(d + 8), flags));
            if flags & 1 == 0 {
                break;
            }
            i = rd16(d + 14);
            assert!(chain.len() <= 2, "chains are of one or two descriptors");
        }
        Some((head, chain))
    }

    fn put_used(&mut self, head: u16, len: u32) {
        let a = self.addr.unwrap();
        let e = a.device + 4 + 8 * u64::from(self.used % self.num);
        wr(e, &u32::from(head).to_le_bytes());
        wr(e + 4, &len.to_le_bytes());
        self.used = self.used.wrapping_add(1);
        wr(a.device + 2, &self.used.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// The host side

/// A host echo client: connects to the guest port, sends `data` within the guest's credit,
/// reads the echo (consuming at once, advertising in CREDIT_UPDATEs once half its small
/// buffer was read), half-closes after the last byte, answers the guest's SHUTDOWN with RST.
struct Client {
    port: u32,
    guest_port: u32,
    data: Vec<u8>,
    sent: usize,
    echo: Vec<u8>,
    buf_alloc: u32,
    fwd_cnt: u32,
    advertised: u32,
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
    connected: bool,
    shut: bool,
    closed: bool,
    refused: bool,
}

struct Host {
    clients: Vec<Client>,
    /// Packets to deliver to the guest.
    out: VecDeque<(Header, Vec<u8>)>,
    /// Every packet the guest sent.
    seen: Vec<(Header, Vec<u8>)>,
    /// A listener on this port: what it received (answers SHUTDOWN with RST).
    listener: Option<(u32, Vec<u8>, bool)>,
    /// Refuse connections to the listener port (RST).
    refuse: bool,
    /// Send this much more than the credit allows (to test the guest's check).
    overrun: bool,
    /// Deliver packets with this dst_cid instead.
    wrong_cid: Option<u64>,
}

impl Host {
    fn hdr(&self, c: &Client, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.wrong_cid.unwrap_or(CID),
            src_port: c.port,
            dst_port: c.guest_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: c.buf_alloc,
            fwd_cnt: c.fwd_cnt,
            ..Header::default()
        }
    }

    /// Sends what the clients may send now.
    fn step(&mut self) {
        for i in 0..self.clients.len() {
            let mut c = std::mem::replace(&mut self.clients[i], Client::new(0, 0, &[], 0));
            if !c.connected && !c.closed && !c.refused && c.sent == 0 && !c.shut {
                c.sent = usize::MAX; // marks "REQUEST sent"
                let h = self.hdr(&c, OP_REQUEST);
                self.out.push_back((h, Vec::new()));
            }
            if c.connected && !c.closed {
                loop {
                    let in_flight = (c.sent as u32).wrapping_sub(c.guest_fwd_cnt);
                    let mut credit = c.guest_buf_alloc.saturating_sub(in_flight) as usize;
                    if self.overrun {
                        credit += 100;
                    }
                    let n = (c.data.len() - c.sent).min(300).min(credit);
                    if n == 0 {
                        break;
                    }
                    let mut h = self.hdr(&c, OP_RW);
                    h.len = n as u32;
                    self.out.push_back((h, c.data[c.sent..c.sent + n].to_vec()));
                    c.sent += n;
                    c.advertised = c.fwd_cnt;
                }
                if c.sent == c.data.len() && !c.shut {
                    c.shut = true;
                    let mut h = self.hdr(&c, OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND;
                    self.out.push_back((h, Vec::new()));
                }
            }
            self.clients[i] = c;
        }
    }

    /// Handles a packet from the guest.
    fn receive(&mut self, h: Header, data: Vec<u8>) {
        assert_eq!(h.src_cid, CID);
        assert_eq!(h.kind, TYPE_STREAM);
        assert_eq!(h.len as usize, data.len());
        self.seen.push((h, data.clone()));
        if let Some((port, got, closed)) = &mut self.listener {
            if h.dst_port == *port {
                let reply = |op, fwd: usize| Header {
                    src_cid: HOST_CID,
                    dst_cid: CID,
                    src_port: h.dst_port,
                    dst_port: h.src_port,
                    kind: TYPE_STREAM,
                    op,
                    buf_alloc: 4,
                    fwd_cnt: fwd as u32,
                    ..Header::default()
                };
                match h.op {
                    OP_REQUEST if self.refuse => self.out.push_back((reply(OP_RST, 0), Vec::new())),
                    OP_REQUEST => self.out.push_back((reply(OP_RESPONSE, 0), Vec::new())),
                    OP_RW => {
                        // A 4-byte buffer read at once: the guest must wait for each update.
                        assert!(data.len() <= 4, "the guest sent past the listener's credit");
                        got.extend_from_slice(&data);
                        let fwd = got.len();
                        self.out
                            .push_back((reply(OP_CREDIT_UPDATE, fwd), Vec::new()));
                    }
                    OP_SHUTDOWN => {
                        *closed = true;
                        let fwd = got.len();
                        self.out.push_back((reply(OP_RST, fwd), Vec::new()));
                    }
                    _ => {}
                }
                return;
            }
        }
        let Some(i) = self
            .clients
            .iter()
            .position(|c| c.port == h.dst_port && c.guest_port == h.src_port)
        else {
            return;
        };
        let mut reply = None;
        {
            let c = &mut self.clients[i];
            c.guest_buf_alloc = h.buf_alloc;
            c.guest_fwd_cnt = h.fwd_cnt;
            match h.op {
                OP_RESPONSE => {
                    c.connected = true;
                    c.sent = 0;
                }
                OP_RST if !c.connected => c.refused = true,
                OP_RST => c.closed = true,
                OP_RW => {
                    let in_flight = (c.echo.len() + data.len()) as u32 - c.fwd_cnt;
                    assert!(
                        in_flight <= c.buf_alloc,
                        "the guest sent past the host's credit"
                    );
                    c.echo.extend_from_slice(&data);
                    c.fwd_cnt = c.echo.len() as u32;
                    if c.fwd_cnt - c.advertised >= c.buf_alloc / 2 {
                        reply = Some(OP_CREDIT_UPDATE);
                    }
                }
                OP_CREDIT_REQUEST => reply = Some(OP_CREDIT_UPDATE),
                OP_SHUTDOWN => {
                    c.closed = true;
                    reply = Some(OP_RST);
                }
                _ => {}
            }
        }
        if let Some(op) = reply {
            let c = &self.clients[i];
            let h = self.hdr(c, op);
            self.clients[i].advertised = self.clients[i].fwd_cnt;
            self.out.push_back((h, Vec::new()));
        }
    }
}

impl Client {
    fn new(port: u32, guest_port: u32, data: &[u8], buf_alloc: u32) -> Self {
        Client {
            port,
            guest_port,
            data: data.to_vec(),
            sent: 0,
            echo: Vec::new(),
            buf_alloc,
            fwd_cnt: 0,
            advertised: 0,
            guest_buf_alloc: 0,
            guest_fwd_cnt: 0,
            connected: false,
            shut: false,
            closed: false,
            refused: false,
        }
    }
}

struct Dev {
    status: u8,
    q: [Q; 3],
    cid: u64,
    host: Host,
}

struct FakeVsock(RefCell<Dev>);

impl FakeVsock {
    fn new(clients: Vec<Client>) -> Self {
        FakeVsock(RefCell::new(Dev {
            status: 0,
            q: [Q::default(); 3],
            cid: CID,
            host: Host {
                clients,
                out: VecDeque::new(),
                seen: Vec::new(),
                listener: None,
                refuse: false,
                overrun: false,
                wrong_cid: None,
            },
        }))
    }

    fn live(&self) -> bool {
        let d = self.0.borrow();
        d.status & STATUS_DRIVER_OK != 0 && d.q.iter().all(|q| q.ready)
    }

    /// Takes the guest's packets, lets the host act, delivers what fits in the rx buffers.
    fn run(&self) {
        if !self.live() {
            return;
        }
        let mut d = self.0.borrow_mut();
        let d = &mut *d;
        while let Some((head, chain)) = d.q[1].next_chain() {
            let (ha, hl, hf) = chain[0];
            assert!(hl as usize >= HDR_LEN && hf & 2 == 0);
            let mut raw = [0u8; HDR_LEN];
            rd(ha, &mut raw);
            let h = Header::decode(&raw).unwrap();
            let mut data = vec![0u8; h.len as usize];
            if h.len > 0 {
                let (da, dl, _) = chain[1];
                assert!(dl >= h.len);
                rd(da, &mut data);
            }
            d.q[1].put_used(head, 0);
            d.host.receive(h, data);
        }
        d.host.step();
        while !d.host.out.is_empty() {
            let Some((head, chain)) = d.q[0].next_chain() else {
                break;
            };
            let (h, data) = d.host.out.pop_front().unwrap();
            let (ha, hl, hf) = chain[0];
            assert!(hl as usize >= HDR_LEN && hf & 2 != 0);
            wr(ha, &h.encode());
            let (da, dl, df) = chain[1];
            assert!(df & 2 != 0 && data.len() <= dl as usize);
            wr(da, &data);
            d.q[0].put_used(head, (HDR_LEN + data.len()) as u32);
        }
    }
}

impl Transport for FakeVsock {
    fn status(&self) -> u8 {
        self.0.borrow().status
    }
    fn set_status(&self, status: u8) {
        let mut d = self.0.borrow_mut();
        if status == 0 {
            d.q = [Q::default(); 3];
        }
        d.status = status;
    }
    fn device_features(&self) -> u64 {
        virtio::VIRTIO_F_VERSION_1
    }
    fn set_driver_features(&self, features: u64) {
        assert_eq!(features, virtio::VIRTIO_F_VERSION_1);
    }
    fn queue_max(&self, index: u16) -> u32 {
        if index < 3 {
            256
        } else {
            0
        }
    }
    fn queue_ready(&self, index: u16) -> bool {
        self.0.borrow().q[usize::from(index)].ready
    }
    fn set_queue(&self, index: u16, size: u16, addresses: QueueAddresses) {
        let q = &mut self.0.borrow_mut().q[usize::from(index)];
        q.num = size;
        q.addr = Some(addresses);
    }
    fn enable_queue(&self, index: u16) {
        self.0.borrow_mut().q[usize::from(index)].ready = true;
    }
    fn notify(&self, _index: u16) {
        self.run();
    }
    fn ack_interrupts(&self) -> u32 {
        0
    }
    fn config_generation(&self) -> u32 {
        // Called on every configuration read, and by the poll loop's status checks: a chance
        // for the host to act.
        0
    }
    fn config_u8(&self, _offset: usize) -> u8 {
        0
    }
    fn config_u32(&self, offset: usize) -> u32 {
        let cid = self.0.borrow().cid;
        match offset {
            0 => cid as u32,
            4 => (cid >> 32) as u32,
            _ => 0,
        }
    }
}

/// Polls (the fake acts on every notify; `kick` lets the host start on its own).
fn kick(f: &FakeVsock) {
    f.run();
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Runs `serve` with the host kicked between polls (the device acts on its own in reality).
fn serve(
    d: &mut Driver<'_, '_, FakeVsock>,
    f: &FakeVsock,
    port: u32,
    n: u32,
    ms: u64,
) -> Result<(), Problem> {
    d.listen = Some(port);
    let deadline = Deadline::after_ms(ms);
    loop {
        kick(f);
        d.poll()?;
        if d.stats.served >= n {
            d.listen = None;
            return Ok(());
        }
        if deadline.expired() {
            return Err(Problem::ServeTimeout {
                served: d.stats.served,
                wanted: n,
                echoed: d.stats.echoed,
                secs: ms / 1000,
            });
        }
    }
}

#[test]
fn one_connection_is_echoed_within_small_host_credit() {
    let mut r = region();
    let p = pool(&mut r);
    let data = pattern(1000, 7);
    let f = FakeVsock::new(vec![Client::new(1000, 52, &data, 256)]);
    let mut d = Driver::start(&f, &p).unwrap();
    assert_eq!(d.cid(), CID);
    serve(&mut d, &f, 52, 1, 5000).unwrap();
    let dev = f.0.borrow();
    let c = &dev.host.clients[0];
    assert!(c.closed);
    assert_eq!(c.echo, data, "every byte back, in order");
    assert_eq!(d.stats.echoed, 1000);
    assert_eq!(d.stats.served, 1);
    assert!(
        d.stats.credit_updates > 0,
        "credit updates as data is consumed"
    );
    assert!(
        d.stats.credit_requests > 0,
        "the 256-byte host buffer ran out"
    );
    // The guest answered the REQUEST with a RESPONSE advertising its buffer.
    let (resp, _) = &dev.host.seen[0];
    assert_eq!(
        (resp.op, resp.buf_alloc, resp.fwd_cnt),
        (OP_RESPONSE, BUF_ALLOC, 0)
    );
    assert_eq!(
        (resp.src_port, resp.dst_port, resp.dst_cid),
        (52, 1000, HOST_CID)
    );
    // It shut down before the host's RST closed the connection.
    assert!(dev
        .host
        .seen
        .iter()
        .any(|(h, _)| h.op == OP_SHUTDOWN && h.flags == SHUTDOWN_RCV | SHUTDOWN_SEND));
}

#[test]
fn concurrent_connections_past_the_guest_buffer() {
    let mut r = region();
    let p = pool(&mut r);
    let clients = (0..3)
        .map(|i| Client::new(2000 + i, 52, &pattern(5000, i as u8), 4096))
        .collect();
    let f = FakeVsock::new(clients);
    let mut d = Driver::start(&f, &p).unwrap();
    serve(&mut d, &f, 52, 3, 5000).unwrap();
    let dev = f.0.borrow();
    for (i, c) in dev.host.clients.iter().enumerate() {
        assert_eq!(c.echo, pattern(5000, i as u8));
        assert!(c.closed);
    }
    assert_eq!(d.stats.echoed, 15_000);
    assert_eq!(d.stats.served, 3);
    // The host never needed more than the guest's credit (the fake asserts it).
    assert!(dev.host.seen.iter().all(|(h, _)| h.buf_alloc == BUF_ALLOC));
}

#[test]
fn other_ports_and_unknown_connections_get_rst() {
    let mut r = region();
    let p = pool(&mut r);
    let mut wrong = Client::new(3000, 53, b"x", 256);
    wrong.sent = 0;
    let f = FakeVsock::new(vec![wrong, Client::new(3001, 52, b"hello", 256)]);
    let mut d = Driver::start(&f, &p).unwrap();
    serve(&mut d, &f, 52, 1, 5000).unwrap();
    let dev = f.0.borrow();
    assert!(dev.host.clients[0].refused, "port 53 is not listened on");
    assert_eq!(dev.host.clients[1].echo, b"hello");
    assert_eq!(d.stats.resets_sent, 1);
}

#[test]
fn the_echo_phase_times_out() {
    let mut r = region();
    let p = pool(&mut r);
    let f = FakeVsock::new(vec![Client::new(1000, 52, b"abc", 256)]);
    let mut d = Driver::start(&f, &p).unwrap();
    let e = serve(&mut d, &f, 52, 2, 200).unwrap_err();
    assert_eq!(
        e,
        Problem::ServeTimeout {
            served: 1,
            wanted: 2,
            echoed: 3,
            secs: 0
        }
    );
    assert_eq!(
        e.to_string(),
        "served 1 of 2 connections within 0 s (echoed 3 bytes)"
    );
    // The driver's own serve, with nobody connecting.
    let mut r2 = region();
    let p2 = pool(&mut r2);
    let f = FakeVsock::new(Vec::new());
    let mut d = Driver::start(&f, &p2).unwrap();
    assert!(matches!(
        d.serve(52, 1, 50),
        Err(Problem::ServeTimeout { served: 0, .. })
    ));
}

#[test]
fn a_host_past_our_credit_fails() {
    let mut r = region();
    let p = pool(&mut r);
    let f = FakeVsock::new(vec![Client::new(1000, 52, &pattern(4000, 1), 0)]);
    f.0.borrow_mut().host.overrun = true;
    // The host gives no credit for the echo, so the guest's ring fills up; the host then sends
    // 100 bytes past the guest's credit.
    f.0.borrow_mut().host.clients[0].buf_alloc = 0;
    let mut d = Driver::start(&f, &p).unwrap();
    let e = serve(&mut d, &f, 52, 1, 2000).unwrap_err();
    assert!(
        matches!(e, Problem::CreditOverrun { port: 1000, .. }),
        "{e:?}"
    );
}

#[test]
fn packets_for_another_cid_fail() {
    let mut r = region();
    let p = pool(&mut r);
    let f = FakeVsock::new(vec![Client::new(1000, 52, b"abc", 256)]);
    f.0.borrow_mut().host.wrong_cid = Some(4);
    let mut d = Driver::start(&f, &p).unwrap();
    let e = serve(&mut d, &f, 52, 1, 2000).unwrap_err();
    assert_eq!(e, Problem::WrongCid { dst: 4 });
}

#[test]
fn reserved_cids_are_refused() {
    let mut r = region();
    let p = pool(&mut r);
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let f = FakeVsock::new(Vec::new());
        f.0.borrow_mut().cid = cid;
        assert_eq!(Driver::start(&f, &p).err(), Some(Problem::BadCid(cid)));
    }
}

#[test]
fn connect_sends_the_line_within_credit() {
    let mut r = region();
    let p = pool(&mut r);
    let f = FakeVsock::new(Vec::new());
    f.0.borrow_mut().host.listener = Some((7000, Vec::new(), false));
    let mut d = Driver::start(&f, &p).unwrap();
    d.connect_and_send(7000, b"probe vsock ok\n").unwrap();
    let dev = f.0.borrow();
    let (_, got, closed) = dev.host.listener.as_ref().unwrap();
    assert_eq!(got.as_slice(), b"probe vsock ok\n");
    assert!(closed, "shut down after the line");
    let (req, _) = &dev.host.seen[0];
    assert_eq!(
        (req.op, req.src_port, req.dst_port, req.dst_cid),
        (OP_REQUEST, CLIENT_PORT, 7000, HOST_CID)
    );
}

#[test]
fn a_refused_connect_fails() {
    let mut r = region();
    let p = pool(&mut r);
    let f = FakeVsock::new(Vec::new());
    f.0.borrow_mut().host.listener = Some((7000, Vec::new(), false));
    f.0.borrow_mut().host.refuse = true;
    let mut d = Driver::start(&f, &p).unwrap();
    let e = d.connect_and_send(7000, b"x").unwrap_err();
    assert_eq!(e, Problem::Refused { port: 7000 });
    assert_eq!(
        e.to_string(),
        "host port 7000 refused the connection (OP_RST)"
    );
    // Nobody there at all (no answer): the message only, not waiting CONNECT_MS here.
    assert_eq!(
        Problem::NoResponse { port: 9 }.to_string(),
        "no OP_RESPONSE from host port 9 within 5 s"
    );
}
