//! virtio-vsock through a running microVM against a plain Unix socket
//! pair: the built-in test guest's echo service (`flatlet.vsock=echo:PORT`)
//! on one side, a host thread echoing on a socket pair on the other, in
//! the same run. Bulk data is written by one thread and read back by
//! another: the writer's rate is host→guest, the reader's (from the first
//! byte back) guest→host; an echo moves both at the pace of the slower.
//! The round trip is one byte out and back, one at a time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stats::Summary;

const PORT: u32 = 5000;
const CHUNK: usize = 64 * 1024;

/// One round's figures for one path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    /// MiB/s written (host→guest, or into the socket pair).
    pub out_mib_s: f64,
    /// MiB/s read back (guest→host).
    pub back_mib_s: f64,
}

/// What the benchmark measured, for vsock and the socket pair.
pub struct VsockFigures {
    /// Bulk rounds through the guest.
    pub vsock: Vec<Round>,
    /// Bulk rounds through the socket pair.
    pub pair: Vec<Round>,
    /// 1-byte round trips through the guest, µs.
    pub vsock_rtt_us: Vec<f64>,
    /// 1-byte round trips through the socket pair, µs.
    pub pair_rtt_us: Vec<f64>,
    /// Bytes per bulk round.
    pub bytes: usize,
}

/// A flatlet running the echo guest.
struct Guest {
    child: Child,
    uds: std::path::PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_guest(flatlet: &Path, dir: &Path) -> Result<Guest, String> {
    let uds = dir.join("v.sock");
    let mut child = Command::new(flatlet)
        .args(["run", "--vsock"])
        .arg(format!("cid=3,uds={}", uds.display()))
        .args([
            "--cmdline",
            &format!("console=ttyS0 flatlet.stay flatlet.vsock=echo:{PORT}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", flatlet.display()))?;
    let console = Arc::new(Mutex::new(String::new()));
    if let Some(mut out) = child.stdout.take() {
        let c = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut c) = c.lock() {
                    c.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
    }
    let guest = Guest { child, uds };
    let needle = format!("vsock: echo on port {PORT}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !console.lock().map(|c| c.contains(&needle)).unwrap_or(false) {
        if Instant::now() > deadline {
            return Err(format!("the guest never said {needle:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(guest)
}

/// A connection to the guest's echo port, past the `OK` line.
fn connect(g: &Guest) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(&g.uds).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {PORT}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err("the guest refused the connection".into()),
            Err(e) => return Err(format!("reading the OK line: {e}")),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!("answer {:?}", String::from_utf8_lossy(&line)));
    }
    Ok(s)
}

/// A socket pair whose far end a thread echoes; the near end.
fn echo_pair() -> Result<UnixStream, String> {
    let (near, mut far) = UnixStream::pair().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n) = far.read(&mut buf) {
            if n == 0 || far.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    Ok(near)
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

/// Writes `bytes` from one thread and reads the echo back on this one,
/// checking every byte.
fn bulk(s: &UnixStream, bytes: usize) -> Result<Round, String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 7 + i / 251) as u8).collect();
    let start = Instant::now();
    let writer = std::thread::spawn(move || -> Result<Duration, String> {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK);
            w.write_all(&data[..n]).map_err(|e| format!("write: {e}"))?;
            left -= n;
        }
        Ok(start.elapsed())
    });
    let mut r = s;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    let mut first = None;
    while got < bytes {
        let n = r
            .read(&mut buf)
            .map_err(|e| format!("read after {got} bytes: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {got} of {bytes} bytes"));
        }
        first.get_or_insert_with(Instant::now);
        for (i, &b) in buf[..n].iter().enumerate() {
            let at = (got + i) % CHUNK;
            if b != (at * 7 + at / 251) as u8 {
                return Err(format!("byte {} came back wrong", got + i));
            }
        }
        got += n;
    }
    let back = first.map_or(start.elapsed(), |f| f.elapsed());
    let out = writer.join().map_err(|_| "the writer panicked".to_string())??;
    Ok(Round {
        out_mib_s: mib_s(bytes, out),
        back_mib_s: mib_s(bytes, back),
    })
}

/// One byte out and back, `n` times; µs each.
fn round_trips(s: &UnixStream, n: usize) -> Result<Vec<f64>, String> {
    let mut s = s;
    let mut b = [0u8; 1];
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        s.write_all(&[i as u8]).map_err(|e| e.to_string())?;
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
        if b[0] != i as u8 {
            return Err("a round trip came back wrong".into());
        }
    }
    Ok(v)
}

/// Runs the benchmark: `rounds` bulk rounds of `mib` MiB and `trips`
/// round trips on each path, interleaved.
pub fn run(flatlet: &Path, mib: usize, rounds: usize, trips: usize) -> Result<VsockFigures, String> {
    let dir = std::env::temp_dir().join(format!("flatlet-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = (|| -> Result<VsockFigures, String> {
        let guest = start_guest(flatlet, &dir)?;
        let bytes = mib << 20;
        let mut f = VsockFigures {
            vsock: Vec::new(),
            pair: Vec::new(),
            vsock_rtt_us: Vec::new(),
            pair_rtt_us: Vec::new(),
            bytes,
        };
        // A warm-up of each path.
        bulk(&connect(&guest)?, 1 << 20)?;
        bulk(&echo_pair()?, 1 << 20)?;
        for _ in 0..rounds {
            f.vsock.push(bulk(&connect(&guest)?, bytes)?);
            f.pair.push(bulk(&echo_pair()?, bytes)?);
        }
        let v = connect(&guest)?;
        let p = echo_pair()?;
        for _ in 0..rounds {
            f.vsock_rtt_us.extend(round_trips(&v, trips / rounds.max(1))?);
            f.pair_rtt_us.extend(round_trips(&p, trips / rounds.max(1))?);
        }
        Ok(f)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    Summary::of(&v.collect::<Vec<_>>()).map_or(f64::NAN, |s| s.median)
}

/// Prints the figures: medians, and vsock's as a ratio of the pair's.
pub fn print(f: &VsockFigures) {
    println!(
        "{} MiB per bulk round, {} rounds; medians",
        f.bytes >> 20,
        f.vsock.len()
    );
    println!(
        "{:<28} {:>14} {:>18} {:>8}",
        "path", "vsock", "Unix socket pair", "ratio"
    );
    let rows = [
        (
            "host->guest, MiB/s",
            median(f.vsock.iter().map(|r| r.out_mib_s)),
            median(f.pair.iter().map(|r| r.out_mib_s)),
        ),
        (
            "guest->host, MiB/s",
            median(f.vsock.iter().map(|r| r.back_mib_s)),
            median(f.pair.iter().map(|r| r.back_mib_s)),
        ),
        (
            "1-byte round trip, µs",
            median(f.vsock_rtt_us.iter().copied()),
            median(f.pair_rtt_us.iter().copied()),
        ),
    ];
    for (name, v, p) in rows {
        println!("{name:<28} {v:>14.1} {p:>18.1} {:>8.3}", v / p);
    }
    for (name, rtt) in [("vsock", &f.vsock_rtt_us), ("pair", &f.pair_rtt_us)] {
        if let Some(s) = Summary::of(rtt) {
            println!(
                "{name} round trip µs: min {:.1} median {:.1} p95 {:.1} max {:.1} (n={})",
                s.min, s.median, s.p95, s.max, s.n
            );
        }
    }
}
