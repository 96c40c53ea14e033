//! Tests of the network device through its queues: a driver written here posts descriptor
//! chains into guest memory, the worker moves frames between them and a real TAP interface
//! in a private network namespace, and a packet socket on that interface plays the host.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::control::{Limiters, Shared};
use super::tap::testing::{can_create_taps, create_tap, in_new_netns, test_frame, PacketSocket};
use super::*;
use crate::rate_limiter::{RateLimiter, TokenBucket};
use crate::virtio::test_driver::RingDriver;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, DeviceHealth, InterruptReason, VirtioInterrupt};

const MEM_SIZE: u64 = 16 << 20;
const QSIZE: u16 = 64;
const RX_TOKEN: u32 = 0;
const TX_TOKEN: u32 = 1;
const TAP_TOKEN: u32 = 2;

#[derive(Default)]
struct CountingInterrupt {
    queue: AtomicU32,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        if let InterruptReason::Queue(_) = reason {
            self.queue.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// The driver side of each queue: rings at `base`, `base + 0x1000` and `base + 0x2000`.
fn driver(mem: &GuestMemoryMmap, base: u64) -> (RingDriver, Queue) {
    RingDriver::new(mem, base, QSIZE)
}

/// A worker over the tap `name` with its two drivers, and where the buffers go.
struct Rig {
    mem: GuestMemoryMmap,
    rx: RingDriver,
    tx: RingDriver,
    worker: NetWorker,
    metrics: Arc<NetMetrics>,
    intr: Arc<CountingInterrupt>,
    heap: u64,
}

impl Rig {
    fn new(
        name: &str,
        mergeable: bool,
        rx_limit: Option<RateLimiter>,
        tx_limit: Option<RateLimiter>,
    ) -> Self {
        let tap = Backend::Tap(Tap::open(name).unwrap());
        Self::over(tap, mergeable, rx_limit, tx_limit)
    }

    fn over(
        backend: Backend,
        mergeable: bool,
        rx_limit: Option<RateLimiter>,
        tx_limit: Option<RateLimiter>,
    ) -> Self {
        Self::over_with(backend, mergeable, rx_limit, tx_limit, None)
    }

    /// [`over`](Self::over), the worker taking rate limiter changes from `control`.
    fn over_with(
        backend: Backend,
        mergeable: bool,
        rx_limit: Option<RateLimiter>,
        tx_limit: Option<RateLimiter>,
        control: Option<Arc<Shared>>,
    ) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (rx, rxq) = driver(&mem, 0);
        let (tx, txq) = driver(&mem, 0x4000);
        let backend = Arc::new(backend);
        let metrics = Arc::new(NetMetrics::default());
        let intr = Arc::new(CountingInterrupt::default());
        let q = |index, queue| ActiveQueue {
            index,
            queue,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let worker = NetWorker::new(
            mem.clone(),
            q(RX_QUEUE, rxq),
            q(TX_QUEUE, txq),
            backend,
            intr.clone(),
            rx_limit,
            tx_limit,
            mergeable,
            metrics.clone(),
        );
        let worker = match control {
            Some(c) => worker.with_control(c),
            None => worker,
        };
        Rig {
            mem,
            rx,
            tx,
            worker,
            metrics,
            intr,
            heap: 0x10_0000,
        }
    }

    fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len + 4095) & !4095;
        assert!(self.heap < MEM_SIZE);
        GuestAddress(a)
    }

    /// Posts a receive chain of one buffer of `len` bytes; returns its head and address.
    fn post_rx(&mut self, len: u32) -> (u16, GuestAddress) {
        let a = self.alloc(u64::from(len));
        (self.rx.add_chain(&[(a, len, true)]), a)
    }

    /// Posts `frame` for transmission behind a zero header split over two descriptors.
    fn post_tx(&mut self, frame: &[u8]) -> u16 {
        let h = self.alloc(12);
        self.mem.write_slice(&[0u8; 12], h).unwrap();
        let d = self.alloc(frame.len() as u64);
        self.mem.write_slice(frame, d).unwrap();
        self.tx.add_chain(&[
            (h, 5, false),
            (h.unchecked_add(5), 7, false),
            (d, frame.len() as u32, false),
        ])
    }

    fn handle(&mut self, token: u32) {
        self.worker.handle(token, &Sources::detached()).unwrap();
    }

    fn bytes(&self, a: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, a).unwrap();
        v
    }

    fn m(&self, c: &AtomicU64) -> u64 {
        let _ = self;
        c.load(Ordering::Relaxed)
    }
}

/// Waits until the tap has something to read.
fn wait_readable(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we own.
    let r = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(r, 1, "the tap became readable");
}

/// Runs `body` with a fresh tap in a private namespace (skipped when not root).
fn with_tap(test: &'static str, body: impl FnOnce(&str) + Send + 'static) {
    if !can_create_taps(test) {
        return;
    }
    in_new_netns(move || {
        create_tap("cgvmnet0");
        body("cgvmnet0");
    });
}

fn tap_config(name: &str) -> NetConfig {
    NetConfig {
        backend: NetBackendConfig::Tap { name: name.into() },
        mac: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }
}

/// Activates `dev` with every feature it offers on the rings `rxq` and `txq` in `mem`,
/// raising `interrupt`; the queues' notification eventfds and the device's health.
fn activate(
    dev: &mut Net,
    mem: &GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> (EventFd, EventFd, DeviceHealth) {
    let rx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let tx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let health = DeviceHealth::new();
    dev.activate(crate::virtio::ActivateContext {
        mem: mem.clone(),
        queues: vec![
            ActiveQueue {
                index: RX_QUEUE,
                queue: rxq,
                notify: rx_notify.try_clone().unwrap(),
            },
            ActiveQueue {
                index: TX_QUEUE,
                queue: txq,
                notify: tx_notify.try_clone().unwrap(),
            },
        ],
        interrupt,
        acked_features: dev.features(),
        health: health.clone(),
    })
    .unwrap();
    (rx_notify, tx_notify, health)
}

fn header_num_buffers(h: &[u8]) -> u16 {
    u16::from_le_bytes([h[10], h[11]])
}

#[test]
fn the_device_offers_documented_features_and_config() {
    with_tap("the_device_offers_documented_features_and_config", |name| {
        let mac = [0x02, 0xcc, 0, 0, 0, 7];
        let dev = Net::new(NetConfig {
            mac: Some(mac),
            ..tap_config(name)
        })
        .unwrap();
        assert_eq!(dev.device_type(), crate::virtio::TYPE_NET);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let f = dev.features();
        for bit in [
            crate::virtio::VIRTIO_F_VERSION_1,
            crate::virtio::VIRTIO_RING_F_EVENT_IDX,
            features::MAC,
            features::STATUS,
            features::MRG_RXBUF,
            features::CSUM,
            features::GUEST_CSUM,
            features::GUEST_TSO4,
            features::HOST_TSO4,
        ] {
            assert!(f & (1 << bit) != 0, "feature {bit}");
        }
        let mut c = [0u8; 10];
        dev.read_config(0, &mut c);
        assert_eq!(&c[..6], &mac);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), STATUS_LINK_UP);
        assert_eq!(&c[8..], &[0, 0], "nothing past the status");
        // The tap is held: a second device on it is refused, naming it.
        let e = Net::new(NetConfig { ..tap_config(name) }).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
        drop(dev);
        // Without a MAC address, no MAC feature.
        let dev = Net::new(NetConfig { ..tap_config(name) }).unwrap();
        assert_eq!(dev.features() & (1 << features::MAC), 0);
        // Offloads follow the guest's features.
        assert_eq!(offloads_for(0), 0);
        assert_eq!(offloads_for(1 << features::GUEST_TSO4), 0);
        assert_eq!(
            offloads_for((1 << features::GUEST_CSUM) | (1 << features::GUEST_TSO6)),
            TUN_F_CSUM | TUN_F_TSO6
        );
    });
    let e = Net::new(NetConfig {
        ..tap_config("a-name-too-long-for-linux")
    })
    .unwrap_err();
    assert!(e.to_string().contains("a-name-too-long-for-linux"));
}

#[test]
fn a_frame_spans_mergeable_buffers_with_num_buffers_set() {
    with_tap(
        "a_frame_spans_mergeable_buffers_with_num_buffers_set",
        |name| {
            let mut rig = Rig::new(name, true, None, None);
            let sock = PacketSocket::bind(name);
            let bufs: Vec<_> = (0..4).map(|_| rig.post_rx(1000)).collect();
            let frame = test_frame(3, 2500);
            sock.send(&frame);
            wait_readable(rig.worker_tap_fd());
            rig.handle(TAP_TOKEN);
            let used = rig.rx.take_used();
            let total = 12 + frame.len();
            assert_eq!(
                used,
                vec![
                    (u32::from(bufs[0].0), 1000),
                    (u32::from(bufs[1].0), 1000),
                    (u32::from(bufs[2].0), (total - 2000) as u32)
                ]
            );
            let mut got = Vec::new();
            for (i, &(_, len)) in used.iter().enumerate() {
                got.extend(rig.bytes(bufs[i].1, len as usize));
            }
            assert_eq!(header_num_buffers(&got), 3);
            assert_eq!(&got[12..], &frame[..]);
            assert_eq!(rig.m(&rig.metrics.rx_frames), 1);
            assert_eq!(rig.m(&rig.metrics.rx_bytes), frame.len() as u64);
            assert!(rig.intr.queue.load(Ordering::SeqCst) >= 1);
            assert!(rig.worker.is_reading_tap());
        },
    );
}

impl Rig {
    fn worker_tap_fd(&self) -> i32 {
        let s = self.worker.sources();
        s.iter()
            .find(|&&(_, t)| t == TAP_TOKEN)
            .map(|&(fd, _)| fd)
            .expect("the tap is a source")
    }
}

#[test]
fn without_buffers_a_frame_waits_and_goes_on_the_rx_notification() {
    with_tap(
        "without_buffers_a_frame_waits_and_goes_on_the_rx_notification",
        |name| {
            let mut rig = Rig::new(name, true, None, None);
            let tap_fd = rig.worker_tap_fd();
            let sock = PacketSocket::bind(name);
            let first = test_frame(1, 1500);
            let second = test_frame(2, 600);
            sock.send(&first);
            sock.send(&second);
            wait_readable(tap_fd);
            rig.handle(TAP_TOKEN);
            // No buffers: the frame waits, the tap is no longer a source, nothing is lost.
            assert!(rig.worker.has_pending_frame());
            assert!(!rig.worker.is_reading_tap());
            assert!(rig.worker.sources().iter().all(|&(_, t)| t != TAP_TOKEN));
            assert_eq!(rig.m(&rig.metrics.rx_dropped), 0);
            // A buffer too small for it (mergeable: more may come): still waits.
            let (h1, a1) = rig.post_rx(1000);
            rig.handle(RX_TOKEN);
            assert!(rig.rx.take_used().is_empty());
            assert!(rig.worker.has_pending_frame());
            // Enough room: both frames are delivered, in order, and the tap is back.
            let (h2, a2) = rig.post_rx(2048);
            let (h3, a3) = rig.post_rx(2048);
            rig.handle(RX_TOKEN);
            let used = rig.rx.take_used();
            assert_eq!(used[0], (u32::from(h1), 1000));
            assert_eq!(used[1], (u32::from(h2), 512));
            assert_eq!(used[2], (u32::from(h3), 612));
            let mut f1 = rig.bytes(a1, 1000);
            f1.extend(rig.bytes(a2, 512));
            assert_eq!(header_num_buffers(&f1), 2);
            assert_eq!(&f1[12..], &first[..]);
            let f2 = rig.bytes(a3, 612);
            assert_eq!(header_num_buffers(&f2), 1);
            assert_eq!(&f2[12..], &second[..]);
            assert!(rig.worker.is_reading_tap());
            assert!(!rig.worker.has_pending_frame());
            assert_eq!(rig.m(&rig.metrics.rx_frames), 2);
            assert_eq!(rig.m(&rig.metrics.rx_dropped), 0);
        },
    );
}

#[test]
fn malformed_rx_chains_cost_one_frame_each() {
    with_tap("malformed_rx_chains_cost_one_frame_each", |name| {
        let mut rig = Rig::new(name, false, None, None);
        let sock = PacketSocket::bind(name);
        // Device-readable, outside guest memory, shorter than the header, too short for
        // the frame without MRG_RXBUF; then a good one.
        let a = rig.alloc(2048);
        let bad1 = rig.rx.add_chain(&[(a, 2048, false)]);
        let bad2 = rig
            .rx
            .add_chain(&[(GuestAddress(MEM_SIZE - 100), 2048, true)]);
        let bad3 = rig.rx.add_chain(&[(a, 8, true)]);
        let bad4 = rig.rx.add_chain(&[(a, 100, true)]);
        let (good, ga) = rig.post_rx(2048);
        let frames: Vec<_> = (0..5).map(|i| test_frame(i, 200)).collect();
        for f in &frames {
            sock.send(f);
        }
        wait_readable(rig.worker_tap_fd());
        for _ in 0..50 {
            rig.handle(TAP_TOKEN);
            if rig.m(&rig.metrics.rx_frames) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let used = rig.rx.take_used();
        assert_eq!(
            used,
            vec![
                (u32::from(bad1), 0),
                (u32::from(bad2), 0),
                (u32::from(bad3), 0),
                (u32::from(bad4), 0),
                (u32::from(good), 212)
            ]
        );
        assert_eq!(&rig.bytes(ga, 212)[12..], &frames[4][..]);
        assert_eq!(rig.m(&rig.metrics.rx_errors), 4);
        assert_eq!(rig.m(&rig.metrics.rx_dropped), 4);
        assert_eq!(rig.m(&rig.metrics.rx_frames), 1);
    });
}

#[test]
fn tx_frames_reach_the_interface_and_malformed_chains_are_dropped() {
    with_tap(
        "tx_frames_reach_the_interface_and_malformed_chains_are_dropped",
        |name| {
            let mut rig = Rig::new(name, true, None, None);
            let sock = PacketSocket::bind(name);
            let a = rig.alloc(70_000);
            // Short header, device-writable descriptor, oversize, outside guest memory.
            let bad = [
                rig.tx.add_chain(&[(a, 8, false)]),
                rig.tx.add_chain(&[(a, 12, false), (a, 100, true)]),
                rig.tx.add_chain(&[(a, 12, false), (a, 66_000, false)]),
                rig.tx
                    .add_chain(&[(a, 12, false), (GuestAddress(MEM_SIZE - 10), 100, false)]),
            ];
            let frame = test_frame(9, 1400);
            let good = rig.post_tx(&frame);
            rig.handle(TX_TOKEN);
            let used = rig.tx.take_used();
            let want: Vec<_> = bad
                .iter()
                .chain([&good])
                .map(|&h| (u32::from(h), 0))
                .collect();
            assert_eq!(used, want);
            let got = sock
                .recv_matching(Duration::from_secs(5), |f| f == &frame[..])
                .expect("the frame reaches the interface");
            assert_eq!(got, frame);
            assert_eq!(rig.m(&rig.metrics.tx_frames), 1);
            assert_eq!(rig.m(&rig.metrics.tx_bytes), 1400);
            assert_eq!(rig.m(&rig.metrics.tx_errors), 4);
            assert_eq!(rig.m(&rig.metrics.tx_dropped), 4);
            assert!(rig.intr.queue.load(Ordering::SeqCst) >= 1);
        },
    );
}

fn one_op_per_hour() -> RateLimiter {
    RateLimiter::new(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucket {
            size: 1,
            one_time_burst: None,
            refill_time_ms: 3_600_000,
        }),
    })
    .unwrap()
}

#[test]
fn rate_limiters_hold_frames_back_without_losing_them() {
    with_tap(
        "rate_limiters_hold_frames_back_without_losing_them",
        |name| {
            let mut rig = Rig::new(name, true, Some(one_op_per_hour()), Some(one_op_per_hour()));
            let sock = PacketSocket::bind(name);
            // Transmit: one frame goes, the second stays on the ring.
            rig.post_tx(&test_frame(1, 100));
            rig.post_tx(&test_frame(2, 100));
            rig.handle(TX_TOKEN);
            assert_eq!(rig.tx.take_used().len(), 1);
            assert_eq!(rig.m(&rig.metrics.tx_frames), 1);
            assert_eq!(rig.m(&rig.metrics.tx_throttled), 1);
            // Receive: one frame delivered, the next pending with the tap out of the set.
            rig.post_rx(2048);
            rig.post_rx(2048);
            sock.send(&test_frame(3, 100));
            sock.send(&test_frame(4, 100));
            wait_readable(rig.worker_tap_fd());
            for _ in 0..50 {
                rig.handle(TAP_TOKEN);
                if rig.worker.has_pending_frame() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(rig.rx.take_used().len(), 1);
            assert!(rig.worker.has_pending_frame());
            assert!(!rig.worker.is_reading_tap());
            assert_eq!(rig.m(&rig.metrics.rx_frames), 1);
            assert!(rig.m(&rig.metrics.rx_throttled) >= 1);
            assert_eq!(rig.m(&rig.metrics.rx_dropped), 0);
        },
    );
}

#[test]
fn an_active_device_moves_frames_both_ways_on_its_thread() {
    with_tap(
        "an_active_device_moves_frames_both_ways_on_its_thread",
        |name| {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            let (mut rxd, rxq) = driver(&mem, 0);
            let (mut txd, txq) = driver(&mem, 0x4000);
            let mut dev = Net::new(NetConfig {
                mac: Some([2, 0, 0, 0, 0, 9]),
                ..tap_config(name)
            })
            .unwrap();
            let metrics = dev.metrics();
            let intr = Arc::new(CountingInterrupt::default());
            let (rx_notify, tx_notify, health) = activate(&mut dev, &mem, rxq, txq, intr.clone());
            let sock = PacketSocket::bind(name);
            let wait = |what: &str, cond: &dyn Fn() -> bool| {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !cond() {
                    assert!(std::time::Instant::now() < deadline, "timed out: {what}");
                    std::thread::sleep(Duration::from_millis(2));
                }
            };
            // Receive: the frame arrives before the buffer; the notification brings it in.
            let frame = test_frame(5, 3000);
            sock.send(&frame);
            std::thread::sleep(Duration::from_millis(20));
            let buf = GuestAddress(0x10_0000);
            rxd.add_chain(&[(buf, 4096, true)]);
            rx_notify.write(1).unwrap();
            wait("rx", &|| metrics.rx_frames.load(Ordering::Relaxed) >= 1);
            let used = rxd.take_used();
            assert_eq!(used, vec![(0, 3012)]);
            let mut got = vec![0u8; 3012];
            mem.read_slice(&mut got, buf).unwrap();
            assert_eq!(&got[12..], &frame[..]);
            // Transmit.
            let out = test_frame(6, 5000);
            let tb = GuestAddress(0x20_0000);
            mem.write_slice(&[0u8; 12], tb).unwrap();
            mem.write_slice(&out, tb.unchecked_add(12)).unwrap();
            txd.add_chain(&[(tb, 12 + out.len() as u32, false)]);
            tx_notify.write(1).unwrap();
            let got = sock
                .recv_matching(Duration::from_secs(5), |f| f == &out[..])
                .expect("the guest's frame reaches the interface");
            assert_eq!(got.len(), out.len());
            wait("tx used", &|| {
                metrics.tx_frames.load(Ordering::Relaxed) == 1
            });
            assert_eq!(txd.take_used(), vec![(0, 0)]);
            assert_eq!(metrics.rx_bytes.load(Ordering::Relaxed), 3000);
            assert_eq!(metrics.tx_bytes.load(Ordering::Relaxed), 5000);
            assert!(!health.is_broken());
            dev.reset();
        },
    );
}

// The stream backend: a socketpair stands in for passt (the test writes and reads its end),
// and one test talks to a real passt.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

const STREAM_WRITABLE_TOKEN: u32 = 5;

/// A stream backend and the test's end of it ("passt"), nonblocking.
fn stream_pair() -> (Backend, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let backend = Backend::Stream(FrameStream::new(OwnedFd::from(ours)).unwrap());
    (backend, theirs)
}

fn framed(frame: &[u8]) -> Vec<u8> {
    let mut v = (frame.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

/// Polls `fd` for reading for up to `ms` milliseconds.
fn readable_within(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we own.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r == 1
}

impl Rig {
    fn source(&self, token: u32) -> Option<i32> {
        self.worker
            .sources()
            .iter()
            .find(|&&(_, t)| t == token)
            .map(|&(fd, _)| fd)
    }

    fn try_handle(&mut self, token: u32) -> Result<(), String> {
        self.worker.handle(token, &Sources::detached())
    }
}

/// Reads whatever `peer` has now into `acc`; splits off the complete frames.
fn drain_frames(peer: &mut UnixStream, acc: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    loop {
        match peer.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => acc.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    let mut out = Vec::new();
    loop {
        if acc.len() < 4 {
            break;
        }
        let len = u32::from_be_bytes([acc[0], acc[1], acc[2], acc[3]]) as usize;
        if acc.len() < 4 + len {
            break;
        }
        out.push(acc[4..4 + len].to_vec());
        acc.drain(..4 + len);
    }
    out
}

#[test]
fn a_stream_device_offers_no_offloads() {
    let (_, peer) = UnixStream::pair().unwrap();
    let (ours, _keep) = UnixStream::pair().unwrap();
    drop(peer);
    let dev = Net::new(NetConfig {
        backend: NetBackendConfig::Stream(OwnedFd::from(ours)),
        mac: Some([2, 0, 0, 0, 0, 1]),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
    .unwrap();
    let f = dev.features();
    for bit in [
        crate::virtio::VIRTIO_F_VERSION_1,
        crate::virtio::VIRTIO_RING_F_EVENT_IDX,
        features::MAC,
        features::STATUS,
        features::MRG_RXBUF,
    ] {
        assert!(f & (1 << bit) != 0, "feature {bit}");
    }
    for bit in [
        features::CSUM,
        features::GUEST_CSUM,
        features::GUEST_TSO4,
        features::GUEST_TSO6,
        features::GUEST_ECN,
        features::GUEST_UFO,
        features::HOST_TSO4,
        features::HOST_TSO6,
        features::HOST_ECN,
        features::HOST_UFO,
    ] {
        assert_eq!(
            f & (1 << bit),
            0,
            "offload feature {bit} offered over a stream"
        );
    }
    assert_eq!(dev.tap_name(), None);
    assert!(format!("{dev:?}").contains("passt"));
    // A descriptor that is not a stream socket is refused.
    let file = std::fs::File::open("/dev/null").unwrap();
    let e = Net::new(NetConfig {
        backend: NetBackendConfig::Stream(OwnedFd::from(file)),
        mac: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("not a stream socket"), "{e}");
}

#[test]
fn stream_frames_cross_both_ways_byte_exact() {
    let (backend, mut peer) = stream_pair();
    let mut rig = Rig::over(backend, true, None, None);
    // Receive: two frames in one write, one spanning two mergeable buffers.
    let f1 = test_frame(1, 1500);
    let f2 = test_frame(2, 60);
    let mut msg = framed(&f1);
    msg.extend(framed(&f2));
    peer.write_all(&msg).unwrap();
    let bufs: Vec<_> = (0..3).map(|_| rig.post_rx(1024)).collect();
    rig.handle(TAP_TOKEN);
    let used = rig.rx.take_used();
    assert_eq!(
        used,
        vec![
            (u32::from(bufs[0].0), 1024),
            (u32::from(bufs[1].0), (12 + 1500 - 1024) as u32),
            (u32::from(bufs[2].0), 12 + 60),
        ]
    );
    let mut got1 = rig.bytes(bufs[0].1, 1024);
    got1.extend(rig.bytes(bufs[1].1, 12 + 1500 - 1024));
    assert_eq!(&got1[..10], &[0u8; 10], "a zeroed header");
    assert_eq!(header_num_buffers(&got1), 2);
    assert_eq!(&got1[12..], &f1[..]);
    let got2 = rig.bytes(bufs[2].1, 72);
    assert_eq!(&got2[..10], &[0u8; 10]);
    assert_eq!(header_num_buffers(&got2), 1);
    assert_eq!(&got2[12..], &f2[..]);
    assert_eq!(rig.m(&rig.metrics.rx_frames), 2);
    assert_eq!(rig.m(&rig.metrics.rx_bytes), 1560);
    assert!(rig.worker.is_reading_tap());
    // Transmit: the header goes, the length comes in front.
    let t1 = test_frame(3, 1400);
    let t2 = test_frame(4, 9000);
    let h1 = rig.post_tx(&t1);
    let h2 = rig.post_tx(&t2);
    rig.handle(TX_TOKEN);
    assert_eq!(
        rig.tx.take_used(),
        vec![(u32::from(h1), 0), (u32::from(h2), 0)]
    );
    let mut want = framed(&t1);
    want.extend(framed(&t2));
    let mut got = vec![0u8; want.len()];
    peer.set_nonblocking(false).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
    peer.set_nonblocking(true).unwrap();
    let mut rest = [0u8; 1];
    assert!(peer.read(&mut rest).is_err(), "nothing more was sent");
    assert_eq!(rig.m(&rig.metrics.tx_frames), 2);
    assert_eq!(rig.m(&rig.metrics.tx_bytes), 10_400);
    assert_eq!(rig.m(&rig.metrics.tx_dropped), 0);
}

#[test]
fn a_frame_split_over_many_small_writes_is_put_back_together() {
    let (backend, mut peer) = stream_pair();
    let mut rig = Rig::over(backend, false, None, None);
    let frame = test_frame(7, 700);
    let (head, addr) = rig.post_rx(2048);
    // Three bytes at a time, so the length prefix itself is split; the worker wakes for each.
    let msg = framed(&frame);
    for piece in msg.chunks(3) {
        assert!(
            rig.rx.take_used().is_empty(),
            "no frame before its last byte"
        );
        peer.write_all(piece).unwrap();
        rig.handle(TAP_TOKEN);
    }
    assert_eq!(rig.rx.take_used(), vec![(u32::from(head), 712)]);
    assert_eq!(&rig.bytes(addr, 712)[12..], &frame[..]);
    // Then one write with the end of a frame and the start of the next.
    let a = test_frame(8, 100);
    let b = test_frame(9, 200);
    let mut msg = framed(&a);
    msg.extend(framed(&b));
    let (ha, aa) = rig.post_rx(2048);
    let (hb, ab) = rig.post_rx(2048);
    peer.write_all(&msg[..50]).unwrap();
    rig.handle(TAP_TOKEN);
    peer.write_all(&msg[50..150]).unwrap();
    rig.handle(TAP_TOKEN);
    assert_eq!(rig.rx.take_used(), vec![(u32::from(ha), 112)]);
    peer.write_all(&msg[150..]).unwrap();
    rig.handle(TAP_TOKEN);
    assert_eq!(rig.rx.take_used(), vec![(u32::from(hb), 212)]);
    assert_eq!(&rig.bytes(aa, 112)[12..], &a[..]);
    assert_eq!(&rig.bytes(ab, 212)[12..], &b[..]);
    assert_eq!(rig.m(&rig.metrics.rx_frames), 3);
    assert_eq!(rig.m(&rig.metrics.rx_dropped), 0);
}

#[test]
fn many_frames_in_one_write_all_arrive_across_batches() {
    let (backend, mut peer) = stream_pair();
    let mut rig = Rig::over(backend, false, None, None);
    let frames: Vec<_> = (0..70u8)
        .map(|i| test_frame(i, 60 + usize::from(i)))
        .collect();
    let msg: Vec<u8> = frames.iter().flat_map(|f| framed(f)).collect();
    peer.write_all(&msg).unwrap();
    let bufs: Vec<_> = (0..QSIZE).map(|_| rig.post_rx(256)).collect();
    rig.handle(TAP_TOKEN);
    let used = rig.rx.take_used();
    assert_eq!(used.len(), RX_BATCH);
    // The socket is empty but frames wait in the backend: the worker woke itself.
    let rx_notify = rig.source(RX_TOKEN).unwrap();
    assert!(readable_within(rx_notify, 0), "the rx eventfd was kicked");
    let mut got: Vec<Vec<u8>> = used
        .iter()
        .enumerate()
        .map(|(i, &(_, len))| rig.bytes(bufs[i].1, len as usize)[12..].to_vec())
        .collect();
    let more: Vec<_> = (0..6).map(|_| rig.post_rx(256)).collect();
    rig.handle(RX_TOKEN);
    let used = rig.rx.take_used();
    assert_eq!(used.len(), 6);
    for (i, &(_, len)) in used.iter().enumerate() {
        got.push(rig.bytes(more[i].1, len as usize)[12..].to_vec());
    }
    assert_eq!(got, frames);
    assert_eq!(rig.m(&rig.metrics.rx_frames), 70);
}

#[test]
fn a_full_stream_keeps_tx_frames_and_waits_for_writability() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt reads the int we own.
    let r = unsafe {
        libc::setsockopt(
            ours.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    let backend = Backend::Stream(FrameStream::new(OwnedFd::from(ours)).unwrap());
    let mut rig = Rig::over(backend, true, None, None);
    // 20 chains of 3 descriptors fill 60 of the ring's 64.
    let frames: Vec<_> = (0..20u8)
        .map(|i| test_frame(i, 2000 + 700 * usize::from(i)))
        .collect();
    for f in &frames {
        rig.post_tx(f);
    }
    rig.handle(TX_TOKEN);
    let first = rig.tx.take_used().len();
    assert!(first > 0 && first < 20, "{first} chains taken");
    let writable = rig.source(STREAM_WRITABLE_TOKEN).unwrap();
    // Full and nobody reading: nothing wakes the worker, and a guest kick takes no chain.
    assert!(
        !readable_within(writable, 100),
        "woken while the socket is full"
    );
    rig.handle(TX_TOKEN);
    assert!(rig.tx.take_used().is_empty());
    assert_eq!(rig.m(&rig.metrics.tx_dropped), 0);
    // "passt" reads; each writability event lets the worker go on.
    let mut acc = Vec::new();
    let mut got = Vec::new();
    let mut taken = first;
    let mut wakeups = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < frames.len() {
        assert!(std::time::Instant::now() < deadline, "{} frames", got.len());
        got.extend(drain_frames(&mut peer, &mut acc));
        if readable_within(writable, 10) {
            wakeups += 1;
            rig.handle(STREAM_WRITABLE_TOKEN);
            taken += rig.tx.take_used().len();
        }
    }
    assert_eq!(taken, 20);
    assert!(wakeups < 200, "{wakeups} wakeups");
    assert!(got == frames, "every frame, whole and in order");
    assert!(acc.is_empty());
    assert!(
        !readable_within(writable, 0),
        "nothing left: no more wakeups"
    );
    assert_eq!(rig.m(&rig.metrics.tx_frames), 20);
    assert_eq!(rig.m(&rig.metrics.tx_dropped), 0);
}

#[test]
fn a_bad_frame_length_from_passt_fails_the_worker() {
    for bad in [0u32, 65535 + 19, u32::MAX] {
        let (backend, mut peer) = stream_pair();
        let mut rig = Rig::over(backend, true, None, None);
        rig.post_rx(2048);
        peer.write_all(&bad.to_be_bytes()).unwrap();
        let e = rig.try_handle(TAP_TOKEN).unwrap_err();
        assert!(e.contains("passt") && e.contains("protocol error"), "{e}");
        assert!(e.contains(&bad.to_string()), "{e}");
    }
    // The largest frame passes.
    let (backend, mut peer) = stream_pair();
    let mut rig = Rig::over(backend, true, None, None);
    let big = test_frame(1, MAX_STREAM_FRAME);
    for _ in 0..QSIZE {
        rig.post_rx(4096);
    }
    let msg = framed(&big);
    let writer = std::thread::spawn(move || {
        peer.set_nonblocking(false).unwrap();
        peer.write_all(&msg).unwrap();
        peer
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rig.m(&rig.metrics.rx_frames) == 0 {
        assert!(std::time::Instant::now() < deadline);
        rig.handle(TAP_TOKEN);
        std::thread::sleep(Duration::from_millis(1));
    }
    let _peer = writer.join().unwrap();
    assert_eq!(rig.m(&rig.metrics.rx_bytes), MAX_STREAM_FRAME as u64);
}

#[test]
fn a_closed_stream_fails_the_worker_naming_passt() {
    let (backend, peer) = stream_pair();
    let mut rig = Rig::over(backend, true, None, None);
    drop(peer);
    let e = rig.try_handle(TAP_TOKEN).unwrap_err();
    assert!(e.contains("passt closed its stream"), "{e}");
    // Sending to it fails the same way.
    let (backend, peer) = stream_pair();
    let mut rig = Rig::over(backend, true, None, None);
    drop(peer);
    rig.post_tx(&test_frame(1, 100));
    let e = rig.try_handle(TX_TOKEN).unwrap_err();
    assert!(e.contains("passt closed its stream"), "{e}");
}

#[test]
fn an_active_stream_device_moves_frames_then_breaks_when_passt_goes() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let (mut rxd, rxq) = driver(&mem, 0);
    let (mut txd, txq) = driver(&mem, 0x4000);
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut dev = Net::new(NetConfig {
        backend: NetBackendConfig::Stream(OwnedFd::from(ours)),
        mac: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
    .unwrap();
    let metrics = dev.metrics();
    let intr = Arc::new(CountingInterrupt::default());
    let (rx_notify, tx_notify, health) = activate(&mut dev, &mem, rxq, txq, intr.clone());
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // Receive on the device thread (under its seccomp filter).
    let buf = GuestAddress(0x10_0000);
    rxd.add_chain(&[(buf, 4096, true)]);
    rx_notify.write(1).unwrap();
    let frame = test_frame(5, 3000);
    peer.write_all(&framed(&frame)).unwrap();
    wait("rx", &|| metrics.rx_frames.load(Ordering::Relaxed) >= 1);
    assert_eq!(rxd.take_used(), vec![(0, 3012)]);
    let mut got = vec![0u8; 3012];
    mem.read_slice(&mut got, buf).unwrap();
    assert_eq!(&got[12..], &frame[..]);
    // Transmit.
    let out = test_frame(6, 5000);
    let tb = GuestAddress(0x20_0000);
    mem.write_slice(&[0u8; 12], tb).unwrap();
    mem.write_slice(&out, tb.unchecked_add(12)).unwrap();
    txd.add_chain(&[(tb, 12 + out.len() as u32, false)]);
    tx_notify.write(1).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; 4 + out.len()];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, framed(&out));
    wait("tx used", &|| {
        metrics.tx_frames.load(Ordering::Relaxed) == 1
    });
    assert_eq!(txd.take_used(), vec![(0, 0)]);
    assert!(!health.is_broken());
    // passt goes away: the device needs a reset.
    drop(peer);
    wait("broken", &|| health.is_broken());
    dev.reset();
}

/// A passt process on the other end of a socketpair, killed when dropped.
struct PasstChild(std::process::Child);

impl Drop for PasstChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host's default gateway (IPv4), from /proc/net/route.
fn default_gateway() -> Option<[u8; 4]> {
    std::fs::read_to_string("/proc/net/route")
        .ok()?
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&"00000000"))
        .and_then(|f| u32::from_str_radix(f.get(2)?, 16).ok())
        .map(u32::to_le_bytes)
}

fn find_passt() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("passt"))
        .find(|p| p.is_file())
}

#[test]
fn a_real_passt_answers_arp_through_the_device() {
    use std::os::unix::process::CommandExt;
    let test = "a_real_passt_answers_arp_through_the_device";
    let Some(passt) = find_passt() else {
        eprintln!("{test}: skipped: passt is not installed");
        return;
    };
    let Some(gw) = default_gateway() else {
        eprintln!("{test}: skipped: the host has no IPv4 default route");
        return;
    };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let their_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(&passt);
    cmd.args(["--foreground", "--quiet", "--fd", &their_fd.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec the closure only calls fcntl on its own descriptor,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(their_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _child = PasstChild(cmd.spawn().unwrap());
    drop(theirs);
    let backend = Backend::Stream(FrameStream::new(OwnedFd::from(ours)).unwrap());
    let mut rig = Rig::over(backend, true, None, None);
    let mac = [2u8, 0, 0, 0, 0, 1];
    let me = [10u8, 0, 2, 15];
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&me);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&gw);
    arp.resize(60, 0);
    let mut bufs: Vec<_> = (0..8).map(|_| rig.post_rx(2048)).collect();
    rig.post_tx(&arp);
    rig.handle(TX_TOKEN);
    assert_eq!(rig.tx.take_used().len(), 1);
    assert_eq!(rig.m(&rig.metrics.tx_frames), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reply = 'found: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no ARP reply from passt"
        );
        if let Some(fd) = rig.source(TAP_TOKEN) {
            readable_within(fd, 100);
        }
        rig.handle(TAP_TOKEN);
        for (head, len) in rig.rx.take_used() {
            let i = bufs
                .iter()
                .position(|b| u32::from(b.0) == head)
                .expect("a posted buffer");
            let got = rig.bytes(bufs[i].1, len as usize);
            bufs.remove(i);
            bufs.push(rig.post_rx(2048));
            let f = &got[12..];
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                break 'found f.to_vec();
            }
        }
    };
    assert_eq!(&reply[0..6], &mac, "addressed to the guest");
    assert_eq!(&reply[28..32], &gw, "the gateway answers");
    assert_eq!(&reply[32..38], &mac);
    assert_eq!(&reply[38..42], &me);
    assert!(rig.m(&rig.metrics.rx_frames) >= 1);
}

// Changing the rate limiters at run time ([`NetControl`]).

use std::time::Instant;

const TX_LIMITER_TOKEN: u32 = 4;
const RX_LIMITER_TOKEN: u32 = 3;
const COMMAND_TOKEN: u32 = 6;

fn tb(size: u64, one_time_burst: Option<u64>, refill_time_ms: u64) -> TokenBucket {
    TokenBucket {
        size,
        one_time_burst,
        refill_time_ms,
    }
}

/// `n` frames per hour: after the first `n`, the next waits far longer than any test.
fn ops_per_hour(n: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(tb(n, None, 3_600_000)),
    }
}

/// The update that removes a limiter's frame limit (Firecracker's size 0).
fn no_ops_limit() -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(tb(0, None, 0)),
    }
}

fn stream_config(fd: OwnedFd) -> NetConfig {
    NetConfig {
        backend: NetBackendConfig::Stream(fd),
        mac: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }
}

/// Waits up to 5 s for `cond`.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Rig {
    /// A worker over `backend` started as [`Net`] starts one: its limiters (made from `rx`
    /// and `tx`) taken from a device's slot, the control eventfd among its sources. Also
    /// returns what the device would share with it.
    fn controlled(
        backend: Backend,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> (Self, Arc<Shared>) {
        let limiters = Limiters::new(rx.as_ref(), tx.as_ref()).unwrap();
        let shared = Arc::new(Shared::new(backend.describe(), limiters).unwrap());
        let l = shared.take_limiters().unwrap();
        let rig = Self::over_with(backend, true, l.rx, l.tx, Some(shared.clone()));
        (rig, shared)
    }

    /// Runs `call` on another thread while this one serves the worker's control eventfd, as
    /// the device thread would; returns what `call` returned.
    fn serve<T: Send>(&mut self, call: impl FnOnce() -> T + Send) -> T {
        let command = self
            .source(COMMAND_TOKEN)
            .expect("the command eventfd is a source");
        std::thread::scope(|s| {
            let call = s.spawn(call);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !call.is_finished() {
                assert!(Instant::now() < deadline, "the control call never returned");
                if readable_within(command, 5) {
                    self.handle(COMMAND_TOKEN);
                }
            }
            call.join().unwrap()
        })
    }
}

#[test]
fn rate_limiter_updates_follow_firecracker_semantics_while_no_worker_runs() {
    let (ours, _peer) = UnixStream::pair().unwrap();
    let rx = RateLimiterConfig {
        bandwidth: Some(tb(1000, None, 1000)),
        ops: Some(tb(10, None, 1000)),
    };
    let dev = Net::new(NetConfig {
        rx_rate_limiter: Some(rx),
        ..stream_config(OwnedFd::from(ours))
    })
    .unwrap();
    let ctl = dev.control();
    assert_eq!(ctl.rate_limiters(), (Some(rx), None));
    // Nothing given, or an empty limiter: nothing changes.
    ctl.update_rate_limiters(None, None).unwrap();
    ctl.update_rate_limiters(Some(RateLimiterConfig::default()), None)
        .unwrap();
    assert_eq!(ctl.rate_limiters(), (Some(rx), None));
    // No limiter yet: one is made from the update.
    ctl.update_rate_limiters(None, Some(ops_per_hour(1)))
        .unwrap();
    assert_eq!(ctl.rate_limiters(), (Some(rx), Some(ops_per_hour(1))));
    // A given bucket replaces the old one; an absent one is kept.
    let ops = tb(100, Some(50), 500);
    ctl.update_rate_limiters(
        Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(ops),
        }),
        None,
    )
    .unwrap();
    let rx = RateLimiterConfig {
        bandwidth: rx.bandwidth,
        ops: Some(ops),
    };
    assert_eq!(ctl.rate_limiters(), (Some(rx), Some(ops_per_hour(1))));
    // Size 0 or refill time 0 removes a bucket; a limiter left with none is gone.
    ctl.update_rate_limiters(
        Some(RateLimiterConfig {
            bandwidth: Some(tb(0, None, 1000)),
            ops: None,
        }),
        Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(tb(1, None, 0)),
        }),
    )
    .unwrap();
    let rx = RateLimiterConfig {
        bandwidth: None,
        ops: Some(ops),
    };
    assert_eq!(ctl.rate_limiters(), (Some(rx), None));
    ctl.update_rate_limiters(Some(no_ops_limit()), Some(no_ops_limit()))
        .unwrap();
    assert_eq!(ctl.rate_limiters(), (None, None));
    let limiters = dev.shared.take_limiters().unwrap();
    assert!(limiters.rx.is_none() && limiters.tx.is_none());
    // A configuration that limits nothing makes no limiter.
    let (ours, _peer) = UnixStream::pair().unwrap();
    let dev = Net::new(NetConfig {
        rx_rate_limiter: Some(RateLimiterConfig::default()),
        tx_rate_limiter: Some(no_ops_limit()),
        ..stream_config(OwnedFd::from(ours))
    })
    .unwrap();
    assert_eq!(dev.control().rate_limiters(), (None, None));
    let limiters = dev.shared.take_limiters().unwrap();
    assert!(limiters.rx.is_none() && limiters.tx.is_none());
    assert!(format!("{:?}", dev.control()).contains("stream to passt"));
}

#[test]
fn a_net_control_handle_can_go_to_any_thread() {
    fn shareable<T: Send + Sync + Clone + std::fmt::Debug>() {}
    shareable::<NetControl>();
}

#[test]
fn a_held_frame_goes_at_once_when_the_running_worker_lifts_the_limit() {
    let (backend, mut peer) = stream_pair();
    let (mut rig, shared) = Rig::controlled(backend, Some(ops_per_hour(1)), Some(ops_per_hour(1)));
    let ctl = NetControl::new(shared.clone());
    assert!(rig.source(RX_LIMITER_TOKEN).is_some());
    assert!(rig.source(TX_LIMITER_TOKEN).is_some());
    // Transmit: the second frame is held on the ring.
    let t1 = test_frame(1, 100);
    let t2 = test_frame(2, 200);
    rig.post_tx(&t1);
    rig.post_tx(&t2);
    rig.handle(TX_TOKEN);
    assert_eq!(rig.tx.take_used().len(), 1);
    assert_eq!(rig.m(&rig.metrics.tx_throttled), 1);
    // Receive: the second frame waits, the backend out of the epoll set.
    let r1 = test_frame(3, 300);
    let r2 = test_frame(4, 400);
    let (_, a1) = rig.post_rx(2048);
    let (h2, a2) = rig.post_rx(2048);
    let mut msg = framed(&r1);
    msg.extend(framed(&r2));
    peer.write_all(&msg).unwrap();
    rig.handle(TAP_TOKEN);
    assert_eq!(rig.rx.take_used().len(), 1);
    assert_eq!(&rig.bytes(a1, 312)[12..], &r1[..]);
    assert!(rig.worker.has_pending_frame());
    assert!(!rig.worker.is_reading_tap());
    let mut acc = Vec::new();
    assert_eq!(drain_frames(&mut peer, &mut acc), vec![t1.clone()]);

    // Lifting both limits: the worker takes the change and both frames go at once, without
    // waiting for the hour-long timers; the limiters and their timers are gone.
    let start = Instant::now();
    let c = ctl.clone();
    rig.serve(move || c.update_rate_limiters(Some(no_ops_limit()), Some(no_ops_limit())))
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(ctl.rate_limiters(), (None, None));
    assert_eq!(rig.rx.take_used(), vec![(u32::from(h2), 412)]);
    assert_eq!(&rig.bytes(a2, 412)[12..], &r2[..]);
    assert!(!rig.worker.has_pending_frame());
    assert!(rig.worker.is_reading_tap());
    assert_eq!(rig.tx.take_used().len(), 1);
    assert_eq!(drain_frames(&mut peer, &mut acc), vec![t2]);
    assert!(rig.source(RX_LIMITER_TOKEN).is_none());
    assert!(rig.source(TX_LIMITER_TOKEN).is_none());
    assert_eq!(rig.m(&rig.metrics.rx_frames), 2);
    assert_eq!(rig.m(&rig.metrics.tx_frames), 2);

    // A new limit on the running worker: a fresh limiter, its timer now a source.
    let c = ctl.clone();
    rig.serve(move || c.update_rate_limiters(None, Some(ops_per_hour(1))))
        .unwrap();
    assert_eq!(ctl.rate_limiters(), (None, Some(ops_per_hour(1))));
    assert!(rig.source(TX_LIMITER_TOKEN).is_some());
    let t3 = test_frame(5, 100);
    rig.post_tx(&t3);
    rig.post_tx(&test_frame(6, 100));
    rig.handle(TX_TOKEN);
    assert_eq!(rig.tx.take_used().len(), 1);
    assert_eq!(rig.m(&rig.metrics.tx_throttled), 2);
    assert_eq!(drain_frames(&mut peer, &mut acc), vec![t3]);
}

#[test]
fn a_net_change_the_worker_does_not_take_times_out_and_changes_nothing() {
    let (backend, mut peer) = stream_pair();
    let (mut rig, shared) = Rig::controlled(backend, None, Some(ops_per_hour(1)));
    let ctl = NetControl::new(shared.clone());
    let t1 = test_frame(1, 100);
    let t2 = test_frame(2, 100);
    rig.post_tx(&t1);
    rig.post_tx(&t2);
    rig.handle(TX_TOKEN);
    assert_eq!(rig.tx.take_used().len(), 1);
    let timer = rig.source(TX_LIMITER_TOKEN);
    // Nobody serves the worker.
    let slow = ctl.clone().with_timeout(Duration::from_millis(100));
    let start = Instant::now();
    let e = slow
        .update_rate_limiters(Some(ops_per_hour(5)), Some(no_ops_limit()))
        .unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(matches!(e, NetError::Timeout { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("stream to passt") && msg.contains("did not take the change"),
        "{msg}"
    );
    assert_eq!(ctl.rate_limiters(), (None, Some(ops_per_hour(1))));
    // The worker wakes up late: the change was withdrawn, the frame is still held.
    rig.handle(COMMAND_TOKEN);
    assert!(rig.tx.take_used().is_empty());
    assert_eq!(rig.source(TX_LIMITER_TOKEN), timer);
    assert!(rig.source(RX_LIMITER_TOKEN).is_none());
    assert_eq!(ctl.rate_limiters(), (None, Some(ops_per_hour(1))));
    let mut acc = Vec::new();
    assert_eq!(drain_frames(&mut peer, &mut acc), vec![t1]);
    // The next change goes through.
    let c = ctl.clone();
    rig.serve(move || c.update_rate_limiters(None, Some(no_ops_limit())))
        .unwrap();
    assert_eq!(rig.tx.take_used().len(), 1);
    assert_eq!(drain_frames(&mut peer, &mut acc), vec![t2]);
    assert_eq!(ctl.rate_limiters(), (None, None));
}

#[test]
fn a_net_change_waiting_when_the_worker_stops_is_made_by_the_caller() {
    let (backend, _peer) = stream_pair();
    let (rig, shared) = Rig::controlled(backend, None, Some(ops_per_hour(1)));
    let ctl = NetControl::new(shared.clone());
    let mut command = libc::pollfd {
        fd: rig.source(COMMAND_TOKEN).unwrap(),
        events: libc::POLLIN,
        revents: 0,
    };
    std::thread::scope(|s| {
        let call = s.spawn(|| ctl.update_rate_limiters(Some(ops_per_hour(2)), None));
        // Once the change waits for the worker, the worker stops (a reset).
        // SAFETY: poll writes only the revents of our one pollfd.
        assert_eq!(unsafe { libc::poll(&mut command, 1, 10_000) }, 1);
        drop(rig);
        call.join().unwrap().unwrap();
    });
    assert_eq!(
        ctl.rate_limiters(),
        (Some(ops_per_hour(2)), Some(ops_per_hour(1)))
    );
    let limiters = shared.take_limiters().unwrap();
    assert_eq!(
        limiters.rx.as_ref().map(RateLimiter::config),
        Some(ops_per_hour(2))
    );
    assert_eq!(
        limiters.tx.as_ref().map(RateLimiter::config),
        Some(ops_per_hour(1))
    );
}

/// The driver's side of an active [`Net`]: its rings and notification eventfds.
struct Activated {
    mem: GuestMemoryMmap,
    rxd: RingDriver,
    txd: RingDriver,
    rx_notify: EventFd,
    tx_notify: EventFd,
    health: DeviceHealth,
    heap: u64,
}

impl Activated {
    /// Activates `dev` on fresh rings (its thread under its seccomp filter).
    fn new(dev: &mut Net) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (rxd, rxq) = driver(&mem, 0);
        let (txd, txq) = driver(&mem, 0x4000);
        let interrupt = Arc::new(CountingInterrupt::default());
        let (rx_notify, tx_notify, health) = activate(dev, &mem, rxq, txq, interrupt);
        Self {
            mem,
            rxd,
            txd,
            rx_notify,
            tx_notify,
            health,
            heap: 0x10_0000,
        }
    }

    fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len + 4095) & !4095;
        assert!(self.heap < MEM_SIZE);
        GuestAddress(a)
    }

    /// Posts `frame` for transmission behind a zero header, and kicks the device.
    fn send(&mut self, frame: &[u8]) {
        let a = self.alloc(12 + frame.len() as u64);
        self.mem.write_slice(&[0u8; 12], a).unwrap();
        self.mem.write_slice(frame, a.unchecked_add(12)).unwrap();
        self.txd.add_chain(&[(a, 12 + frame.len() as u32, false)]);
        self.tx_notify.write(1).unwrap();
    }

    /// Posts a 4 KiB receive buffer and kicks the device; returns its address.
    fn post_rx(&mut self) -> GuestAddress {
        let a = self.alloc(4096);
        self.rxd.add_chain(&[(a, 4096, true)]);
        self.rx_notify.write(1).unwrap();
        a
    }
}

#[test]
fn rate_limits_change_before_activation_while_active_and_after_a_reset() {
    with_tap(
        "rate_limits_change_before_activation_while_active_and_after_a_reset",
        |name| {
            assert!(crate::seccomp::enabled());
            let mut dev = Net::new(tap_config(name)).unwrap();
            let metrics = dev.metrics();
            let ctl = dev.control();
            let sock = PacketSocket::bind(name);
            let sent = |f: &[u8], ms: u64| {
                sock.recv_matching(Duration::from_millis(ms), |g| g == f)
                    .is_some()
            };
            let m = |c: &AtomicU64| c.load(Ordering::Relaxed);
            // Before activation: stored, and the device thread starts with it.
            ctl.update_rate_limiters(None, Some(ops_per_hour(1)))
                .unwrap();
            assert_eq!(ctl.rate_limiters(), (None, Some(ops_per_hour(1))));
            let mut a = Activated::new(&mut dev);
            let (t1, t2) = (test_frame(1, 500), test_frame(2, 600));
            a.send(&t1);
            a.send(&t2);
            assert!(sent(&t1, 5000), "the first frame goes");
            wait_until("tx throttled", || m(&metrics.tx_throttled) >= 1);
            assert!(!sent(&t2, 200), "the second frame is held");
            assert_eq!(a.txd.take_used().len(), 1);

            // While active: a new receive limit, made on this thread, taken by the worker.
            ctl.update_rate_limiters(Some(ops_per_hour(1)), None)
                .unwrap();
            assert_eq!(
                ctl.rate_limiters(),
                (Some(ops_per_hour(1)), Some(ops_per_hour(1)))
            );
            let b1 = a.post_rx();
            let b2 = a.post_rx();
            let (r1, r2) = (test_frame(3, 700), test_frame(4, 800));
            sock.send(&r1);
            wait_until("rx 1", || m(&metrics.rx_frames) == 1);
            sock.send(&r2);
            wait_until("rx throttled", || m(&metrics.rx_throttled) >= 1);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(m(&metrics.rx_frames), 1, "the second frame is held");
            let mut got = vec![0u8; 712];
            a.mem.read_slice(&mut got, b1).unwrap();
            assert_eq!(&got[12..], &r1[..]);

            // Lifting both limits lets the held frames go at once (the old timers had an
            // hour to run).
            let start = Instant::now();
            ctl.update_rate_limiters(Some(no_ops_limit()), Some(no_ops_limit()))
                .unwrap();
            assert_eq!(ctl.rate_limiters(), (None, None));
            assert!(sent(&t2, 5000), "the held frame goes");
            wait_until("rx 2", || m(&metrics.rx_frames) == 2);
            assert!(start.elapsed() < Duration::from_secs(5));
            let mut got = vec![0u8; 812];
            a.mem.read_slice(&mut got, b2).unwrap();
            assert_eq!(&got[12..], &r2[..]);
            wait_until("tx used", || m(&metrics.tx_frames) == 2);
            assert_eq!(a.txd.take_used().len(), 1);
            assert_eq!(a.rxd.take_used().len(), 2);
            // Unlimited now.
            for i in 0..5 {
                let f = test_frame(10 + i, 100);
                a.send(&f);
                assert!(sent(&f, 5000));
            }
            assert!(!a.health.is_broken());

            // After a reset: stored directly (no worker is asked, so 1 ms is time enough),
            // and the next activation uses it.
            dev.reset();
            ctl.clone()
                .with_timeout(Duration::from_millis(1))
                .update_rate_limiters(None, Some(ops_per_hour(1)))
                .unwrap();
            assert_eq!(ctl.rate_limiters(), (None, Some(ops_per_hour(1))));
            let throttled = m(&metrics.tx_throttled);
            let mut a = Activated::new(&mut dev);
            let (t3, t4) = (test_frame(20, 500), test_frame(21, 600));
            a.send(&t3);
            a.send(&t4);
            assert!(sent(&t3, 5000));
            wait_until("tx throttled", || m(&metrics.tx_throttled) > throttled);
            assert!(!sent(&t4, 200));
            assert!(!a.health.is_broken());
            dev.reset();
        },
    );
}
