//! Frames of the `netbench` check, without allocation: the 12-byte `virtio_net_hdr_v1`
//! (encoded and decoded), the headers of a benchmark frame (Ethernet, IPv4, TCP to
//! [`BENCH_PORT`]) whose payload is a fixed pattern ([`payload_byte`]), so that a 64 KiB frame
//! is written straight into device memory and its checksum computed without a copy, the end
//! marker the host sends after its frames, and the classification of what arrives. Pure code,
//! unit-tested on the host.
//!
//! A benchmark frame: Ethernet (EtherType IPv4), IPv4 (20 bytes, DF, TTL 64, header
//! checksum), TCP (20 bytes, ACK|PSH, from port [`BENCH_PORT`] - 1 to [`BENCH_PORT`]), then the
//! payload. The TCP checksum is complete, or, for a frame the device is to segment (TSO,
//! [`tso_header`]), the folded pseudo-header sum over the whole TCP length that Linux expects
//! with VIRTIO_NET_HDR_F_NEEDS_CSUM. A TSO frame is [`TSO_SEGMENTS`] segments of
//! [`TSO_MSS`] bytes: [`TSO_FRAME_LEN`] bytes, what Linux sends at a 64 KiB GSO limit.

use super::{Ip, Mac, ETH_HEADER};

/// Length of `virtio_net_hdr_v1` (with num_buffers), the header of every frame with
/// VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Header flag: the checksum at csum_start + csum_offset is to be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// gso_type: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// gso_type: TCP over IPv4, to be segmented.
pub const GSO_TCPV4: u8 = 1;
/// The TCP destination port of benchmark frames (the source port is one less).
pub const BENCH_PORT: u16 = 5201;
/// The EtherType of the end marker (IEEE local experimental).
pub const END_ETHERTYPE: u16 = 0x88b5;
/// The payload that starts an end marker.
pub const END_MAGIC: &[u8] = b"cgvm-netbench-end";
/// Ethernet, IPv4 and TCP headers of a benchmark frame.
pub const HEADERS_LEN: usize = ETH_HEADER + IPV4_LEN + TCP_LEN;
/// The smallest benchmark frame (without FCS; the 64-byte frames of the benchmark are longer).
pub const MIN_FRAME: usize = 60;
/// The largest benchmark frame that is not segmented (a 1500-byte MTU).
pub const MAX_FRAME: usize = 1514;
/// The TCP segment size of a TSO frame.
pub const TSO_MSS: u16 = 1448;
/// Segments in a TSO frame.
pub const TSO_SEGMENTS: usize = 45;
/// The length of a TSO frame: headers and 45 segments of 1448 bytes (65214 bytes).
pub const TSO_FRAME_LEN: usize = HEADERS_LEN + TSO_SEGMENTS * TSO_MSS as usize;

/// The guest's address in benchmark frames.
pub const GUEST_IP: Ip = Ip([10, 0, 2, 15]);
/// The host's address in benchmark frames.
pub const HOST_IP: Ip = Ip([10, 0, 2, 2]);
/// The Ethernet destination of the frames the guest sends: a locally administered address
/// that no host interface has, so that the host's stack drops them at once (after its packet
/// taps saw them).
pub const SINK_MAC: Mac = Mac([0x02, 0x00, 0x00, 0x00, 0x00, 0xfe]);
/// The guest's MAC when the device offers none.
pub const DEFAULT_MAC: Mac = Mac([0x02, 0x00, 0x00, 0x00, 0x00, 0x0f]);

const IPV4_LEN: usize = 20;
const TCP_LEN: usize = 20;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
/// TCP flags ACK | PSH.
const TCP_ACK_PSH: u8 = 0x18;

/// `struct virtio_net_hdr_v1` (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// [`F_NEEDS_CSUM`], [`F_DATA_VALID`].
    pub flags: u8,
    /// [`GSO_NONE`], [`GSO_TCPV4`], ... (bit 7: ECN).
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes of each segment.
    pub gso_size: u16,
    /// Where the checksum starts.
    pub csum_start: u16,
    /// Where the checksum goes, from csum_start.
    pub csum_offset: u16,
    /// Receive buffers the frame spans (with VIRTIO_NET_F_MRG_RXBUF; 0 on transmit).
    pub num_buffers: u16,
}

impl VnetHdr {
    /// The 12 wire bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Decodes the first 12 bytes of `b` (`None` if shorter).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }

    /// Whether it announces a GSO frame (any type).
    pub fn is_gso(&self) -> bool {
        self.gso_type & 0x7f != GSO_NONE
    }
}

/// The header of a TSO frame from [`frame_headers`] (with `partial`): segment TCP over IPv4
/// at `mss` bytes, complete the TCP checksum.
pub fn tso_header(mss: u16) -> VnetHdr {
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: HEADERS_LEN as u16,
        gso_size: mss,
        csum_start: (ETH_HEADER + IPV4_LEN) as u16,
        csum_offset: 16,
        num_buffers: 0,
    }
}

/// Who a benchmark frame is from and to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// Ethernet source.
    pub src_mac: Mac,
    /// Ethernet destination.
    pub dst_mac: Mac,
    /// IPv4 source.
    pub src_ip: Ip,
    /// IPv4 destination.
    pub dst_ip: Ip,
}

/// The payload byte at `i` (from the start of the TCP payload): a pattern that is not all
/// zeros and not periodic at small powers of two.
pub fn payload_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(7) ^ ((i >> 8) as u8) ^ 0x5a
}

/// Adds big-endian 16-bit words of `b` to `sum` (an odd length ends with a zero-padded word).
fn add_words(mut sum: u64, b: &[u8]) -> u64 {
    for pair in b.chunks(2) {
        sum += u64::from(pair[0]) << 8 | pair.get(1).copied().map_or(0, u64::from);
    }
    sum
}

/// Folds a sum of 16-bit words into 16 bits (one's complement addition).
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The sum of the payload's 16-bit words ([`payload_byte`] 0..len), without the bytes.
fn payload_sum(len: usize) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < len {
        sum += u64::from(payload_byte(i)) << 8 | u64::from(payload_byte(i + 1));
        i += 2;
    }
    if i < len {
        sum += u64::from(payload_byte(i)) << 8;
    }
    sum
}

/// Writes the headers of a benchmark frame of `frame_len` bytes (the payload, bytes
/// [`HEADERS_LEN`].., being [`payload_byte`]s) with TCP sequence number `seq` into `out`.
/// `partial`: the TCP checksum field holds the folded pseudo-header sum (for
/// [`F_NEEDS_CSUM`]), else the complete checksum. `None` when `frame_len` is below
/// [`MIN_FRAME`] or its IPv4 length would pass 65535.
pub fn frame_headers(
    out: &mut [u8; HEADERS_LEN],
    frame_len: usize,
    e: &Endpoints,
    seq: u32,
    partial: bool,
) -> Option<()> {
    if frame_len < MIN_FRAME {
        return None;
    }
    let ip_len = u16::try_from(frame_len - ETH_HEADER).ok()?;
    let tcp_len = ip_len - IPV4_LEN as u16;
    out.fill(0);
    out[0..6].copy_from_slice(&e.dst_mac.0);
    out[6..12].copy_from_slice(&e.src_mac.0);
    out[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    {
        let ip = &mut out[ETH_HEADER..ETH_HEADER + IPV4_LEN];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&e.src_ip.0);
        ip[16..20].copy_from_slice(&e.dst_ip.0);
        let sum = !fold(add_words(0, ip));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let tcp = &mut out[ETH_HEADER + IPV4_LEN..];
    tcp[0..2].copy_from_slice(&(BENCH_PORT - 1).to_be_bytes());
    tcp[2..4].copy_from_slice(&BENCH_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = (TCP_LEN as u8 / 4) << 4;
    tcp[13] = TCP_ACK_PSH;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let mut pseudo = add_words(0, &e.src_ip.0);
    pseudo = add_words(pseudo, &e.dst_ip.0);
    pseudo += u64::from(IPPROTO_TCP) + u64::from(tcp_len);
    let check = if partial {
        fold(pseudo)
    } else {
        let payload = usize::from(tcp_len) - TCP_LEN;
        !fold(add_words(pseudo, tcp) + payload_sum(payload))
    };
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    Some(())
}

/// Length of the end marker [`end_marker`] builds.
#[cfg(test)]
pub const END_MARKER_LEN: usize = MIN_FRAME;

/// Builds the end marker from `src` to `dst` into `out`: EtherType [`END_ETHERTYPE`], payload
/// [`END_MAGIC`], zero-padded to 60 bytes. `None` when `out` is too small. (The host sends
/// it: `benches/net.rs` builds the same frame; the guest only recognises it.)
#[cfg(test)]
pub fn end_marker(out: &mut [u8], dst: Mac, src: Mac) -> Option<usize> {
    let out = out.get_mut(..END_MARKER_LEN)?;
    out.fill(0);
    out[0..6].copy_from_slice(&dst.0);
    out[6..12].copy_from_slice(&src.0);
    out[12..14].copy_from_slice(&END_ETHERTYPE.to_be_bytes());
    out[ETH_HEADER..ETH_HEADER + END_MAGIC.len()].copy_from_slice(END_MAGIC);
    Some(END_MARKER_LEN)
}

/// What a received frame is to the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A benchmark frame: IPv4, TCP, to [`BENCH_PORT`].
    Bench,
    /// The end marker.
    End,
    /// Anything else (the host's own traffic): not counted.
    Other,
}

/// Classifies a frame by its first bytes `head` (at least [`HEADERS_LEN`] of them when the
/// frame has as many).
pub fn classify(head: &[u8]) -> Kind {
    let be16 = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    match be16(12) {
        Some(END_ETHERTYPE)
            if head.get(ETH_HEADER..ETH_HEADER + END_MAGIC.len()) == Some(END_MAGIC) =>
        {
            Kind::End
        }
        Some(ETHERTYPE_IPV4) => {
            let Some(&vhl) = head.get(ETH_HEADER) else {
                return Kind::Other;
            };
            let ihl = usize::from(vhl & 0xf) * 4;
            let tcp = ETH_HEADER + ihl;
            let is_tcp = head.get(ETH_HEADER + 9) == Some(&IPPROTO_TCP);
            if vhl >> 4 == 4 && ihl >= IPV4_LEN && is_tcp && be16(tcp + 2) == Some(BENCH_PORT) {
                Kind::Bench
            } else {
                Kind::Other
            }
        }
        _ => Kind::Other,
    }
}

/// Why a used receive buffer cannot be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TallyError {
    /// The first buffer of a frame holds less than the virtio-net header.
    Short(u32),
    /// num_buffers is 0 (with VIRTIO_NET_F_MRG_RXBUF).
    NumBuffers(u16),
}

/// What the receive side counted: frames put together from the used buffers (one each, or
/// num_buffers of them with VIRTIO_NET_F_MRG_RXBUF), by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxTally {
    mergeable: bool,
    /// Benchmark frames.
    pub frames: u64,
    /// Their bytes (Ethernet frames, without the virtio-net header).
    pub bytes: u64,
    /// Benchmark frames whose header announced GSO.
    pub gso: u64,
    /// Benchmark frames that spanned more than one buffer.
    pub merged: u64,
    /// The longest benchmark frame.
    pub max_frame: u64,
    /// Frames of other kinds (not the end marker).
    pub other: u64,
    /// Buffers of the current frame still to come.
    rest: u16,
    /// The current frame: its kind, bytes so far, GSO, buffers.
    kind: Option<Kind>,
    len: u64,
    is_gso: bool,
    buffers: u16,
}

impl RxTally {
    /// An empty tally; `mergeable`: VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub fn new(mergeable: bool) -> Self {
        Self {
            mergeable,
            ..Self::default()
        }
    }

    /// Whether the next used buffer continues a frame (else it starts one, with a header).
    pub fn in_frame(&self) -> bool {
        self.rest > 0
    }

    /// The first buffer of a frame: its header, the kind of the frame (from its first bytes)
    /// and the used length (header included). The frame's kind when this buffer completes it.
    pub fn first(
        &mut self,
        hdr: &VnetHdr,
        kind: Kind,
        used_len: u32,
    ) -> Result<Option<Kind>, TallyError> {
        if (used_len as usize) < VNET_HDR_LEN {
            return Err(TallyError::Short(used_len));
        }
        let buffers = if self.mergeable { hdr.num_buffers } else { 1 };
        if buffers == 0 {
            return Err(TallyError::NumBuffers(0));
        }
        self.kind = Some(kind);
        self.len = u64::from(used_len) - VNET_HDR_LEN as u64;
        self.is_gso = hdr.is_gso();
        self.buffers = buffers;
        self.rest = buffers - 1;
        Ok((self.rest == 0).then(|| self.finish()))
    }

    /// A further buffer of the current frame (only while [`in_frame`](Self::in_frame)); the
    /// frame's kind when this buffer completes it.
    pub fn more(&mut self, used_len: u32) -> Option<Kind> {
        if self.rest == 0 {
            return None;
        }
        self.len += u64::from(used_len);
        self.rest -= 1;
        (self.rest == 0).then(|| self.finish())
    }

    fn finish(&mut self) -> Kind {
        let kind = self.kind.take().unwrap_or(Kind::Other);
        match kind {
            Kind::Bench => {
                self.frames += 1;
                self.bytes += self.len;
                self.gso += u64::from(self.is_gso);
                self.merged += u64::from(self.buffers > 1);
                self.max_frame = self.max_frame.max(self.len);
            }
            Kind::Other => self.other += 1,
            Kind::End => {}
        }
        kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    const E: Endpoints = Endpoints {
        src_mac: Mac([0x02, 0, 0, 0, 0, 0x01]),
        dst_mac: Mac([0x02, 0, 0, 0, 0, 0x02]),
        src_ip: Ip([10, 0, 2, 15]),
        dst_ip: Ip([10, 0, 2, 2]),
    };

    /// The whole frame: headers and the payload pattern.
    fn frame(len: usize, partial: bool) -> Vec<u8> {
        let mut h = [0u8; HEADERS_LEN];
        frame_headers(&mut h, len, &E, 1000, partial).unwrap();
        let mut f = h.to_vec();
        f.extend((0..len - HEADERS_LEN).map(payload_byte));
        f
    }

    /// The TCP checksum verifies: the sum over the pseudo-header and the segment is 0xffff.
    fn tcp_sum(f: &[u8]) -> u16 {
        let seg = &f[HEADERS_LEN - TCP_LEN..];
        let mut sum = add_words(0, &f[26..34]);
        sum += u64::from(IPPROTO_TCP) + seg.len() as u64;
        fold(add_words(sum, seg))
    }

    #[test]
    fn vnet_header_codec() {
        let h = tso_header(TSO_MSS);
        let b = h.encode();
        assert_eq!(b, [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0]);
        assert_eq!(VnetHdr::decode(&b), Some(h));
        assert!(h.is_gso());
        let mut longer = b.to_vec();
        longer.push(9);
        assert_eq!(VnetHdr::decode(&longer), Some(h));
        assert_eq!(VnetHdr::decode(&b[..11]), None);
        let plain = VnetHdr {
            num_buffers: 3,
            ..VnetHdr::default()
        };
        assert_eq!(
            VnetHdr::decode(&plain.encode()).map(|h| h.num_buffers),
            Some(3)
        );
        assert!(!plain.is_gso());
        // ECN alone is not a GSO type.
        let ecn = VnetHdr {
            gso_type: 0x80,
            ..VnetHdr::default()
        };
        assert!(!ecn.is_gso());
    }

    #[test]
    fn frames_are_valid_ipv4_tcp() {
        for len in [60, 64, 65, 1514] {
            let f = frame(len, false);
            assert_eq!(f.len(), len);
            assert_eq!(&f[12..14], &[0x08, 0x00]);
            // IPv4 header checksum and total length.
            assert_eq!(fold(add_words(0, &f[14..34])), 0xffff, "{len}");
            assert_eq!(usize::from(u16::from_be_bytes([f[16], f[17]])), len - 14);
            assert_eq!(&f[36..38], &BENCH_PORT.to_be_bytes());
            assert_eq!(tcp_sum(&f), 0xffff, "{len}");
            assert_eq!(classify(&f), Kind::Bench);
            assert_eq!(classify(&f[..HEADERS_LEN]), Kind::Bench);
        }
        assert_eq!(TSO_FRAME_LEN, 65214);
        let f = frame(TSO_FRAME_LEN, false);
        assert_eq!(tcp_sum(&f), 0xffff);
    }

    #[test]
    fn partial_checksum_is_the_pseudo_header_sum() {
        let f = frame(TSO_FRAME_LEN, true);
        // What the device (or the host's kernel) does with NEEDS_CSUM: the sum from
        // csum_start to the end, the field included as it is, complemented, at csum_offset.
        let h = tso_header(TSO_MSS);
        let start = usize::from(h.csum_start);
        let at = start + usize::from(h.csum_offset);
        let mut done = f.clone();
        let sum = !fold(add_words(0, &f[start..]));
        done[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(tcp_sum(&done), 0xffff);
        assert_eq!(done, frame(TSO_FRAME_LEN, false));
        assert_eq!(usize::from(h.hdr_len), HEADERS_LEN);
    }

    #[test]
    fn bad_lengths() {
        let mut h = [0u8; HEADERS_LEN];
        assert_eq!(frame_headers(&mut h, 59, &E, 0, false), None);
        assert_eq!(frame_headers(&mut h, 14 + 65535, &E, 0, false), Some(()));
        assert_eq!(frame_headers(&mut h, 14 + 65536, &E, 0, true), None);
    }

    #[test]
    fn classification() {
        let mut m = [0xeeu8; 80];
        assert_eq!(end_marker(&mut m[..59], E.dst_mac, E.src_mac), None);
        assert_eq!(end_marker(&mut m, E.dst_mac, E.src_mac), Some(60));
        assert_eq!(classify(&m[..60]), Kind::End);
        assert_eq!(&m[..6], &E.dst_mac.0);
        // Cut short, or another magic: not the marker.
        assert_eq!(classify(&m[..20]), Kind::Other);
        m[20] ^= 1;
        assert_eq!(classify(&m[..60]), Kind::Other);
        // Another port, UDP, IPv6, a bad IHL, short frames.
        let f = frame(64, false);
        let mut g = f.clone();
        g[37] ^= 1;
        assert_eq!(classify(&g), Kind::Other);
        let mut g = f.clone();
        g[23] = 17;
        assert_eq!(classify(&g), Kind::Other);
        let mut g = f.clone();
        g[14] = 0x65;
        assert_eq!(classify(&g), Kind::Other);
        let mut g = f.clone();
        g[14] = 0x44;
        assert_eq!(classify(&g), Kind::Other);
        for n in 0..38 {
            assert_eq!(classify(&f[..n]), Kind::Other, "{n}");
        }
        assert_eq!(classify(&vec![0u8; 100]), Kind::Other);
    }

    #[test]
    fn payload_is_not_trivial() {
        let p: Vec<u8> = (0..4096).map(payload_byte).collect();
        assert!(p.iter().any(|&b| b != p[0]));
        assert_ne!(&p[..256], &p[256..512]);
        assert_eq!(payload_sum(5), add_words(0, &p[..5]));
        assert_eq!(payload_sum(4096), add_words(0, &p));
    }
    #[test]
    fn tally_of_single_and_merged_buffers() {
        let plain = VnetHdr {
            num_buffers: 1,
            ..VnetHdr::default()
        };
        let mut t = RxTally::new(true);
        assert!(!t.in_frame());
        assert_eq!(t.first(&plain, Kind::Bench, 12 + 64), Ok(Some(Kind::Bench)));
        assert_eq!(t.first(&plain, Kind::Other, 12 + 90), Ok(Some(Kind::Other)));
        // A TSO frame over three buffers.
        let gso = VnetHdr {
            num_buffers: 3,
            ..tso_header(TSO_MSS)
        };
        assert_eq!(t.first(&gso, Kind::Bench, 30_000), Ok(None));
        assert!(t.in_frame());
        assert_eq!(t.more(30_000), None);
        assert_eq!(t.more(5_226), Some(Kind::Bench));
        assert!(!t.in_frame());
        assert_eq!(t.more(100), None);
        assert_eq!(t.first(&plain, Kind::End, 12 + 60), Ok(Some(Kind::End)));
        assert_eq!(
            (t.frames, t.bytes, t.gso, t.merged, t.max_frame, t.other),
            (2, 64 + 65_214, 1, 1, 65_214, 1)
        );
        // Broken buffers.
        assert_eq!(t.first(&plain, Kind::Bench, 11), Err(TallyError::Short(11)));
        let zero = VnetHdr::default();
        assert_eq!(
            t.first(&zero, Kind::Bench, 100),
            Err(TallyError::NumBuffers(0))
        );
        // Without MRG_RXBUF, num_buffers is not looked at.
        let mut t = RxTally::new(false);
        assert_eq!(t.first(&zero, Kind::Bench, 112), Ok(Some(Kind::Bench)));
        assert_eq!((t.frames, t.bytes, t.merged), (1, 100, 0));
    }
}
