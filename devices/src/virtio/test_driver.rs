//! Tests' driver side of a split virtqueue: lays out the descriptor table, available and used
//! rings in guest memory, posts descriptor chains and reads back used entries, so device
//! tests can feed their workers exactly the chains they want, hostile ones included.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: the chain goes on.
const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const F_WRITE: u16 = 2;

/// One descriptor: address, length, device-writable.
pub type Desc = (GuestAddress, u32, bool);

/// The driver side of one queue of `size` entries whose descriptor table, available and used
/// rings start at `base`, `base + 0x1000` and `base + 0x2000`.
pub struct RingDriver {
    mem: GuestMemoryMmap,
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl RingDriver {
    /// Zeroes the rings at `base` and returns the driver and the device's view of the queue.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> (Self, Queue) {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        let d = Self {
            mem: mem.clone(),
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (d, q)
    }

    /// Posts a chain of `descs`, linked in order; returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.0.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&((idx + 1) % self.size).to_le_bytes());
            self.mem
                .write_slice(&b, GuestAddress(self.base + u64::from(idx) * 16))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        let slot = self.avail_idx % self.size;
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
            let e = used.unchecked_add(4 + 8 * u64::from(self.used_seen % self.size));
            let id: u32 = self.mem.read_obj(e).unwrap();
            let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
