//! Opening the files a configuration names (kernel, initrd, drive images,
//! config file) without ever blocking the VMM thread: each is opened with
//! `O_NONBLOCK` (a FIFO with no writer would otherwise hold `open` until
//! someone opens its other end), then its type is checked on the open
//! descriptor (no window between the check and the use), and only regular
//! files (and, for drives, block devices) are taken.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Which kinds of file a caller takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (kernels, initrds, config files).
    RegularFile,
    /// Regular files and block devices (drive images).
    FileOrBlockDevice,
}

/// Refuses a path a person most likely did not mean: a newline or NUL in
/// it (the NUL would cut it short; a newline breaks every log line that
/// shows it).
pub fn check_path_text(path: &Path) -> Result<(), String> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.contains(&b'\n') || bytes.contains(&0) {
        return Err("the path contains a newline or NUL byte".into());
    }
    Ok(())
}

/// What `meta` is, for an error message.
fn kind_name(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// Opens `path` for reading (and writing if `write`), never blocking,
/// and checks that it is a kind `accept` takes. The descriptor returned is
/// blocking again (regular files and block devices never block on
/// readiness; the flag only mattered for `open`). The error is a reason
/// to show after the path.
pub fn open_checked(path: &Path, write: bool, accept: Accept) -> Result<File, String> {
    check_path_text(path)?;
    let wanted = match accept {
        Accept::RegularFile => "a regular file",
        Accept::FileOrBlockDevice => "a regular file or a block device",
    };
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) => format!("it is a directory, not {wanted}"),
            // A FIFO opened for writing with no reader.
            Some(libc::ENXIO) => format!("it is a FIFO or a device with nothing behind it, not {wanted}"),
            _ => e.to_string(),
        })?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let t = meta.file_type();
    let ok = t.is_file() || (accept == Accept::FileOrBlockDevice && t.is_block_device());
    if !ok {
        return Err(format!("it is {}, not {wanted}", kind_name(&meta)));
    }
    let flags = fcntl(file.as_fd(), FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(file.as_fd(), FcntlArg::F_SETFL(flags)).map_err(|e| e.to_string())?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("flatlet-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let p = temp("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for write in [false, true] {
            let t = Instant::now();
            let e = open_checked(&p, write, Accept::FileOrBlockDevice).unwrap_err();
            // With write, a FIFO without a reader is ENXIO; either way no
            // wait for the other end.
            assert!(e.contains("FIFO"), "{e}");
            assert!(t.elapsed() < Duration::from_secs(2));
        }
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn only_the_accepted_kinds() {
        let e = open_checked(Path::new("/dev/zero"), false, Accept::FileOrBlockDevice).unwrap_err();
        assert!(e.contains("character device"), "{e}");
        let e = open_checked(Path::new("/dev/null"), true, Accept::RegularFile).unwrap_err();
        assert!(e.contains("character device"), "{e}");
        let e = open_checked(Path::new("/tmp"), false, Accept::RegularFile).unwrap_err();
        assert!(e.contains("directory"), "{e}");
        let p = temp("regular");
        std::fs::write(&p, b"x").unwrap();
        let f = open_checked(&p, true, Accept::RegularFile).unwrap();
        let flags = fcntl(f.as_fd(), FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0, "blocking again");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn newlines_and_nuls_in_paths() {
        assert!(open_checked(Path::new("/tmp/a\nb"), false, Accept::RegularFile).is_err());
        assert!(check_path_text(Path::new("/tmp/a\0b")).is_err());
        assert!(check_path_text(Path::new("/tmp/ab")).is_ok());
    }
}
