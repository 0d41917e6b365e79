//! The API's costs: process start to the first answered request, and the
//! latency of requests on a kept-alive connection.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flatlet_api::client::Client;

use crate::stats::Summary;

/// What the API benchmark measured.
pub struct ApiFigures {
    /// Spawn to the first `GET /` answered, per launch, in µs.
    pub first_answer_us: Vec<f64>,
    /// Latency of `GET /`, per request, in µs.
    pub get_us: Vec<f64>,
    /// Latency of `PUT /machine-config`, per request, in µs.
    pub put_us: Vec<f64>,
}

fn stop(child: &mut std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// Spawns flatlet with an API socket and times it to its first answer.
fn time_to_first_answer(flatlet: &Path, sock: &Path) -> Result<f64, String> {
    let _ = std::fs::remove_file(sock);
    let start = Instant::now();
    let mut child = Command::new(flatlet)
        .arg("--api-sock")
        .arg(sock)
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", flatlet.display()))?;
    let deadline = start + Duration::from_secs(10);
    let elapsed = loop {
        if let Ok(mut c) = Client::connect(sock) {
            if let Ok(r) = c.request("GET", "/", None) {
                if r.status == 200 {
                    break start.elapsed();
                }
            }
        }
        if Instant::now() > deadline {
            stop(&mut child);
            return Err("the API never answered".into());
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    stop(&mut child);
    Ok(elapsed.as_secs_f64() * 1e6)
}

/// Runs the API benchmark.
pub fn run(flatlet: &Path, launches: usize, requests: usize) -> Result<ApiFigures, String> {
    let dir = std::env::temp_dir().join(format!("flatlet-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("api.sock");
    let mut first_answer_us = Vec::new();
    for _ in 0..launches {
        first_answer_us.push(time_to_first_answer(flatlet, &sock)?);
    }
    // Request latency on one long-lived instance.
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(flatlet)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match Client::connect(&sock) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => {
                stop(&mut child);
                return Err(e.to_string());
            }
        }
    };
    let mut time = |method: &str, path: &str, body: Option<&str>, expect: u16| -> Result<Vec<f64>, String> {
        let mut v = Vec::with_capacity(requests);
        for _ in 0..requests {
            let t = Instant::now();
            let r = client.request(method, path, body).map_err(|e| e.to_string())?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
            if r.status != expect {
                return Err(format!("{method} {path}: {r:?}"));
            }
        }
        Ok(v)
    };
    let get_us = time("GET", "/", None, 200);
    let put_us = time(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        204,
    );
    stop(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ApiFigures {
        first_answer_us,
        get_us: get_us?,
        put_us: put_us?,
    })
}

/// Prints the figures.
pub fn print(f: &ApiFigures) {
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "µs", "min", "median", "p95", "max"
    );
    for (name, v) in [
        ("spawn -> first GET / answered", &f.first_answer_us),
        ("GET / latency", &f.get_us),
        ("PUT /machine-config latency", &f.put_us),
    ] {
        if let Some(s) = Summary::of(v) {
            println!(
                "{name:<34} {:>10.0} {:>10.0} {:>10.0} {:>10.0}   (n={})",
                s.min, s.median, s.p95, s.max, s.n
            );
        }
    }
}
