//! cgroups of a jail: `<parent>/<id>` in each v1 controller hierarchy the
//! settings name, or in the unified (v2) hierarchy, with the settings
//! written and the jailer's process moved in before it execs the VMM.

use std::fs;
use std::path::{Path, PathBuf};

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors of cgroup set-up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A `--cgroup` argument is not `controller.file=value`.
    #[error("invalid --cgroup {0:?}: expected CONTROLLER.FILE=VALUE, e.g. cpu.cfs_quota_us=50000")]
    Syntax(String),
    /// The controller's hierarchy is not mounted.
    #[error("cgroup v{version} controller {controller:?} is not available (no {path})")]
    NoController {
        version: u8,
        controller: String,
        path: String,
    },
    /// A cgroup file operation failed.
    #[error("cgroup: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// An unknown cgroup version.
    #[error("cgroup version {0} does not exist (use 1 or 2)")]
    Version(u8),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.display().to_string();
    move |source| CgroupError::Io { what, path, source }
}

/// One `--cgroup FILE=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The file, e.g. `cpu.cfs_quota_us`.
    pub file: String,
    /// What to write.
    pub value: String,
}

impl Setting {
    /// Parses `FILE=VALUE`; the file must be `controller.name` with no path
    /// in it.
    pub fn parse(s: &str) -> Result<Self, CgroupError> {
        let bad = || CgroupError::Syntax(s.to_string());
        let (file, value) = s.split_once('=').ok_or_else(bad)?;
        let ok_file = file.contains('.')
            && !file.starts_with('.')
            && file
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_');
        if !ok_file || value.is_empty() || value.contains('\n') {
            return Err(bad());
        }
        Ok(Self {
            file: file.to_string(),
            value: value.to_string(),
        })
    }

    /// The controller, from the file's prefix.
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }
}

/// The unified hierarchy: `/sys/fs/cgroup/unified` on hybrid hosts,
/// `/sys/fs/cgroup` on pure v2 ones.
fn v2_root(base: &Path) -> PathBuf {
    let hybrid = base.join("unified");
    if hybrid.join("cgroup.controllers").exists() {
        hybrid
    } else {
        base.to_path_buf()
    }
}

/// The controllers the settings name, each once, sorted.
fn controllers(settings: &[Setting]) -> Vec<&str> {
    let mut controllers: Vec<&str> = settings.iter().map(Setting::controller).collect();
    controllers.sort_unstable();
    controllers.dedup();
    controllers
}

/// The cgroup directories of a jail, one per hierarchy its settings use.
pub fn dirs(
    base: &Path,
    version: u8,
    parent: &str,
    id: &str,
    settings: &[Setting],
) -> Result<Vec<PathBuf>, CgroupError> {
    match version {
        1 => Ok(controllers(settings)
            .iter()
            .map(|c| base.join(c).join(parent).join(id))
            .collect()),
        2 if settings.is_empty() => Ok(Vec::new()),
        2 => Ok(vec![v2_root(base).join(parent).join(id)]),
        v => Err(CgroupError::Version(v)),
    }
}

/// Creates the jail's cgroups, writes the settings, and moves `pid` in.
pub fn setup(
    base: &Path,
    version: u8,
    parent: &str,
    id: &str,
    settings: &[Setting],
    pid: u32,
) -> Result<(), CgroupError> {
    match version {
        1 => setup_v1(base, parent, id, settings, pid),
        2 => setup_v2(base, parent, id, settings, pid),
        v => Err(CgroupError::Version(v)),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io("writing", path))
}

fn setup_v1(base: &Path, parent: &str, id: &str, settings: &[Setting], pid: u32) -> Result<(), CgroupError> {
    for dir in dirs(base, 1, parent, id, settings)? {
        let hierarchy = dir.parent().and_then(Path::parent).unwrap_or(base);
        let controller = hierarchy
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !hierarchy.exists() {
            return Err(CgroupError::NoController {
                version: 1,
                controller,
                path: hierarchy.display().to_string(),
            });
        }
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        if controller == "cpuset" {
            inherit_cpuset(hierarchy, &dir)?;
        }
        for s in settings.iter().filter(|s| s.controller() == controller) {
            write(&dir.join(&s.file), &s.value)?;
        }
        write(&dir.join("cgroup.procs"), &pid.to_string())?;
    }
    Ok(())
}

/// A new cpuset cgroup has no CPUs or memory nodes, and nothing can join
/// it: copy them down from the nearest ancestor that has them.
fn inherit_cpuset(hierarchy: &Path, dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mut chain = Vec::new();
        let mut d = dir.to_path_buf();
        while d.starts_with(hierarchy) && d != hierarchy {
            chain.push(d.clone());
            if !d.pop() {
                break;
            }
        }
        chain.reverse();
        let mut value =
            fs::read_to_string(hierarchy.join(file)).map_err(io("reading", &hierarchy.join(file)))?;
        for d in chain {
            let path = d.join(file);
            let current = fs::read_to_string(&path).map_err(io("reading", &path))?;
            if current.trim().is_empty() {
                write(&path, value.trim())?;
            } else {
                value = current;
            }
        }
    }
    Ok(())
}

fn setup_v2(base: &Path, parent: &str, id: &str, settings: &[Setting], pid: u32) -> Result<(), CgroupError> {
    let Some(dir) = dirs(base, 2, parent, id, settings)?.pop() else {
        return Ok(());
    };
    let root = v2_root(base);
    let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let controllers = controllers(settings);
    for c in &controllers {
        if !available.split_whitespace().any(|a| a == *c) {
            return Err(CgroupError::NoController {
                version: 2,
                controller: (*c).to_string(),
                path: root.join("cgroup.controllers").display().to_string(),
            });
        }
    }
    fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    // Controllers are enabled for children level by level, from the root
    // down to the jail's parent.
    let mut level = root.clone();
    for part in [Some(parent), None] {
        for c in &controllers {
            write(&level.join("cgroup.subtree_control"), &format!("+{c}"))?;
        }
        match part {
            Some(p) => level = level.join(p),
            None => break,
        }
    }
    for s in settings {
        write(&dir.join(&s.file), &s.value)?;
    }
    write(&dir.join("cgroup.procs"), &pid.to_string())
}

/// The jail's cgroup directories that exist: `<parent>/<id>` in every v1
/// hierarchy (whatever the settings were), or in the unified one.
pub fn existing(base: &Path, version: u8, parent: &str, id: &str) -> Vec<PathBuf> {
    let candidates: Vec<PathBuf> = match version {
        2 => vec![v2_root(base).join(parent).join(id)],
        _ => fs::read_dir(base)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path().join(parent).join(id))
                    .collect()
            })
            .unwrap_or_default(),
    };
    candidates.into_iter().filter(|d| d.is_dir()).collect()
}

/// The processes in a cgroup (its `cgroup.procs`).
pub fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = fs::read_to_string(&path).map_err(io("reading", &path))?;
    Ok(text.split_whitespace().filter_map(|p| p.parse().ok()).collect())
}

/// Removes the jail's cgroups (and the parent when it is left empty).
/// Returns the directories it removed.
pub fn remove(base: &Path, version: u8, parent: &str, id: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for dir in existing(base, version, parent, id) {
        if fs::remove_dir(&dir).is_ok() {
            removed.push(dir.clone());
            if let Some(p) = dir.parent() {
                if fs::remove_dir(p).is_ok() {
                    removed.push(p.to_path_buf());
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse() {
        let s = Setting::parse("cpu.cfs_quota_us=50000").unwrap();
        assert_eq!(
            (s.controller(), s.file.as_str(), s.value.as_str()),
            ("cpu", "cpu.cfs_quota_us", "50000")
        );
        assert_eq!(
            Setting::parse("memory.limit_in_bytes=1G").unwrap().controller(),
            "memory"
        );
        for bad in [
            "cpu",
            "=1",
            "cpu.x=",
            "../../etc/passwd=1",
            "cpu/x.y=1",
            "cpu.x=1\n2",
            ".cpu=1",
            "nodot=1",
        ] {
            assert!(Setting::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directories_per_version() {
        let base = Path::new("/sys/fs/cgroup");
        let s = vec![
            Setting::parse("cpu.shares=10").unwrap(),
            Setting::parse("cpu.cfs_quota_us=1").unwrap(),
            Setting::parse("pids.max=9").unwrap(),
        ];
        assert_eq!(
            dirs(base, 1, "flatlet", "vm1", &s).unwrap(),
            vec![base.join("cpu/flatlet/vm1"), base.join("pids/flatlet/vm1")]
        );
        assert_eq!(
            dirs(base, 2, "flatlet", "vm1", &[]).unwrap(),
            Vec::<PathBuf>::new()
        );
        assert!(matches!(
            dirs(base, 3, "f", "v", &s),
            Err(CgroupError::Version(3))
        ));
    }

    #[test]
    fn v1_setup_writes_settings_and_joins_on_a_fake_hierarchy() {
        let tmp = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let base = tmp.as_path();
        for d in ["cpuset", "pids"] {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        fs::write(base.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        fs::write(base.join("cpuset/cpuset.mems"), "0\n").unwrap();
        // A real hierarchy makes these files appear in every new cgroup.
        for d in ["cpuset/fl", "cpuset/fl/vm"] {
            fs::create_dir_all(base.join(d)).unwrap();
            fs::write(base.join(d).join("cpuset.cpus"), "").unwrap();
            fs::write(base.join(d).join("cpuset.mems"), "").unwrap();
        }
        let s = vec![
            Setting::parse("pids.max=7").unwrap(),
            Setting::parse("cpuset.cpus=1").unwrap(),
        ];
        setup(base, 1, "fl", "vm", &s, 4242).unwrap();
        assert_eq!(fs::read_to_string(base.join("pids/fl/vm/pids.max")).unwrap(), "7");
        assert_eq!(
            fs::read_to_string(base.join("pids/fl/vm/cgroup.procs")).unwrap(),
            "4242"
        );
        assert_eq!(
            fs::read_to_string(base.join("cpuset/fl/cpuset.mems")).unwrap(),
            "0",
            "inherited"
        );
        assert_eq!(
            fs::read_to_string(base.join("cpuset/fl/vm/cpuset.cpus")).unwrap(),
            "1",
            "the setting wins"
        );
        let missing = vec![Setting::parse("memory.limit_in_bytes=1").unwrap()];
        assert!(matches!(
            setup(base, 1, "fl", "vm", &missing, 1),
            Err(CgroupError::NoController { .. })
        ));
    }
}
