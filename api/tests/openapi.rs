//! `api/openapi.yaml` against the router and the real server: every route is described, every
//! described route is routed, and every answer the server gives fits the description.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/openapi.rs"]
mod openapi;

use std::collections::BTreeSet;

use api::{route, Routed, ServerOptions, ROUTES};
use harness::{request_bytes, start, start_without_vmm, test_options, Client, Reply, VERSION};
use openapi::Spec;

fn spec() -> Spec {
    Spec::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/openapi.yaml"
    )))
    .expect("openapi.yaml")
}

/// A concrete path for a template.
fn concrete(template: &str) -> String {
    template
        .replace("{drive_id}", "rootfs")
        .replace("{iface_id}", "eth0")
        .replace("{id}", "pmem0")
}

#[test]
fn every_route_is_described_and_every_description_is_routed() {
    let spec = spec();
    let described: BTreeSet<(String, String)> = spec.routes().into_iter().collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|r| {
            r.methods
                .iter()
                .map(|m| (m.to_string(), r.path.to_string()))
        })
        .collect();
    let undocumented: Vec<_> = routed.difference(&described).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from openapi.yaml: {undocumented:?}"
    );
    for (method, template) in &described {
        let path = concrete(template);
        match route(method, &path, b"{}", "v") {
            Routed::Vmm(_) => {}
            Routed::Reply(r) => assert!(
                r.status != 404 && r.status != 405,
                "{method} {path} is described but the router answers {}: {:?}",
                r.status,
                r.fault_message()
            ),
        }
    }
    assert_eq!(described, routed, "openapi.yaml and ROUTES differ");
    // Every Firecracker path is either served or named as unsupported.
    for r in ROUTES.iter().filter(|r| r.unsupported.is_some()) {
        for m in r.methods {
            let op = &spec.doc()["paths"][r.path][m.to_ascii_lowercase()];
            assert!(
                op["responses"]["400"].is_object(),
                "{m} {} is unsupported but its 400 is not described",
                r.path
            );
        }
    }
}

#[test]
fn the_validator_catches_what_it_should() {
    let spec = spec();
    let ok = serde_json::json!({"vcpu_count": 2, "mem_size_mib": 64});
    spec.validate_response("GET", "/machine-config", 200, &ok)
        .unwrap();
    for (bad, word) in [
        (serde_json::json!({"vcpu_count": 2}), "mem_size_mib"),
        (
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 64, "x": 1}),
            "`x`",
        ),
        (
            serde_json::json!({"vcpu_count": "2", "mem_size_mib": 64}),
            "expected integer",
        ),
        (
            serde_json::json!({"vcpu_count": 33, "mem_size_mib": 64}),
            "maximum",
        ),
        (
            serde_json::json!({"vcpu_count": 0, "mem_size_mib": 64}),
            "minimum",
        ),
        (
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "1G"}),
            "not one of",
        ),
    ] {
        let e = spec
            .validate_response("GET", "/machine-config", 200, &bad)
            .unwrap_err();
        assert!(e.contains(word), "{e}");
    }
    let nested = serde_json::json!({"drives": [{"drive_id": "a", "is_root_device": true,
        "rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}]});
    let e = spec
        .validate_response("GET", "/vm/config", 200, &nested)
        .unwrap_err();
    assert!(e.contains("$.drives[0].rate_limiter.ops.size"), "{e}");
    assert!(spec
        .validate_response("PUT", "/drives/x", 204, &serde_json::Value::Null)
        .is_ok());
    assert!(spec
        .validate_response("PUT", "/drives/x", 204, &ok)
        .is_err());
    assert!(spec
        .validate_response("GET", "/machine-config", 200, &serde_json::Value::Null)
        .is_err());
    assert_eq!(spec.match_path("/drives/abc"), Some("/drives/{drive_id}"));
    assert_eq!(spec.match_path("/drives"), None);
    let fault = serde_json::json!({"fault_message": "x"});
    spec.validate_response("GET", "/nowhere", 404, &fault)
        .unwrap();
    assert!(spec
        .validate_response("GET", "/nowhere", 404, &serde_json::json!({"error": "x"}))
        .is_err());
}

/// One exchange: request, the status expected and words its fault_message must contain.
struct Case {
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    status: u16,
    words: &'static [&'static str],
}

const fn case(
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    status: u16,
    words: &'static [&'static str],
) -> Case {
    Case {
        method,
        path,
        body,
        status,
        words,
    }
}

const MC: &str = "/machine-config";

const CASES: &[Case] = &[
    // Successes.
    case("GET", "/", None, 200, &[]),
    case("GET", "/version", None, 200, &[]),
    case("GET", MC, None, 200, &[]),
    case("GET", "/vm/config", None, 200, &[]),
    case(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        204,
        &[],
    ),
    case(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
        204,
        &[],
    ),
    case(
        "PUT",
        MC,
        Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#),
        204,
        &[],
    ),
    case("PATCH", MC, Some(r#"{"mem_size_mib":512}"#), 204, &[]),
    case(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#),
        204,
        &[],
    ),
    case(
        "PUT",
        "/drives/rootfs",
        Some(
            r#"{"drive_id":"rootfs","is_root_device":true,"path_on_host":"/r.img","is_read_only":false}"#,
        ),
        204,
        &[],
    ),
    case(
        "PATCH",
        "/drives/rootfs",
        Some(r#"{"drive_id":"rootfs","rate_limiter":{"ops":{"size":10,"refill_time":100}}}"#),
        204,
        &[],
    ),
    case("PUT", "/entropy", Some("{}"), 204, &[]),
    case(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#),
        204,
        &[],
    ),
    case(
        "PUT",
        "/logger",
        Some(r#"{"log_path":"/l","level":"Warning","show_level":true}"#),
        204,
        &[],
    ),
    case(
        "PUT",
        "/metrics",
        Some(r#"{"metrics_path":"/m"}"#),
        204,
        &[],
    ),
    case(
        "PUT",
        "/serial",
        Some(r#"{"serial_out_path":"/s"}"#),
        204,
        &[],
    ),
    // The VMM refuses.
    case(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        400,
        &["not running"],
    ),
    case(
        "PUT",
        MC,
        Some(r#"{"vcpu_count":64,"mem_size_mib":256}"#),
        400,
        &["vcpu_count 64"],
    ),
    case("PATCH", MC, Some("{}"), 400, &["changes nothing"]),
    case(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Paused"}"#),
        400,
        &["not running"],
    ),
    case(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path":"/nonexistent"}"#),
        400,
        &["kernel_image_path"],
    ),
    case(
        "PUT",
        "/drives/data",
        Some(r#"{"drive_id":"data","is_root_device":false}"#),
        400,
        &["path_on_host"],
    ),
    // Bad JSON, unknown field, missing field, wrong type, no body.
    case(
        "PUT",
        MC,
        Some(r#"{"vcpu_count":2,"#),
        400,
        &["PUT /machine-config:", "EOF"],
    ),
    case(
        "PUT",
        MC,
        Some(r#"{"vcpu_count":2,"mem_size_mib":256,"foo":1}"#),
        400,
        &["PUT /machine-config:", "unknown field `foo`"],
    ),
    case(
        "PUT",
        MC,
        Some(r#"{"vcpu_count":2}"#),
        400,
        &["missing field `mem_size_mib`"],
    ),
    case(
        "PUT",
        MC,
        Some(r#"{"vcpu_count":true,"mem_size_mib":256}"#),
        400,
        &["vcpu_count: invalid type: boolean"],
    ),
    case(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Running"}"#),
        400,
        &["state: unknown variant `Running`"],
    ),
    case(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"Reboot"}"#),
        400,
        &["unknown variant `Reboot`"],
    ),
    case(
        "PUT",
        "/boot-source",
        None,
        400,
        &["PUT /boot-source:", "needs a JSON body"],
    ),
    case(
        "PUT",
        "/metrics",
        Some("{}"),
        400,
        &["missing field `metrics_path`"],
    ),
    case(
        "PUT",
        "/logger",
        Some(r#"{"level":"loud"}"#),
        400,
        &["level"],
    ),
    case(
        "PUT",
        "/drives/rootfs",
        Some(
            r#"{"drive_id":"rootfs","is_root_device":false,"rate_limiter":{"ops":{"size":-1,"refill_time":1}}}"#,
        ),
        400,
        &["rate_limiter.ops.size: invalid value"],
    ),
    // Drive ids.
    case(
        "PUT",
        "/drives/rootfs",
        Some(r#"{"drive_id":"other","is_root_device":true}"#),
        400,
        &["The id from the path [rootfs] does not match the id from the body [other]!"],
    ),
    case(
        "PATCH",
        "/drives/a",
        Some(r#"{"drive_id":"b"}"#),
        400,
        &["[a]", "[b]"],
    ),
    case(
        "PUT",
        "/drives/bad.id",
        Some(r#"{"drive_id":"bad.id","is_root_device":true}"#),
        400,
        &["drive_id 'bad.id'"],
    ),
    // Network interfaces and vsock.
    case(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:00:01"}"#),
        204,
        &[],
    ),
    case(
        "PATCH",
        "/network-interfaces/eth0",
        Some(
            r#"{"iface_id":"eth0","tx_rate_limiter":{"bandwidth":{"size":1000,"refill_time":10}}}"#,
        ),
        204,
        &[],
    ),
    case(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid":3,"uds_path":"/v.sock","vsock_id":"vsock0"}"#),
        204,
        &[],
    ),
    case(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#),
        400,
        &["The id from the path [eth0] does not match the id from the body [eth1]!"],
    ),
    case(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0"}"#),
        400,
        &[
            "PUT /network-interfaces/eth0:",
            "missing field `host_dev_name`",
        ],
    ),
    case(
        "PUT",
        "/network-interfaces/bad.id",
        Some(r#"{"iface_id":"bad.id","host_dev_name":"tap0"}"#),
        400,
        &["iface_id 'bad.id'"],
    ),
    case(
        "PATCH",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0","rx_rate_limiter":{"ops":{"size":1}}}"#),
        400,
        &["rx_rate_limiter.ops: missing field `refill_time`"],
    ),
    case(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid":"3","uds_path":"/v.sock"}"#),
        400,
        &["PUT /vsock:", "guest_cid: invalid type"],
    ),
    case(
        "PUT",
        "/vsock",
        Some(r#"{"uds_path":"/v.sock"}"#),
        400,
        &["missing field `guest_cid`"],
    ),
    // Unsupported Firecracker features.
    case("GET", "/balloon", None, 400, &["balloon"]),
    case(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib":1,"deflate_on_oom":true}"#),
        400,
        &["balloon"],
    ),
    case(
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib":1}"#),
        400,
        &["balloon"],
    ),
    case("GET", "/balloon/statistics", None, 400, &["balloon"]),
    case(
        "PATCH",
        "/balloon/statistics",
        Some("{}"),
        400,
        &["balloon"],
    ),
    case("PATCH", "/balloon/hinting/start", None, 400, &["balloon"]),
    case("GET", "/balloon/hinting/status", None, 400, &["balloon"]),
    case("PATCH", "/balloon/hinting/stop", None, 400, &["balloon"]),
    case("PUT", "/snapshot/create", Some("{}"), 400, &["snapshot"]),
    case("PUT", "/snapshot/load", Some("{}"), 400, &["snapshot"]),
    case("GET", "/mmds", None, 400, &["MMDS"]),
    case("PUT", "/mmds", Some("{}"), 400, &["MMDS"]),
    case("PATCH", "/mmds", Some("{}"), 400, &["MMDS"]),
    case("PUT", "/mmds/config", Some("{}"), 400, &["MMDS"]),
    case("GET", "/hotplug/memory", None, 400, &["hotplug"]),
    case("PUT", "/hotplug/memory", Some("{}"), 400, &["hotplug"]),
    case("PATCH", "/hotplug/memory", Some("{}"), 400, &["hotplug"]),
    case("PUT", "/pmem/pmem0", Some("{}"), 400, &["pmem"]),
    case("PATCH", "/pmem/pmem0", Some("{}"), 400, &["pmem"]),
    case("PUT", "/cpu-config", Some("{}"), 400, &["CPU"]),
    // Unknown paths, wrong methods, query strings.
    case("GET", "/nope", None, 404, &["GET /nope"]),
    case("PUT", "/drives", Some("{}"), 404, &["/drives"]),
    case(
        "GET",
        "/machine-config/x",
        None,
        404,
        &["/machine-config/x"],
    ),
    case("DELETE", MC, None, 405, &["DELETE", "GET, PUT, PATCH"]),
    case("POST", "/actions", Some("{}"), 405, &["POST"]),
    case("GET", "/boot-source", None, 405, &["PUT"]),
    case("PUT", "/version", Some("{}"), 405, &["GET"]),
    case(
        "GET",
        "/machine-config?verbose=1",
        None,
        400,
        &["query strings"],
    ),
];

fn check(spec: &Spec, method: &str, path: &str, reply: &Reply) {
    let validated_path = path.split('?').next().unwrap_or(path);
    let body = reply.json().unwrap_or_default();
    spec.validate_response(method, validated_path, reply.status, &body)
        .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&reply.body)));
    if reply.status != 204 {
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
    }
}

#[test]
fn every_endpoint_answers_as_described() {
    let spec = spec();
    let server = start(test_options());
    // All cases over one keep-alive connection, then each on its own.
    let mut client = Client::new(server.connect());
    for pass in 0..2 {
        for c in CASES {
            let reply = if pass == 0 {
                client.send(c.method, c.path, c.body);
                client.read_reply()
            } else {
                server.request(c.method, c.path, c.body)
            };
            assert_eq!(
                reply.status,
                c.status,
                "{} {} {:?}: {}",
                c.method,
                c.path,
                c.body,
                String::from_utf8_lossy(&reply.body)
            );
            let fault = reply.fault();
            for w in c.words {
                assert!(
                    fault.contains(w),
                    "{} {}: {fault:?} lacks {w:?}",
                    c.method,
                    c.path
                );
            }
            if c.status == 405 {
                assert!(reply.header("allow").is_some(), "405 without Allow");
            }
            assert_eq!(reply.header("connection"), Some("keep-alive"));
            check(&spec, c.method, c.path, &reply);
        }
    }
    // What came back is what the fake VMM holds.
    let v = server.request("GET", "/version", None).json().unwrap();
    assert_eq!(v["firecracker_version"], VERSION);
    let c = server.request("GET", "/vm/config", None).json().unwrap();
    assert_eq!(
        c["drives"][0]["rate_limiter"]["bandwidth"]["refill_time"],
        1000
    );
    assert_eq!(c["machine-config"]["vcpu_count"], 2);
    assert_eq!(c["network-interfaces"][0]["host_dev_name"], "tap0");
    assert_eq!(c["vsock"]["guest_cid"], 3);
}

/// Sends raw bytes on a new connection; returns the one answer and whether the server closed.
fn raw_exchange(server: &harness::TestServer, bytes: &[u8]) -> (Reply, bool) {
    let mut client = Client::new(server.connect());
    client.send_raw(bytes);
    let reply = client.read_reply();
    let closed = client
        .read_to_end()
        .map(|rest| rest.is_empty())
        .unwrap_or(false);
    (reply, closed)
}

#[test]
fn framing_errors_answer_400_and_close() {
    let spec = spec();
    let mut server = start(ServerOptions {
        max_payload: 1000,
        ..test_options()
    });
    let big = "x".repeat(1001);
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), "malformed", ""),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), "malformed", ""),
        (
            b"PUT /machine-config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
            "Transfer-Encoding",
            "",
        ),
        (
            request_bytes("PUT", "/machine-config", Some(&big), &[]),
            "1001 bytes",
            "1000 bytes",
        ),
        (
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
            "Content-Length",
            "",
        ),
    ];
    for (bytes, w1, w2) in cases {
        let (reply, closed) = raw_exchange(&server, &bytes);
        assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(&bytes));
        let f = reply.fault();
        assert!(f.contains(w1) && f.contains(w2), "{f}");
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(closed, "the connection stays open after {f}");
        // Framing errors are described once for the whole API.
        check(&spec, "", "", &reply);
    }
    // A body at the limit is fine.
    let at_limit = format!(
        r#"{{"kernel_image_path":"/k","boot_args":"{}"}}"#,
        "a".repeat(1000 - 41)
    );
    assert_eq!(at_limit.len(), 1000);
    let reply = server.request("PUT", "/boot-source", Some(&at_limit));
    assert_eq!(reply.status, 204, "{}", reply.fault());
    server.stop().expect("the server failed");
    assert!(
        server
            .metrics
            .malformed_requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 5
    );
}

#[test]
fn a_vanished_vmm_is_503() {
    let spec = spec();
    let server = start_without_vmm();
    let reply = server.request("GET", MC, None);
    assert_eq!(reply.status, 503);
    assert!(reply.fault().contains("shutting down"), "{}", reply.fault());
    check(&spec, "GET", MC, &reply);
    // What the API thread answers itself still works.
    assert_eq!(server.request("GET", "/version", None).status, 200);
}
