//! MSI-X (PCI 3.0, 6.8.2): the capability, the vector table and the pending bit array of one
//! function, and the delivery of its messages.
//!
//! Each vector is an eventfd the VMM registers with KVM_IRQFD on a GSI of its own; the GSI's
//! route (the message: address and data) comes from the table entry and is set through
//! [`PciHost::set_msi_route`] before the first message that needs it. A message raised while
//! its vector (or the whole function) is masked sets the vector's pending bit instead, and is
//! sent when the mask goes. [`Msix`] is shared: the guest's table and capability writes arrive
//! under the function's lock, messages are raised from device threads; one small mutex inside
//! orders the two, so that no message is lost between a mask check and an unmask.

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::{MsiMessage, PciHost};

/// The MSI-X capability ID.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Size of the MSI-X capability structure.
pub const MSIX_CAPABILITY_SIZE: usize = 12;
/// Size of one table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors one function may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Message Control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message Control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control: the entry's mask bit.
const VECTOR_MASKED: u32 = 1;

/// One vector as the VMM wires it: the eventfd a message is written to, registered with
/// KVM_IRQFD on `gsi`.
#[derive(Debug)]
pub struct MsixVector {
    /// The GSI whose route carries this vector's message.
    pub gsi: u32,
    /// Written once per message.
    pub event: EventFd,
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixDelivery {
    /// Written to the vector's eventfd.
    Sent,
    /// The vector or the function is masked: the pending bit is set.
    Pending,
    /// MSI-X is not enabled: the caller falls back to INTx.
    Disabled,
    /// No such vector.
    NoVector,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.address_hi) << 32) | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

#[derive(Debug)]
struct State {
    enabled: bool,
    function_masked: bool,
    entries: Vec<Entry>,
    pending: Vec<bool>,
    /// The route last given to the host for each vector.
    routed: Vec<Option<MsiMessage>>,
}

/// The MSI-X state of one function; see the module documentation.
pub struct Msix {
    host: Arc<dyn PciHost>,
    vectors: Vec<MsixVector>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.vectors)
            .field("state", &self.state)
            .finish()
    }
}

impl Msix {
    /// MSI-X with `vectors` (at most [`MSIX_MAX_VECTORS`]; the rest are dropped), all masked
    /// and disabled, as after a reset.
    pub fn new(host: Arc<dyn PciHost>, mut vectors: Vec<MsixVector>) -> Self {
        vectors.truncate(usize::from(MSIX_MAX_VECTORS));
        let n = vectors.len();
        Self {
            host,
            vectors,
            state: Mutex::new(State {
                enabled: false,
                function_masked: false,
                entries: vec![
                    Entry {
                        address_lo: 0,
                        address_hi: 0,
                        data: 0,
                        control: VECTOR_MASKED,
                    };
                    n
                ],
                pending: vec![false; n],
                routed: vec![None; n],
            }),
        }
    }

    /// The capability structure (to add with `ConfigSpace::add_capability`) and its write mask,
    /// for a table at `table_offset` and a PBA at `pba_offset` (both 8-byte aligned) of BAR
    /// `bar`.
    pub fn capability(
        &self,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> ([u8; MSIX_CAPABILITY_SIZE], [u8; MSIX_CAPABILITY_SIZE]) {
        let mut body = [0u8; MSIX_CAPABILITY_SIZE];
        body[0] = MSIX_CAPABILITY_ID;
        let control = (self.vectors.len().max(1) - 1) as u16;
        body[2..4].copy_from_slice(&control.to_le_bytes());
        body[4..8].copy_from_slice(&((table_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&((pba_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        let mut writable = [0u8; MSIX_CAPABILITY_SIZE];
        writable[3] = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8;
        (body, writable)
    }

    /// The vectors, in table order: what the VMM registers with KVM_IRQFD.
    pub fn vectors(&self) -> &[MsixVector] {
        &self.vectors
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.vectors.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Size of the pending bit array in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.vectors.len() as u64).div_ceil(64) * 8
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Takes the capability's Message Control after a guest write: enable and function mask.
    /// Vectors that can now send get their routes, and their pending messages go out.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        let enabled = control & MSIX_ENABLE != 0;
        let function_masked = control & MSIX_FUNCTION_MASK != 0;
        if enabled == s.enabled && function_masked == s.function_masked {
            return;
        }
        let was_enabled = s.enabled;
        s.enabled = enabled;
        s.function_masked = function_masked;
        if !enabled && was_enabled {
            // Routes of a disabled function are withdrawn; enabling again sets them.
            for v in 0..self.vectors.len() {
                if s.routed[v].take().is_some() {
                    if let Err(e) = self.host.set_msi_route(self.vectors[v].gsi, None) {
                        log::warn!("msi-x: cannot remove the route of vector {v}: {e}");
                    }
                }
            }
        }
        for v in 0..self.vectors.len() {
            self.unmasked(&mut s, v);
        }
    }

    /// Whether vector `v` may send now.
    fn can_send(s: &State, v: usize) -> bool {
        s.enabled && !s.function_masked && s.entries.get(v).is_some_and(|e| !e.masked())
    }

    /// Gives the host the route of vector `v` if it changed since last time.
    fn sync_route(&self, s: &mut State, v: usize) {
        let Some(entry) = s.entries.get(v) else {
            return;
        };
        let msg = entry.message();
        if s.routed[v] == Some(msg) {
            return;
        }
        match self.host.set_msi_route(self.vectors[v].gsi, Some(msg)) {
            Ok(()) => s.routed[v] = Some(msg),
            Err(e) => log::error!(
                "msi-x: cannot route vector {v} (GSI {}): {e}",
                self.vectors[v].gsi
            ),
        }
    }

    /// Vector `v` may have become able to send: route it and send what is pending.
    fn unmasked(&self, s: &mut State, v: usize) {
        if !Self::can_send(s, v) {
            return;
        }
        self.sync_route(s, v);
        if s.pending[v] {
            s.pending[v] = false;
            self.send(v);
        }
    }

    fn send(&self, v: usize) {
        if let Err(e) = self.vectors[v].event.write(1) {
            log::error!("msi-x: cannot signal vector {v}: {e}");
        }
    }

    /// Raises vector `vector` (from any thread: it makes no host calls, only an eventfd
    /// write).
    pub fn trigger(&self, vector: u16) -> MsixDelivery {
        let mut s = self.lock();
        if !s.enabled {
            return MsixDelivery::Disabled;
        }
        let v = usize::from(vector);
        if v >= self.vectors.len() {
            return MsixDelivery::NoVector;
        }
        if !Self::can_send(&s, v) {
            s.pending[v] = true;
            return MsixDelivery::Pending;
        }
        // The route was set when the vector became able to send (on the guest's thread: a
        // device thread may not make KVM calls); if that failed it was logged, and the next
        // guest write to the entry tries again.
        self.send(v);
        MsixDelivery::Sent
    }

    /// Whether vector `v`'s pending bit is set.
    pub fn is_pending(&self, v: u16) -> bool {
        self.lock()
            .pending
            .get(usize::from(v))
            .copied()
            .unwrap_or(false)
    }

    /// Checks a table or PBA access: aligned 4 or 8 bytes (PCI 3.0, 6.8.2: anything else is
    /// undefined; here it reads as zero and writes are dropped).
    fn access_ok(offset: u64, len: usize) -> bool {
        (len == 4 || len == 8) && offset % len as u64 == 0
    }

    /// The guest reads the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !Self::access_ok(offset, data.len()) {
            log::debug!(
                "msi-x: {}-byte table read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let s = self.lock();
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let Some(o) = offset.checked_add(4 * i as u64) else {
                continue;
            };
            let Some(e) = usize::try_from(o / MSIX_ENTRY_SIZE)
                .ok()
                .and_then(|v| s.entries.get(v))
            else {
                continue;
            };
            let v = match o % MSIX_ENTRY_SIZE {
                0 => e.address_lo,
                4 => e.address_hi,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// The guest writes the table at `offset`.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        if !Self::access_ok(offset, data.len()) {
            log::debug!(
                "msi-x: {}-byte table write at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let mut s = self.lock();
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let Some(o) = offset.checked_add(4 * i as u64) else {
                continue;
            };
            let Some(v) = usize::try_from(o / MSIX_ENTRY_SIZE)
                .ok()
                .filter(|&v| v < s.entries.len())
            else {
                continue;
            };
            let mut val = [0u8; 4];
            val.copy_from_slice(chunk);
            let val = u32::from_le_bytes(val);
            let e = &mut s.entries[v];
            match o % MSIX_ENTRY_SIZE {
                0 => e.address_lo = val & !3,
                4 => e.address_hi = val,
                8 => e.data = val,
                _ => e.control = val & VECTOR_MASKED,
            }
            // A message changed while the vector can send takes effect at once; an unmasked
            // vector sends what is pending.
            self.unmasked(&mut s, v);
        }
    }

    /// The guest reads the pending bit array at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !Self::access_ok(offset, data.len()) {
            log::debug!("msi-x: {}-byte PBA read at {offset:#x} ignored", data.len());
            return;
        }
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let Some(first) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| o.checked_mul(8))
            else {
                continue;
            };
            for bit in 0..8 {
                if s.pending.get(first + bit).copied().unwrap_or(false) {
                    *b |= 1 << bit;
                }
            }
        }
    }

    /// The guest writes the pending bit array: it is read-only.
    pub fn write_pba(&self, offset: u64, data: &[u8]) {
        log::debug!(
            "msi-x: {}-byte write to the read-only PBA at {offset:#x} ignored",
            data.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{HostEvent, RecordingHost};
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn msix(n: u32) -> (Arc<RecordingHost>, Msix) {
        let host = Arc::new(RecordingHost::default());
        let vectors = (0..n)
            .map(|i| MsixVector {
                gsi: 24 + i,
                event: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        (host.clone(), Msix::new(host, vectors))
    }

    fn fired(m: &Msix, v: usize) -> bool {
        m.vectors()[v].event.read().is_ok()
    }

    fn w32(m: &Msix, off: u64, v: u32) {
        m.write_table(off, &v.to_le_bytes());
    }

    fn r32(m: &Msix, off: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read_table(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn pba(m: &Msix) -> u64 {
        let mut b = [0u8; 8];
        m.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    /// Programs vector `v` with address 0xfee0_0000 | v << 12 and data 0x40 + v.
    fn program(m: &Msix, v: u64) {
        w32(m, v * 16, 0xfee0_0000 | (v as u32) << 12);
        w32(m, v * 16 + 4, 0);
        w32(m, v * 16 + 8, 0x40 + v as u32);
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (_, m) = msix(3);
        let (body, mask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(body[0], MSIX_CAPABILITY_ID);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2, "table size - 1");
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x5000);
        assert_eq!(
            mask[2..4],
            [0, 0xc0],
            "only enable and function mask are writable"
        );
        assert_eq!(m.table_size(), 48);
        assert_eq!(m.pba_size(), 8);
        let (_, big) = msix(65);
        assert_eq!(big.pba_size(), 16);
    }

    #[test]
    fn entries_reset_masked_and_round_trip_with_4_and_8_byte_accesses() {
        let (_, m) = msix(2);
        assert_eq!(r32(&m, 12), 1, "masked after reset");
        assert_eq!(r32(&m, 16 + 12), 1);
        m.write_table(16, &0x0000_0001_fee0_1000u64.to_le_bytes());
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0000_0001_fee0_1000);
        m.write_table(24, &((1u64 << 32) | 0x41).to_le_bytes());
        assert_eq!(r32(&m, 24), 0x41);
        assert_eq!(r32(&m, 28), 1);
        // Reserved control bits and the address's low bits are read-only.
        w32(&m, 28, 0xffff_fffe);
        assert_eq!(r32(&m, 28), 0);
        w32(&m, 16, 0xfee0_0003);
        assert_eq!(r32(&m, 16), 0xfee0_0000);
    }

    #[test]
    fn hostile_table_and_pba_accesses_are_harmless() {
        let (host, m) = msix(2);
        program(&m, 0);
        for len in [1usize, 2, 3, 4, 8, 16] {
            for off in 0..48u64 {
                let mut d = vec![0xaau8; len];
                m.read_table(off, &mut d);
                if !(len == 4 || len == 8) || off % len as u64 != 0 {
                    assert!(d.iter().all(|&b| b == 0), "{len} bytes at {off}");
                }
                m.read_pba(off, &mut d);
                m.write_pba(off, &d);
                if !(len == 4 || len == 8) || off % len as u64 != 0 {
                    m.write_table(off, &vec![0xff; len]);
                }
            }
        }
        assert_eq!(r32(&m, 0), 0xfee0_0000, "odd writes changed nothing");
        assert_eq!(r32(&m, 12), 1);
        // Past the table: reads zero, writes go nowhere.
        w32(&m, 32, 5);
        m.write_table(u64::MAX - 7, &[0; 8]);
        assert_eq!(r32(&m, 32), 0);
        let mut d = [0u8; 8];
        m.read_table(u64::MAX - 7, &mut d);
        m.read_pba(u64::MAX - 7, &mut d);
        assert!(host.events().is_empty(), "no routes for masked vectors");
    }

    #[test]
    fn disabled_msix_falls_back_and_masked_vectors_go_pending() {
        let (host, m) = msix(2);
        assert_eq!(m.trigger(0), MsixDelivery::Disabled);
        program(&m, 0);
        program(&m, 1);
        m.set_control(MSIX_ENABLE);
        assert_eq!(m.trigger(0), MsixDelivery::Pending, "entries start masked");
        assert!(!fired(&m, 0));
        assert_eq!(pba(&m), 1);
        assert!(m.is_pending(0));
        assert_eq!(m.trigger(7), MsixDelivery::NoVector);
        // Unmasking delivers the pending message after setting its route.
        w32(&m, 12, 0);
        assert!(fired(&m, 0));
        assert_eq!(pba(&m), 0);
        assert_eq!(
            host.events(),
            [HostEvent::MsiRoute {
                gsi: 24,
                msg: Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x40
                })
            }]
        );
        assert_eq!(m.trigger(0), MsixDelivery::Sent);
        assert!(fired(&m, 0));
        assert_eq!(
            host.events().len(),
            1,
            "an unchanged route is not set again"
        );
        assert_eq!(m.trigger(1), MsixDelivery::Pending);
        assert_eq!(pba(&m), 2);
    }

    #[test]
    fn function_mask_holds_every_vector_and_releases_them() {
        let (host, m) = msix(2);
        program(&m, 0);
        program(&m, 1);
        w32(&m, 12, 0);
        w32(&m, 28, 0);
        m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(host.events().is_empty());
        assert_eq!(m.trigger(0), MsixDelivery::Pending);
        assert_eq!(m.trigger(1), MsixDelivery::Pending);
        assert_eq!(pba(&m), 3);
        m.set_control(MSIX_ENABLE);
        assert!(fired(&m, 0) && fired(&m, 1));
        assert_eq!(pba(&m), 0);
        assert_eq!(host.events().len(), 2);
        // Disabling withdraws the routes; messages then fall back.
        m.set_control(0);
        assert_eq!(m.trigger(0), MsixDelivery::Disabled);
        let ev = host.events();
        assert_eq!(
            ev[2..],
            [
                HostEvent::MsiRoute { gsi: 24, msg: None },
                HostEvent::MsiRoute { gsi: 25, msg: None }
            ]
        );
        // A message changed while the vector is live is routed at once.
        m.set_control(MSIX_ENABLE);
        w32(&m, 8, 0x99);
        assert_eq!(
            host.events().last(),
            Some(&HostEvent::MsiRoute {
                gsi: 24,
                msg: Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x99
                })
            })
        );
    }

    #[test]
    fn a_failing_host_does_not_lose_the_message() {
        let (host, m) = msix(1);
        program(&m, 0);
        w32(&m, 12, 0);
        host.fail_routes(true);
        m.set_control(MSIX_ENABLE);
        assert_eq!(m.trigger(0), MsixDelivery::Sent);
        assert!(fired(&m, 0));
        assert!(host.events().is_empty());
        host.fail_routes(false);
        assert_eq!(m.trigger(0), MsixDelivery::Sent);
        assert!(
            host.events().is_empty(),
            "no host calls when a message is raised"
        );
        w32(&m, 8, 0x40);
        assert_eq!(
            host.events().len(),
            1,
            "the next entry write sets the route"
        );
    }
}
