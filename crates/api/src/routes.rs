//! The routes flatlet serves, and how each request becomes a controller
//! [`Request`]. `resources/openapi.json` lists exactly [`ROUTES`]; a test
//! holds the two together.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use flatlet_vmm::config::devices::{DriveConfig, DriveUpdate, NetConfig, NetUpdate};
use flatlet_vmm::config::rate_limit::EntropyConfig;
use flatlet_vmm::config::vsock::VsockConfig;
use flatlet_vmm::config::{BootSource, BootSourceConfig, MachineConfig, MachineConfigUpdate};
use flatlet_vmm::controller::{FIRECRACKER_API_VERSION, Request, Response};
use flatlet_vmm::logger::LoggerConfig;
use flatlet_vmm::metrics::MetricsConfig;
use flatlet_vmm::mmds::MmdsConfig;

/// Every (method, path) flatlet serves; `{...}` is a path parameter.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/entropy"),
    ("GET", "/mmds"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("PUT", "/mmds/config"),
    ("PUT", "/vsock"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
];

/// Why a request could not become a controller request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// No such route.
    #[error("Invalid request method and/or path: {0} {1}")]
    NotFound(String, String),
    /// The body is missing.
    #[error("The request body is empty; this request needs a JSON body.")]
    EmptyBody,
    /// The body is not what the route takes.
    #[error("The request body is not valid: {0}")]
    Body(String),
    /// The id in the path and the one in the body differ.
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch,
    /// A GET with a body (Firecracker refuses them).
    #[error("GET request cannot have a body.")]
    GetWithBody,
}

/// `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: ActionType,
}

#[derive(Debug, Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: VmStateValue,
}

#[derive(Debug, Deserialize)]
enum VmStateValue {
    Paused,
    Resumed,
}

fn body<T: DeserializeOwned>(raw: &[u8]) -> Result<T, RouteError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::EmptyBody);
    }
    serde_json::from_slice(raw).map_err(|e| RouteError::Body(e.to_string()))
}

fn same_id(path_id: &str, body_id: &str) -> Result<(), RouteError> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(RouteError::IdMismatch)
    }
}

/// Turns a request into a controller request.
pub fn parse(method: &str, path: &str, raw: &[u8]) -> Result<Request, RouteError> {
    let not_found = || RouteError::NotFound(method.to_string(), path.to_string());
    if method == "GET" && !raw.is_empty() {
        return Err(RouteError::GetWithBody);
    }
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    Ok(match (method, segments.as_slice()) {
        ("GET", []) => Request::GetInstanceInfo,
        ("GET", ["version"]) => Request::GetVersion,
        ("GET", ["machine-config"]) => Request::GetMachineConfig,
        ("PUT", ["machine-config"]) => Request::PutMachineConfig(body::<MachineConfig>(raw)?),
        ("PATCH", ["machine-config"]) => Request::PatchMachineConfig(body::<MachineConfigUpdate>(raw)?),
        // The controller checks the files, with the other checks.
        ("PUT", ["boot-source"]) => Request::PutBootSource(BootSource::from(&body::<BootSourceConfig>(raw)?)),
        ("PUT", ["drives", id]) if !id.is_empty() => {
            let d: DriveConfig = body(raw)?;
            same_id(id, &d.drive_id)?;
            Request::PutDrive(d)
        }
        ("PATCH", ["drives", id]) if !id.is_empty() => {
            let d: DriveUpdate = body(raw)?;
            same_id(id, &d.drive_id)?;
            Request::PatchDrive(d)
        }
        ("PUT", ["network-interfaces", id]) if !id.is_empty() => {
            let n: NetConfig = body(raw)?;
            same_id(id, &n.iface_id)?;
            Request::PutNetworkInterface(n)
        }
        ("PATCH", ["network-interfaces", id]) if !id.is_empty() => {
            let n: NetUpdate = body(raw)?;
            same_id(id, &n.iface_id)?;
            Request::PatchNetworkInterface(n)
        }
        ("PUT", ["actions"]) => match body::<Action>(raw)?.action_type {
            ActionType::InstanceStart => Request::Start,
            ActionType::SendCtrlAltDel => Request::SendCtrlAltDel,
            ActionType::FlushMetrics => Request::FlushMetrics,
        },
        ("PATCH", ["vm"]) => match body::<VmState>(raw)?.state {
            VmStateValue::Paused => Request::Pause,
            VmStateValue::Resumed => Request::Resume,
        },
        ("GET", ["vm", "config"]) => Request::GetVmConfig,
        ("PUT", ["snapshot", "create"]) => Request::CreateSnapshot(body(raw)?),
        ("PUT", ["snapshot", "load"]) => Request::LoadSnapshot(body(raw)?),
        ("PUT", ["logger"]) => Request::PutLogger(body::<LoggerConfig>(raw)?),
        ("PUT", ["metrics"]) => Request::PutMetrics(body::<MetricsConfig>(raw)?),
        ("PUT", ["entropy"]) => Request::PutEntropy(body::<EntropyConfig>(raw)?),
        ("GET", ["mmds"]) => Request::GetMmds,
        // A JSON object, as Firecracker's OpenAPI says (its binary takes any
        // value, which `GET /mmds` then returns against that schema).
        ("PUT", ["mmds"]) => Request::PutMmds(body::<serde_json::Map<_, _>>(raw)?.into()),
        ("PATCH", ["mmds"]) => Request::PatchMmds(body::<serde_json::Map<_, _>>(raw)?.into()),
        ("PUT", ["mmds", "config"]) => Request::PutMmdsConfig(body::<MmdsConfig>(raw)?),
        ("PUT", ["vsock"]) => Request::PutVsock(body::<VsockConfig>(raw)?),
        _ => return Err(not_found()),
    })
}

/// The HTTP status and JSON body (if any) of a controller's answer (an
/// error comes with its status).
pub fn reply(result: Result<Response, (u16, String)>) -> (u16, Option<String>) {
    let json = |v: serde_json::Result<String>| v.unwrap_or_else(|e| format!("{{\"fault_message\":\"{e}\"}}"));
    match result {
        Ok(Response::Empty) => (204, None),
        Ok(Response::InstanceInfo(i)) => (200, Some(json(serde_json::to_string(&i)))),
        Ok(Response::MachineConfig(m)) => (200, Some(json(serde_json::to_string(&m)))),
        Ok(Response::VmConfig(c)) => (200, Some(json(serde_json::to_string(&c)))),
        Ok(Response::Version(v)) => (
            200,
            Some(
                serde_json::json!({"firecracker_version": FIRECRACKER_API_VERSION, "flatlet_version": v})
                    .to_string(),
            ),
        ),
        Ok(Response::Mmds(v)) => (200, Some(v.to_string())),
        Err((status, message)) => (status, fault(&message).1),
    }
}

/// A 400 answer with Firecracker's error body.
pub fn fault(message: &str) -> (u16, Option<String>) {
    (
        400,
        Some(serde_json::json!({ "fault_message": message }).to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str, body: &str) -> Request {
        parse(method, path, body.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    #[test]
    fn every_route_parses() {
        assert_eq!(ok("GET", "/", ""), Request::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), Request::GetVersion);
        assert_eq!(ok("GET", "/machine-config", ""), Request::GetMachineConfig);
        assert!(matches!(
            ok(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#
            ),
            Request::PutMachineConfig(MachineConfig { vcpu_count: 2, .. })
        ));
        assert!(matches!(
            ok("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#),
            Request::PatchMachineConfig(MachineConfigUpdate {
                mem_size_mib: Some(512),
                ..
            })
        ));
        assert!(matches!(
            ok("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#),
            Request::PutBootSource(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/drives/root",
                r#"{"drive_id": "root", "path_on_host": "/r", "is_root_device": true}"#
            ),
            Request::PutDrive(_)
        ));
        assert!(matches!(
            ok(
                "PATCH",
                "/drives/root",
                r#"{"drive_id": "root", "path_on_host": "/r2"}"#
            ),
            Request::PatchDrive(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#
            ),
            Request::PutNetworkInterface(_)
        ));
        assert!(matches!(
            ok("PATCH", "/network-interfaces/eth0", r#"{"iface_id": "eth0"}"#),
            Request::PatchNetworkInterface(_)
        ));
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            Request::Start
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
            Request::SendCtrlAltDel
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
            Request::FlushMetrics
        );
        assert_eq!(ok("PATCH", "/vm", r#"{"state": "Paused"}"#), Request::Pause);
        assert_eq!(ok("PATCH", "/vm", r#"{"state": "Resumed"}"#), Request::Resume);
        assert_eq!(ok("GET", "/vm/config", ""), Request::GetVmConfig);
        assert!(matches!(
            ok("PUT", "/logger", r#"{"level": "Debug"}"#),
            Request::PutLogger(_)
        ));
        assert!(matches!(
            ok("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
            Request::PutMetrics(_)
        ));
        assert_eq!(ok("GET", "/mmds", ""), Request::GetMmds);
        assert_eq!(
            ok("PUT", "/mmds", r#"{"latest": {"a": "b"}}"#),
            Request::PutMmds(serde_json::json!({"latest": {"a": "b"}}))
        );
        assert_eq!(
            ok("PATCH", "/mmds", r#"{"a": null}"#),
            Request::PatchMmds(serde_json::json!({"a": null}))
        );
        for (method, bad) in [
            ("PUT", "false"),
            ("PUT", "[1]"),
            ("PUT", "null"),
            ("PATCH", "\"s\""),
        ] {
            assert!(
                matches!(parse(method, "/mmds", bad.as_bytes()), Err(RouteError::Body(_))),
                "{method} {bad}"
            );
        }
        assert!(matches!(
            ok(
                "PUT",
                "/mmds/config",
                r#"{"network_interfaces": ["eth0"], "version": "V2"}"#
            ),
            Request::PutMmdsConfig(_)
        ));
        assert!(matches!(
            parse(
                "PUT",
                "/mmds/config",
                br#"{"network_interfaces": [], "ipv4": "x"}"#
            ),
            Err(RouteError::Body(_))
        ));
        // A trailing slash is the same path.
        assert_eq!(ok("GET", "/machine-config/", ""), Request::GetMachineConfig);
    }

    #[test]
    fn bad_requests() {
        let nf = |m: &str, p: &str| RouteError::NotFound(m.into(), p.into());
        assert_eq!(parse("DELETE", "/", b""), Err(nf("DELETE", "/")));
        assert_eq!(parse("GET", "/balloon", b""), Err(nf("GET", "/balloon")));
        assert_eq!(parse("PUT", "/drives/", b"{}"), Err(nf("PUT", "/drives/")));
        assert_eq!(parse("PUT", "/drives/a/b", b"{}"), Err(nf("PUT", "/drives/a/b")));
        assert_eq!(parse("PUT", "/machine-config", b""), Err(RouteError::EmptyBody));
        assert_eq!(parse("GET", "/version", b"{}"), Err(RouteError::GetWithBody));
        assert!(matches!(
            ok("PUT", "/logger", r#"{"level": "debug"}"#),
            Request::PutLogger(_)
        ));
        assert!(matches!(
            parse("PUT", "/machine-config", b"{"),
            Err(RouteError::Body(_))
        ));
        assert!(matches!(
            parse("PUT", "/machine-config", br#"{"vcpu_count": 1, "mem_size_mib": 128, "gpu": true}"#),
            Err(RouteError::Body(m)) if m.contains("unknown field `gpu`")
        ));
        assert!(matches!(
            parse("PUT", "/actions", br#"{"action_type": "Reboot"}"#),
            Err(RouteError::Body(_))
        ));
        assert!(matches!(
            parse("PATCH", "/vm", br#"{"state": "Frozen"}"#),
            Err(RouteError::Body(_))
        ));
        assert_eq!(
            parse(
                "PUT",
                "/drives/a",
                br#"{"drive_id": "b", "path_on_host": "/r", "is_root_device": false}"#
            ),
            Err(RouteError::IdMismatch)
        );
        assert!(matches!(
            parse("PUT", "/actions", &[0xff, 0xfe]),
            Err(RouteError::Body(_))
        ));
    }

    #[test]
    fn replies() {
        assert_eq!(reply(Ok(Response::Empty)), (204, None));
        let (code, body) = reply(Err((400, "nope".into())));
        assert_eq!(code, 400);
        assert_eq!(body.unwrap(), r#"{"fault_message":"nope"}"#);
        let (code, body) = reply(Err((413, "too large".into())));
        assert_eq!(code, 413);
        assert_eq!(body.unwrap(), r#"{"fault_message":"too large"}"#);
        let (code, body) = reply(Ok(Response::Mmds(serde_json::json!({"a": 1}))));
        assert_eq!((code, body.unwrap().as_str()), (200, r#"{"a":1}"#));
        let (code, body) = reply(Ok(Response::Version("1.2.3".into())));
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body.unwrap()).unwrap();
        assert_eq!(v["firecracker_version"], FIRECRACKER_API_VERSION);
        assert_eq!(v["flatlet_version"], "1.2.3");
    }
}
