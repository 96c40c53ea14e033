//! The vsock device and its worker through its queues.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{Header, Op, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::test_util::{Driver, GUEST_CID, SIZE};
use super::*;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, InterruptReason, VirtioInterrupt};

use crate::temp_dir::TempDir;

#[derive(Default)]
struct CountingInterrupt(AtomicU32);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _reason: InterruptReason) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn new_checks_the_cid_and_the_path() {
    let dir = TempDir::new("vsockdev");
    let p = dir.path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(cid, &p).err().unwrap();
        assert!(e.to_string().contains(&cid.to_string()), "{e}");
    }
    let missing = dir.path().join("nope/v.sock");
    let e = Vsock::new(3, &missing).err().unwrap();
    assert!(matches!(e, VsockError::NoDirectory(_)));
    assert!(e.to_string().contains("nope/v.sock"), "{e}");
    let long = dir.path().join("x".repeat(MAX_UDS_PATH_LEN));
    assert!(matches!(
        Vsock::new(3, &long),
        Err(VsockError::PathTooLong(_))
    ));
    let v = Vsock::new(3, &p).unwrap();
    assert_eq!((v.cid(), v.uds_path()), (3, p.as_path()));
    let e = Vsock::new(4, &p).err().unwrap();
    assert!(matches!(e, VsockError::InUse(_)));
    assert!(e.to_string().contains("v.sock"), "{e}");
    // The device's config space is the CID; dropping it removes the socket.
    let mut cfg = [0u8; 12];
    v.read_config(0, &mut cfg);
    assert_eq!(cfg, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes().len(), 3);
    drop(v);
    assert!(!p.exists());
    Vsock::new(3, &p).unwrap();
}

struct Harness {
    _dir: TempDir,
    uds: PathBuf,
    rx: Driver,
    tx: Driver,
    worker: VsockWorker,
    irq: Arc<CountingInterrupt>,
    rx_notify: EventFd,
    tx_notify: EventFd,
}

impl Harness {
    fn new() -> Self {
        let dir = TempDir::new("vsockdev");
        let uds = dir.path().join("v.sock");
        let dev = Vsock::new(GUEST_CID, &uds).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut drivers: Vec<Driver> = (0..3).map(|n| Driver::with(&mem, n)).collect();
        let notifies: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let queues: Vec<ActiveQueue> = drivers
            .iter_mut()
            .zip(&notifies)
            .enumerate()
            .map(|(i, (d, n))| ActiveQueue {
                index: i as u16,
                queue: std::mem::replace(&mut d.queue, Queue::new(SIZE).unwrap()),
                notify: n.try_clone().unwrap(),
            })
            .collect();
        let queues: [ActiveQueue; 3] = queues.try_into().ok().unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let muxer = Muxer::new(GUEST_CID, &uds, dev.listener.try_clone().unwrap()).unwrap();
        let worker = VsockWorker::new(mem, queues, irq.clone(), muxer, GUEST_CID);
        std::mem::forget(dev); // keep the socket file; the directory goes at the end
        let mut it = drivers.into_iter();
        let rx = it.next().unwrap();
        let tx = it.next().unwrap();
        let mut n = notifies.into_iter();
        Harness {
            _dir: dir,
            uds,
            rx,
            tx,
            worker,
            irq,
            rx_notify: n.next().unwrap(),
            tx_notify: n.next().unwrap(),
        }
    }

    /// Posts an rx buffer of `len` bytes.
    fn post_rx(&mut self, len: u32) -> GuestAddress {
        let a = self.rx.alloc(u64::from(len));
        self.rx.add_chain(&[(a, len, true)]);
        self.rx_notify.write(1).unwrap();
        self.worker.handle(0, &Sources::detached()).unwrap();
        a
    }

    /// Sends a packet from the guest.
    fn send(&mut self, op: Op, key: (u32, u32), data: &[u8]) {
        let hdr = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: key.1,
            dst_port: key.0,
            len: data.len() as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        };
        let h = self.tx.put(&hdr.to_bytes());
        if data.is_empty() {
            self.tx.add_chain(&[(h, HDR_LEN as u32, false)]);
        } else {
            let d = self.tx.put(data);
            self.tx
                .add_chain(&[(h, HDR_LEN as u32, false), (d, data.len() as u32, false)]);
        }
        self.tx_notify.write(1).unwrap();
        self.worker.handle(1, &Sources::detached()).unwrap();
        assert_eq!(self.tx.take_used().len(), 1);
    }

    /// Runs host events until an rx buffer is used; returns the packet in it.
    fn wait_rx(&mut self, buf: GuestAddress) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used = self.rx.take_used();
            if let Some(&(_, len)) = used.first() {
                let b = self.rx.get(buf, len as usize);
                let mut raw = [0u8; HDR_LEN];
                raw.copy_from_slice(&b[..HDR_LEN]);
                return (Header::from_bytes(&raw), b[HDR_LEN..].to_vec());
            }
            assert!(Instant::now() < deadline, "no rx packet");
            std::thread::sleep(Duration::from_millis(2));
            self.worker.handle(3, &Sources::detached()).unwrap();
        }
    }

    /// Whether the muxer's epoll set reports anything now.
    fn muxer_ready(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.worker.muxer().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd we pass.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }
}

#[test]
fn a_host_client_talks_to_the_guest_through_the_queues() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    // No rx buffer yet: the request waits, and nothing stays ready (no spinning).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.worker.muxer().has_rx() {
        assert!(Instant::now() < deadline);
        h.worker.handle(3, &Sources::detached()).unwrap();
    }
    assert!(!h.muxer_ready());
    let buf = h.post_rx(4096);
    let (req, _) = h.wait_rx(buf);
    assert_eq!(Op::from_u16(req.op), Some(Op::Request));
    assert_eq!((req.dst_cid, req.dst_port), (GUEST_CID, 52));
    let key = (req.src_port, 52);
    h.send(Op::Response, key, b"");
    let mut ok = vec![0u8; format!("OK {}\n", key.0).len()];
    client.read_exact(&mut ok).unwrap();
    h.send(Op::Rw, key, b"to host");
    let mut b = [0u8; 7];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"to host");
    // Host data with no rx buffer waits without keeping the muxer's set ready.
    client.write_all(b"to guest").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.worker.muxer().has_rx() {
        assert!(Instant::now() < deadline);
        h.worker.handle(3, &Sources::detached()).unwrap();
    }
    assert!(!h.muxer_ready());
    let buf = h.post_rx(4096);
    let (p, d) = h.wait_rx(buf);
    assert_eq!(
        (Op::from_u16(p.op), d.as_slice()),
        (Some(Op::Rw), &b"to guest"[..])
    );
    assert!(h.irq.0.load(Ordering::SeqCst) > 0);
}

#[test]
fn hostile_queue_buffers_are_returned_and_bad_packets_dropped() {
    let mut h = Harness::new();
    // A packet for an unknown connection gets an RST; a tiny rx buffer is returned empty
    // and the next one gets the packet; a read-only rx buffer is returned empty too.
    h.send(Op::Rw, (7, 8), b"x");
    let a = h.rx.alloc(16);
    h.rx.add_chain(&[(a, 16, true)]);
    let b = h.rx.alloc(64);
    h.rx.add_chain(&[(b, 64, false)]);
    let buf = h.post_rx(64);
    let used = h.rx.take_used();
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        [0, 0, HDR_LEN as u32]
    );
    let mut raw = [0u8; HDR_LEN];
    raw.copy_from_slice(&h.rx.get(buf, HDR_LEN));
    assert_eq!(Op::from_u16(Header::from_bytes(&raw).op), Some(Op::Rst));
    // A tx chain with a short header, one with a writable descriptor: used, nothing sent.
    let x = h.tx.alloc(64);
    h.tx.add_chain(&[(x, 10, false)]);
    h.tx.add_chain(&[(x, 64, true)]);
    h.tx_notify.write(1).unwrap();
    h.worker.handle(1, &Sources::detached()).unwrap();
    assert_eq!(h.tx.take_used(), [(2, 0), (3, 0)]);
    assert!(!h.worker.muxer().has_rx());
}

#[test]
fn an_activated_device_serves_host_clients_on_its_own_thread() {
    let dir = TempDir::new("vsockdev");
    let uds = dir.path().join("v.sock");
    let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let mut drivers: Vec<Driver> = (0..3).map(|n| Driver::with(&mem, n)).collect();
    let buf = drivers[0].alloc(4096);
    drivers[0].add_chain(&[(buf, 4096, true)]);
    let queues = drivers
        .iter_mut()
        .enumerate()
        .map(|(i, d)| ActiveQueue {
            index: i as u16,
            queue: std::mem::replace(&mut d.queue, Queue::new(SIZE).unwrap()),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        })
        .collect();
    let health = crate::virtio::DeviceHealth::new();
    dev.activate(crate::virtio::ActivateContext {
        mem,
        queues,
        interrupt: Arc::new(CountingInterrupt::default()),
        acked_features: 0,
        health: health.clone(),
    })
    .unwrap();
    // The seccomp filter of the thread allows accepting, reading and answering.
    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        let u = drivers[0].take_used();
        if !u.is_empty() {
            break u;
        }
        assert!(Instant::now() < deadline, "no request reached the guest");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(used, [(0, HDR_LEN as u32)]);
    let mut raw = [0u8; HDR_LEN];
    raw.copy_from_slice(&drivers[0].get(buf, HDR_LEN));
    assert_eq!(Header::from_bytes(&raw).dst_port, 52);
    dev.reset();
    assert!(!health.is_broken());
    // Reset closed the connection.
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0);
}
