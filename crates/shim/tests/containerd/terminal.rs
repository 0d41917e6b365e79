//! Terminals: `ctr run -t` and `ctr task exec -t` with the flatlet
//! runtime, on a pseudo-terminal of the test's own (ctr wants a terminal
//! on its stdio), whose window size is set before ctr starts: ctr sends it
//! with `resize_pty` right after the start.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::pty::{Winsize, openpty};

use super::{Containerd, IMAGE, RUNTIME, assert_nothing_left, text};

/// How long a marker may take to appear (a restore, an exec: seconds;
/// minutes on a loaded nested host).
const MARKER_TIMEOUT: Duration = Duration::from_secs(600);

/// A ctr command on a terminal of the test's own.
struct OnTerminal {
    master: File,
    output: Arc<Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
    child: Child,
    start: Instant,
}

impl OnTerminal {
    /// Starts `ctr args` with a new terminal of `rows` x `cols` as its
    /// stdin, stdout and stderr.
    fn start(ctd: &Containerd, args: &[&str], rows: u16, cols: u16) -> Self {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None).unwrap();
        // Only ctr gets the terminal: the ctr commands run meanwhile must
        // not hold it open.
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
        }
        let slave = File::from(pty.slave);
        let start = Instant::now();
        let child = ctd
            .ctr_cmd(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let master = File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let mut master = master.try_clone().unwrap();
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match master.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => output.lock().unwrap().extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // EIO: ctr (and whatever it started) closed the terminal.
                        Err(_) => break,
                    }
                }
            })
        };
        Self {
            master,
            output,
            reader,
            child,
            start,
        }
    }

    /// What came out so far, without carriage returns (the container's
    /// terminal turns `\n` into `\r\n`, and ctr's in raw mode, which keeps
    /// output processing, does it again).
    fn output(&self) -> String {
        text(&self.output.lock().unwrap()).replace('\r', "")
    }

    /// Waits until the output has `marker`.
    fn wait_for(&mut self, marker: &str) {
        let deadline = Instant::now() + MARKER_TIMEOUT;
        while !self.output().contains(marker) {
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "no {marker:?} from ctr (exited: {exited:?}): {:?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `keys`.
    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    /// Waits for ctr to end and for the terminal to close: exit code,
    /// everything that came out, time since the start.
    fn finish(mut self) -> (Option<i32>, String, Duration) {
        let status = self.child.wait().unwrap();
        let took = self.start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.reader.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the terminal stayed open after ctr exited: {:?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = self.output();
        self.reader.join().unwrap();
        (status.code(), output, took)
    }
}

/// The line of `output` that `tty` printed: `/dev/pts/<n>`.
fn tty_line(output: &str) -> Option<&str> {
    output.lines().find(|l| {
        l.strip_prefix("/dev/pts/")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// `sh -c` script: prints its terminal, waits (at most 20 s) for the size
/// ctr sends after the start (a new terminal is 0x0, which busybox's stty
/// shows as 24 80), prints it and `ready`, reads a typed line, prints it
/// and a line on stderr, exits with `code`.
fn script(rows: u16, cols: u16, code: u8) -> String {
    format!(
        "tty; n=0; while [ \"$(stty size)\" != '{rows} {cols}' ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done; \
         echo \"size: $(stty size)\"; echo ready; read line; echo \"typed: $line\"; echo on-stderr >&2; exit {code}"
    )
}

/// Checks what a run of [`script`] printed.
fn check(output: &str, rows: u16, cols: u16, typed: &str) {
    assert!(
        tty_line(output).is_some(),
        "tty printed a /dev/pts path: {output:?}"
    );
    assert!(!output.contains("not a tty"), "{output:?}");
    assert!(
        output.contains(&format!("size: {rows} {cols}\n")),
        "the terminal has the outer size: {output:?}"
    );
    // The terminal echoes what is typed, and the process reads it.
    assert!(
        output.contains(&format!("ready\n{typed}\ntyped: {typed}\n")),
        "{output:?}"
    );
    assert!(
        output.contains("on-stderr\n"),
        "stderr goes to the terminal: {output:?}"
    );
}

pub fn terminal_container(ctd: &Containerd, jail_base: &Path, state_dir: &Path) {
    // ctr run -t: the container's first process on a terminal.
    let (rows, cols) = (37, 101);
    let sh = script(rows, cols, 4);
    let mut run = OnTerminal::start(
        ctd,
        &[
            "run",
            "-t",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t30",
            "sh",
            "-c",
            &sh,
        ],
        rows,
        cols,
    );
    run.wait_for("ready\n");
    // Raw mode in ctr: the container's terminal turns the CR into a newline.
    run.type_keys(b"hello from the host\r");
    let (code, output, took) = run.finish();
    eprintln!(
        "containerd: ctr run -t --rm took {:.1} s; output {output:?}",
        took.as_secs_f64()
    );
    assert_eq!(code, Some(4), "the exit status: {output:?}");
    check(&output, rows, cols, "hello from the host");
    let out = ctd.ctr(&["containers", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "", "ctr run --rm removed the container");
    assert_nothing_left(jail_base, state_dir);

    // ctr task exec -t in a container that has no terminal.
    ctd.run_detached("t31");
    let (rows, cols) = (29, 83);
    let sh = script(rows, cols, 6);
    let mut exec = OnTerminal::start(
        ctd,
        &["task", "exec", "-t", "--exec-id", "te1", "t31", "sh", "-c", &sh],
        rows,
        cols,
    );
    exec.wait_for("ready\n");
    exec.type_keys(b"typed into an exec\r");
    let (code, output, took) = exec.finish();
    eprintln!(
        "containerd: ctr task exec -t took {:.1} s; output {output:?}",
        took.as_secs_f64()
    );
    assert_eq!(code, Some(6), "the exec's exit status: {output:?}");
    check(&output, rows, cols, "typed into an exec");
    // As another user: the terminal is the exec's controlling terminal
    // (/dev/tty reaches it) and belongs to the exec's user (devpts's
    // mode=0620,gid=5 otherwise).
    let (code, output, _) = OnTerminal::start(
        ctd,
        &[
            "task",
            "exec",
            "-t",
            "--user",
            "65534",
            "--exec-id",
            "te2",
            "t31",
            "sh",
            "-c",
            "id -u; echo via-dev-tty >/dev/tty && ls -ln \"$(tty)\"",
        ],
        24,
        80,
    )
    .finish();
    assert_eq!(code, Some(0), "{output:?}");
    assert!(output.lines().any(|l| l == "65534"), "id -u: {output:?}");
    assert!(output.contains("via-dev-tty\n"), "{output:?}");
    let ls = output
        .lines()
        .find(|l| l.contains("/dev/pts/"))
        .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>());
    assert_eq!(
        ls,
        Some(vec!["crw--w----", "1", "65534", "5"]),
        "ls -ln of the terminal: {output:?}"
    );

    let out = ctd.ctr(&["task", "kill", "-s", "SIGKILL", "t31"]);
    assert!(out.status.success(), "ctr task kill: {}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
        if ls.lines().any(|l| l.starts_with("t31 ") && l.contains("STOPPED")) {
            break;
        }
        assert!(Instant::now() < deadline, "t31 did not stop: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctd.ctr(&["task", "rm", "t31"]).status.success());
    assert!(ctd.ctr(&["containers", "rm", "t31"]).status.success());
    assert_nothing_left(jail_base, state_dir);
}
