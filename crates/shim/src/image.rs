//! The container's root file system as a block device: containerd's
//! mounts (an overlay of the image's layers, usually) are mounted on the
//! bundle's `rootfs`, copied into a new ext4 image with `mkfs.ext4 -d`
//! (e2fsprogs) and unmounted again. The guest mounts the image read-write;
//! what the container writes stays in the image, which goes away with the
//! container.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use containerd_shim::protos::api::Mount;
use nix::mount::MsFlags;

/// Room for what the container writes, on top of what its files take.
const HEADROOM: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("mounting {what} on {target}: {message}")]
    Mount {
        what: String,
        target: String,
        message: String,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

/// Mounts containerd's `mounts` on `target` (none: `target` already
/// holds the files). Done here rather than with the containerd-shim
/// crate's helper, which forks and waits through the crate's reaper, and
/// the shim waits for its own children.
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<(), ImageError> {
    for m in mounts {
        let (flags, data) = mount_options(&m.type_, &m.options);
        let fstype = (!m.type_.is_empty() && m.type_ != "bind").then_some(m.type_.as_str());
        let data = (!data.is_empty()).then_some(data.as_str());
        nix::mount::mount(Some(m.source.as_str()), target, fstype, flags, data).map_err(|e| {
            ImageError::Mount {
                what: format!("{} ({})", m.source, m.type_),
                target: target.display().to_string(),
                message: e.to_string(),
            }
        })?;
    }
    Ok(())
}

/// A mount's flags and file-system data from containerd's option list.
fn mount_options(fstype: &str, options: &[String]) -> (MsFlags, String) {
    let mut flags = if fstype == "bind" {
        MsFlags::MS_BIND
    } else {
        MsFlags::empty()
    };
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Undoes [`mount_rootfs`] (every mount on `target`).
pub fn unmount_rootfs(target: &Path) {
    while nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
}

/// The bytes the files under `dir` take (not following symbolic links).
pub fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            // Each inode costs a block or so in the image, too.
            total += meta.len() + 4096;
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// The image size the files under `dir` need, with room to write.
pub fn size_for(dir: &Path) -> u64 {
    (tree_size(dir) * 5 / 4 + HEADROOM).div_ceil(1 << 20) << 20
}

/// File-system features of the image, against mke2fs's ext4 defaults: the
/// image lives as long as its container, so a journal protects nothing,
/// and metadata checksums only cost the guest kernel time (crc32c of each
/// bitmap and descriptor it reads or writes, emulated instruction by
/// instruction on nested hosts). `uninit_bg` keeps block groups lazily
/// initialised (and the sparse image small) without `metadata_csum`.
const FEATURES: &str = "^has_journal,^metadata_csum,uninit_bg";
/// Inode tables zeroed by mke2fs (`fallocate` zero ranges on the host,
/// milliseconds) and marked so: otherwise the guest's `ext4lazyinit`
/// thread writes them full of zeros (16 MiB for the 1 GiB template disk)
/// through virtio-blk after the mount, all of it emulated kernel work.
const EXTENDED: &str = "lazy_itable_init=0";

/// Makes `image`, an ext4 file system of `size` bytes (sparse) holding the
/// files under `dir` (owners and modes kept). Returns how long it took.
pub fn build(dir: &Path, image: &Path, size: u64) -> Result<Duration, ImageError> {
    let start = Instant::now();
    let _ = std::fs::remove_file(image);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q", "-F", "-t", "ext4", "-L", "rootfs", "-O", FEATURES, "-E", EXTENDED, "-d",
        ])
        .arg(dir)
        .arg(image)
        .arg(format!("{}k", size >> 10))
        .output()
        .map_err(|source| ImageError::Io {
            what: "running mkfs.ext4 (e2fsprogs)".into(),
            source,
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(ImageError::Mkfs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn containerd_mount_options_become_flags_and_data() {
        let opts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (f, d) = mount_options(
            "overlay",
            &opts(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/a:/b"]),
        );
        assert_eq!(
            (f, d.as_str()),
            (
                MsFlags::empty(),
                "index=off,workdir=/w,upperdir=/u,lowerdir=/a:/b"
            )
        );
        let (f, d) = mount_options("bind", &opts(&["rbind", "ro"]));
        assert_eq!(
            (f, d.as_str()),
            (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY, "")
        );
    }

    #[test]
    fn an_image_holds_the_tree() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err()
            || Command::new("debugfs").arg("-V").output().is_err()
        {
            eprintln!("SKIPPED an_image_holds_the_tree: no e2fsprogs");
            return;
        }
        let d = std::env::temp_dir().join(format!("flatlet-shim-image-{}", std::process::id()));
        std::fs::create_dir_all(d.join("tree/bin")).unwrap();
        std::fs::write(d.join("tree/bin/hello"), "hello from the image\n").unwrap();
        std::os::unix::fs::symlink("hello", d.join("tree/bin/link")).unwrap();
        assert!(tree_size(&d.join("tree")) >= 21);
        let image = d.join("rootfs.ext4");
        build(&d.join("tree"), &image, size_for(&d.join("tree"))).unwrap();
        assert!(std::fs::metadata(&image).unwrap().len() >= HEADROOM);
        let out = Command::new("debugfs")
            .args(["-R", "cat /bin/hello"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the image\n");
        let out = Command::new("debugfs")
            .args(["-R", "stat /bin/link"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("Fast link dest: \"hello\""));
        assert!(build(&d.join("missing"), &d.join("x.ext4"), HEADROOM).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
