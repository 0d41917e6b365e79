//! MMDS through the real binary's API: the data store (`PUT`, `PATCH`,
//! `GET /mmds`), its size limit, `--metadata`, `PUT /mmds/config` and
//! its checks, and `GET /vm/config`. (The guest side is tested with
//! crafted frames in crates/mmds and through a net device in
//! crates/devices.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::vmm::Vmm;
use serde_json::{Value, json};

fn get_json(vmm: &Vmm, path: &str) -> Value {
    serde_json::from_str(&vmm.ok("GET", path, None).body).unwrap()
}

#[test]
fn data_store_put_patch_get_and_limit() {
    let vmm = Vmm::start_with("mmds-store", &["--mmds-size-limit", "200"], &[]);
    assert_eq!(get_json(&vmm, "/mmds"), json!({}));
    vmm.fault("PATCH", "/mmds", Some(r#"{"a": "b"}"#), "not initialized");
    let data = json!({"latest": {"meta-data": {"ami-id": "ami-1", "reservation-id": "r-1"}}});
    assert_eq!(vmm.ok("PUT", "/mmds", Some(&data.to_string())).status, 204);
    assert_eq!(get_json(&vmm, "/mmds"), data);
    let patch = r#"{"latest": {"meta-data": {"ami-id": "ami-2", "reservation-id": null}}}"#;
    assert_eq!(vmm.ok("PATCH", "/mmds", Some(patch)).status, 204);
    assert_eq!(
        get_json(&vmm, "/mmds"),
        json!({"latest": {"meta-data": {"ami-id": "ami-2"}}})
    );
    // Over the limit: 413, as Firecracker, and nothing changes.
    let big = json!({"x": "y".repeat(300)}).to_string();
    for method in ["PUT", "PATCH"] {
        let r = vmm.call(method, "/mmds", Some(&big));
        assert_eq!(r.status, 413, "{method}: {r:?}");
        assert!(r.body.contains("over its limit of 200 bytes"), "{r:?}");
    }
    assert_eq!(
        get_json(&vmm, "/mmds"),
        json!({"latest": {"meta-data": {"ami-id": "ami-2"}}})
    );
    vmm.fault("PUT", "/mmds", Some("{"), "not valid");
    vmm.fault("PUT", "/mmds", Some(""), "empty");
}

#[test]
fn metadata_flag_seeds_the_store() {
    let dir = common::TempDir::new("mmds-metadata");
    let file = dir.path("metadata.json");
    std::fs::write(&file, r#"{"latest": {"user-data": "hello"}}"#).unwrap();
    let vmm = Vmm::start_with("mmds-seeded", &["--metadata", file.to_str().unwrap()], &[]);
    assert_eq!(get_json(&vmm, "/mmds"), json!({"latest": {"user-data": "hello"}}));

    // A file that is not JSON, or over the limit, ends flatlet with a
    // configuration error.
    std::fs::write(&file, "{").unwrap();
    let out = common::flatlet()
        .args(["--api-sock", dir.path("x.sock").to_str().unwrap()])
        .args(["--metadata", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
    std::fs::write(&file, json!({"a": "b".repeat(100)}).to_string()).unwrap();
    let out = common::flatlet()
        .args(["--api-sock", dir.path("y.sock").to_str().unwrap()])
        .args(["--metadata", file.to_str().unwrap(), "--mmds-size-limit", "50"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("over its limit"));
}

#[test]
fn config_checks_and_vm_config() {
    let vmm = Vmm::start("mmds-config");
    vmm.fault(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"]}"#),
        "does not exist",
    );
    vmm.ok(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap-mmds0"}"#),
    );
    vmm.fault(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": []}"#),
        "is empty",
    );
    vmm.fault(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#),
        "link-local",
    );
    vmm.fault(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"], "version": "V3"}"#),
        "unknown variant",
    );
    vmm.fault(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"], "extra": 1}"#),
        "unknown field",
    );
    assert!(get_json(&vmm, "/vm/config").get("mmds-config").is_none());
    vmm.ok(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"], "version": "V2"}"#),
    );
    assert_eq!(
        get_json(&vmm, "/vm/config")["mmds-config"],
        json!({"version": "V2", "network_interfaces": ["eth0"],
               "ipv4_address": "169.254.169.254", "imds_compat": false})
    );
    vmm.ok(
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2", "imds_compat": true}"#),
    );
    assert_eq!(
        get_json(&vmm, "/vm/config")["mmds-config"],
        json!({"version": "V1", "network_interfaces": ["eth0"],
               "ipv4_address": "169.254.170.2", "imds_compat": true})
    );
}

#[test]
fn config_file_accepts_mmds_config() {
    let file = flatlet_vmm::config::ConfigFile::parse(
        r#"{"boot-source": {"kernel_image_path": "/k"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
            "mmds-config": {"network_interfaces": ["eth0"], "version": "V2"}}"#,
    )
    .unwrap();
    let mmds = file.mmds_config.unwrap();
    assert_eq!(mmds.network_interfaces, ["eth0"]);
    assert!(
        flatlet_vmm::config::ConfigFile::parse(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "mmds-config": {"version": "V2"}}"#
        )
        .is_err(),
        "network_interfaces is required"
    );
}
