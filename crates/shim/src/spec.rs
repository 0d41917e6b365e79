//! The parts of an OCI runtime spec the shim reads: the process (from the
//! bundle's `config.json`, or an exec's spec) and the annotations.

use std::collections::HashMap;
use std::path::Path;

use flatlet_agent_protocol::ProcessSpec;
use serde::Deserialize;

/// The CRI's annotation naming a pod's sandbox: containers with the same
/// one are meant to share a VM.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing the OCI spec: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the OCI spec has no process")]
    NoProcess,
    #[error("the OCI spec's process has no args")]
    NoArgs,
}

#[derive(Debug, Deserialize)]
struct Spec {
    process: Option<Process>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Process {
    #[serde(default)]
    terminal: bool,
    #[serde(default)]
    user: User,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cwd: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct User {
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    additional_gids: Vec<u32>,
}

impl From<Process> for ProcessSpec {
    fn from(p: Process) -> Self {
        ProcessSpec {
            args: p.args,
            env: p.env,
            cwd: if p.cwd.is_empty() { "/".into() } else { p.cwd },
            uid: p.user.uid,
            gid: p.user.gid,
            additional_gids: p.user.additional_gids,
            terminal: p.terminal,
        }
    }
}

/// The container's process and annotations from `<bundle>/config.json`.
pub fn read_bundle(bundle: &Path) -> Result<(ProcessSpec, HashMap<String, String>), SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let spec: Spec = serde_json::from_slice(&text)?;
    let process = spec.process.ok_or(SpecError::NoProcess)?;
    if process.args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    Ok((process.into(), spec.annotations))
}

/// An exec's process (the JSON of an OCI `process` object).
pub fn parse_process(json: &[u8]) -> Result<ProcessSpec, SpecError> {
    let process: Process = serde_json::from_slice(json)?;
    if process.args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    Ok(process.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bundles_process_and_annotations_are_read() {
        let dir = std::env::temp_dir().join(format!("flatlet-shim-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion": "1.0.2", "process": {"terminal": false, "user": {"uid": 1000, "gid": 100,
               "additionalGids": [10]}, "args": ["sh", "-c", "exit 3"], "env": ["PATH=/bin"], "cwd": "/tmp",
               "capabilities": {}}, "root": {"path": "rootfs"},
               "annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}"#,
        )
        .unwrap();
        let (p, ann) = read_bundle(&dir).unwrap();
        assert_eq!(p.args, ["sh", "-c", "exit 3"]);
        assert_eq!(
            (p.uid, p.gid, p.additional_gids.as_slice(), p.cwd.as_str()),
            (1000, 100, &[10][..], "/tmp")
        );
        assert_eq!(ann.get(SANDBOX_ID_ANNOTATION).map(String::as_str), Some("pod1"));
        std::fs::write(dir.join("config.json"), r#"{"process": {"args": []}}"#).unwrap();
        assert!(matches!(read_bundle(&dir), Err(SpecError::NoArgs)));
        std::fs::write(dir.join("config.json"), r#"{}"#).unwrap();
        assert!(matches!(read_bundle(&dir), Err(SpecError::NoProcess)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_execs_process_defaults_its_cwd() {
        let p = parse_process(br#"{"args": ["ls"], "env": []}"#).unwrap();
        assert_eq!((p.cwd.as_str(), p.uid), ("/", 0));
        assert!(parse_process(b"[").is_err());
    }
}
