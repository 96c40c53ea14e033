//! A test driver: lays out a split queue in guest memory and posts descriptor chains.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// The guest's CID in tests.
pub const GUEST_CID: u64 = 3;
/// Queue size of test queues.
pub const SIZE: u16 = 64;
const MEM_SIZE: u64 = 16 << 20;

/// One descriptor: address, length, device-writable.
pub type Desc = (GuestAddress, u32, bool);

/// The driver side of one queue, and the device's view of it (`queue`).
pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    heap: u64,
    heap_end: u64,
}

impl Driver {
    /// A driver alone in its guest memory.
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        Self::with(&mem, 0)
    }

    /// Driver number `n` (0..4) in `mem`: its rings at `n * 0x4000`, its buffers in its own
    /// quarter of the rest.
    pub fn with(mem: &GuestMemoryMmap, n: u64) -> Self {
        let base = n * 0x4000;
        mem.write_slice(&[0u8; 0x4000], GuestAddress(base)).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        let quarter = (MEM_SIZE - 0x10_0000) / 4;
        let heap = 0x10_0000 + n * quarter;
        Driver {
            mem: mem.clone(),
            queue: q,
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            heap,
            heap_end: heap + quarter,
        }
    }

    /// `len` bytes of guest memory.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len + 63) & !63;
        assert!(self.heap <= self.heap_end, "test heap exhausted");
        GuestAddress(a)
    }

    /// `bytes` copied into guest memory.
    pub fn put(&mut self, bytes: &[u8]) -> GuestAddress {
        let a = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, a).unwrap();
        a
    }

    /// `len` bytes of guest memory at `a`.
    pub fn get(&self, a: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, a).unwrap();
        v
    }

    /// Posts a chain of `descs`, linked in order; returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % SIZE;
            let last = i + 1 == descs.len();
            let flags: u16 = if w { 2 } else { 0 } | if last { 0 } else { 1 };
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.0.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&((idx + 1) % SIZE).to_le_bytes());
            self.mem
                .write_slice(&b, GuestAddress(self.base + u64::from(idx) * 16))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % SIZE;
        let slot = self.avail_idx % SIZE;
        self.mem
            .write_obj(head, GuestAddress(self.base + 0x1004 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.base + 0x1002))
            .unwrap();
        head
    }

    /// The used entries added since the last call: (id, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let used = GuestAddress(self.base + 0x2000);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = used.unchecked_add(4 + 8 * u64::from(self.used_seen % SIZE));
            let id: u32 = self.mem.read_obj(e).unwrap();
            let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
