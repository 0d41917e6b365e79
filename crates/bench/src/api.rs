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

/// The command line that serves the API of `vmm` (flatlet, or another
/// VMM with Firecracker's flags) on `sock`, logging only errors.
pub fn api_argv(vmm: &Path, sock: &Path, extra: &[&str]) -> Vec<String> {
    let mut argv = vec![
        vmm.display().to_string(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--level".into(),
        "Error".into(),
    ];
    argv.extend(extra.iter().map(|a| a.to_string()));
    argv
}

/// Spawns `argv` (which serves the API on `sock`) and times it to its
/// first answered `GET /`. The same harness for every VMM: spawn, then
/// connect and ask every 50 µs until a 200 comes back.
pub fn time_to_first_answer(argv: &[String], sock: &Path) -> Result<f64, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let _ = std::fs::remove_file(sock);
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
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
    let _ = std::fs::remove_file(sock);
    Ok(elapsed.as_secs_f64() * 1e6)
}

/// Times each command line to its first answer, `runs` times, interleaved
/// (A B A B ...); `argv(i, sock)` gives contender `i`'s command line.
pub fn first_answers_interleaved(
    contenders: usize,
    runs: usize,
    argv: &dyn Fn(usize, &Path) -> Vec<String>,
) -> Result<Vec<Vec<f64>>, String> {
    let dir = std::env::temp_dir().join(format!("flatlet-bench-api1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut out = vec![Vec::with_capacity(runs); contenders];
    let mut result = Ok(());
    'runs: for _ in 0..runs {
        for (i, times) in out.iter_mut().enumerate() {
            let sock = dir.join(format!("api{i}.sock"));
            match time_to_first_answer(&argv(i, &sock), &sock) {
                Ok(us) => times.push(us),
                Err(e) => {
                    result = Err(e);
                    break 'runs;
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| out)
}

/// Runs the API benchmark.
pub fn run(flatlet: &Path, launches: usize, requests: usize) -> Result<ApiFigures, String> {
    let dir = std::env::temp_dir().join(format!("flatlet-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("api.sock");
    let mut first_answer_us = Vec::new();
    for _ in 0..launches {
        first_answer_us.push(time_to_first_answer(&api_argv(flatlet, &sock, &[]), &sock)?);
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
