//! The exec helper: between the agent's fork and the container's process.
//! It runs as `flatlet-agent --exec-helper ROOT SPEC_JSON` with the
//! process's standard streams already in place, starts a session (with
//! `terminal`, the terminal on its stdin becomes the session's controlling
//! terminal, owned by the spec's user, as runc does), enters ROOT, takes
//! the spec's user and groups, goes to its working directory and execs its
//! `args` with its environment. Failing, it says why on stderr (the
//! container's) and exits 127 (no such program) or 126 (anything else),
//! as a shell does.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use flatlet_agent_protocol::ProcessSpec;
use nix::unistd::{Gid, Uid, chdir, chroot, execve, fchown, setgid, setgroups, setsid, setuid};

use crate::pty;

/// The first argument that selects the helper.
pub const FLAG: &str = "--exec-helper";

/// The default `PATH` when the spec's environment has none (runc's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
enum HelperError {
    #[error("usage: flatlet-agent {FLAG} ROOT SPEC_JSON")]
    Usage,
    #[error("bad process spec: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{0}: not found")]
    NotFound(String),
    #[error("an argument or variable holds a NUL byte")]
    Nul,
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> HelperError {
    let what = what.into();
    move |source| HelperError::Sys { what, source }
}

pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("flatlet-agent: {e}");
            if matches!(e, HelperError::NotFound(_)) {
                127
            } else {
                126
            }
        }
    }
}

enum Never {}

fn run(args: &[String]) -> Result<Never, HelperError> {
    let [root, spec] = args else {
        return Err(HelperError::Usage);
    };
    let spec: ProcessSpec = serde_json::from_str(spec)?;
    if spec.args.is_empty() {
        return Err(HelperError::NotFound(String::new()));
    }
    // A session of its own: signals to the group reach it and its children.
    setsid().map_err(sys("setsid"))?;
    if spec.terminal {
        let tty = std::io::stdin();
        pty::make_controlling(tty.as_fd()).map_err(sys("making stdin the controlling terminal"))?;
        // The agent opened it (root's); the process may open it again by
        // its name. Only the owner changes (runc's fixStdioPermissions).
        fchown(tty.as_fd(), Some(Uid::from_raw(spec.uid)), None)
            .map_err(sys(format!("giving the terminal to uid {}", spec.uid)))?;
    }
    chroot(root.as_str()).map_err(sys(format!("chroot {root}")))?;
    chdir("/").map_err(sys("chdir /"))?;
    let cwd = if spec.cwd.is_empty() {
        "/"
    } else {
        spec.cwd.as_str()
    };
    chdir(cwd).map_err(sys(format!("chdir {cwd}")))?;
    let groups: Vec<Gid> = spec.additional_gids.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).map_err(sys("setgroups"))?;
    setgid(Gid::from_raw(spec.gid)).map_err(sys(format!("setgid {}", spec.gid)))?;
    setuid(Uid::from_raw(spec.uid)).map_err(sys(format!("setuid {}", spec.uid)))?;
    let program = resolve(&spec.args[0], &spec.env)?;
    let cstr = |s: &str| CString::new(s).map_err(|_| HelperError::Nul);
    let path = cstr(&program)?;
    let argv = spec.args.iter().map(|a| cstr(a)).collect::<Result<Vec<_>, _>>()?;
    let envp = spec.env.iter().map(|e| cstr(e)).collect::<Result<Vec<_>, _>>()?;
    let err = execve(&path, &argv, &envp).map_err(sys(format!("exec {program}")));
    match err {
        Ok(never) => match never {},
        Err(e) => Err(e),
    }
}

/// `name` as execvp would find it, in the `PATH` of `env` (not the agent's).
fn resolve(name: &str, env: &[String]) -> Result<String, HelperError> {
    if name.contains('/') {
        return Ok(name.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate.to_string_lossy().into_owned());
        }
    }
    Err(HelperError::NotFound(name.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_with_a_slash_are_taken_as_they_are() {
        assert_eq!(resolve("./x", &[]).unwrap(), "./x");
        assert_eq!(resolve("/bin/sh", &[]).unwrap(), "/bin/sh");
    }

    #[test]
    fn names_are_looked_up_in_the_specs_path() {
        let dir = std::env::temp_dir().join(format!("flatlet-agent-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("prog");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        let env = vec![format!("PATH=/nonexistent:{}", dir.display())];
        assert!(
            matches!(resolve("prog", &env), Err(HelperError::NotFound(_))),
            "not executable"
        );
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve("prog", &env).unwrap(), prog.to_string_lossy());
        assert!(matches!(resolve("nope", &env), Err(HelperError::NotFound(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
