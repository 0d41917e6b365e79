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

/// Mounts containerd's `mounts` on `target` (none: `target` already holds the files).
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<(), ImageError> {
    for m in mounts {
        let fstype = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        containerd_shim::mount::mount_rootfs(fstype, source, &m.options, target).map_err(|e| {
            ImageError::Mount {
                what: format!("{} ({})", m.source, m.type_),
                target: target.display().to_string(),
                message: e.to_string(),
            }
        })?;
    }
    Ok(())
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

/// Makes `image`, an ext4 file system holding the files under `dir`
/// (owners and modes kept). Returns how long it took.
pub fn build(dir: &Path, image: &Path) -> Result<Duration, ImageError> {
    let start = Instant::now();
    let size = (tree_size(dir) * 5 / 4 + HEADROOM).div_ceil(1 << 20) << 20;
    let _ = std::fs::remove_file(image);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", "rootfs", "-d"])
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
        build(&d.join("tree"), &image).unwrap();
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
        assert!(build(&d.join("missing"), &d.join("x.ext4")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
