//! Tests of the block device through its queue: a driver written here posts descriptor chains
//! into guest memory, the worker handles them against real files, and the tests check bytes
//! on disk, bytes in guest memory, status bytes and used lengths.
//!
//! The driver lays the queue out itself rather than with virtio-queue's `MockSplitQueue`,
//! whose ring layout (0.18) counts ring entries as bytes and so puts the used ring inside the
//! available ring of a queue larger than 128 entries.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{status, types, FLAG_UNMAP};
use super::*;
use crate::rate_limiter::TokenBucket;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, DeviceHealth, InterruptReason, VirtioInterrupt};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Guest memory: two adjacent regions of 32 MiB, so buffers can straddle regions.
const MEM_SIZE: u64 = 64 << 20;
const REGION: u64 = 32 << 20;
/// Where the test driver's buffers start.
const HEAP: u64 = 0x10_0000;

use crate::temp_dir::TempDir;

/// The byte at `offset` of a test image.
fn pattern(offset: u64) -> u8 {
    ((offset / 512) * 13 + offset % 509) as u8
}

/// An image of `size` bytes filled with [`pattern`].
fn make_image(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.path().join(name);
    let bytes: Vec<u8> = (0..size).map(pattern).collect();
    std::fs::write(&p, bytes).unwrap();
    p
}

fn file_bytes(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn config(path: &Path, engine: Engine) -> BlockConfig {
    BlockConfig {
        path: path.to_path_buf(),
        read_only: false,
        ephemeral: false,
        serial: "cgvm-disk-0".into(),
        engine,
        rate_limiter: None,
    }
}

#[derive(Default)]
struct CountingInterrupt {
    queue: AtomicU32,
    config: AtomicU32,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        match reason {
            InterruptReason::Queue(_) => self.queue.fetch_add(1, Ordering::SeqCst),
            InterruptReason::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), (MEM_SIZE - REGION) as usize),
    ])
    .unwrap()
}

/// The driver side of the request queue: the descriptor table at 0, the available ring at
/// 0x1000 (`used_event` after it), the used ring at 0x2000.
struct Driver {
    mem: GuestMemoryMmap,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    heap: u64,
}

/// One descriptor: address, length, device-writable.
type Desc = (GuestAddress, u32, bool);

impl Driver {
    /// A driver and the device's view of the queue.
    fn new(mem: &GuestMemoryMmap) -> (Self, Queue) {
        let (desc_table, avail, used) = (0u64, 0x1000u64, 0x2000u64);
        // Zero rings, as a driver would set them up.
        mem.write_slice(&[0u8; 0x3000], GuestAddress(0)).unwrap();
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(desc_table as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        let d = Driver {
            mem: mem.clone(),
            desc_table: GuestAddress(desc_table),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            heap: HEAP,
        };
        (d, q)
    }

    /// `len` bytes of guest memory, 4 KiB aligned.
    fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len + 4095) & !4095;
        assert!(self.heap < MEM_SIZE, "test heap exhausted");
        GuestAddress(a)
    }

    fn write_desc(&self, table: GuestAddress, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, table.unchecked_add(u64::from(i) * 16))
            .unwrap();
    }

    /// Makes `head` available.
    fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % QUEUE_SIZE;
        self.mem
            .write_obj(head, self.avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Posts a chain of `descs` (linked in order) and returns its head.
    fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QUEUE_SIZE;
            let last = i + 1 == descs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(
                self.desc_table,
                idx,
                addr.0,
                len,
                flags,
                (idx + 1) % QUEUE_SIZE,
            );
        }
        self.next_desc = (head + descs.len() as u16) % QUEUE_SIZE;
        self.publish(head);
        head
    }

    /// Posts a chain of `descs` through an indirect table: one descriptor of the queue's.
    fn add_indirect(&mut self, descs: &[Desc]) -> u16 {
        let table = self.alloc(16 * descs.len() as u64);
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(table, i as u16, addr.0, len, flags, i as u16 + 1);
        }
        let head = self.next_desc;
        self.write_desc(
            self.desc_table,
            head,
            table.0,
            16 * descs.len() as u32,
            F_INDIRECT,
            0,
        );
        self.next_desc = (head + 1) % QUEUE_SIZE;
        self.publish(head);
        head
    }

    /// The used entries added since the last call: (id, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_seen % QUEUE_SIZE));
            let id: u32 = self.mem.read_obj(e).unwrap();
            let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// A 16-byte request header in guest memory.
    fn header(&mut self, req_type: u32, sector: u64) -> GuestAddress {
        let a = self.alloc(16);
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&req_type.to_le_bytes());
        b[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&b, a).unwrap();
        a
    }

    /// A status byte preset to 0xff (so that "not written" shows).
    fn status(&mut self) -> GuestAddress {
        let a = self.alloc(1);
        self.mem.write_obj(0xffu8, a).unwrap();
        a
    }

    fn bytes(&self, a: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, a).unwrap();
        v
    }

    fn byte(&self, a: GuestAddress) -> u8 {
        self.mem.read_obj(a).unwrap()
    }
}

/// A posted request: where its status and its device-writable data are.
struct Posted {
    head: u16,
    status: GuestAddress,
    data: Option<(GuestAddress, usize)>,
}

/// What the device answered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u8,
    used_len: u32,
    data: Vec<u8>,
}

/// A worker driven directly on the test thread (no thread, no seccomp), and its driver.
struct Harness {
    drv: Driver,
    worker: BlockWorker,
    irq: Arc<CountingInterrupt>,
    notify: EventFd,
    block: Block,
}

impl Harness {
    fn new(cfg: BlockConfig) -> Self {
        Self::with_block(Block::new(cfg).unwrap(), false)
    }

    fn with_block(block: Block, event_idx: bool) -> Self {
        let mem = memory();
        let (drv, mut queue) = Driver::new(&mem);
        queue.set_event_idx(event_idx);
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let state = block.shared.take_state().unwrap();
        let worker = BlockWorker::new(
            mem,
            ActiveQueue {
                index: 0,
                queue,
                notify: notify.try_clone().unwrap(),
            },
            irq.clone(),
            state,
            block.shared.clone(),
            block.metrics.clone(),
        );
        Harness {
            drv,
            worker,
            irq,
            notify,
            block,
        }
    }

    /// Stops the worker (its state goes back to the device) and starts a new one on a fresh
    /// queue, as a guest reset and re-activation would.
    fn restart(self) -> Self {
        let Harness { worker, block, .. } = self;
        drop(worker);
        Self::with_block(block, false)
    }

    fn source(&self, token: u32) -> Option<i32> {
        self.worker
            .sources()
            .into_iter()
            .find(|&(_, t)| t == token)
            .map(|(fd, _)| fd)
    }

    /// Notifies the queue and runs the worker until every posted chain is used (waiting
    /// for io_uring completions and rate-limiter timers as needed).
    fn run(&mut self) -> Result<(), String> {
        self.notify.write(1).unwrap();
        self.worker.handle(0, &Sources::detached())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.drv.used_idx() != self.drv.avail_idx {
            assert!(Instant::now() < deadline, "requests never completed");
            self.serve_once(1000)?;
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for the worker's control, limiter and completion sources, and
    /// has the worker handle those that are readable, in that order (so that a swap finds
    /// the requests in flight still unreaped), as its thread would.
    fn serve_once(&mut self, timeout_ms: i32) -> Result<(), String> {
        let sources: Vec<(i32, u32)> = [3u32, 1, 2]
            .iter()
            .filter_map(|&t| self.source(t).map(|fd| (fd, t)))
            .collect();
        let mut fds: Vec<libc::pollfd> = sources
            .iter()
            .map(|&(fd, _)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll writes only the revents of our array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        for (p, &(_, t)) in fds.iter().zip(&sources) {
            // A source the previous call replaced may still be reported: handling it is
            // harmless, as a stale event on the device thread would be.
            if p.revents & libc::POLLIN != 0 {
                self.worker.handle(t, &Sources::detached())?;
            }
        }
        Ok(())
    }

    /// Runs `call` with a control handle on another thread while this one serves the
    /// worker, as the device thread would; returns what `call` returned.
    fn serve<T: Send>(&mut self, call: impl FnOnce(BlockControl) -> T + Send) -> T {
        let ctl = self.block.control();
        std::thread::scope(|s| {
            let call = s.spawn(move || call(ctl));
            let deadline = Instant::now() + Duration::from_secs(20);
            while !call.is_finished() {
                assert!(Instant::now() < deadline, "the control call never returned");
                self.serve_once(5).unwrap();
            }
            call.join().unwrap()
        })
    }

    /// Posts one request: header, then `out` as device-readable data, then `in_len` bytes of
    /// device-writable data, then the status byte.
    fn post(&mut self, req_type: u32, sector: u64, out: &[u8], in_len: usize) -> Posted {
        self.post_as(req_type, sector, out, in_len, false)
    }

    /// [`post`](Self::post), through an indirect table when `indirect`.
    fn post_as(
        &mut self,
        req_type: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
        indirect: bool,
    ) -> Posted {
        let hdr = self.drv.header(req_type, sector);
        let mut descs = vec![(hdr, 16, false)];
        if !out.is_empty() {
            let a = self.drv.alloc(out.len() as u64);
            self.drv.mem.write_slice(out, a).unwrap();
            descs.push((a, out.len() as u32, false));
        }
        let mut data = None;
        if in_len > 0 {
            let a = self.drv.alloc(in_len as u64);
            self.drv.mem.write_slice(&vec![0xee; in_len], a).unwrap();
            descs.push((a, in_len as u32, true));
            data = Some((a, in_len));
        }
        let st = self.drv.status();
        descs.push((st, 1, true));
        let head = if indirect {
            self.drv.add_indirect(&descs)
        } else {
            self.drv.add_chain(&descs)
        };
        Posted {
            head,
            status: st,
            data,
        }
    }

    /// The answer to `p`, from the used entries in `used`.
    fn answer(&self, p: &Posted, used: &[(u32, u32)]) -> Answer {
        let len = used
            .iter()
            .find(|u| u.0 == u32::from(p.head))
            .unwrap_or_else(|| panic!("chain {} not used: {used:?}", p.head))
            .1;
        Answer {
            status: self.drv.byte(p.status),
            used_len: len,
            data: p
                .data
                .map(|(a, n)| self.drv.bytes(a, n))
                .unwrap_or_default(),
        }
    }

    /// Posts one request, runs the device and returns its answer.
    fn request(&mut self, req_type: u32, sector: u64, out: &[u8], in_len: usize) -> Answer {
        let p = self.post(req_type, sector, out, in_len);
        self.run().unwrap();
        let used = self.drv.take_used();
        assert_eq!(used.len(), 1);
        self.answer(&p, &used)
    }

    fn read(&mut self, sector: u64, len: usize) -> Answer {
        self.request(types::IN, sector, &[], len)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> Answer {
        self.request(types::OUT, sector, data, 0)
    }

    fn range_request(&mut self, req_type: u32, sector: u64, sectors: u32, flags: u32) -> Answer {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        self.request(req_type, 0, &seg, 0)
    }

    /// Posts a hand-made chain and returns the used entry's length and the status byte.
    fn raw(&mut self, descs: &[Desc]) -> (u32, u8) {
        let st_addr = descs.last().map(|d| d.0).unwrap();
        let head = self.drv.add_chain(descs);
        self.run().unwrap();
        let used = self.drv.take_used();
        assert_eq!(used, vec![(u32::from(head), used[0].1)]);
        (used[0].1, self.drv.byte(st_addr))
    }

    fn metrics(&self) -> Arc<BlockMetrics> {
        self.block.metrics()
    }
}

fn ok(data: Vec<u8>) -> Answer {
    Answer {
        status: status::OK,
        used_len: data.len() as u32 + 1,
        data,
    }
}

fn failed(st: u8, in_len: usize) -> Answer {
    Answer {
        status: st,
        used_len: 1,
        data: vec![0xee; in_len],
    }
}

const DISK: u64 = 1 << 20;

fn image_bytes(range: std::ops::Range<u64>) -> Vec<u8> {
    range.map(pattern).collect()
}

// ---------------------------------------------------------------------------------------
// The device: features, configuration space, construction errors.

#[test]
fn config_space_and_features() {
    let dir = TempDir::new("blk-test");
    // 1 MiB + 100 bytes: the tail that is not a whole sector is not visible.
    let p = make_image(&dir, "d.img", DISK + 100);
    let b = Block::new(config(&p, Engine::Sync)).unwrap();
    assert_eq!(b.device_type(), 2);
    assert_eq!(b.queue_max_sizes(), &[256]);
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    b.read_config(0, &mut c);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), DISK / 512);
    assert_eq!(u32_at(8), 64 << 10, "size_max");
    assert_eq!(u32_at(12), 254, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 1, "num_queues");
    assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
    assert_eq!(u32_at(40), 1, "max_discard_seg");
    assert_eq!(u32_at(44), 8, "discard_sector_alignment");
    assert_eq!(u32_at(48), MAX_WRITE_ZEROES_SECTORS);
    assert_eq!(u32_at(52), 1, "max_write_zeroes_seg");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    // Reads at an offset, past the end.
    let mut d = [0xffu8; 4];
    b.read_config(8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 64 << 10);
    b.read_config(CONFIG_SPACE_SIZE as u64, &mut d);
    assert_eq!(d, [0; 4]);

    let f = b.features();
    for bit in [1, 2, 6, 9, 13, 14, 29] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & (1 << 5), 0, "not read-only");
    assert_eq!(f & (1 << 32), 0, "VERSION_1 is the transport's");

    let ro = Block::new(BlockConfig {
        read_only: true,
        ..config(&p, Engine::Sync)
    })
    .unwrap();
    let f = ro.features();
    assert_ne!(f & (1 << 5), 0, "read-only");
    assert_eq!(f & ((1 << 13) | (1 << 14)), 0, "no discard or write-zeroes");
    assert!(ro.is_read_only());
    assert_eq!(ro.capacity_sectors(), DISK / 512);
}

#[test]
fn construction_errors_name_the_file_and_the_reason() {
    let dir = TempDir::new("blk-test");
    let missing = dir.path().join("missing.img");
    let e = Block::new(config(&missing, Engine::Sync)).err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("missing.img") && msg.contains("cannot open"),
        "{msg}"
    );

    // A directory: refused by open(O_RDWR), or after it when opened read-only.
    let e = Block::new(config(dir.path(), Engine::Sync)).err().unwrap();
    assert!(
        e.to_string().contains(&*dir.path().to_string_lossy()),
        "{e}"
    );
    let ro = |p: &Path| BlockConfig {
        read_only: true,
        ..config(p, Engine::Sync)
    };
    let e = Block::new(ro(dir.path())).err().unwrap();
    assert!(matches!(e, BlockError::NotADisk { .. }), "{e}");
    let e = Block::new(ro(Path::new("/dev/null"))).err().unwrap();
    assert!(
        e.to_string().contains("/dev/null: not a regular file"),
        "{e}"
    );

    let p = make_image(&dir, "d.img", 4096);
    let e = Block::new(BlockConfig {
        serial: "x".repeat(21),
        ..config(&p, Engine::Sync)
    })
    .err()
    .unwrap();
    let msg = e.to_string();
    assert!(msg.contains("d.img") && msg.contains("21 bytes"), "{msg}");
    // 20 bytes is fine.
    Block::new(BlockConfig {
        serial: "x".repeat(20),
        ..config(&p, Engine::Sync)
    })
    .unwrap();
}

#[test]
fn engine_names_parse() {
    assert_eq!("sync".parse::<Engine>(), Ok(Engine::Sync));
    assert_eq!("uring".parse::<Engine>(), Ok(Engine::Uring));
    assert!("aio".parse::<Engine>().is_err());
    assert_eq!(Engine::Uring.to_string(), "uring");
    assert_eq!(Engine::default(), Engine::Sync);
}

// ---------------------------------------------------------------------------------------
// Every request type, on both engines.

fn every_request_type(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(config(&p, engine));

    // IN: two sectors from sector 3.
    assert_eq!(h.read(3, 1024), ok(image_bytes(3 * 512..5 * 512)));
    // IN of the last sector.
    let last = DISK / 512 - 1;
    assert_eq!(h.read(last, 512), ok(image_bytes(last * 512..DISK)));

    // OUT: the bytes land at sector 10 and nowhere else.
    let data: Vec<u8> = (0..1536u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(h.write(10, &data), ok(vec![]));
    let on_disk = file_bytes(&p);
    assert_eq!(on_disk[10 * 512..13 * 512], data[..]);
    assert_eq!(on_disk[..10 * 512], image_bytes(0..10 * 512)[..]);
    assert_eq!(on_disk[13 * 512..], image_bytes(13 * 512..DISK)[..]);
    // And reads see them.
    assert_eq!(h.read(10, 1536), ok(data.clone()));

    // FLUSH.
    assert_eq!(h.request(types::FLUSH, 0, &[], 0), ok(vec![]));

    // GET_ID: the serial, NUL-padded to 20 bytes; a shorter buffer gets what fits.
    let mut id = b"cgvm-disk-0".to_vec();
    id.resize(20, 0);
    assert_eq!(h.request(types::GET_ID, 0, &[], 20), ok(id.clone()));
    assert_eq!(h.request(types::GET_ID, 0, &[], 8), ok(id[..8].to_vec()));
    // A longer buffer gets 20 bytes; the rest is left alone.
    let mut long = id.clone();
    long.extend_from_slice(&[0xee; 12]);
    assert_eq!(
        h.request(types::GET_ID, 0, &[], 32),
        Answer {
            status: 0,
            used_len: 21,
            data: long
        }
    );

    // DISCARD: the range reads as zeros afterwards (a hole), its neighbours are intact.
    assert_eq!(h.range_request(types::DISCARD, 16, 16, 0), ok(vec![]));
    let on_disk = file_bytes(&p);
    assert!(on_disk[16 * 512..32 * 512].iter().all(|&b| b == 0));
    assert_eq!(
        on_disk[32 * 512..33 * 512],
        image_bytes(32 * 512..33 * 512)[..]
    );
    assert_eq!(
        on_disk[15 * 512..16 * 512],
        image_bytes(15 * 512..16 * 512)[..]
    );

    // WRITE_ZEROES, with and without UNMAP, at unaligned sectors.
    assert_eq!(h.range_request(types::WRITE_ZEROES, 41, 3, 0), ok(vec![]));
    assert_eq!(
        h.range_request(types::WRITE_ZEROES, 51, 5, FLAG_UNMAP),
        ok(vec![])
    );
    let on_disk = file_bytes(&p);
    assert!(on_disk[41 * 512..44 * 512].iter().all(|&b| b == 0));
    assert!(on_disk[51 * 512..56 * 512].iter().all(|&b| b == 0));
    assert_eq!(
        on_disk[40 * 512..41 * 512],
        image_bytes(40 * 512..41 * 512)[..]
    );
    assert_eq!(
        on_disk[44 * 512..51 * 512],
        image_bytes(44 * 512..51 * 512)[..]
    );
    assert_eq!(
        on_disk[56 * 512..57 * 512],
        image_bytes(56 * 512..57 * 512)[..]
    );
    assert_eq!(h.read(41, 512), ok(vec![0; 512]));

    // Unknown types: UNSUPP, status byte only.
    for t in [2, 3, 7, 10, 14, 0xffff_ffff] {
        assert_eq!(
            h.request(t, 0, &[], 0),
            failed(status::UNSUPP, 0),
            "type {t}"
        );
    }

    let m = h.metrics();
    assert_eq!(m.read_ops.load(Ordering::Relaxed), 4);
    assert_eq!(
        m.read_bytes.load(Ordering::Relaxed),
        1024 + 512 + 1536 + 512
    );
    assert_eq!(m.write_ops.load(Ordering::Relaxed), 1);
    assert_eq!(m.write_bytes.load(Ordering::Relaxed), 1536);
    assert_eq!(m.flush_ops.load(Ordering::Relaxed), 1);
    assert_eq!(m.errors.load(Ordering::Relaxed), 6);
    assert!(h.irq.queue.load(Ordering::SeqCst) > 0);
}

#[test]
fn every_request_type_sync() {
    every_request_type(Engine::Sync);
}

#[test]
fn every_request_type_uring() {
    every_request_type(Engine::Uring);
}

/// A read and a write whose buffers straddle the two guest memory regions, split over
/// several descriptors, and a header split in two.
fn scattered_buffers(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(config(&p, engine));
    let a = GuestAddress(REGION - 700);
    let b = GuestAddress(REGION + 0x10000);
    let hdr = h.drv.header(types::IN, 4);
    let st = h.drv.status();
    let (len, s) = h.raw(&[
        (hdr, 16, false),
        (a, 1024, true),
        (b, 512, true),
        (st, 1, true),
    ]);
    assert_eq!((len, s), (1537, status::OK));
    let mut got = h.drv.bytes(a, 1024);
    got.extend(h.drv.bytes(b, 512));
    assert_eq!(got, image_bytes(4 * 512..7 * 512));

    // A write from the same buffers, with the header in two 8-byte pieces.
    h.drv.mem.write_slice(&[0x5a; 1024], a).unwrap();
    h.drv.mem.write_slice(&[0xa5; 512], b).unwrap();
    let hdr = h.drv.header(types::OUT, 100);
    let st = h.drv.status();
    let (len, s) = h.raw(&[
        (hdr, 8, false),
        (hdr.unchecked_add(8), 8, false),
        (a, 1024, false),
        (b, 512, false),
        (st, 1, true),
    ]);
    assert_eq!((len, s), (1, status::OK));
    let on_disk = file_bytes(&p);
    assert!(on_disk[100 * 512..102 * 512].iter().all(|&x| x == 0x5a));
    assert!(on_disk[102 * 512..103 * 512].iter().all(|&x| x == 0xa5));
}

#[test]
fn scattered_buffers_sync() {
    scattered_buffers(Engine::Sync);
}

#[test]
fn scattered_buffers_uring() {
    scattered_buffers(Engine::Uring);
}

/// Many requests in one notification (each through an indirect table, so that 200 fit in
/// the queue): with io_uring they are in flight together, more than the ring's 128 slots, so
/// the worker must wait for slots; each gets its own answer.
fn many_requests(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(config(&p, engine));
    for round in 0..2 {
        let mut posted = Vec::new();
        for i in 0..200u64 {
            // Sequential writes of distinct data, then reads of them.
            let data = vec![(i + round) as u8; 512];
            posted.push((i, h.post_as(types::OUT, i, &data, 0, true)));
        }
        h.run().unwrap();
        let used = h.drv.take_used();
        assert_eq!(used.len(), 200);
        for (_, p) in &posted {
            assert_eq!(h.answer(p, &used), ok(vec![]));
        }
        let mut posted = Vec::new();
        for i in 0..200u64 {
            posted.push((i, h.post_as(types::IN, i, &[], 512, true)));
        }
        h.run().unwrap();
        let used = h.drv.take_used();
        for (i, p) in &posted {
            assert_eq!(h.answer(p, &used), ok(vec![(i + round) as u8; 512]));
        }
    }
}

#[test]
fn many_requests_sync() {
    many_requests(Engine::Sync);
}

#[test]
fn many_requests_uring() {
    many_requests(Engine::Uring);
}

/// The same sequence of requests, good and bad, gives the same answers and the same disk on
/// both engines.
#[test]
fn both_engines_give_the_same_results() {
    let run = |engine: Engine| {
        let dir = TempDir::new("blk-test");
        let p = make_image(&dir, "d.img", DISK);
        let mut h = Harness::new(config(&p, engine));
        let mut answers = Vec::new();
        for i in 0..40u64 {
            let sector = (i * 37) % (DISK / 512 - 8);
            let a = match i % 8 {
                0 => h.write(sector, &vec![i as u8; 4096]),
                1 => h.read(sector, 4096),
                2 => h.request(types::FLUSH, 0, &[], 0),
                3 => h.range_request(types::DISCARD, sector, 8, 0),
                4 => h.range_request(types::WRITE_ZEROES, sector, 3, FLAG_UNMAP),
                5 => h.read(DISK / 512 - 1, 1024), // past the end
                6 => h.request(types::GET_ID, 0, &[], 20),
                _ => h.request(99, 0, &[], 0),
            };
            answers.push(a);
        }
        answers.push(h.read(0, 64 << 10));
        (answers, file_bytes(&p))
    };
    let (sync_answers, sync_disk) = run(Engine::Sync);
    let (uring_answers, uring_disk) = run(Engine::Uring);
    assert_eq!(sync_answers, uring_answers);
    assert!(sync_disk == uring_disk, "the disks differ");
}

// ---------------------------------------------------------------------------------------
// A hostile guest.

fn hostile_chains(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(config(&p, engine));
    let outside = GuestAddress(MEM_SIZE + 0x1000);

    // Data outside guest memory (and straddling its end).
    let hdr = h.drv.header(types::IN, 0);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[(hdr, 16, false), (outside, 512, true), (st, 1, true)]),
        (1, status::IOERR)
    );
    let hdr = h.drv.header(types::IN, 0);
    let st = h.drv.status();
    let straddle = GuestAddress(MEM_SIZE - 256);
    assert_eq!(
        h.raw(&[(hdr, 16, false), (straddle, 512, true), (st, 1, true)]),
        (1, status::IOERR)
    );
    // A header outside guest memory.
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[(outside, 16, false), (st, 1, true)]),
        (1, status::IOERR)
    );

    // The status byte outside guest memory: returned with nothing written.
    let hdr = h.drv.header(types::IN, 0);
    let data = h.drv.alloc(512);
    let head = h
        .drv
        .add_chain(&[(hdr, 16, false), (data, 512, true), (outside, 1, true)]);
    h.run().unwrap();
    assert_eq!(h.drv.take_used(), vec![(u32::from(head), 0)]);

    // No status descriptor at all (header only), and a zero-length status descriptor.
    let hdr = h.drv.header(types::FLUSH, 0);
    let head = h.drv.add_chain(&[(hdr, 16, false)]);
    h.run().unwrap();
    assert_eq!(h.drv.take_used(), vec![(u32::from(head), 0)]);
    let hdr = h.drv.header(types::FLUSH, 0);
    let st = h.drv.status();
    let head = h.drv.add_chain(&[(hdr, 16, false), (st, 0, true)]);
    h.run().unwrap();
    assert_eq!(h.drv.take_used(), vec![(u32::from(head), 0)]);
    assert_eq!(h.drv.byte(st), 0xff);

    // Zero-length data descriptors are skipped.
    let hdr = h.drv.header(types::IN, 2);
    let data = h.drv.alloc(512);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[
            (hdr, 16, false),
            (data, 0, true),
            (data, 512, true),
            (st, 1, true)
        ]),
        (513, status::OK)
    );
    assert_eq!(h.drv.bytes(data, 512), image_bytes(1024..1536));

    // Oversized: one descriptor past MAX_REQUEST_BYTES.
    let hdr = h.drv.header(types::IN, 0);
    let big = GuestAddress(HEAP + (8 << 20));
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[
            (hdr, 16, false),
            (big, MAX_REQUEST_BYTES + 512, true),
            (st, 1, true)
        ]),
        (1, status::IOERR)
    );
    // A descriptor of 4 GiB - 1 bytes, and with it a chain of more than 4 GiB, which
    // virtio-queue cuts short: no status.
    let hdr = h.drv.header(types::OUT, 0);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[(hdr, 16, false), (big, u32::MAX, false), (st, 1, true)]),
        (0, 0xff)
    );
    // Exactly MAX_REQUEST_BYTES is fine (the disk is 1 MiB though: past the end).
    let hdr = h.drv.header(types::IN, 0);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[
            (hdr, 16, false),
            (big, MAX_REQUEST_BYTES, true),
            (st, 1, true)
        ]),
        (1, status::IOERR)
    );

    // Wrong directions: device-readable data in a read, device-writable data in a write,
    // a device-writable header, a readable descriptor after a writable one.
    let data = h.drv.alloc(512);
    let hdr = h.drv.header(types::IN, 0);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[(hdr, 16, false), (data, 512, false), (st, 1, true)]),
        (1, status::IOERR)
    );
    let hdr = h.drv.header(types::OUT, 0);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[(hdr, 16, false), (data, 512, true), (st, 1, true)]),
        (1, status::IOERR)
    );
    let hdr = h.drv.header(types::IN, 0);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[(hdr, 16, true), (data, 512, true), (st, 1, true)]),
        (1, status::IOERR)
    );
    let hdr = h.drv.header(types::OUT, 0);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[
            (hdr, 16, false),
            (data, 512, true),
            (data, 512, false),
            (st, 1, true)
        ]),
        (1, status::IOERR)
    );
    // A short header.
    let hdr = h.drv.header(types::IN, 0);
    let st = h.drv.status();
    assert_eq!(h.raw(&[(hdr, 8, false), (st, 1, true)]), (1, status::IOERR));

    // Past the end of the disk, and sector arithmetic that overflows.
    let cap = DISK / 512;
    assert_eq!(h.read(cap - 1, 1024), failed(status::IOERR, 1024));
    assert_eq!(h.read(cap, 512), failed(status::IOERR, 512));
    assert_eq!(h.read(u64::MAX, 512), failed(status::IOERR, 512));
    assert_eq!(h.read(u64::MAX / 512 + 1, 512), failed(status::IOERR, 512));
    assert_eq!(h.write(cap, &[1; 512]), failed(status::IOERR, 0));
    assert_eq!(
        h.range_request(types::DISCARD, cap - 1, 2, 0),
        failed(status::IOERR, 0)
    );
    assert_eq!(
        h.range_request(types::WRITE_ZEROES, u64::MAX, 1, 0),
        failed(status::IOERR, 0)
    );
    // A read of nothing at the very end is fine.
    assert_eq!(h.read(cap, 0), ok(vec![]));

    // Lengths that are not whole sectors.
    assert_eq!(h.read(0, 100), failed(status::IOERR, 100));
    assert_eq!(h.write(0, &[1; 700]), failed(status::IOERR, 0));

    // DISCARD / WRITE_ZEROES: unknown flags, UNMAP on a discard, two segments, a partial
    // segment, too many sectors.
    assert_eq!(
        h.range_request(types::DISCARD, 0, 1, FLAG_UNMAP),
        failed(status::UNSUPP, 0)
    );
    assert_eq!(
        h.range_request(types::WRITE_ZEROES, 0, 1, 2),
        failed(status::UNSUPP, 0)
    );
    assert_eq!(
        h.request(types::DISCARD, 0, &[0; 32], 0),
        failed(status::IOERR, 0)
    );
    assert_eq!(
        h.request(types::DISCARD, 0, &[0; 8], 0),
        failed(status::IOERR, 0)
    );
    assert_eq!(
        h.request(types::DISCARD, 0, &[], 0),
        failed(status::IOERR, 0)
    );
    assert_eq!(
        h.range_request(types::WRITE_ZEROES, 0, MAX_WRITE_ZEROES_SECTORS + 1, 0),
        failed(status::IOERR, 0)
    );

    // The disk is as it was: nothing above wrote anything.
    assert_eq!(file_bytes(&p), image_bytes(0..DISK));
}

#[test]
fn hostile_chains_sync() {
    hostile_chains(Engine::Sync);
}

#[test]
fn hostile_chains_uring() {
    hostile_chains(Engine::Uring);
}

#[test]
fn the_request_size_cap_is_exact() {
    let dir = TempDir::new("blk-test");
    let p = dir.path().join("big.img");
    File::create(&p).unwrap().set_len(32 << 20).unwrap();
    let mut h = Harness::new(config(&p, Engine::Sync));
    let big = GuestAddress(HEAP + (8 << 20));
    h.drv
        .mem
        .write_slice(&vec![0xee; MAX_REQUEST_BYTES as usize], big)
        .unwrap();
    let hdr = h.drv.header(types::IN, 1);
    let st = h.drv.status();
    assert_eq!(
        h.raw(&[
            (hdr, 16, false),
            (big, MAX_REQUEST_BYTES, true),
            (st, 1, true)
        ]),
        (MAX_REQUEST_BYTES + 1, status::OK)
    );
    assert!(h
        .drv
        .bytes(big, MAX_REQUEST_BYTES as usize)
        .iter()
        .all(|&b| b == 0));
    // One sector more, even split over two descriptors, is refused.
    let hdr = h.drv.header(types::IN, 1);
    let st = h.drv.status();
    let more = big.unchecked_add(u64::from(MAX_REQUEST_BYTES));
    assert_eq!(
        h.raw(&[
            (hdr, 16, false),
            (big, MAX_REQUEST_BYTES, true),
            (more, 512, true),
            (st, 1, true)
        ]),
        (1, status::IOERR)
    );
}

#[test]
fn descriptor_loops_and_bad_links_are_returned_without_a_status() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(config(&p, Engine::Sync));
    let hdr = h.drv.header(types::IN, 0);
    let st = h.drv.status();
    let table = h.drv.desc_table;

    // 100 -> 101 -> 100: a loop, cut at the queue size.
    h.drv.write_desc(table, 100, hdr.0, 16, F_NEXT, 101);
    h.drv.write_desc(table, 101, st.0, 1, F_WRITE | F_NEXT, 100);
    h.drv.publish(100);
    // A next index outside the table.
    h.drv.write_desc(table, 110, hdr.0, 16, F_NEXT, 999);
    h.drv.publish(110);
    // A chain longer than the queue, through an indirect table of 300 descriptors.
    let ind = h.drv.alloc(300 * 16);
    let data = h.drv.alloc(512);
    h.drv.write_desc(ind, 0, hdr.0, 16, F_NEXT, 1);
    for i in 1..299u16 {
        h.drv
            .write_desc(ind, i, data.0, 512, F_WRITE | F_NEXT, i + 1);
    }
    h.drv.write_desc(ind, 299, st.0, 1, F_WRITE, 0);
    h.drv.write_desc(table, 120, ind.0, 300 * 16, F_INDIRECT, 0);
    h.drv.publish(120);
    // A well-formed chain after them still works.
    let good = h.post(types::IN, 0, &[], 512);

    h.run().unwrap();
    let used = h.drv.take_used();
    assert_eq!(used.len(), 4);
    assert_eq!(&used[..3], &[(100, 0), (110, 0), (120, 0)]);
    assert_eq!(h.drv.byte(st), 0xff, "no status written");
    assert_eq!(h.answer(&good, &used), ok(image_bytes(0..512)));
    assert_eq!(h.metrics().errors.load(Ordering::Relaxed), 3);
}

#[test]
fn an_indirect_chain_within_the_limit_works() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(config(&p, Engine::Sync));
    let hdr = h.drv.header(types::IN, 8);
    let st = h.drv.status();
    let data = h.drv.alloc(4 * 512);
    let ind = h.drv.alloc(6 * 16);
    h.drv.write_desc(ind, 0, hdr.0, 16, F_NEXT, 1);
    for i in 0..4u16 {
        h.drv.write_desc(
            ind,
            i + 1,
            data.0 + u64::from(i) * 512,
            512,
            F_WRITE | F_NEXT,
            i + 2,
        );
    }
    h.drv.write_desc(ind, 5, st.0, 1, F_WRITE, 0);
    let table = h.drv.desc_table;
    h.drv.write_desc(table, 7, ind.0, 6 * 16, F_INDIRECT, 0);
    h.drv.publish(7);
    h.run().unwrap();
    assert_eq!(h.drv.take_used(), vec![(7, 2049)]);
    assert_eq!(h.drv.byte(st), status::OK);
    assert_eq!(h.drv.bytes(data, 2048), image_bytes(8 * 512..12 * 512));
}

#[test]
fn a_broken_queue_is_fatal_for_the_device() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    // The available index jumps more than the queue size ahead.
    let mut h = Harness::new(config(&p, Engine::Sync));
    h.drv.set_avail_idx(300);
    h.notify.write(1).unwrap();
    assert!(h.worker.handle(0, &Sources::detached()).is_err());

    // A head index out of range.
    let mut h = Harness::new(config(&p, Engine::Sync));
    h.drv.publish(QUEUE_SIZE + 4);
    h.notify.write(1).unwrap();
    let e = h.worker.handle(0, &Sources::detached()).unwrap_err();
    assert!(e.contains("head index"), "{e}");
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(BlockConfig {
        read_only: true,
        ..config(&p, Engine::Sync)
    });
    assert_eq!(h.write(0, &[1; 512]), failed(status::IOERR, 0));
    assert_eq!(
        h.range_request(types::DISCARD, 0, 8, 0),
        failed(status::IOERR, 0)
    );
    assert_eq!(
        h.range_request(types::WRITE_ZEROES, 0, 8, 0),
        failed(status::IOERR, 0)
    );
    assert_eq!(h.read(1, 512), ok(image_bytes(512..1024)));
    assert_eq!(h.request(types::FLUSH, 0, &[], 0), ok(vec![]));
    assert_eq!(file_bytes(&p), image_bytes(0..DISK));

    // The file is opened O_RDONLY: a file the process cannot write still attaches.
    let slot = h.block.shared.lock_slot();
    assert!(slot.state.is_none(), "the worker holds the state");
    drop(slot);
    let state = h.worker.borrowed_state().unwrap();
    let (raw, durable) = state.disk.raw().unwrap();
    assert!(!durable);
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
}

// ---------------------------------------------------------------------------------------
// Ephemeral disks.

fn checksum(p: &Path) -> u64 {
    // FNV-1a over the file.
    file_bytes(p)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

fn ephemeral_disk(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let before = checksum(&p);
    let mut model = image_bytes(0..DISK);
    let mut h = Harness::new(BlockConfig {
        ephemeral: true,
        ..config(&p, engine)
    });
    assert_eq!(dir.entries(), vec!["d.img"], "the overlay has no name");
    // A sparse overlay (this file system has no reflinks) always uses the sync engine; a
    // reflinked one keeps the engine asked for.
    let sparse = h.worker.borrowed_state().unwrap().disk.raw().is_none();
    assert_eq!(
        h.source(2).is_some(),
        engine == Engine::Uring && !sparse,
        "io_uring completions are a source"
    );

    // Writes: a sector in the middle of a block, a span across blocks, whole blocks.
    let writes: [(u64, usize, u8); 4] = [
        (9, 512, 0x11),
        (15, 3 * 512, 0x22),
        (64, 8192, 0x33),
        (2047, 512, 0x44),
    ];
    for (sector, len, v) in writes {
        assert_eq!(h.write(sector, &vec![v; len]), ok(vec![]));
        let o = sector as usize * 512;
        model[o..o + len].fill(v);
    }
    assert_eq!(h.range_request(types::DISCARD, 100, 5, 0), ok(vec![]));
    model[100 * 512..105 * 512].fill(0);
    assert_eq!(
        h.range_request(types::WRITE_ZEROES, 200, 16, FLAG_UNMAP),
        ok(vec![])
    );
    model[200 * 512..216 * 512].fill(0);
    assert_eq!(h.request(types::FLUSH, 0, &[], 0), ok(vec![]));

    // Reads see the guest's writes and the image elsewhere, at any alignment.
    assert_eq!(h.read(0, 256 << 10), ok(model[..256 << 10].to_vec()));
    assert_eq!(h.read(7, 5 * 512), ok(model[7 * 512..12 * 512].to_vec()));
    assert_eq!(h.read(2040, 8 * 512), ok(model[2040 * 512..].to_vec()));

    // The image is untouched and nothing was left beside it.
    assert_eq!(checksum(&p), before);
    assert_eq!(dir.entries(), vec!["d.img"]);

    // A device reset keeps the overlay: the next activation reads the same.
    let mut h = h.restart();
    assert_eq!(h.read(0, 256 << 10), ok(model[..256 << 10].to_vec()));

    // Another disk over the same image starts from the image.
    drop(h);
    let mut h2 = Harness::new(BlockConfig {
        ephemeral: true,
        ..config(&p, engine)
    });
    assert_eq!(h2.read(9, 512), ok(image_bytes(9 * 512..10 * 512)));
    assert_eq!(checksum(&p), before);
    assert_eq!(dir.entries(), vec!["d.img"]);
}

#[test]
fn ephemeral_disk_sync() {
    ephemeral_disk(Engine::Sync);
}

#[test]
fn ephemeral_disk_uring() {
    ephemeral_disk(Engine::Uring);
}

#[test]
fn an_ephemeral_image_is_opened_read_only_and_its_overlay_is_anonymous() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    // A read-only image file (as root, permissions do not stop writes; the open flags do).
    let mut perms = std::fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&p, perms).unwrap();
    let b = Block::new(BlockConfig {
        ephemeral: true,
        ..config(&p, Engine::Sync)
    })
    .unwrap();
    assert!(!b.is_read_only(), "the guest can write an ephemeral disk");
    let slot = b.shared.lock_slot();
    let disk = &slot.state.as_ref().unwrap().disk;
    // On this file system (no reflinks) the overlay is sparse; where reflinks work it is a
    // plain file that is not durable.
    match disk.raw() {
        Some((fd, durable)) => {
            assert!(!durable);
            // The reflinked overlay is not the image.
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: fstat writes into our stat buffer.
            assert_eq!(unsafe { libc::fstat(fd, st.as_mut_ptr()) }, 0);
            // SAFETY: fstat succeeded.
            let st = unsafe { st.assume_init() };
            assert_eq!(st.st_nlink, 0, "the overlay has no name");
        }
        None => assert_eq!(disk.sparse().unwrap().map().written(), 0),
    }
    assert_eq!(dir.entries(), vec!["d.img"]);
}

#[test]
fn anonymous_files_leave_nothing_in_their_directory() {
    let dir = TempDir::new("blk-test");
    let mut f = disk::anonymous_file(dir.path()).unwrap();
    f.write_all(b"overlay data").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "overlay data");
    assert!(dir.entries().is_empty());
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes into our stat buffer.
    assert_eq!(unsafe { libc::fstat(f.as_raw_fd(), st.as_mut_ptr()) }, 0);
    // SAFETY: fstat succeeded.
    assert_eq!(unsafe { st.assume_init() }.st_nlink, 0);
}

// ---------------------------------------------------------------------------------------
// Notifications, rate limiting.

#[test]
fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::with_block(Block::new(config(&p, Engine::Sync)).unwrap(), true);
    // used_event (after the avail ring) = 5: the driver wants an interrupt once the used
    // index passes 5.
    let used_event = h.drv.avail.unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
    h.drv.mem.write_obj(5u16, used_event).unwrap();
    for _ in 0..3 {
        h.read(0, 512);
    }
    assert_eq!(h.irq.queue.load(Ordering::SeqCst), 0);
    for _ in 0..3 {
        h.read(0, 512);
    }
    assert_eq!(h.irq.queue.load(Ordering::SeqCst), 1);
}

#[test]
fn the_rate_limiter_holds_requests_back_until_its_timer_fires() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(BlockConfig {
        rate_limiter: Some(RateLimiterConfig {
            bandwidth: None,
            // 2 requests, then 2 more every 100 ms.
            ops: Some(TokenBucket {
                size: 2,
                one_time_burst: None,
                refill_time_ms: 100,
            }),
        }),
        ..config(&p, Engine::Sync)
    });
    assert!(h.source(1).is_some(), "the limiter's timer is a source");
    let posted: Vec<Posted> = (0..5).map(|i| h.post(types::IN, i, &[], 512)).collect();
    h.notify.write(1).unwrap();
    h.worker.handle(0, &Sources::detached()).unwrap();
    // Two went through; the third is held back (not used, not answered).
    let used = h.drv.take_used();
    assert_eq!(used.len(), 2);
    assert_eq!(h.drv.byte(posted[2].status), 0xff);
    assert!(h.metrics().throttled.load(Ordering::Relaxed) >= 1);
    // Another notification does not let it through either.
    h.notify.write(1).unwrap();
    h.worker.handle(0, &Sources::detached()).unwrap();
    assert!(h.drv.take_used().is_empty());
    // The timer lets the rest through, in order.
    h.run().unwrap();
    let mut used2 = used;
    used2.extend(h.drv.take_used());
    assert_eq!(used2.len(), 5);
    for (i, p) in posted.iter().enumerate() {
        let i = i as u64;
        assert_eq!(h.answer(p, &used2), ok(image_bytes(i * 512..(i + 1) * 512)));
    }
    assert_eq!(
        used2.iter().map(|u| u.0).collect::<Vec<_>>(),
        posted.iter().map(|p| u32::from(p.head)).collect::<Vec<_>>()
    );
}

#[test]
fn the_bandwidth_limiter_counts_bytes() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut h = Harness::new(BlockConfig {
        rate_limiter: Some(RateLimiterConfig {
            bandwidth: Some(TokenBucket {
                size: 4096,
                one_time_burst: None,
                refill_time_ms: 50,
            }),
            ops: None,
        }),
        ..config(&p, Engine::Uring)
    });
    let posted: Vec<Posted> = (0..4)
        .map(|i| h.post(types::IN, i * 8, &[], 4096))
        .collect();
    h.notify.write(1).unwrap();
    h.worker.handle(0, &Sources::detached()).unwrap();
    assert!(h.metrics().throttled.load(Ordering::Relaxed) >= 1);
    h.run().unwrap();
    let used = h.drv.take_used();
    for (i, p) in posted.iter().enumerate() {
        let s = i as u64 * 8 * 512;
        assert_eq!(h.answer(p, &used), ok(image_bytes(s..s + 4096)));
    }
}

// ---------------------------------------------------------------------------------------
// The real device thread, under its seccomp filter.

fn on_device_thread(cfg: BlockConfig, engine_used: &str) {
    let mut block = Block::new(cfg.clone()).unwrap();
    let irq = Arc::new(CountingInterrupt::default());
    let health = DeviceHealth::new();
    for activation in 0..2 {
        let mem = memory();
        let (mut drv, queue) = Driver::new(&mem);
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![ActiveQueue {
                    index: 0,
                    queue,
                    notify: notify.try_clone().unwrap(),
                }],
                interrupt: irq.clone(),
                acked_features: block.features(),
                health: health.clone(),
            })
            .unwrap();
        // Writes, reads, a flush, a discard, write-zeroes, GET_ID, a bad request.
        let mut posted = Vec::new();
        let mut h_post = |drv: &mut Driver, t: u32, sector: u64, out: &[u8], in_len: usize| {
            let hdr = drv.header(t, sector);
            let mut descs = vec![(hdr, 16, false)];
            if !out.is_empty() {
                let a = drv.alloc(out.len() as u64);
                drv.mem.write_slice(out, a).unwrap();
                descs.push((a, out.len() as u32, false));
            }
            let mut data = None;
            if in_len > 0 {
                let a = drv.alloc(in_len as u64);
                descs.push((a, in_len as u32, true));
                data = Some((a, in_len));
            }
            let st = drv.status();
            descs.push((st, 1, true));
            let head = drv.add_chain(&descs);
            posted.push(Posted {
                head,
                status: st,
                data,
            });
        };
        let v = 0x40 + activation as u8;
        h_post(&mut drv, types::OUT, 8, &vec![v; 4096], 0);
        h_post(&mut drv, types::FLUSH, 0, &[], 0);
        h_post(&mut drv, types::GET_ID, 0, &[], 20);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&100u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        h_post(&mut drv, types::DISCARD, 0, &seg, 0);
        seg[0..8].copy_from_slice(&200u64.to_le_bytes());
        h_post(&mut drv, types::WRITE_ZEROES, 0, &seg, 0);
        h_post(&mut drv, 77, 0, &[], 0);
        notify.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while drv.used_idx() != drv.avail_idx {
            assert!(
                Instant::now() < deadline,
                "{engine_used}: the device thread did not answer"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // Then read back what was written (ordering across requests is the driver's job).
        h_post(&mut drv, types::IN, 8, &[], 4096);
        h_post(&mut drv, types::IN, 100, &[], 512);
        notify.write(1).unwrap();
        while drv.used_idx() != drv.avail_idx {
            assert!(Instant::now() < deadline, "{engine_used}: no answer");
            std::thread::sleep(Duration::from_millis(2));
        }
        let used = drv.take_used();
        let status_of = |i: usize| drv.byte(posted[i].status);
        assert_eq!(
            (0..6).map(status_of).collect::<Vec<_>>(),
            vec![0, 0, 0, 0, 0, status::UNSUPP],
            "{engine_used}"
        );
        assert_eq!(status_of(6), 0);
        assert_eq!(drv.bytes(posted[6].data.unwrap().0, 4096), vec![v; 4096]);
        assert_eq!(drv.bytes(posted[7].data.unwrap().0, 512), vec![0; 512]);
        let mut id = cfg.serial.as_bytes().to_vec();
        id.resize(20, 0);
        assert_eq!(drv.bytes(posted[2].data.unwrap().0, 20), id);
        assert_eq!(used.len(), 8);
        assert!(irq.queue.load(Ordering::SeqCst) > 0);
        assert!(!health.is_broken(), "{engine_used}: the device is healthy");
        // A guest reset: the thread stops and gives the disk back for the next activation.
        block.reset();
    }
    assert_eq!(irq.config.load(Ordering::SeqCst), 0);
}

#[test]
fn device_thread_sync() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    on_device_thread(config(&p, Engine::Sync), "sync");
    assert_eq!(file_bytes(&p)[8 * 512..16 * 512], vec![0x41; 4096][..]);
}

#[test]
fn device_thread_uring() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    on_device_thread(config(&p, Engine::Uring), "uring");
    assert_eq!(file_bytes(&p)[8 * 512..16 * 512], vec![0x41; 4096][..]);
}

#[test]
fn device_thread_ephemeral_rate_limited() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let before = checksum(&p);
    let cfg = BlockConfig {
        ephemeral: true,
        rate_limiter: Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucket {
                size: 3,
                one_time_burst: None,
                refill_time_ms: 20,
            }),
        }),
        ..config(&p, Engine::Uring)
    };
    on_device_thread(cfg, "ephemeral");
    assert_eq!(checksum(&p), before);
    assert_eq!(dir.entries(), vec!["d.img"]);
}

#[test]
fn a_missing_queue_fails_activation() {
    let dir = TempDir::new("blk-test");
    let p = make_image(&dir, "d.img", DISK);
    let mut b = Block::new(config(&p, Engine::Sync)).unwrap();
    let e = b
        .activate(ActivateContext {
            mem: memory(),
            queues: vec![],
            interrupt: Arc::new(CountingInterrupt::default()),
            acked_features: 0,
            health: DeviceHealth::new(),
        })
        .unwrap_err();
    assert!(matches!(
        e,
        ActivateError::MissingQueues { want: 1, got: 0 }
    ));
}

// ---------------------------------------------------------------------------------------
// Changes while the guest runs: swapping the backing file, updating the rate limiter.

/// The byte at `offset` of a second test image, different from [`pattern`] everywhere.
fn other_pattern(offset: u64) -> u8 {
    pattern(offset) ^ 0x5a
}

fn make_other_image(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, (0..size).map(other_pattern).collect::<Vec<u8>>()).unwrap();
    p
}

fn other_bytes(range: std::ops::Range<u64>) -> Vec<u8> {
    range.map(other_pattern).collect()
}

/// The capacity in the configuration space, read as a driver does (two 32-bit reads).
fn config_capacity(dev: &dyn VirtioDevice) -> u64 {
    let (mut lo, mut hi) = ([0u8; 4], [0u8; 4]);
    dev.read_config(0, &mut lo);
    dev.read_config(4, &mut hi);
    u64::from(u32::from_le_bytes(lo)) | (u64::from(u32::from_le_bytes(hi)) << 32)
}

/// An ops bucket of `n` requests an hour: what is refused waits far longer than any test.
fn ops_per_hour(n: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucket {
            size: n,
            one_time_burst: None,
            refill_time_ms: 3_600_000,
        }),
    }
}

/// Both buckets removed: no limit at all.
const NO_LIMIT: RateLimiterConfig = RateLimiterConfig {
    bandwidth: Some(TokenBucket {
        size: 0,
        one_time_burst: None,
        refill_time_ms: 0,
    }),
    ops: Some(TokenBucket {
        size: 0,
        one_time_burst: None,
        refill_time_ms: 1000,
    }),
};

fn swap_before_activation(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", 2 * DISK);
    let block = Block::new(config(&a, engine)).unwrap();
    let ctl = block.control();
    let generation = block.config_generation();
    assert_eq!(ctl.swap_backing_file(b.clone()).unwrap(), 2 * DISK / 512);
    assert_eq!(block.capacity_sectors(), 2 * DISK / 512);
    assert_eq!(ctl.capacity_sectors(), 2 * DISK / 512);
    assert_eq!(config_capacity(&block), 2 * DISK / 512);
    assert_ne!(block.config_generation(), generation);
    assert_eq!(block.path(), b);
    assert_eq!(ctl.path(), b);

    let mut h = Harness::with_block(block, false);
    // Past the old end, and the serial is the device's.
    let s = DISK / 512 + 3;
    assert_eq!(h.read(s, 1024), ok(other_bytes(s * 512..(s + 2) * 512)));
    let mut id = b"cgvm-disk-0".to_vec();
    id.resize(ID_BYTES, 0);
    assert_eq!(h.request(types::GET_ID, 0, &[], ID_BYTES), ok(id));
    // Writes go to the new file, read-write like the old one.
    assert_eq!(h.write(1, &[7; 512]), ok(vec![]));
    assert_eq!(file_bytes(&b)[512..1024], [7; 512][..]);
    assert_eq!(file_bytes(&a), image_bytes(0..DISK));
    assert_eq!(h.irq.config.load(Ordering::SeqCst), 0, "no driver to tell");
    assert_eq!(
        h.source(2).is_some(),
        engine == Engine::Uring,
        "the new ring is a source"
    );
}

#[test]
fn swap_before_activation_sync() {
    swap_before_activation(Engine::Sync);
}

#[test]
fn swap_before_activation_uring() {
    swap_before_activation(Engine::Uring);
}

fn swap_while_active(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", 2 * DISK);
    let mut h = Harness::new(config(&a, engine));
    let generation = h.block.config_generation();
    let ring = h.source(2);

    // Requests in flight on the old disk when the swap arrives (with io_uring: submitted,
    // their completions not yet reaped).
    let posted: Vec<Posted> = (0..8)
        .map(|i| h.post(types::IN, i * 8, &[], 4096))
        .collect();
    h.notify.write(1).unwrap();
    h.worker.handle(0, &Sources::detached()).unwrap();
    let in_flight = h.worker.borrowed_state().unwrap().executor.in_flight();
    assert_eq!(
        in_flight > 0,
        engine == Engine::Uring,
        "{in_flight} in flight"
    );

    let capacity = h.serve(|c| c.swap_backing_file(b.clone())).unwrap();
    assert_eq!(capacity, 2 * DISK / 512);

    // Each request of the old disk was answered once, from the old file.
    let used = h.drv.take_used();
    assert_eq!(used.len(), posted.len(), "{used:?}");
    let mut heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    heads.sort_unstable();
    heads.dedup();
    assert_eq!(heads.len(), posted.len());
    for (i, p) in posted.iter().enumerate() {
        let s = i as u64 * 8 * 512;
        assert_eq!(h.answer(p, &used), ok(image_bytes(s..s + 4096)));
    }
    assert_eq!(h.worker.borrowed_state().unwrap().executor.in_flight(), 0);

    // The driver is told: configuration interrupt, new capacity, new generation.
    assert_eq!(h.irq.config.load(Ordering::SeqCst), 1);
    assert_eq!(config_capacity(&h.block), 2 * DISK / 512);
    assert_ne!(h.block.config_generation(), generation);
    if engine == Engine::Uring {
        assert!(h.source(2).is_some() && h.source(2) != ring, "a new ring");
    }

    // The new file serves reads (past the old end too) and takes writes.
    assert_eq!(h.read(5, 1024), ok(other_bytes(5 * 512..7 * 512)));
    let s = 2 * DISK / 512 - 2;
    assert_eq!(h.read(s, 1024), ok(other_bytes(s * 512..2 * DISK)));
    assert_eq!(h.write(DISK / 512 + 1, &[9; 4096]), ok(vec![]));
    let o = DISK as usize + 512;
    assert_eq!(file_bytes(&b)[o..o + 4096], [9; 4096][..]);
    assert_eq!(h.request(types::FLUSH, 0, &[], 0), ok(vec![]));
    assert_eq!(
        file_bytes(&a),
        image_bytes(0..DISK),
        "the old file is left alone"
    );

    // Back to the smaller file: what is past its end now fails.
    assert_eq!(
        h.serve(|c| c.swap_backing_file(a.clone())).unwrap(),
        DISK / 512
    );
    assert_eq!(h.irq.config.load(Ordering::SeqCst), 2);
    assert_eq!(h.read(DISK / 512, 512), failed(status::IOERR, 512));
    assert_eq!(h.read(0, 512), ok(image_bytes(0..512)));

    // After a reset the disk is the last one swapped in.
    let mut h = h.restart();
    assert_eq!(h.read(0, 512), ok(image_bytes(0..512)));
}

#[test]
fn swap_while_active_sync() {
    swap_while_active(Engine::Sync);
}

#[test]
fn swap_while_active_uring() {
    swap_while_active(Engine::Uring);
}

#[test]
fn a_failed_swap_names_the_file_and_keeps_the_old_disk() {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let mut h = Harness::new(config(&a, Engine::Uring));
    let generation = h.block.config_generation();
    let ctl = h.block.control();
    // The file work happens on the calling thread: these fail before the worker is asked.
    let missing = dir.path().join("missing.img");
    let e = ctl.swap_backing_file(missing).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("missing.img") && msg.contains("cannot open"),
        "{msg}"
    );
    let e = ctl
        .swap_backing_file(PathBuf::from("/dev/null"))
        .unwrap_err();
    assert!(
        e.to_string().contains("/dev/null: not a regular file"),
        "{e}"
    );
    let e = ctl
        .swap_backing_file(a.join("not-a-directory.img"))
        .unwrap_err();
    assert!(e.to_string().contains("a.img/not-a-directory.img"), "{e}");

    assert_eq!(ctl.path(), a);
    assert_eq!(config_capacity(&h.block), DISK / 512);
    assert_eq!(h.block.config_generation(), generation);
    assert_eq!(h.irq.config.load(Ordering::SeqCst), 0);
    assert_eq!(h.read(3, 1024), ok(image_bytes(3 * 512..5 * 512)));
    assert_eq!(h.write(3, &[1; 512]), ok(vec![]));
    assert_eq!(file_bytes(&a)[3 * 512..4 * 512], [1; 512][..]);
}

fn ephemeral_swap(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", DISK);
    let (sum_a, sum_b) = (checksum(&a), checksum(&b));
    let mtime_b = std::fs::metadata(&b).unwrap().modified().unwrap();
    let mut h = Harness::new(BlockConfig {
        ephemeral: true,
        ..config(&a, engine)
    });
    assert_eq!(h.write(0, &[1; 4096]), ok(vec![]));

    h.serve(|c| c.swap_backing_file(b.clone())).unwrap();
    // A fresh overlay over the new image: the old overlay's writes are gone with it.
    assert_eq!(h.read(0, 4096), ok(other_bytes(0..4096)));
    assert_eq!(h.write(0, &[2; 4096]), ok(vec![]));
    assert_eq!(h.range_request(types::DISCARD, 16, 8, 0), ok(vec![]));
    assert_eq!(h.request(types::FLUSH, 0, &[], 0), ok(vec![]));
    assert_eq!(h.read(0, 4096), ok(vec![2; 4096]));
    assert_eq!(h.read(16, 4096), ok(vec![0; 4096]));
    assert_eq!(h.read(24, 512), ok(other_bytes(24 * 512..25 * 512)));
    // A reset keeps the new overlay.
    let mut h = h.restart();
    assert_eq!(h.read(0, 4096), ok(vec![2; 4096]));
    drop(h);

    assert_eq!(checksum(&b), sum_b, "the new image was never written");
    assert_eq!(std::fs::metadata(&b).unwrap().modified().unwrap(), mtime_b);
    assert_eq!(checksum(&a), sum_a);
    assert_eq!(
        dir.entries(),
        vec!["a.img", "b.img"],
        "no overlay left behind"
    );
}

#[test]
fn an_ephemeral_swap_never_writes_the_new_file_sync() {
    ephemeral_swap(Engine::Sync);
}

#[test]
fn an_ephemeral_swap_never_writes_the_new_file_uring() {
    ephemeral_swap(Engine::Uring);
}

#[test]
fn a_read_only_disk_stays_read_only_after_a_swap() {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", DISK);
    let mut h = Harness::new(BlockConfig {
        read_only: true,
        ..config(&a, Engine::Sync)
    });
    h.serve(|c| c.swap_backing_file(b.clone())).unwrap();
    assert_eq!(h.write(0, &[1; 512]), failed(status::IOERR, 0));
    assert_eq!(h.read(0, 512), ok(other_bytes(0..512)));
    assert_eq!(file_bytes(&b), other_bytes(0..DISK));
    assert!(h.block.is_read_only());
}

fn rate_limiter_updates_while_active(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let mut h = Harness::new(config(&a, engine));
    let ctl = h.block.control();
    assert_eq!(ctl.rate_limiter(), None);
    assert!(h.source(1).is_none());

    // A limiter where there was none: 2 requests, then the rest waits (an hour).
    h.serve(|c| c.update_rate_limiter(Some(ops_per_hour(2))))
        .unwrap();
    assert_eq!(ctl.rate_limiter(), Some(ops_per_hour(2)));
    assert!(h.source(1).is_some(), "the new timer is a source");
    let posted: Vec<Posted> = (0..6).map(|i| h.post(types::IN, i, &[], 512)).collect();
    h.notify.write(1).unwrap();
    h.worker.handle(0, &Sources::detached()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.drv.used_idx() < 2 {
        assert!(Instant::now() < deadline);
        h.serve_once(10).unwrap();
    }
    h.serve_once(50).unwrap();
    assert_eq!(h.drv.used_idx(), 2, "the limit holds the rest back");
    let throttled = h.metrics().throttled.load(Ordering::Relaxed);
    assert!(throttled >= 1);

    // A new, full bucket of 3: the held request is retried at once, 3 more go.
    h.serve(|c| c.update_rate_limiter(Some(ops_per_hour(3))))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.drv.used_idx() < 5 {
        assert!(Instant::now() < deadline, "the new bucket was not used");
        h.serve_once(10).unwrap();
    }
    h.serve_once(50).unwrap();
    assert_eq!(h.drv.used_idx(), 5);
    assert!(h.metrics().throttled.load(Ordering::Relaxed) > throttled);

    // Nothing to update, and an update without buckets: nothing changes.
    let timer = h.source(1);
    ctl.update_rate_limiter(None).unwrap();
    h.serve(|c| c.update_rate_limiter(Some(RateLimiterConfig::default())))
        .unwrap();
    // An absent bucket is kept as it is.
    let bandwidth = TokenBucket {
        size: 1 << 30,
        one_time_burst: None,
        refill_time_ms: 1000,
    };
    h.serve(|c| {
        c.update_rate_limiter(Some(RateLimiterConfig {
            bandwidth: Some(bandwidth),
            ops: None,
        }))
    })
    .unwrap();
    assert_eq!(
        ctl.rate_limiter(),
        Some(RateLimiterConfig {
            bandwidth: Some(bandwidth),
            ops: ops_per_hour(3).ops,
        })
    );
    assert_eq!(h.source(1), timer, "the same limiter, updated");
    h.serve_once(50).unwrap();
    assert_eq!(h.drv.used_idx(), 5, "the ops bucket is still empty");

    // Buckets of size 0 remove the limits: the last request goes through.
    h.serve(|c| c.update_rate_limiter(Some(NO_LIMIT))).unwrap();
    assert_eq!(ctl.rate_limiter(), None);
    assert!(h.source(1).is_none(), "the limiter is gone");
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.drv.used_idx() < 6 {
        assert!(Instant::now() < deadline, "the last request never went");
        h.serve_once(10).unwrap();
    }
    let used = h.drv.take_used();
    assert_eq!(used.len(), 6);
    for (i, p) in posted.iter().enumerate() {
        let i = i as u64;
        assert_eq!(h.answer(p, &used), ok(image_bytes(i * 512..(i + 1) * 512)));
    }
    for _ in 0..20 {
        assert_eq!(h.read(7, 512), ok(image_bytes(7 * 512..8 * 512)));
    }
}

#[test]
fn rate_limiter_updates_while_active_sync() {
    rate_limiter_updates_while_active(Engine::Sync);
}

#[test]
fn rate_limiter_updates_while_active_uring() {
    rate_limiter_updates_while_active(Engine::Uring);
}

#[test]
fn rate_limiter_updates_before_activation_and_after_a_reset() {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let block = Block::new(config(&a, Engine::Sync)).unwrap();
    let ctl = block.control();
    ctl.update_rate_limiter(Some(ops_per_hour(1))).unwrap();
    assert_eq!(ctl.rate_limiter(), Some(ops_per_hour(1)));
    let mut h = Harness::with_block(block, false);
    assert!(h.source(1).is_some());
    for i in 0..2 {
        h.post(types::IN, i, &[], 512);
    }
    h.notify.write(1).unwrap();
    h.worker.handle(0, &Sources::detached()).unwrap();
    assert_eq!(h.drv.used_idx(), 1);

    // A reset (the worker stops and gives the state back), then the update is made directly.
    let Harness { worker, block, .. } = h;
    drop(worker);
    ctl.update_rate_limiter(Some(NO_LIMIT)).unwrap();
    assert_eq!(ctl.rate_limiter(), None);
    let mut h = Harness::with_block(block, false);
    assert!(h.source(1).is_none());
    for _ in 0..5 {
        assert_eq!(h.read(0, 512), ok(image_bytes(0..512)));
    }
}

#[test]
fn a_change_the_device_thread_does_not_take_times_out_and_changes_nothing() {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", 2 * DISK);
    let mut h = Harness::new(config(&a, Engine::Uring));
    let generation = h.block.config_generation();
    // Nobody serves the worker.
    let ctl = h.block.control().with_timeout(Duration::from_millis(100));
    let start = Instant::now();
    let e = ctl.swap_backing_file(b.clone()).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(matches!(e, BlockError::Timeout { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("b.img") && msg.contains("did not take the change"),
        "{msg}"
    );
    let e = ctl.update_rate_limiter(Some(ops_per_hour(1))).unwrap_err();
    assert!(
        e.to_string().contains("a.img") && matches!(e, BlockError::Timeout { .. }),
        "{e}"
    );

    // The worker wakes up late: the changes were withdrawn, nothing happens.
    h.worker.handle(3, &Sources::detached()).unwrap();
    assert_eq!(ctl.path(), a);
    assert_eq!(config_capacity(&h.block), DISK / 512);
    assert_eq!(h.block.config_generation(), generation);
    assert_eq!(ctl.rate_limiter(), None);
    assert!(h.source(1).is_none());
    assert_eq!(h.irq.config.load(Ordering::SeqCst), 0);
    assert_eq!(h.read(1, 512), ok(image_bytes(512..1024)));
    // And the next change goes through.
    assert_eq!(
        h.serve(|c| c.swap_backing_file(b.clone())).unwrap(),
        2 * DISK / 512
    );
    assert_eq!(h.read(1, 512), ok(other_bytes(512..1024)));
}

#[test]
fn a_change_waiting_when_the_worker_stops_is_made_by_the_caller() {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", 2 * DISK);
    let h = Harness::new(config(&a, Engine::Uring));
    let ctl = h.block.control();
    let Harness { worker, block, .. } = h;
    let command = libc::pollfd {
        fd: block.shared.command_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    std::thread::scope(|s| {
        let call = s.spawn(|| ctl.swap_backing_file(b.clone()));
        // Once the change waits for the worker, the device is reset.
        let mut p = command;
        // SAFETY: poll writes only the revents of our one pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 10_000) }, 1);
        drop(worker);
        assert_eq!(call.join().unwrap().unwrap(), 2 * DISK / 512);
    });
    assert_eq!(block.capacity_sectors(), 2 * DISK / 512);
    let mut h = Harness::with_block(block, false);
    assert_eq!(h.read(3, 512), ok(other_bytes(3 * 512..4 * 512)));
}

#[test]
fn a_control_handle_can_go_to_any_thread() {
    fn shareable<T: Send + Sync + Clone + std::fmt::Debug>() {}
    shareable::<BlockControl>();
}

#[test]
fn the_device_thread_filter_follows_the_configured_engine() {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    // Ephemeral over a sparse overlay runs the sync engine, but a swap may bring a file
    // whose overlay is a reflink, and io_uring with it.
    let h = Harness::new(BlockConfig {
        ephemeral: true,
        ..config(&a, Engine::Uring)
    });
    assert_eq!(h.worker.seccomp().name, "virtio-blk-uring");
    assert!(h.worker.seccomp().calls.contains(&libc::SYS_io_uring_enter));
    let h = Harness::new(config(&a, Engine::Sync));
    assert_eq!(h.worker.seccomp().name, "virtio-blk-sync");
    assert!(!h.worker.seccomp().calls.contains(&libc::SYS_io_uring_enter));
}

/// Waits until the driver has `n` used entries.
fn wait_used(drv: &Driver, n: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while drv.used_idx() != n {
        assert!(
            Instant::now() < deadline,
            "{what}: the device thread did not answer"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Activates `block` on a fresh queue; returns its driver and notification eventfd.
fn activate(
    block: &mut Block,
    irq: &Arc<CountingInterrupt>,
    health: &DeviceHealth,
) -> (Driver, EventFd) {
    let mem = memory();
    let (drv, queue) = Driver::new(&mem);
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    block
        .activate(ActivateContext {
            mem,
            queues: vec![ActiveQueue {
                index: 0,
                queue,
                notify: notify.try_clone().unwrap(),
            }],
            interrupt: irq.clone(),
            acked_features: block.features(),
            health: health.clone(),
        })
        .unwrap();
    (drv, notify)
}

/// Posts a read of `len` bytes at `sector` by hand; returns (data, status) addresses.
fn post_read(drv: &mut Driver, sector: u64, len: u32) -> (GuestAddress, GuestAddress) {
    let hdr = drv.header(types::IN, sector);
    let data = drv.alloc(u64::from(len));
    let st = drv.status();
    drv.add_chain(&[(hdr, 16, false), (data, len, true), (st, 1, true)]);
    (data, st)
}

/// Swaps and updates on the real device thread, under its seccomp filter: while requests
/// are in flight, then after a reset, then active again.
fn changes_on_the_device_thread(engine: Engine) {
    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", 2 * DISK);
    let c = make_image(&dir, "c.img", DISK / 2);
    let mut block = Block::new(config(&a, engine)).unwrap();
    let ctl = block.control();
    let irq = Arc::new(CountingInterrupt::default());
    let health = DeviceHealth::new();
    let (mut drv, notify) = activate(&mut block, &irq, &health);

    // Reads posted just before the swap: each is answered once, from one file or the other.
    let reads: Vec<_> = (0..32).map(|i| post_read(&mut drv, i * 8, 4096)).collect();
    notify.write(1).unwrap();
    assert_eq!(ctl.swap_backing_file(b.clone()).unwrap(), 2 * DISK / 512);
    assert_eq!(
        irq.config.load(Ordering::SeqCst),
        1,
        "raised before the answer"
    );
    assert_eq!(config_capacity(&block), 2 * DISK / 512);
    wait_used(&drv, 32, "reads across the swap");
    let used = drv.take_used();
    assert_eq!(used.len(), 32);
    for (i, &(data, st)) in reads.iter().enumerate() {
        let s = i as u64 * 8 * 512;
        let got = drv.bytes(data, 4096);
        assert_eq!(drv.byte(st), status::OK);
        assert!(
            got == image_bytes(s..s + 4096) || got == other_bytes(s..s + 4096),
            "read {i}"
        );
    }
    // After it, the new file.
    let (data, st) = post_read(&mut drv, DISK / 512 + 8, 4096);
    notify.write(1).unwrap();
    wait_used(&drv, 33, "a read after the swap");
    assert_eq!(drv.byte(st), status::OK);
    assert_eq!(drv.bytes(data, 4096), other_bytes(DISK + 4096..DISK + 8192));

    // A limiter on the thread (its timer came from this thread), then removed.
    ctl.update_rate_limiter(Some(ops_per_hour(1))).unwrap();
    post_read(&mut drv, 0, 512);
    let (data, _) = post_read(&mut drv, 1, 512);
    notify.write(1).unwrap();
    wait_used(&drv, 34, "one read under the limit");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.used_idx(), 34, "the second read is held back");
    ctl.update_rate_limiter(Some(NO_LIMIT)).unwrap();
    wait_used(&drv, 35, "the held read after the limit went");
    assert_eq!(drv.bytes(data, 512), other_bytes(512..1024));
    assert!(!health.is_broken());

    // A reset, a swap while no thread runs (no interrupt: no driver), a new activation.
    block.reset();
    assert_eq!(ctl.swap_backing_file(c.clone()).unwrap(), DISK / 1024);
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    assert_eq!(config_capacity(&block), DISK / 1024);
    let (mut drv, notify) = activate(&mut block, &irq, &health);
    let (data, st) = post_read(&mut drv, 16, 4096);
    notify.write(1).unwrap();
    wait_used(&drv, 1, "a read after the reset");
    assert_eq!(drv.byte(st), status::OK);
    assert_eq!(drv.bytes(data, 4096), image_bytes(8192..12288));
    // And a swap on the new thread.
    assert_eq!(ctl.swap_backing_file(a.clone()).unwrap(), DISK / 512);
    assert_eq!(irq.config.load(Ordering::SeqCst), 2);
    let (data, _) = post_read(&mut drv, DISK / 512 - 1, 512);
    notify.write(1).unwrap();
    wait_used(&drv, 2, "a read after the second swap");
    assert_eq!(drv.bytes(data, 512), image_bytes(DISK - 512..DISK));
    assert!(!health.is_broken());
    block.reset();
    drop(block);
    assert_eq!(dir.entries(), vec!["a.img", "b.img", "c.img"]);
}

#[test]
fn changes_on_the_device_thread_sync() {
    changes_on_the_device_thread(Engine::Sync);
}

#[test]
fn changes_on_the_device_thread_uring() {
    changes_on_the_device_thread(Engine::Uring);
}

#[test]
fn the_transport_shows_the_new_capacity_generation_and_interrupt() {
    use crate::bus::BusDevice;
    use crate::virtio::mmio::MmioTransport;

    let dir = TempDir::new("blk-test");
    let a = make_image(&dir, "a.img", DISK);
    let b = make_other_image(&dir, "b.img", 2 * DISK);
    let c = make_image(&dir, "c.img", 4 * DISK);
    let block = Block::new(config(&a, Engine::Uring)).unwrap();
    let ctl = block.control();
    let features = block.features() | (1 << crate::virtio::VIRTIO_F_VERSION_1);
    let mem = memory();
    let _ = Driver::new(&mem); // zeroed rings at the addresses used below
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(block), mem, irq.try_clone().unwrap()).unwrap();
    let r = |t: &mut MmioTransport, off: u64| {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    };
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let capacity = |t: &mut MmioTransport| u64::from(r(t, 0x100)) | (u64::from(r(t, 0x104)) << 32);
    assert_eq!(capacity(&mut t), DISK / 512);
    let g0 = r(&mut t, 0xfc);

    // Before the driver starts.
    ctl.swap_backing_file(b).unwrap();
    assert_eq!(capacity(&mut t), 2 * DISK / 512);
    let g1 = r(&mut t, 0xfc);
    assert_ne!(g1, g0);

    // The driver starts the device.
    w(&mut t, 0x70, 1);
    w(&mut t, 0x70, 3);
    w(&mut t, 0x24, 0);
    w(&mut t, 0x20, features as u32);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, (features >> 32) as u32);
    w(&mut t, 0x70, 0xb);
    assert_eq!(r(&mut t, 0x70), 0xb, "FEATURES_OK");
    w(&mut t, 0x30, 0);
    w(&mut t, 0x38, u32::from(QUEUE_SIZE));
    for (reg, addr) in [(0x80, 0u32), (0x90, 0x1000), (0xa0, 0x2000)] {
        w(&mut t, reg, addr);
        w(&mut t, reg + 4, 0);
    }
    w(&mut t, 0x44, 1);
    w(&mut t, 0x70, 0xf);
    assert!(t.is_active());
    assert_eq!(r(&mut t, 0x60), 0);
    assert_eq!(r(&mut t, 0xfc), g1);

    // A swap on the running device: interrupt (configuration bit), capacity, generation.
    assert_eq!(ctl.swap_backing_file(c).unwrap(), 4 * DISK / 512);
    assert_eq!(r(&mut t, 0x60), 2, "InterruptStatus: configuration change");
    assert!(irq.read().unwrap() >= 1, "the irqfd was written");
    assert_eq!(capacity(&mut t), 4 * DISK / 512);
    let g2 = r(&mut t, 0xfc);
    assert_ne!(g2, g1);
    assert_eq!(r(&mut t, 0x70) & 0x40, 0, "healthy");
    // A failed swap changes nothing.
    assert!(ctl.swap_backing_file(dir.path().join("nope")).is_err());
    assert_eq!(r(&mut t, 0xfc), g2);
    w(&mut t, 0x64, 2);
    w(&mut t, 0x70, 0);
    assert!(!t.is_active());
}
