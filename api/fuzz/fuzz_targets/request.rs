//! Arbitrary bytes as what a client sent on one connection: every request `parse_request`
//! finds goes through the router and is answered, exactly as the server does it, until the
//! bytes run out or stop being HTTP. The first byte picks the body size limit, so that small
//! limits are exercised too.
//!
//! Checks besides "no panic": a complete request takes at least one byte and at most what
//! there is, its body fits the limit, the same request is found when only its own bytes are
//! given, a strict prefix of those bytes is only ever "incomplete" (the server re-parses a
//! connection's input as it grows, so a request must not turn invalid halfway), and every
//! answer is a status the API documents.

#![no_main]

use api::{parse_request, route, vmm_response, Parse, Routed};
use libfuzzer_sys::fuzz_target;
use vmm::rpc::{VmmActionError, VmmData};

fuzz_target!(|data: &[u8]| {
    let Some((first, mut rest)) = data.split_first() else {
        return;
    };
    let limit = usize::from(*first) * 256;
    for _ in 0..64 {
        match parse_request(rest, limit) {
            Parse::Incomplete { .. } => break,
            Parse::Invalid(e) => {
                assert!(!e.message.is_empty());
                break;
            }
            Parse::Complete { request, consumed } => {
                assert!(consumed > 0 && consumed <= rest.len());
                assert!(request.body.len() <= limit);
                let own = &rest[..consumed];
                assert_eq!(
                    parse_request(own, limit),
                    Parse::Complete {
                        request: request.clone(),
                        consumed
                    }
                );
                // A few prefixes: the cut just before the end, inside the head, at the body.
                for cut in [consumed - 1, consumed / 2, consumed - request.body.len()] {
                    if cut < consumed {
                        let p = parse_request(&own[..cut], limit);
                        assert!(matches!(p, Parse::Incomplete { .. }), "cut {cut}: {p:?}");
                    }
                }
                let response = match route(&request.method, &request.target, &request.body, "f") {
                    Routed::Reply(r) => r,
                    Routed::Vmm(action) => {
                        let _ = action.name();
                        vmm_response(Ok(Err(VmmActionError::new("refused"))))
                    }
                };
                assert!(
                    matches!(response.status, 200 | 204 | 400 | 404 | 405),
                    "{} {}: {response:?}",
                    request.method,
                    request.target
                );
                if response.status >= 400 {
                    assert!(response.fault_message().is_some());
                }
                let mut out = Vec::new();
                response.write_to(&mut out, "fuzz", !request.keep_alive, false);
                let _ = vmm_response(Ok(Ok(VmmData::Empty)));
                if !request.keep_alive {
                    break;
                }
                rest = &rest[consumed..];
            }
        }
    }
});
