//! Unit tests of the frame builders and the reply parsers, with hostile and short frames.

use super::*;
use std::string::ToString;
use std::vec::Vec;

const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const PEER_MAC: Mac = Mac([0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0x01]);
const IP: Ip = Ip([10, 0, 2, 15]);
const PEER: Ip = Ip([10, 0, 2, 2]);
const XID: u32 = 0x1234_abcd;

#[test]
fn ip_parse_and_display() {
    assert_eq!(Ip::parse(b"10.0.2.15"), Some(IP));
    assert_eq!(Ip::parse(b"255.255.255.255"), Some(Ip([255; 4])));
    for bad in [
        &b""[..],
        b"10.0.2",
        b"10.0.2.15.1",
        b"10.0.2.256",
        b"10..2.15",
        b"a.b.c.d",
        b"10.0.2.15 ",
        b"1000.0.0.1",
        b"-1.0.0.1",
    ] {
        assert_eq!(Ip::parse(bad), None, "{bad:?}");
    }
    assert_eq!(IP.to_string(), "10.0.2.15");
    assert_eq!(MAC.to_string(), "52:54:00:12:34:56");
}

#[test]
fn arp_request_layout() {
    let mut buf = [0xaau8; 100];
    assert_eq!(arp_request(&mut buf[..59], MAC, IP, PEER), None);
    let n = arp_request(&mut buf, MAC, IP, PEER).unwrap();
    assert_eq!(n, 60);
    let f = &buf[..n];
    assert_eq!(&f[0..6], &[0xff; 6]);
    assert_eq!(&f[6..12], &MAC.0);
    assert_eq!(&f[12..14], &[0x08, 0x06]);
    assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
    assert_eq!(&f[22..28], &MAC.0);
    assert_eq!(&f[28..32], &IP.0);
    assert_eq!(&f[32..38], &[0; 6]);
    assert_eq!(&f[38..42], &PEER.0);
    assert!(f[42..].iter().all(|&b| b == 0), "padding");
    // Our own request (a broadcast) is no reply.
    assert_eq!(classify_arp(f, MAC, IP, PEER), Verdict::Unrelated);
}

/// The peer's reply, as a Linux host sends it.
fn arp_reply() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&PEER_MAC.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&PEER_MAC.0);
    f.extend_from_slice(&PEER.0);
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&IP.0);
    f
}

#[test]
fn arp_reply_is_recognised() {
    let f = arp_reply();
    let v = classify_arp(&f, MAC, IP, PEER);
    assert_eq!(
        v,
        Verdict::Reply(Answer::Arp {
            ip: PEER,
            mac: PEER_MAC
        })
    );
    let Verdict::Reply(a) = v else { unreachable!() };
    assert_eq!(a.to_string(), "arp reply: 10.0.2.2 is at 0a:bb:cc:dd:ee:01");
    // Padded to 60 bytes: the same.
    let mut padded = f.clone();
    padded.resize(60, 0);
    assert!(matches!(
        classify_arp(&padded, MAC, IP, PEER),
        Verdict::Reply(_)
    ));
}

#[test]
fn other_arp_frames_are_unrelated() {
    // From another address.
    let mut f = arp_reply();
    f[28..32].copy_from_slice(&[10, 0, 2, 3]);
    assert_eq!(classify_arp(&f, MAC, IP, PEER), Verdict::Unrelated);
    // A request, not a reply.
    let mut f = arp_reply();
    f[21] = 1;
    assert_eq!(classify_arp(&f, MAC, IP, PEER), Verdict::Unrelated);
    // For another IP.
    let mut f = arp_reply();
    f[41] = 16;
    assert_eq!(classify_arp(&f, MAC, IP, PEER), Verdict::Unrelated);
    // An IPv6 frame.
    let mut f = arp_reply();
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(classify_arp(&f, MAC, IP, PEER), Verdict::Unrelated);
    // A broadcast ARP frame with odd sizes: someone else's business.
    let mut f = arp_reply();
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[18] = 8;
    assert_eq!(classify_arp(&f, MAC, IP, PEER), Verdict::Unrelated);
}

#[test]
fn broken_arp_replies_to_us_are_malformed() {
    let f = arp_reply();
    assert!(matches!(
        classify_arp(&f[..41], MAC, IP, PEER),
        Verdict::Malformed(_)
    ));
    let mut g = f.clone();
    g[19] = 16; // protocol size
    assert!(matches!(
        classify_arp(&g, MAC, IP, PEER),
        Verdict::Malformed(_)
    ));
    let mut g = f.clone();
    g[22..28].copy_from_slice(&[0xff; 6]); // broadcast sender MAC
    assert!(matches!(
        classify_arp(&g, MAC, IP, PEER),
        Verdict::Malformed(_)
    ));
}

#[test]
fn every_truncation_and_junk_is_safe() {
    let f = arp_reply();
    for n in 0..f.len() {
        assert!(!matches!(
            classify_arp(&f[..n], MAC, IP, PEER),
            Verdict::Reply(_)
        ));
    }
    let offer = dhcp_offer(&[]);
    for n in 0..offer.len() {
        // Never a panic; a cut frame is never taken as the offer.
        let v = classify_dhcp(&offer[..n], MAC, XID);
        assert!(!matches!(v, Verdict::Reply(_)), "{n}: {v:?}");
    }
    // Pseudo-random junk, also with plausible headers.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..400 {
        let mut junk: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = classify_arp(&junk, MAC, IP, PEER);
        let _ = classify_dhcp(&junk, MAC, XID);
        if len >= 42 {
            junk[..14].copy_from_slice(&offer[..14]);
            junk[14] = 0x45;
            junk[23] = 17;
            let _ = classify_dhcp(&junk, MAC, XID);
        }
    }
}

#[test]
fn dhcp_discover_layout() {
    let mut buf = [0u8; 400];
    assert_eq!(dhcp_discover(&mut buf[..341], MAC, XID), None);
    let n = dhcp_discover(&mut buf, MAC, XID).unwrap();
    assert_eq!(n, 342);
    let f = &buf[..n];
    assert_eq!(&f[0..6], &[0xff; 6]);
    assert_eq!(&f[6..12], &MAC.0);
    assert_eq!(&f[12..14], &[8, 0]);
    let ip = &f[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(be16(ip, 2), 328);
    assert_eq!(ip[9], 17);
    assert_eq!(&ip[12..16], &[0; 4]);
    assert_eq!(&ip[16..20], &[255; 4]);
    assert_eq!(ones_sum(ip), 0xffff, "header checksum");
    let udp = &f[34..42];
    assert_eq!((be16(udp, 0), be16(udp, 2), be16(udp, 4)), (68, 67, 308));
    let b = &f[42..];
    assert_eq!(&b[0..3], &[1, 1, 6]);
    assert_eq!(&b[4..8], &XID.to_be_bytes());
    assert_eq!(be16(b, 10), 0x8000);
    assert_eq!(&b[28..34], &MAC.0);
    assert_eq!(&b[236..240], &DHCP_COOKIE);
    assert_eq!(&b[240..243], &[53, 1, 1]);
    // Not taken for an answer to itself (op 1, port 68 → 67).
    assert_eq!(classify_dhcp(f, MAC, XID), Verdict::Unrelated);
}

/// A DHCPOFFER like passt's: unicast to our MAC, from 10.0.2.2, for XID, offering 10.0.2.15,
/// with `options` after the cookie (default: type OFFER, server id, end).
fn dhcp_offer(options: &[u8]) -> Vec<u8> {
    let default = [53, 1, 2, 54, 4, 10, 0, 2, 2, 1, 4, 255, 255, 255, 0, 255];
    let options = if options.is_empty() {
        &default[..]
    } else {
        options
    };
    let mut b = vec![0u8; 240];
    b[0] = 2;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&XID.to_be_bytes());
    b[16..20].copy_from_slice(&IP.0);
    b[20..24].copy_from_slice(&PEER.0);
    b[28..34].copy_from_slice(&MAC.0);
    b[236..240].copy_from_slice(&DHCP_COOKIE);
    b.extend_from_slice(options);
    let mut f = Vec::new();
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&PEER_MAC.0);
    f.extend_from_slice(&[8, 0]);
    let total = 20 + 8 + b.len();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&PEER.0);
    ip[16..20].copy_from_slice(&IP.0);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&((8 + b.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&b);
    f
}

#[test]
fn dhcp_offer_is_recognised() {
    let f = dhcp_offer(&[]);
    let v = classify_dhcp(&f, MAC, XID);
    assert_eq!(
        v,
        Verdict::Reply(Answer::DhcpOffer {
            offered: IP,
            server: PEER
        })
    );
    let Verdict::Reply(a) = v else { unreachable!() };
    assert_eq!(a.to_string(), "dhcp offer 10.0.2.15 from 10.0.2.2");
    // Broadcast, padded, with PAD options and no server id: the IP source names the server.
    let mut g = dhcp_offer(&[0, 0, 53, 1, 2, 255]);
    g[0..6].copy_from_slice(&[0xff; 6]);
    g[26..30].copy_from_slice(&[10, 0, 2, 3]);
    g.resize(g.len() + 30, 0);
    assert_eq!(
        classify_dhcp(&g, MAC, XID),
        Verdict::Reply(Answer::DhcpOffer {
            offered: IP,
            server: Ip([10, 0, 2, 3])
        })
    );
}

#[test]
fn other_dhcp_traffic_is_unrelated() {
    // Another xid, another MAC, another port, a fragment, not UDP.
    let cases: [(usize, u8); 5] = [(42 + 7, 0xce), (0, 0x00), (37, 69), (20, 0x20), (23, 6)];
    for (at, value) in cases {
        let mut f = dhcp_offer(&[]);
        f[at] = value;
        assert_eq!(classify_dhcp(&f, MAC, XID), Verdict::Unrelated, "byte {at}");
    }
    // An IP total length past the frame.
    let mut f = dhcp_offer(&[]);
    f[16] = 0xff;
    assert_eq!(classify_dhcp(&f, MAC, XID), Verdict::Unrelated);
    // A UDP length past the IP payload.
    let mut f = dhcp_offer(&[]);
    f[38] = 0xff;
    assert_eq!(classify_dhcp(&f, MAC, XID), Verdict::Unrelated);
}

#[test]
fn broken_dhcp_answers_are_malformed() {
    let malformed = |f: &[u8]| matches!(classify_dhcp(f, MAC, XID), Verdict::Malformed(_));
    // No cookie.
    let mut f = dhcp_offer(&[]);
    f[42 + 236] = 0;
    assert!(malformed(&f));
    // Another chaddr.
    let mut f = dhcp_offer(&[]);
    f[42 + 28] ^= 1;
    assert!(malformed(&f));
    // No message type; a type of 2 bytes; an ACK; an option running past the end.
    assert!(malformed(&dhcp_offer(&[54, 4, 10, 0, 2, 2, 255])));
    assert!(malformed(&dhcp_offer(&[53, 2, 2, 2, 255])));
    assert!(malformed(&dhcp_offer(&[53, 1, 5, 255])));
    assert!(malformed(&dhcp_offer(&[53, 1, 2, 54, 40, 1])));
    // Offering 0.0.0.0.
    let mut f = dhcp_offer(&[]);
    f[42 + 16..42 + 20].copy_from_slice(&[0; 4]);
    assert!(malformed(&f));
}
