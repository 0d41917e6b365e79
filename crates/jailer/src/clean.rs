//! `flatlet-jailer clean`: removes a jail once its VMM has gone.
//!
//! It removes `<base>/<exec name>/<id>` and the jail's cgroups, and
//! `<base>/<exec name>` only when that leaves it empty; never the base
//! directory. It refuses, removing nothing, when the jail's VMM still runs,
//! when something is mounted inside the jail, or when the directory is not
//! a jail: a symbolic link, or a directory holding more than the `root` the
//! jailer makes in it.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cgroup;
use crate::jail::{JailError, Place};

/// The only entry of a jail's directory: the VMM's `/`.
const ROOT: &str = "root";

/// Removes a jail after its VMM has gone. Returns what it removed.
pub fn clean(place: &Place) -> Result<Vec<PathBuf>, JailError> {
    clean_in(place, Path::new(cgroup::CGROUP_ROOT), Path::new("/proc"))
}

/// [`clean`] with the cgroup hierarchies under `cgroup_base` and the
/// process table at `proc`.
fn clean_in(place: &Place, cgroup_base: &Path, proc: &Path) -> Result<Vec<PathBuf>, JailError> {
    let dir = place.dir();
    let refused = |reason: String| JailError::Refused {
        path: dir.display().to_string(),
        reason,
    };
    let jail = inspect(place)?;
    let root = match &jail {
        JailDir::Present { root } => root.as_ref(),
        JailDir::Absent => None,
    };
    let pids = running(place, root, cgroup_base, proc)?;
    if !pids.is_empty() {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        return Err(refused(format!(
            "its VMM is still running (pid {}); stop it first",
            pids.join(", ")
        )));
    }
    let mut removed = Vec::new();
    if let JailDir::Present { .. } = jail {
        if let Some(mount) = mount_inside(&dir)? {
            return Err(refused(format!(
                "{} is mounted inside it; unmount it first",
                mount.display()
            )));
        }
        // Does not follow symbolic links: one in the jail is removed, not
        // what it points to (and `inspect` made sure `dir` is not one).
        fs::remove_dir_all(&dir).map_err(|e| JailError::Step {
            what: format!("removing {}", dir.display()),
            reason: e.to_string(),
        })?;
        removed.push(dir.clone());
        // rmdir: only when no other jail (or anything else) is left in it.
        let exec_dir = place.exec_dir();
        if fs::remove_dir(&exec_dir).is_ok() {
            removed.push(exec_dir);
        }
    }
    removed.extend(cgroup::remove(
        cgroup_base,
        place.cgroup_version,
        &place.parent_cgroup,
        &place.id,
    ));
    Ok(removed)
}

/// What `<base>/<exec name>/<id>` is.
enum JailDir {
    /// Nothing there (a jail already cleaned, or never made).
    Absent,
    /// A jail directory, with its `root` if it has one (a jail whose
    /// set-up failed early has none).
    Present { root: Option<fs::Metadata> },
}

fn lstat(path: &Path) -> Result<Option<fs::Metadata>, JailError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JailError::Step {
            what: format!("inspecting {}", path.display()),
            reason: e.to_string(),
        }),
    }
}

/// Checks that the jail's directory, if there is one, is what the jailer
/// makes: a real directory (reached through a real `<base>/<exec name>`)
/// that holds nothing but a real `root` directory.
fn inspect(place: &Place) -> Result<JailDir, JailError> {
    let dir = place.dir();
    let refused = |reason: String| JailError::Refused {
        path: dir.display().to_string(),
        reason,
    };
    let real_dir = |path: &Path, m: &fs::Metadata| {
        if m.file_type().is_symlink() {
            Err(refused(format!("{} is a symbolic link", path.display())))
        } else if !m.is_dir() {
            Err(refused(format!("{} is not a directory", path.display())))
        } else {
            Ok(())
        }
    };
    let exec_dir = place.exec_dir();
    match lstat(&exec_dir)? {
        None => return Ok(JailDir::Absent),
        Some(m) => real_dir(&exec_dir, &m)?,
    }
    match lstat(&dir)? {
        None => return Ok(JailDir::Absent),
        Some(m) => real_dir(&dir, &m)?,
    }
    let entries = fs::read_dir(&dir).map_err(|e| JailError::Step {
        what: format!("listing {}", dir.display()),
        reason: e.to_string(),
    })?;
    for entry in entries {
        let name = entry
            .map_err(|e| JailError::Step {
                what: format!("listing {}", dir.display()),
                reason: e.to_string(),
            })?
            .file_name();
        if name != ROOT {
            return Err(refused(format!(
                "it holds {name:?}, and a jail holds only {ROOT:?}: is it a jail?"
            )));
        }
    }
    let root_path = dir.join(ROOT);
    let root = lstat(&root_path)?;
    if let Some(m) = &root {
        real_dir(&root_path, m)?;
    }
    Ok(JailDir::Present { root })
}

/// The processes of the jail other than this one: those in its cgroups,
/// and those whose root directory is the jail's `root` (the VMM after
/// `pivot_root`, whether or not it has cgroups or a PID file).
///
/// The PID file a VMM in a new PID namespace gets (`root/<exec name>.pid`)
/// is not trusted: the VMM can rewrite or delete it. Its process is found
/// by its root directory like any other.
fn running(
    place: &Place,
    root: Option<&fs::Metadata>,
    cgroup_base: &Path,
    proc: &Path,
) -> Result<Vec<u32>, JailError> {
    let me = std::process::id();
    let mut pids = Vec::new();
    for dir in cgroup::existing(cgroup_base, place.cgroup_version, &place.parent_cgroup, &place.id) {
        pids.extend(cgroup::procs(&dir)?);
    }
    if let Some(root) = root {
        let entries = fs::read_dir(proc).map_err(|e| JailError::Step {
            what: format!("listing {}", proc.display()),
            reason: e.to_string(),
        })?;
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // A process that has gone since the listing has no root; as
            // root (which removing a jail needs) every other one has one.
            if let Ok(m) = fs::metadata(entry.path().join("root")) {
                if (m.dev(), m.ino()) == (root.dev(), root.ino()) {
                    pids.push(pid);
                }
            }
        }
    }
    pids.retain(|p| *p != me);
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// A mount point at or under `dir` in this mount namespace: removing the
/// jail would delete what is mounted there.
fn mount_inside(dir: &Path) -> Result<Option<PathBuf>, JailError> {
    let step = |what: String| {
        move |e: std::io::Error| JailError::Step {
            what,
            reason: e.to_string(),
        }
    };
    let dir = fs::canonicalize(dir).map_err(step(format!("resolving {}", dir.display())))?;
    let info = fs::read("/proc/self/mountinfo").map_err(step("reading /proc/self/mountinfo".into()))?;
    Ok(mount_points(&info).into_iter().find(|m| m.starts_with(&dir)))
}

/// The mount points of a `/proc/self/mountinfo` (the fifth field of each
/// line, with its octal escapes of space, tab, newline and backslash).
fn mount_points(info: &[u8]) -> Vec<PathBuf> {
    info.split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape(field))))
        .collect()
}

fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (field[i], octal) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn place(base: &Path, id: &str) -> Place {
        Place {
            base: base.to_path_buf(),
            exec_name: "flatlet".into(),
            id: id.into(),
            cgroup_version: 1,
            parent_cgroup: "flatlet".into(),
        }
    }

    /// A jail as `prepare` leaves it, without device nodes.
    fn fake_jail(base: &Path, id: &str) -> PathBuf {
        let dir = base.join("flatlet").join(id);
        fs::create_dir_all(dir.join("root/dev")).unwrap();
        fs::write(dir.join("root/flatlet"), "vmm").unwrap();
        dir
    }

    /// A fake cgroup tree and a fake /proc, both empty.
    fn host() -> (TempDir, PathBuf, PathBuf) {
        let tmp = TempDir::new().unwrap();
        let cg = tmp.as_path().join("cgroup");
        let proc = tmp.as_path().join("proc");
        fs::create_dir_all(cg.join("pids")).unwrap();
        fs::create_dir_all(&proc).unwrap();
        (tmp, cg, proc)
    }

    #[test]
    fn removes_the_jail_and_its_empty_parent_never_the_base() {
        let (_h, cg, proc) = host();
        let tmp = TempDir::new().unwrap();
        let base = tmp.as_path();
        let one = fake_jail(base, "one");
        let two = fake_jail(base, "two");
        let removed = clean_in(&place(base, "one"), &cg, &proc).unwrap();
        assert_eq!(removed, vec![one.clone()]);
        assert!(!one.exists() && two.exists(), "only the jail asked for");
        let removed = clean_in(&place(base, "two"), &cg, &proc).unwrap();
        assert_eq!(removed, vec![two, base.join("flatlet")]);
        assert!(base.is_dir(), "the base directory stays");
        assert_eq!(
            clean_in(&place(base, "two"), &cg, &proc).unwrap(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn symlinks_in_the_jail_are_not_followed() {
        let (_h, cg, proc) = host();
        let tmp = TempDir::new().unwrap();
        let victim = tmp.as_path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::write(victim.join("precious"), "keep").unwrap();
        let base = tmp.as_path().join("base");
        let dir = fake_jail(&base, "links");
        symlink(&victim, dir.join("root/dir-link")).unwrap();
        symlink(victim.join("precious"), dir.join("root/file-link")).unwrap();
        symlink(&victim, dir.join("root/dev/deep-link")).unwrap();
        clean_in(&place(&base, "links"), &cg, &proc).unwrap();
        assert!(!dir.exists());
        assert_eq!(fs::read_to_string(victim.join("precious")).unwrap(), "keep");
    }

    #[test]
    fn refuses_what_is_not_a_jail() {
        let (_h, cg, proc) = host();
        let tmp = TempDir::new().unwrap();
        let victim = tmp.as_path().join("victim");
        fs::create_dir_all(victim.join("root")).unwrap();
        fs::write(victim.join("precious"), "keep").unwrap();
        let base = tmp.as_path().join("base");

        // The jail directory is a symbolic link.
        fs::create_dir_all(base.join("flatlet")).unwrap();
        symlink(&victim, base.join("flatlet/linked")).unwrap();
        let e = clean_in(&place(&base, "linked"), &cg, &proc).unwrap_err();
        assert!(matches!(e, JailError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");

        // Its root is one.
        let dir = base.join("flatlet/rootlink");
        fs::create_dir(&dir).unwrap();
        symlink(victim.join("root"), dir.join("root")).unwrap();
        let e = clean_in(&place(&base, "rootlink"), &cg, &proc).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");

        // It holds more than a jail does.
        let dir = fake_jail(&base, "stuffed");
        fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = clean_in(&place(&base, "stuffed"), &cg, &proc).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert!(dir.join("root/flatlet").exists());

        // The exec name's directory is a symbolic link.
        let other = tmp.as_path().join("other");
        fake_jail(&other, "elsewhere");
        symlink(other.join("flatlet"), base.join("flatlet2")).unwrap();
        let mut p = place(&base, "elsewhere");
        p.exec_name = "flatlet2".into();
        let e = clean_in(&p, &cg, &proc).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(other.join("flatlet/elsewhere/root/flatlet").exists());
        assert_eq!(fs::read_to_string(victim.join("precious")).unwrap(), "keep");
    }

    #[test]
    fn refuses_while_a_process_is_in_the_jail() {
        let (_h, cg, proc) = host();
        let tmp = TempDir::new().unwrap();
        let base = tmp.as_path();
        let dir = fake_jail(base, "busy");

        // In one of its cgroups.
        let group = cg.join("pids/flatlet/busy");
        fs::create_dir_all(&group).unwrap();
        fs::write(group.join("cgroup.procs"), "4242\n4343\n").unwrap();
        let e = clean_in(&place(base, "busy"), &cg, &proc).unwrap_err();
        assert!(matches!(e, JailError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("still running (pid 4242, 4343)"), "{e}");
        assert!(dir.join("root/flatlet").exists() && group.exists());
        fs::write(group.join("cgroup.procs"), "").unwrap();

        // With the jail's root as its root (a fake /proc entry whose
        // `root` is the jail's root, as the kernel's magic link resolves).
        fs::create_dir(proc.join("5151")).unwrap();
        symlink(dir.join("root"), proc.join("5151/root")).unwrap();
        fs::create_dir(proc.join("6161")).unwrap();
        symlink("/", proc.join("6161/root")).unwrap();
        let e = clean_in(&place(base, "busy"), &cg, &proc).unwrap_err();
        assert!(e.to_string().contains("still running (pid 5151)"), "{e}");
        assert!(dir.join("root/flatlet").exists());

        fs::remove_file(proc.join("5151/root")).unwrap();
        // (The fake cgroup directory holds a file, so only the jail goes.)
        assert_eq!(
            clean_in(&place(base, "busy"), &cg, &proc).unwrap(),
            vec![dir.clone(), base.join("flatlet")]
        );
    }

    #[test]
    fn this_process_does_not_count() {
        let (_h, cg, proc) = host();
        let tmp = TempDir::new().unwrap();
        let dir = fake_jail(tmp.as_path(), "self");
        let group = cg.join("pids/flatlet/self");
        fs::create_dir_all(&group).unwrap();
        fs::write(group.join("cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
        clean_in(&place(tmp.as_path(), "self"), &cg, &proc).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn mountinfo_mount_points() {
        let info = b"22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
            40 22 0:5 / /srv/jail\\040one/flatlet/a\\134b rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(info),
            vec![PathBuf::from("/"), PathBuf::from("/srv/jail one/flatlet/a\\b")]
        );
        assert_eq!(unescape(b"a\\011b\\1"), b"a\tb\\1");
    }

    #[test]
    fn no_mount_inside_a_fresh_directory() {
        let tmp = TempDir::new().unwrap();
        assert_eq!(mount_inside(tmp.as_path()).unwrap(), None);
        assert!(mount_inside(Path::new("/")).unwrap().is_some());
    }
}
