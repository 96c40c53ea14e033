//! The router: a method, a request target and a body become a [`VmmAction`] for the VMM
//! thread, or an answer the API thread gives itself. A pure function, so that the fuzz target
//! and the OpenAPI test call exactly what the server calls.
//!
//! Error answers name the endpoint first (`PUT /machine-config: ...`), then what is wrong:
//! serde's message for a body that does not parse, prefixed with the path of the offending
//! field when it is inside the body (`rate_limiter.bandwidth.size: invalid type: ...`).

use serde::de::DeserializeOwned;
use serde::Serialize;
use vmm::resources::{
    check_drive_id, check_iface_id, not_available, ActionType, BootSource, Drive, EntropyDevice,
    InstanceActionInfo, LoggerConfig, MachineConfig, MachineConfigUpdate, MetricsConfig,
    NetworkInterface, PartialDrive, PartialNetworkInterface, SerialConfig, VmState, Vsock,
};
use vmm::rpc::{SendError, VmmAction, VmmData, VmmResponse};

use crate::http::Response;

/// One path of the API and the methods it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    /// The path template as the OpenAPI description writes it (`/drives/{drive_id}`).
    pub path: &'static str,
    /// The methods the path takes; any other gets 405.
    pub methods: &'static [&'static str],
    /// For a Firecracker path cgvm does not implement: the feature, as
    /// [`vmm::resources::not_available`] names it. Every method then gets 400.
    pub unsupported: Option<&'static str>,
}

const fn supported(path: &'static str, methods: &'static [&'static str]) -> RouteSpec {
    RouteSpec {
        path,
        methods,
        unsupported: None,
    }
}

const fn missing(
    path: &'static str,
    methods: &'static [&'static str],
    feature: &'static str,
) -> RouteSpec {
    RouteSpec {
        path,
        methods,
        unsupported: Some(feature),
    }
}

/// Every path the API knows: those cgvm serves, then the Firecracker paths it answers with
/// "not available". A path outside this table gets 404.
pub const ROUTES: &[RouteSpec] = &[
    supported("/", &["GET"]),
    supported("/version", &["GET"]),
    supported("/actions", &["PUT"]),
    supported("/machine-config", &["GET", "PUT", "PATCH"]),
    supported("/vm/config", &["GET"]),
    supported("/vm", &["PATCH"]),
    supported("/boot-source", &["PUT"]),
    supported("/drives/{drive_id}", &["PUT", "PATCH"]),
    supported("/network-interfaces/{iface_id}", &["PUT", "PATCH"]),
    supported("/vsock", &["PUT"]),
    supported("/entropy", &["PUT"]),
    supported("/logger", &["PUT"]),
    supported("/metrics", &["PUT"]),
    supported("/serial", &["PUT"]),
    missing("/balloon", &["GET", "PUT", "PATCH"], "balloon"),
    missing("/balloon/statistics", &["GET", "PATCH"], "balloon"),
    missing("/balloon/hinting/start", &["PATCH"], "balloon"),
    missing("/balloon/hinting/status", &["GET"], "balloon"),
    missing("/balloon/hinting/stop", &["PATCH"], "balloon"),
    missing("/snapshot/create", &["PUT"], "snapshot"),
    missing("/snapshot/load", &["PUT"], "snapshot"),
    missing("/mmds", &["GET", "PUT", "PATCH"], "mmds"),
    missing("/mmds/config", &["PUT"], "mmds-config"),
    missing("/hotplug/memory", &["GET", "PUT", "PATCH"], "hotplug"),
    missing("/pmem/{id}", &["PUT", "PATCH"], "pmem"),
    missing("/cpu-config", &["PUT"], "cpu-config"),
];

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// Ask the VMM thread; its answer becomes the response through [`vmm_response`].
    Vmm(VmmAction),
    /// The API thread answers by itself (`GET /version`, and every error found here).
    Reply(Response),
}

/// `GET /version`'s answer (Firecracker's `FirecrackerVersion`).
#[derive(Serialize)]
struct Version<'a> {
    firecracker_version: &'a str,
}

/// Matches `path` against a template; returns the `{...}` segments' values.
fn matches<'p>(template: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut params = Vec::new();
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(ts), Some(ps)) if ts.starts_with('{') => params.push(ps),
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// Finds the route of a concrete path, with its parameters.
pub fn find_route(path: &str) -> Option<(&'static RouteSpec, Vec<&str>)> {
    ROUTES
        .iter()
        .find_map(|r| matches(r.path, path).map(|params| (r, params)))
}

fn bad(method: &str, path: &str, msg: impl std::fmt::Display) -> Response {
    Response::fault(400, &format!("{method} {path}: {msg}"))
}

/// Parses a JSON body into `T`, naming the endpoint, the field and the reason on failure.
fn body<T: DeserializeOwned>(
    method: &str,
    path: &str,
    what: &str,
    body: &[u8],
) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(
            method,
            path,
            format!("the request needs a JSON body ({what}) and has none"),
        ));
    }
    // serde would also take a struct as a JSON array of its fields in order; the API's bodies
    // are objects, and only objects are accepted.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(bad(
            method,
            path,
            format!("the body must be a JSON object ({what})"),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| bad(method, path, e))?;
    de.end().map_err(|e| bad(method, path, e))?;
    Ok(value)
}

/// Routes one request. `target` is the request target in origin form (see
/// [`crate::http::Request::target`]); `version` is what `GET /version` answers.
///
/// Query strings are refused with 400: no endpoint takes parameters, and silently dropping
/// one would hide a client's mistake.
pub fn route(method: &str, target: &str, payload: &[u8], version: &str) -> Routed {
    if target.contains('?') || target.contains('#') {
        let path = target.split(['?', '#']).next().unwrap_or_default();
        return Routed::Reply(bad(
            method,
            path,
            "query strings are not supported (no endpoint takes parameters)",
        ));
    }
    let path = target;
    let Some((spec, params)) = find_route(path) else {
        return Routed::Reply(Response::fault(
            404,
            &format!("{method} {path}: there is no such path in the API"),
        ));
    };
    if !spec.methods.contains(&method) {
        let allow = spec.methods.join(", ");
        let mut r = Response::fault(
            405,
            &format!(
                "{method} {path}: method not allowed; {} accepts {allow}",
                spec.path
            ),
        );
        r.allow = Some(allow);
        return Routed::Reply(r);
    }
    if let Some(feature) = spec.unsupported {
        return Routed::Reply(bad(method, path, not_available(feature)));
    }
    route_supported(method, spec.path, path, &params, payload, version)
        .unwrap_or_else(Routed::Reply)
}

fn route_supported(
    method: &str,
    template: &str,
    path: &str,
    params: &[&str],
    payload: &[u8],
    version: &str,
) -> Result<Routed, Response> {
    let action = match (method, template) {
        ("GET", "/") => VmmAction::GetInstanceInfo,
        ("GET", "/version") => {
            return Ok(Routed::Reply(Response::json(
                200,
                &Version {
                    firecracker_version: version,
                },
            )))
        }
        ("PUT", "/actions") => {
            let info: InstanceActionInfo = body(method, path, "InstanceActionInfo", payload)?;
            match info.action_type {
                ActionType::InstanceStart => VmmAction::StartInstance,
                ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
                ActionType::FlushMetrics => VmmAction::FlushMetrics,
            }
        }
        ("GET", "/machine-config") => VmmAction::GetMachineConfig,
        ("PUT", "/machine-config") => VmmAction::PutMachineConfig(body::<MachineConfig>(
            method,
            path,
            "MachineConfiguration",
            payload,
        )?),
        ("PATCH", "/machine-config") => VmmAction::PatchMachineConfig(body::<MachineConfigUpdate>(
            method,
            path,
            "MachineConfiguration",
            payload,
        )?),
        ("GET", "/vm/config") => VmmAction::GetVmConfig,
        ("PATCH", "/vm") => VmmAction::SetVmState(body::<VmState>(method, path, "Vm", payload)?),
        ("PUT", "/boot-source") => {
            VmmAction::PutBootSource(body::<BootSource>(method, path, "BootSource", payload)?)
        }
        ("PUT" | "PATCH", "/drives/{drive_id}") => {
            let id = params.first().copied().unwrap_or_default();
            check_drive_id(id).map_err(|e| bad(method, path, e))?;
            let (action, body_id) = if method == "PUT" {
                let d: Drive = body(method, path, "Drive", payload)?;
                let body_id = d.drive_id.clone();
                (VmmAction::PutDrive(d), body_id)
            } else {
                let d: PartialDrive = body(method, path, "PartialDrive", payload)?;
                let body_id = d.drive_id.clone();
                (VmmAction::PatchDrive(d), body_id)
            };
            check_ids(method, path, id, &body_id)?;
            action
        }
        ("PUT" | "PATCH", "/network-interfaces/{iface_id}") => {
            let id = params.first().copied().unwrap_or_default();
            check_iface_id(id).map_err(|e| bad(method, path, e))?;
            let (action, body_id) = if method == "PUT" {
                let n: NetworkInterface = body(method, path, "NetworkInterface", payload)?;
                let body_id = n.iface_id.clone();
                (VmmAction::PutNetworkInterface(n), body_id)
            } else {
                let n: PartialNetworkInterface =
                    body(method, path, "PartialNetworkInterface", payload)?;
                let body_id = n.iface_id.clone();
                (VmmAction::PatchNetworkInterface(n), body_id)
            };
            check_ids(method, path, id, &body_id)?;
            action
        }
        ("PUT", "/vsock") => VmmAction::PutVsock(body::<Vsock>(method, path, "Vsock", payload)?),
        ("PUT", "/entropy") => VmmAction::PutEntropy(body::<EntropyDevice>(
            method,
            path,
            "EntropyDevice",
            payload,
        )?),
        ("PUT", "/logger") => {
            VmmAction::PutLogger(body::<LoggerConfig>(method, path, "Logger", payload)?)
        }
        ("PUT", "/metrics") => {
            VmmAction::PutMetrics(body::<MetricsConfig>(method, path, "Metrics", payload)?)
        }
        ("PUT", "/serial") => {
            VmmAction::PutSerial(body::<SerialConfig>(method, path, "SerialDevice", payload)?)
        }
        // ROUTES and this match list the same pairs; a mismatch is a bug here, not the
        // client's, but it must not take the server down.
        _ => {
            return Err(Response::fault(
                500,
                &format!("{method} {path}: the router has no handler for {method} {template}"),
            ))
        }
    };
    Ok(Routed::Vmm(action))
}

/// Firecracker's check that the id in the path is the id in the body.
fn check_ids(method: &str, path: &str, id: &str, body_id: &str) -> Result<(), Response> {
    if body_id != id {
        return Err(bad(
            method,
            path,
            format!("The id from the path [{id}] does not match the id from the body [{body_id}]!"),
        ));
    }
    Ok(())
}

/// The HTTP answer for what the VMM thread said (or why it could not be asked).
///
/// - `Ok(VmmData::Empty)`: 204.
/// - `Ok(data)`: 200 with the data as JSON.
/// - `Err(VmmActionError(msg))`: 400 with `msg` as the `fault_message`.
/// - [`SendError::Gone`]: 503, the VMM is shutting down; [`SendError::Wake`]: 500.
pub fn vmm_response(answer: Result<VmmResponse, SendError>) -> Response {
    match answer {
        Ok(Ok(VmmData::Empty)) => Response::no_content(),
        Ok(Ok(data)) => Response::json(200, &data),
        Ok(Err(e)) => Response::fault(400, &e.0),
        Err(e @ SendError::Gone) => Response::fault(503, &e.to_string()),
        Err(e @ SendError::Wake(_)) => Response::fault(500, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::resources::{MachineConfig, VmStateName};
    use vmm::rpc::VmmActionError;

    fn action(method: &str, target: &str, payload: &str) -> VmmAction {
        match route(method, target, payload.as_bytes(), "1.2.3") {
            Routed::Vmm(a) => a,
            Routed::Reply(r) => panic!("{method} {target}: {r:?} {:?}", r.fault_message()),
        }
    }

    fn reply(method: &str, target: &str, payload: &str) -> (u16, String) {
        match route(method, target, payload.as_bytes(), "1.2.3") {
            Routed::Reply(r) => (
                r.status,
                r.fault_message().unwrap_or_else(|| {
                    String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into()
                }),
            ),
            Routed::Vmm(a) => panic!("{method} {target}: {a:?}"),
        }
    }

    #[test]
    fn every_endpoint_reaches_its_action() {
        assert_eq!(action("GET", "/", ""), VmmAction::GetInstanceInfo);
        for (t, a) in [
            ("InstanceStart", VmmAction::StartInstance),
            ("SendCtrlAltDel", VmmAction::SendCtrlAltDel),
            ("FlushMetrics", VmmAction::FlushMetrics),
        ] {
            assert_eq!(
                action("PUT", "/actions", &format!(r#"{{"action_type":"{t}"}}"#)),
                a
            );
        }
        assert_eq!(
            action("GET", "/machine-config", ""),
            VmmAction::GetMachineConfig
        );
        assert_eq!(
            action(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":2,"mem_size_mib":256}"#
            ),
            VmmAction::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..Default::default()
            })
        );
        assert_eq!(
            action("PATCH", "/machine-config", r#"{"vcpu_count":4}"#),
            VmmAction::PatchMachineConfig(MachineConfigUpdate {
                vcpu_count: Some(4),
                ..Default::default()
            })
        );
        assert_eq!(action("GET", "/vm/config", ""), VmmAction::GetVmConfig);
        assert_eq!(
            action("PATCH", "/vm", r#"{"state":"Paused"}"#),
            VmmAction::SetVmState(VmState {
                state: VmStateName::Paused
            })
        );
        assert!(matches!(
            action("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#),
            VmmAction::PutBootSource(b) if b.kernel_image_path.as_os_str() == "/k"
        ));
        assert!(matches!(
            action(
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","is_root_device":true,"path_on_host":"/r"}"#
            ),
            VmmAction::PutDrive(d) if d.drive_id == "rootfs" && d.is_root_device
        ));
        assert!(matches!(
            action(
                "PATCH",
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","path_on_host":"/r2"}"#
            ),
            VmmAction::PatchDrive(d) if d.drive_id == "rootfs"
        ));
        assert!(matches!(
            action(
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:00:01"}"#
            ),
            VmmAction::PutNetworkInterface(n)
                if n.iface_id == "eth0" && n.host_dev_name == "tap0"
                    && n.guest_mac.as_deref() == Some("02:00:00:00:00:01")
        ));
        assert!(matches!(
            action(
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":10,"refill_time":100}}}"#
            ),
            VmmAction::PatchNetworkInterface(n)
                if n.iface_id == "eth0" && n.rx_rate_limiter.is_none()
                    && n.tx_rate_limiter.is_some_and(|t| t.ops.is_some_and(|o| o.size == 10))
        ));
        assert_eq!(
            action(
                "PUT",
                "/vsock",
                r#"{"guest_cid":3,"uds_path":"/v.sock","vsock_id":"vsock0"}"#
            ),
            VmmAction::PutVsock(Vsock {
                guest_cid: 3,
                uds_path: "/v.sock".into(),
                vsock_id: Some("vsock0".into()),
            })
        );
        assert_eq!(
            action("PUT", "/entropy", "{}"),
            VmmAction::PutEntropy(EntropyDevice::default())
        );
        assert!(matches!(
            action("PUT", "/logger", r#"{"level":"debug"}"#),
            VmmAction::PutLogger(_)
        ));
        assert!(matches!(
            action("PUT", "/metrics", r#"{"metrics_path":"/m"}"#),
            VmmAction::PutMetrics(_)
        ));
        assert!(matches!(
            action("PUT", "/serial", r#"{"serial_out_path":"/s"}"#),
            VmmAction::PutSerial(_)
        ));
    }

    #[test]
    fn version_is_answered_here() {
        let (s, b) = reply("GET", "/version", "");
        assert_eq!(s, 200);
        assert_eq!(b, r#"{"firecracker_version":"1.2.3"}"#);
    }

    #[test]
    fn body_errors_name_endpoint_field_and_reason() {
        for (method, path, payload, words) in [
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":8,"foo":1}"#,
                &[
                    "PUT /machine-config:",
                    "unknown field `foo`",
                    "expected one of",
                ][..],
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":1}"#,
                &["missing field `mem_size_mib`"],
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":"two","mem_size_mib":8}"#,
                &["vcpu_count: invalid type: string"],
            ),
            (
                "PUT",
                "/drives/d1",
                r#"{"drive_id":"d1","is_root_device":false,"rate_limiter":{"bandwidth":{"size":"x","refill_time":1}}}"#,
                &["rate_limiter.bandwidth.size: invalid type"],
            ),
            ("PUT", "/boot-source", "{", &["PUT /boot-source:", "EOF"]),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path":"/k"} x"#,
                &["trailing characters"],
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type":"Reboot"}"#,
                &["action_type: unknown variant `Reboot`"],
            ),
            ("PUT", "/machine-config", "", &["needs a JSON body"]),
            ("PATCH", "/vm", "  \r\n", &["needs a JSON body"]),
            ("PUT", "/entropy", "[]", &["PUT /entropy:", "JSON object"]),
            ("PUT", "/machine-config", "[2, 64]", &["JSON object"]),
            ("PUT", "/boot-source", "\"x\"", &["JSON object"]),
        ] {
            let (s, m) = reply(method, path, payload);
            assert_eq!(s, 400, "{m}");
            for w in words {
                assert!(m.contains(w), "{m:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn drive_ids_are_checked_against_the_path() {
        let (s, m) = reply(
            "PUT",
            "/drives/a",
            r#"{"drive_id":"b","is_root_device":false}"#,
        );
        assert_eq!(s, 400);
        assert!(m.ends_with("The id from the path [a] does not match the id from the body [b]!"));
        let (s, m) = reply("PATCH", "/drives/a", r#"{"drive_id":"b"}"#);
        assert_eq!(s, 400);
        assert!(m.contains("[a]") && m.contains("[b]"), "{m}");
        for bad_id in ["", "a%20b", "012345678901234567890", "a.b"] {
            let (s, m) = reply(
                "PUT",
                &format!("/drives/{bad_id}"),
                r#"{"drive_id":"x","is_root_device":false}"#,
            );
            assert_eq!(s, 400, "{bad_id}");
            assert!(m.contains("drive_id"), "{m}");
        }
    }

    #[test]
    fn iface_ids_are_checked_against_the_path_and_bodies_name_their_fields() {
        let (s, m) = reply(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#,
        );
        assert_eq!(s, 400);
        assert!(
            m.ends_with("The id from the path [eth0] does not match the id from the body [eth1]!"),
            "{m}"
        );
        let (s, m) = reply("PATCH", "/network-interfaces/a", r#"{"iface_id":"b"}"#);
        assert_eq!(s, 400);
        assert!(m.contains("[a]") && m.contains("[b]"), "{m}");
        for bad_id in ["", "a%20b", "a.b", &"x".repeat(65)] {
            let (s, m) = reply(
                "PUT",
                &format!("/network-interfaces/{bad_id}"),
                r#"{"iface_id":"x","host_dev_name":"tap0"}"#,
            );
            assert_eq!(s, 400, "{bad_id}");
            assert!(m.contains("iface_id"), "{m}");
        }
        for (method, path, payload, words) in [
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0"}"#,
                &["missing field `host_dev_name`"][..],
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"t","allow_mmds_requests":true}"#,
                &["unknown field `allow_mmds_requests`"],
            ),
            (
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":"x","refill_time":1}}}"#,
                &["rx_rate_limiter.bandwidth.size: invalid type"],
            ),
            (
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap1"}"#,
                &["unknown field `host_dev_name`"],
            ),
            (
                "PUT",
                "/vsock",
                r#"{"guest_cid":3}"#,
                &["missing field `uds_path`"],
            ),
            (
                "PUT",
                "/vsock",
                r#"{"guest_cid":-3,"uds_path":"/v"}"#,
                &["guest_cid: invalid value"],
            ),
            ("PUT", "/vsock", "", &["PUT /vsock:", "needs a JSON body"]),
        ] {
            let (s, m) = reply(method, path, payload);
            assert_eq!(s, 400, "{m}");
            for w in words {
                assert!(m.contains(w), "{m:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn unsupported_paths_say_what_is_missing() {
        for (m, p, word) in [
            ("GET", "/balloon", "balloon"),
            ("GET", "/balloon/statistics", "balloon"),
            ("PATCH", "/balloon/hinting/start", "balloon"),
            ("PUT", "/snapshot/create", "snapshot"),
            ("PUT", "/snapshot/load", "snapshot"),
            ("GET", "/mmds", "MMDS"),
            ("PUT", "/mmds/config", "MMDS"),
            ("PATCH", "/hotplug/memory", "hotplug"),
            ("PUT", "/pmem/p0", "pmem"),
            ("PUT", "/cpu-config", "CPU"),
        ] {
            let (s, msg) = reply(m, p, "{}");
            assert_eq!(s, 400, "{m} {p}");
            assert!(msg.contains(word), "{msg}");
        }
    }

    #[test]
    fn unknown_paths_and_methods() {
        let (s, m) = reply("GET", "/nope", "");
        assert_eq!(s, 404);
        assert!(m.contains("/nope"), "{m}");
        for p in ["/drives", "/machine-config/", "//", "/vm/config/x"] {
            assert_eq!(reply("GET", p, "").0, 404, "{p}");
        }
        match route("DELETE", "/machine-config", b"", "v") {
            Routed::Reply(r) => {
                assert_eq!(r.status, 405);
                assert_eq!(r.allow.as_deref(), Some("GET, PUT, PATCH"));
                assert!(r.fault_message().unwrap_or_default().contains("DELETE"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(reply("GET", "/vsock", "").0, 405);
        let (s, m) = reply("GET", "/machine-config?x=1", "");
        assert_eq!(s, 400);
        assert!(m.contains("query"), "{m}");
    }

    #[test]
    fn the_table_and_the_handlers_agree() {
        for r in ROUTES {
            let path = r.path.replace("{drive_id}", "d0").replace(['{', '}'], "");
            for m in r.methods {
                if let Routed::Reply(resp) = route(m, &path, b"{}", "v") {
                    assert!(
                        resp.status == 400 || resp.status == 200,
                        "{m} {path}: {resp:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn vmm_answers_map_to_statuses() {
        assert_eq!(vmm_response(Ok(Ok(VmmData::Empty))).status, 204);
        let r = vmm_response(Ok(Ok(VmmData::MachineConfig(MachineConfig::default()))));
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v["mem_size_mib"], 128);
        let r = vmm_response(Ok(Err(VmmActionError::new("nope"))));
        assert_eq!(
            (r.status, r.fault_message().as_deref()),
            (400, Some("nope"))
        );
        assert_eq!(vmm_response(Err(SendError::Gone)).status, 503);
        let wake = SendError::Wake(std::io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(vmm_response(Err(wake)).status, 500);
    }
}
