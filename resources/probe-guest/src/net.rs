//! Ethernet frames for the `net` check, without allocation: an ARP request and a DHCPDISCOVER
//! built into a caller's buffer, and the parsers that recognise their answers (an ARP reply
//! from the peer, a DHCPOFFER for our transaction id) among whatever else arrives. Pure code,
//! unit-tested on the host with hostile and short frames (`net/tests.rs`).
//!
//! A received frame is classified as [`Verdict::Reply`] (the answer), [`Verdict::Malformed`]
//! (it claims to be the answer but is broken: an ARP reply addressed to our MAC that is cut
//! short or has the wrong address sizes, a DHCP message for our xid without the magic cookie,
//! without a message type, or of another type than OFFER) or [`Verdict::Unrelated`]
//! (everything else: IPv6 router solicitations, other hosts' ARP, short junk).
//!
//! `bench`: the frames of the `netbench` check (the virtio-net header, benchmark frames, the
//! end marker).

use core::fmt;

pub mod bench;

/// Ethernet header length (no VLAN tag).
pub const ETH_HEADER: usize = 14;
/// Shortest Ethernet frame (without FCS); shorter frames are padded with zeros.
pub const ETH_MIN: usize = 60;
/// EtherType of IPv4.
const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
const ETHERTYPE_ARP: u16 = 0x0806;
/// An ARP packet for IPv4 over Ethernet.
const ARP_LEN: usize = 28;
/// ARP opcodes.
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
/// IP protocol number of UDP.
const IPPROTO_UDP: u8 = 17;
/// DHCP ports.
const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
/// BOOTP: the fixed part before the options' magic cookie.
const BOOTP_FIXED: usize = 236;
/// The DHCP magic cookie.
const DHCP_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// BOOTP messages are at least this long (RFC 1542); the DISCOVER is padded to it.
const BOOTP_MIN: usize = 300;
/// DHCP options.
const OPT_PAD: u8 = 0;
const OPT_END: u8 = 255;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAM_REQUEST: u8 = 55;
const OPT_CLIENT_ID: u8 = 61;
/// DHCP message types.
const DHCPDISCOVER: u8 = 1;
const DHCPOFFER: u8 = 2;

/// Length of the DHCPDISCOVER frame [`dhcp_discover`] builds.
pub const DHCP_DISCOVER_LEN: usize = ETH_HEADER + 20 + 8 + BOOTP_MIN;
/// Length of the ARP request frame [`arp_request`] builds (padded to [`ETH_MIN`]).
pub const ARP_REQUEST_LEN: usize = ETH_MIN;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ip(pub [u8; 4]);

impl Ip {
    /// Parses a dotted quad (`10.0.2.15`): four decimal parts of 0..=255, nothing else.
    pub fn parse(s: &[u8]) -> Option<Ip> {
        let mut out = [0u8; 4];
        let mut parts = s.split(|&b| b == b'.');
        for o in &mut out {
            let p = parts.next()?;
            if p.is_empty() || p.len() > 3 || !p.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let v = p.iter().fold(0u32, |a, &b| a * 10 + u32::from(b - b'0'));
            *o = u8::try_from(v).ok()?;
        }
        parts.next().is_none().then_some(Ip(out))
    }
}

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0;
        write!(f, "{}.{}.{}.{}", a[0], a[1], a[2], a[3])
    }
}

/// What a received frame is to the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The answer waited for.
    Reply(Answer),
    /// It claims to be the answer but is broken (why).
    Malformed(&'static str),
    /// Something else: ignored.
    Unrelated,
}

/// An answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An ARP reply: the peer's address and MAC.
    Arp {
        /// The peer's IPv4 address (the one asked for).
        ip: Ip,
        /// Its MAC.
        mac: Mac,
    },
    /// A DHCPOFFER.
    DhcpOffer {
        /// The address offered (yiaddr).
        offered: Ip,
        /// The server identifier (option 54), else the IP source address.
        server: Ip,
    },
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Arp { ip, mac } => write!(f, "arp reply: {ip} is at {mac}"),
            Answer::DhcpOffer { offered, server } => {
                write!(f, "dhcp offer {offered} from {server}")
            }
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn eth_header(out: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    out[0..6].copy_from_slice(&dst.0);
    out[6..12].copy_from_slice(&src.0);
    put16(out, 12, ethertype);
}

/// Builds a broadcast ARP request "who has `target`? tell `ip` (`mac`)" into `out`; returns its
/// length ([`ARP_REQUEST_LEN`]), or `None` when `out` is too small.
pub fn arp_request(out: &mut [u8], mac: Mac, ip: Ip, target: Ip) -> Option<usize> {
    let out = out.get_mut(..ARP_REQUEST_LEN)?;
    out.fill(0);
    eth_header(out, Mac::BROADCAST, mac, ETHERTYPE_ARP);
    let a = &mut out[ETH_HEADER..ETH_HEADER + ARP_LEN];
    put16(a, 0, 1); // Ethernet
    put16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, ARP_REQUEST);
    a[8..14].copy_from_slice(&mac.0);
    a[14..18].copy_from_slice(&ip.0);
    // Target hardware address unknown: zeros.
    a[24..28].copy_from_slice(&target.0);
    Some(ARP_REQUEST_LEN)
}

/// Classifies a received frame while waiting for the ARP reply of `peer` to `mac`/`ip`.
///
/// The reply: EtherType ARP, Ethernet/IPv4 with sizes 6 and 4, opcode 2, sender address
/// `peer`; its target, when not zero, must be us. An ARP frame sent to our MAC (not
/// broadcast) that is too short or has other sizes is malformed; other frames are unrelated.
pub fn classify_arp(frame: &[u8], mac: Mac, ip: Ip, peer: Ip) -> Verdict {
    if frame.len() < ETH_HEADER || be16(frame, 12) != ETHERTYPE_ARP {
        return Verdict::Unrelated;
    }
    let to_us = frame[0..6] == mac.0;
    let Some(a) = frame.get(ETH_HEADER..ETH_HEADER + ARP_LEN) else {
        return if to_us {
            Verdict::Malformed("ARP frame to our MAC cut short")
        } else {
            Verdict::Unrelated
        };
    };
    if be16(a, 0) != 1 || be16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
        return if to_us {
            Verdict::Malformed(
                "ARP frame to our MAC is not Ethernet/IPv4 (hardware/protocol type or sizes)",
            )
        } else {
            Verdict::Unrelated
        };
    }
    let sender_ip = Ip([a[14], a[15], a[16], a[17]]);
    if be16(a, 6) != ARP_REPLY || sender_ip != peer {
        return Verdict::Unrelated;
    }
    let target_mac = &a[18..24];
    let target_ip = &a[24..28];
    if target_ip != ip.0 || (target_mac != mac.0 && target_mac != [0; 6]) {
        // A reply to someone else (a gratuitous one, or for another guest).
        return Verdict::Unrelated;
    }
    let mut sender_mac = [0u8; 6];
    sender_mac.copy_from_slice(&a[8..14]);
    if sender_mac == [0; 6] || sender_mac[0] & 1 != 0 {
        return Verdict::Malformed("ARP reply from the peer gives a zero or multicast MAC");
    }
    Verdict::Reply(Answer::Arp {
        ip: peer,
        mac: Mac(sender_mac),
    })
}

/// The one's-complement sum of 16-bit words (the IPv4 header checksum when complemented).
fn ones_sum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in b.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).copied().map_or(0, u32::from);
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Builds a broadcast DHCPDISCOVER from `mac` with transaction id `xid` into `out` (UDP from
/// 0.0.0.0:68 to 255.255.255.255:67, the BROADCAST flag set, options: message type, client
/// identifier, parameter request list (subnet mask, router, DNS)); returns its length
/// ([`DHCP_DISCOVER_LEN`]), or `None` when `out` is too small.
pub fn dhcp_discover(out: &mut [u8], mac: Mac, xid: u32) -> Option<usize> {
    let out = out.get_mut(..DHCP_DISCOVER_LEN)?;
    out.fill(0);
    eth_header(out, Mac::BROADCAST, mac, ETHERTYPE_IPV4);
    let ip_len = DHCP_DISCOVER_LEN - ETH_HEADER;
    {
        let ip = &mut out[ETH_HEADER..ETH_HEADER + 20];
        ip[0] = 0x45;
        put16(ip, 2, ip_len as u16);
        ip[8] = 64; // TTL
        ip[9] = IPPROTO_UDP;
        ip[16..20].copy_from_slice(&[255; 4]);
        let sum = !ones_sum(ip);
        put16(ip, 10, sum);
    }
    let udp_at = ETH_HEADER + 20;
    {
        let udp = &mut out[udp_at..udp_at + 8];
        put16(udp, 0, DHCP_CLIENT_PORT);
        put16(udp, 2, DHCP_SERVER_PORT);
        put16(udp, 4, (ip_len - 20) as u16);
        // Checksum 0: none (allowed over IPv4).
    }
    let b = &mut out[udp_at + 8..];
    b[0] = 1; // BOOTREQUEST
    b[1] = 1; // Ethernet
    b[2] = 6;
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    put16(b, 10, 0x8000); // BROADCAST: we cannot take unicast IP before we have an address
    b[28..34].copy_from_slice(&mac.0);
    b[BOOTP_FIXED..BOOTP_FIXED + 4].copy_from_slice(&DHCP_COOKIE);
    let options: [u8; 19] = [
        OPT_MESSAGE_TYPE,
        1,
        DHCPDISCOVER,
        OPT_CLIENT_ID,
        7,
        1,
        mac.0[0],
        mac.0[1],
        mac.0[2],
        mac.0[3],
        mac.0[4],
        mac.0[5],
        OPT_PARAM_REQUEST,
        3,
        1,
        3,
        6,
        OPT_END,
        OPT_PAD,
    ];
    b[BOOTP_FIXED + 4..BOOTP_FIXED + 4 + options.len()].copy_from_slice(&options);
    Some(DHCP_DISCOVER_LEN)
}

/// Classifies a received frame while waiting for a DHCPOFFER for `xid` to `mac`.
///
/// Walks Ethernet (to `mac` or broadcast), IPv4 (version 4, header length 20..=60 within the
/// total length, within the frame, not a fragment, protocol UDP), UDP (67 → 68, its length
/// within the IP payload), BOOTP (op 2, xid). A message that gets this far is ours: it must
/// have chaddr = `mac`, the magic cookie and well-formed options with message type 2 (OFFER),
/// else it is malformed. Anything that stops earlier is unrelated.
pub fn classify_dhcp(frame: &[u8], mac: Mac, xid: u32) -> Verdict {
    if frame.len() < ETH_HEADER + 20 || be16(frame, 12) != ETHERTYPE_IPV4 {
        return Verdict::Unrelated;
    }
    if frame[0..6] != mac.0 && frame[0..6] != Mac::BROADCAST.0 {
        return Verdict::Unrelated;
    }
    let ip = &frame[ETH_HEADER..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return Verdict::Unrelated;
    }
    // More fragments, or a fragment offset: not something this check reassembles.
    if be16(ip, 6) & 0x3fff != 0 || ip[9] != IPPROTO_UDP {
        return Verdict::Unrelated;
    }
    let src = Ip([ip[12], ip[13], ip[14], ip[15]]);
    let udp = &ip[ihl..total];
    if udp.len() < 8 || be16(udp, 0) != DHCP_SERVER_PORT || be16(udp, 2) != DHCP_CLIENT_PORT {
        return Verdict::Unrelated;
    }
    let udp_len = usize::from(be16(udp, 4));
    if udp_len < 8 || udp_len > udp.len() {
        return Verdict::Unrelated;
    }
    let b = &udp[8..udp_len];
    if b.len() < 8 || b[0] != 2 || u32::from_be_bytes([b[4], b[5], b[6], b[7]]) != xid {
        return Verdict::Unrelated;
    }
    // Ours from here on.
    if b.len() < BOOTP_FIXED + 4 {
        return Verdict::Malformed("DHCP message for our xid cut short");
    }
    if b[28..34] != mac.0 {
        return Verdict::Malformed("DHCP message for our xid names another chaddr");
    }
    if b[BOOTP_FIXED..BOOTP_FIXED + 4] != DHCP_COOKIE {
        return Verdict::Malformed("DHCP message for our xid lacks the magic cookie");
    }
    let offered = Ip([b[16], b[17], b[18], b[19]]);
    let mut kind = None;
    let mut server = None;
    let mut opts = &b[BOOTP_FIXED + 4..];
    loop {
        match opts {
            [] => break, // no END: tolerated (the length bounds it)
            [OPT_END, ..] => break,
            [OPT_PAD, rest @ ..] => opts = rest,
            [code, len, rest @ ..] if rest.len() >= usize::from(*len) => {
                let (value, rest) = rest.split_at(usize::from(*len));
                match (*code, value) {
                    (OPT_MESSAGE_TYPE, [t]) => kind = Some(*t),
                    (OPT_MESSAGE_TYPE, _) => {
                        return Verdict::Malformed("DHCP message type option is not 1 byte")
                    }
                    (OPT_SERVER_ID, [a, b, c, d]) => server = Some(Ip([*a, *b, *c, *d])),
                    _ => {}
                }
                opts = rest;
            }
            _ => return Verdict::Malformed("DHCP options run past the message"),
        }
    }
    match kind {
        Some(DHCPOFFER) => {}
        Some(_) => return Verdict::Malformed("DHCP answer for our xid is not an OFFER"),
        None => return Verdict::Malformed("DHCP message for our xid has no message type"),
    }
    if offered.0 == [0; 4] {
        return Verdict::Malformed("DHCPOFFER offers 0.0.0.0");
    }
    Verdict::Reply(Answer::DhcpOffer {
        offered,
        server: server.unwrap_or(src),
    })
}

#[cfg(test)]
mod tests;
