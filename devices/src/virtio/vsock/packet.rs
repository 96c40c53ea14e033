//! The virtio-vsock packet: a 44-byte little-endian header (`struct virtio_vsock_hdr`,
//! virtio 1.2, 5.10.6) followed by `len` bytes of data, read from the guest's tx chains and
//! written into its rx chains. Everything in a tx chain is guest-controlled and checked here:
//! the direction of every descriptor, the header's length, the data length (against the
//! chain and against [`MAX_DATA_LEN`]), the socket type, the op and both CIDs.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// The host's CID: where every guest packet must go and every device packet comes from.
pub const HOST_CID: u64 = 2;
/// Socket type: stream (the only one supported).
pub const TYPE_STREAM: u16 = 1;
/// The most data one packet may carry, in either direction.
pub const MAX_DATA_LEN: u32 = 64 * 1024;
/// Shutdown flag: the sender will receive nothing more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send nothing more.
pub const SHUTDOWN_SEND: u32 = 2;

/// The operation of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset (refused, aborted or closed).
    Rst = 3,
    /// The sender stops receiving and/or sending (flags).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's buffer space and forwarded count, unasked.
    CreditUpdate = 6,
    /// The sender asks for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The op of a raw value; `None` for an unknown one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Bytes of data after the header.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`Op`] as a number).
    pub op: u16,
    /// Op-specific flags (shutdown: [`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
    pub flags: u32,
    /// The sender's receive buffer space for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far (wrapping).
    pub fwd_cnt: u32,
}

fn array<const N: usize>(b: &[u8; HDR_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = b[at + i];
    }
    out
}

impl Header {
    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Header {
            src_cid: u64::from_le_bytes(array(b, 0)),
            dst_cid: u64::from_le_bytes(array(b, 8)),
            src_port: u32::from_le_bytes(array(b, 16)),
            dst_port: u32::from_le_bytes(array(b, 20)),
            len: u32::from_le_bytes(array(b, 24)),
            type_: u16::from_le_bytes(array(b, 28)),
            op: u16::from_le_bytes(array(b, 30)),
            flags: u32::from_le_bytes(array(b, 32)),
            buf_alloc: u32::from_le_bytes(array(b, 36)),
            fwd_cnt: u32::from_le_bytes(array(b, 40)),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain does not hold a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// A tx chain has a device-writable descriptor.
    #[error("a device-writable descriptor in a tx chain")]
    WritableInTx,
    /// An rx chain has a device-readable descriptor.
    #[error("a device-readable descriptor in an rx chain")]
    ReadableInRx,
    /// The chain is shorter than a header.
    #[error("a packet of {0} bytes is shorter than its {HDR_LEN}-byte header")]
    ShortHeader(u64),
    /// The header announces more data than a packet may carry.
    #[error("a data length of {0} bytes is over the {MAX_DATA_LEN}-byte limit")]
    TooLong(u32),
    /// The header announces more data than the chain holds.
    #[error("a data length of {len} bytes, but the chain holds {have}")]
    MissingData {
        /// The announced length.
        len: u32,
        /// Bytes after the header in the chain.
        have: u64,
    },
    /// A descriptor lies outside guest memory.
    #[error("a descriptor outside guest memory")]
    Memory,
    /// Not a stream packet.
    #[error("socket type {0} is not supported")]
    BadType(u16),
    /// An unknown op.
    #[error("unknown op {0}")]
    BadOp(u16),
    /// The source is not the guest.
    #[error("source CID {0} is not the guest's")]
    BadSrcCid(u64),
    /// The destination is not the host.
    #[error("destination CID {0} is not the host's")]
    BadDstCid(u64),
    /// An rx chain too small for the packet.
    #[error("an rx buffer of {have} bytes for a packet of {need}")]
    RxTooSmall {
        /// Bytes the packet needs.
        need: u64,
        /// Device-writable bytes in the chain.
        have: u64,
    },
}

/// A checked packet from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// Its header (`len` equals `data.len()`).
    pub hdr: Header,
    /// Its op.
    pub op: Op,
    /// Its data.
    pub data: Vec<u8>,
}

/// The descriptors of a chain as (address, length), all in one direction.
fn segments(
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
) -> Result<(Vec<(GuestAddress, u32)>, u64), PacketError> {
    let mut segs = Vec::new();
    let mut total = 0u64;
    for d in chain {
        if d.is_write_only() != writable {
            return Err(if writable {
                PacketError::ReadableInRx
            } else {
                PacketError::WritableInTx
            });
        }
        total += u64::from(d.len());
        segs.push((d.addr(), d.len()));
    }
    Ok((segs, total))
}

/// Copies between guest memory and `buf`, starting `offset` bytes into the chain `segs`.
fn copy(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, u32)],
    mut offset: u64,
    buf: &mut [u8],
    to_guest: bool,
) -> Result<(), PacketError> {
    let mut done = 0usize;
    for &(addr, len) in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(buf.len() - done);
        let at = addr.checked_add(offset).ok_or(PacketError::Memory)?;
        let part = &mut buf[done..done + n];
        let r = if to_guest {
            mem.write_slice(part, at)
        } else {
            mem.read_slice(part, at)
        };
        r.map_err(|_| PacketError::Memory)?;
        done += n;
        offset = 0;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(PacketError::Memory)
    }
}

/// Reads and checks the packet of a tx chain from the guest whose CID is `guest_cid`.
/// Bytes in the chain after the announced data are ignored.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    guest_cid: u64,
) -> Result<TxPacket, PacketError> {
    let (segs, total) = segments(chain, false)?;
    if total < HDR_LEN as u64 {
        return Err(PacketError::ShortHeader(total));
    }
    let mut raw = [0u8; HDR_LEN];
    copy(mem, &segs, 0, &mut raw, false)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len > MAX_DATA_LEN {
        return Err(PacketError::TooLong(hdr.len));
    }
    let have = total - HDR_LEN as u64;
    if u64::from(hdr.len) > have {
        return Err(PacketError::MissingData { len: hdr.len, have });
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(PacketError::BadType(hdr.type_));
    }
    let op = Op::from_u16(hdr.op).ok_or(PacketError::BadOp(hdr.op))?;
    if hdr.src_cid != guest_cid {
        return Err(PacketError::BadSrcCid(hdr.src_cid));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(PacketError::BadDstCid(hdr.dst_cid));
    }
    let mut data = vec![0u8; hdr.len as usize];
    copy(mem, &segs, HDR_LEN as u64, &mut data, false)?;
    Ok(TxPacket { hdr, op, data })
}

/// The device-writable bytes of an rx chain (whose descriptors must all be writable).
pub fn rx_capacity(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<u64, PacketError> {
    segments(chain.clone(), true).map(|(_, total)| total)
}

/// Writes `hdr` (whose `len` is set to `data.len()`) and `data` into an rx chain; returns
/// the bytes written.
pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    hdr: &Header,
    data: &[u8],
) -> Result<u32, PacketError> {
    let (segs, total) = segments(chain, true)?;
    let need = (HDR_LEN + data.len()) as u64;
    if data.len() > MAX_DATA_LEN as usize || need > total {
        return Err(PacketError::RxTooSmall { need, have: total });
    }
    let mut hdr = *hdr;
    hdr.len = data.len() as u32;
    let mut raw = hdr.to_bytes();
    copy(mem, &segs, 0, &mut raw, true)?;
    let mut data = data.to_vec();
    copy(mem, &segs, HDR_LEN as u64, &mut data, true)?;
    Ok(need as u32)
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;

    use super::*;
    use crate::virtio::vsock::test_util::{Desc, Driver, GUEST_CID};

    fn stream_hdr(op: Op, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 80,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    /// Posts `descs` and reads the chain back as a tx packet.
    fn tx(drv: &mut Driver, descs: &[Desc]) -> Result<TxPacket, PacketError> {
        drv.add_chain(descs);
        let mem = drv.mem.clone();
        let chain = drv
            .queue
            .pop_descriptor_chain(&mem)
            .expect("a chain was posted");
        read_tx(&mem, chain, GUEST_CID)
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = stream_hdr(Op::Rw, 5);
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &GUEST_CID.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(Op::from_u16(0), None);
        assert_eq!(Op::from_u16(8), None);
        assert_eq!(Op::from_u16(7), Some(Op::CreditRequest));
    }

    #[test]
    fn a_packet_split_anywhere_is_read_whole() {
        let mut drv = Driver::new();
        let mut bytes = stream_hdr(Op::Rw, 10).to_bytes().to_vec();
        bytes.extend_from_slice(b"0123456789");
        // Header split 20/24, data in a third descriptor, plus trailing bytes ignored.
        let a = drv.put(&bytes[..20]);
        let b = drv.put(&bytes[20..50]);
        let c = drv.put(&[&bytes[50..], b"trailing"].concat());
        let p = tx(&mut drv, &[(a, 20, false), (b, 30, false), (c, 12, false)]).unwrap();
        assert_eq!(p.op, Op::Rw);
        assert_eq!(p.data, b"0123456789");
        // Header alone, no data.
        let h = drv.put(&stream_hdr(Op::Request, 0).to_bytes());
        let p = tx(&mut drv, &[(h, 44, false)]).unwrap();
        assert_eq!((p.op, p.data.len()), (Op::Request, 0));
    }

    #[test]
    fn hostile_tx_chains_are_refused() {
        let mut drv = Driver::new();
        let put_hdr = |drv: &mut Driver, h: Header| drv.put(&h.to_bytes());
        // Short header: 43 bytes, and an empty chain descriptor.
        let h = put_hdr(&mut drv, stream_hdr(Op::Rw, 0));
        assert_eq!(
            tx(&mut drv, &[(h, 43, false)]),
            Err(PacketError::ShortHeader(43))
        );
        assert_eq!(
            tx(&mut drv, &[(h, 0, false)]),
            Err(PacketError::ShortHeader(0))
        );
        // A device-writable descriptor, before or after the header.
        assert_eq!(
            tx(&mut drv, &[(h, 44, true)]),
            Err(PacketError::WritableInTx)
        );
        let d = drv.alloc(16);
        assert_eq!(
            tx(&mut drv, &[(h, 44, false), (d, 16, true)]),
            Err(PacketError::WritableInTx)
        );
        // len over the limit, and len past the chain's end.
        let h = put_hdr(&mut drv, stream_hdr(Op::Rw, MAX_DATA_LEN + 1));
        let big = drv.alloc(u64::from(MAX_DATA_LEN) + 1);
        assert_eq!(
            tx(&mut drv, &[(h, 44, false), (big, MAX_DATA_LEN + 1, false)]),
            Err(PacketError::TooLong(MAX_DATA_LEN + 1))
        );
        let h = put_hdr(&mut drv, stream_hdr(Op::Rw, 100));
        assert_eq!(
            tx(&mut drv, &[(h, 44, false), (d, 16, false)]),
            Err(PacketError::MissingData { len: 100, have: 16 })
        );
        let h = put_hdr(
            &mut drv,
            Header {
                len: u32::MAX,
                ..stream_hdr(Op::Rw, 0)
            },
        );
        assert_eq!(
            tx(&mut drv, &[(h, 44, false)]),
            Err(PacketError::TooLong(u32::MAX))
        );
        // Wrong type, unknown ops, wrong CIDs.
        let h = put_hdr(
            &mut drv,
            Header {
                type_: 2,
                ..stream_hdr(Op::Rw, 0)
            },
        );
        assert_eq!(
            tx(&mut drv, &[(h, 44, false)]),
            Err(PacketError::BadType(2))
        );
        for op in [0u16, 8, 0xffff] {
            let h = put_hdr(
                &mut drv,
                Header {
                    op,
                    ..stream_hdr(Op::Rw, 0)
                },
            );
            assert_eq!(tx(&mut drv, &[(h, 44, false)]), Err(PacketError::BadOp(op)));
        }
        for cid in [0u64, 1, HOST_CID, GUEST_CID + 1, u64::MAX] {
            let h = put_hdr(
                &mut drv,
                Header {
                    src_cid: cid,
                    ..stream_hdr(Op::Rw, 0)
                },
            );
            assert_eq!(
                tx(&mut drv, &[(h, 44, false)]),
                Err(PacketError::BadSrcCid(cid))
            );
        }
        for cid in [0u64, 1, GUEST_CID, u64::MAX] {
            let h = put_hdr(
                &mut drv,
                Header {
                    dst_cid: cid,
                    ..stream_hdr(Op::Rw, 0)
                },
            );
            assert_eq!(
                tx(&mut drv, &[(h, 44, false)]),
                Err(PacketError::BadDstCid(cid))
            );
        }
        // Descriptors outside guest memory, and one that wraps the address space.
        let far = GuestAddress(1 << 40);
        assert_eq!(tx(&mut drv, &[(far, 44, false)]), Err(PacketError::Memory));
        let h = put_hdr(&mut drv, stream_hdr(Op::Rw, 8));
        assert_eq!(
            tx(
                &mut drv,
                &[(h, 44, false), (GuestAddress(u64::MAX - 3), 8, false)]
            ),
            Err(PacketError::Memory)
        );
    }

    #[test]
    fn rx_chains_are_checked_and_filled() {
        let mut drv = Driver::new();
        let mem = drv.mem.clone();
        let a = drv.alloc(30);
        let b = drv.alloc(30);
        drv.add_chain(&[(a, 30, true), (b, 30, true)]);
        let chain = drv.queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(rx_capacity(&chain), Ok(60));
        let h = Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            ..stream_hdr(Op::Rw, 0)
        };
        assert_eq!(write_rx(&mem, chain, &h, b"hello"), Ok(49));
        let got = [drv.get(a, 30), drv.get(b, 30)].concat();
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&got[..HDR_LEN]);
        assert_eq!(Header::from_bytes(&raw), Header { len: 5, ..h });
        assert_eq!(&got[HDR_LEN..49], b"hello");
        // Too small, and a readable descriptor.
        drv.add_chain(&[(a, 40, true)]);
        let chain = drv.queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            write_rx(&mem, chain, &h, b"hello"),
            Err(PacketError::RxTooSmall { need: 49, have: 40 })
        );
        drv.add_chain(&[(a, 40, true), (b, 40, false)]);
        let chain = drv.queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(rx_capacity(&chain), Err(PacketError::ReadableInRx));
        assert_eq!(
            write_rx(&mem, chain, &h, b""),
            Err(PacketError::ReadableInRx)
        );
        // Outside guest memory.
        drv.add_chain(&[(GuestAddress(1 << 40), 100, true)]);
        let chain = drv.queue.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(write_rx(&mem, chain, &h, b"x"), Err(PacketError::Memory));
    }
}
