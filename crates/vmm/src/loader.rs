//! Loading the guest: kernel (ELF vmlinux or bzImage, through
//! linux-loader), initrd and command line.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::config::{BootSource, Kernel, validate_cmdline};
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};

/// The command line of the built-in test guest when none is given.
pub const BUILTIN_DEFAULT_CMDLINE: &str = "console=ttyS0";
/// The command line of a Linux kernel when none is given: a serial
/// console, reset through the i8042 (which ends the VM), and no probing of
/// hardware a microVM lacks.
pub const LINUX_DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

const PAGE_SIZE: u64 = 4096;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {reason}")]
    KernelRead { path: String, reason: String },
    /// The file is neither an ELF nor a bzImage.
    #[error("{path} is not a kernel: it is neither an ELF vmlinux nor a bzImage")]
    NotAKernel { path: String },
    /// An ELF file for another machine.
    #[error("{path} is not an x86-64 kernel: {what}")]
    WrongArchitecture { path: String, what: String },
    /// A bzImage without the 64-bit entry point.
    #[error("{path} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry { path: String },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {reason}")]
    Load { path: String, reason: String },
    /// The kernel's segments fall outside guest memory.
    #[error("kernel {path} does not fit in guest memory (it ends at {end:#x}, memory ends at {mem_end:#x})")]
    KernelTooBig { path: String, end: u64, mem_end: u64 },
    /// A segment reaches outside guest memory (where, linux-loader does
    /// not say).
    #[error("kernel {path} does not fit in guest memory (memory ends at {mem_end:#x})")]
    KernelOutsideMemory { path: String, mem_end: u64 },
    /// The file ends before the data its headers announce.
    #[error("kernel {path} is truncated: the file ends before the data its headers announce")]
    Truncated { path: String },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {reason}")]
    InitrdRead { path: String, reason: String },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig { path: String, size: u64 },
    /// A bad command line.
    #[error("{0}")]
    Cmdline(String),
}

/// A loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts, in 64-bit mode.
    pub entry: u64,
    /// First guest-physical address of the kernel.
    pub start: u64,
    /// First guest-physical address past the kernel.
    pub end: u64,
    /// The bzImage's setup header, for the zero page.
    pub setup_header: Option<setup_header>,
    /// Whether it is flatlet's built-in test guest (never Linux).
    pub builtin: bool,
}

fn display(kernel: &Kernel) -> String {
    match kernel {
        Kernel::Path(p) => p.display().to_string(),
        Kernel::Builtin(_) => crate::config::BUILTIN_KERNEL_NAME.to_string(),
    }
}

/// What kind of image the first bytes announce.
#[derive(Debug, PartialEq, Eq)]
enum ImageKind {
    Elf,
    BzImage,
}

fn sniff(head: &[u8], path: &str) -> Result<ImageKind, LoaderError> {
    if head.len() >= 20 && &head[..4] == ELF_MAGIC {
        if head[4] != ELFCLASS64 {
            return Err(LoaderError::WrongArchitecture {
                path: path.into(),
                what: "a 32-bit ELF".into(),
            });
        }
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if machine != EM_X86_64 {
            return Err(LoaderError::WrongArchitecture {
                path: path.into(),
                what: format!("ELF machine {machine}"),
            });
        }
        return Ok(ImageKind::Elf);
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        return Ok(ImageKind::BzImage);
    }
    Err(LoaderError::NotAKernel { path: path.into() })
}

fn load_image<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    path: &str,
) -> Result<LoadedKernel, LoaderError> {
    let read_err = |e: std::io::Error| LoaderError::KernelRead {
        path: path.into(),
        reason: e.to_string(),
    };
    let mut head = [0u8; 0x210];
    let n = read_up_to(image, &mut head).map_err(read_err)?;
    image.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let kind = sniff(&head[..n], path)?;
    let load_err = |e: linux_loader::loader::Error| LoaderError::Load {
        path: path.into(),
        reason: e.to_string(),
    };
    let loaded = match kind {
        ImageKind::Elf => Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))),
        ImageKind::BzImage => BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START))),
    };
    // A read that stopped at the end of the file: the image is short of
    // what its headers announce. (A segment outside guest memory fails
    // before anything is read.)
    let at_end = loaded.is_err() && {
        let pos = image.stream_position().ok();
        let len = image.seek(SeekFrom::End(0)).ok();
        pos.is_some() && pos >= len
    };
    let result: KernelLoaderResult = loaded.map_err(|e| {
        // linux-loader reports a short file and a segment outside guest
        // memory alike, as a failed read of the image: say which it was.
        let mem_end = mem.last_addr().0 + 1;
        match e {
            linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
            | linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
            ) if at_end => LoaderError::Truncated { path: path.into() },
            linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
            | linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
            ) => LoaderError::KernelOutsideMemory {
                path: path.into(),
                mem_end,
            },
            other => load_err(other),
        }
    })?;
    let mem_end = mem.last_addr().0 + 1;
    if result.kernel_end > mem_end {
        return Err(LoaderError::KernelTooBig {
            path: path.into(),
            end: result.kernel_end,
            mem_end,
        });
    }
    let entry = match result.setup_header {
        Some(hdr) => {
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::No64BitEntry { path: path.into() });
            }
            result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
        }
        None => result.kernel_load.0,
    };
    Ok(LoadedKernel {
        entry,
        start: result.kernel_load.0,
        end: result.kernel_end,
        setup_header: result.setup_header,
        builtin: false,
    })
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Loads the kernel into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &Kernel) -> Result<LoadedKernel, LoaderError> {
    let path = display(kernel);
    match kernel {
        Kernel::Builtin(bytes) => {
            let kernel = load_image(mem, &mut Cursor::new(*bytes), &path)?;
            Ok(LoadedKernel {
                builtin: true,
                ..kernel
            })
        }
        Kernel::Path(p) => {
            let mut file = open_regular(p).map_err(|reason| LoaderError::KernelRead {
                path: path.clone(),
                reason,
            })?;
            load_image(mem, &mut file, &path)
        }
    }
}

/// Opens a regular file for reading (a directory or device is refused
/// with a clear reason).
fn open_regular(path: &Path) -> Result<File, String> {
    crate::config::files::open_checked(path, false, crate::config::files::Accept::RegularFile)
}

/// Loads the initrd at the top of low memory, page-aligned, above the
/// kernel. Returns its (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_end: u64,
) -> Result<(u64, u64), LoaderError> {
    let shown = path.display().to_string();
    let read_err = |reason: String| LoaderError::InitrdRead {
        path: shown.clone(),
        reason,
    };
    let mut file = open_regular(path).map_err(read_err)?;
    let size = file.metadata().map_err(|e| read_err(e.to_string()))?.len();
    let max_end = match kernel.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => low_end.min(u64::from(hdr.initrd_addr_max) + 1),
        _ => low_end,
    };
    let too_big = || LoaderError::InitrdTooBig {
        path: shown.clone(),
        size,
    };
    let addr = max_end.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if size == 0 || addr < kernel.end.next_multiple_of(PAGE_SIZE) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| read_err(e.to_string()))?;
    Ok((addr, size))
}

/// Whether the loaded kernel is Linux: a bzImage, or an ELF whose loaded
/// image holds Linux's version banner.
pub fn is_linux(mem: &GuestMemoryMmap, kernel: &LoadedKernel) -> bool {
    const BANNER: &[u8] = b"Linux version ";
    const CHUNK: u64 = 1 << 20;
    if kernel.setup_header.is_some() {
        return true;
    }
    // The test guest is known: searching it would copy its image and bss
    // (~360 KiB, every page faulted in) on every launch, ~0.8 ms of CPU on
    // the nested hosts (issue 16's profile).
    if kernel.builtin {
        return false;
    }
    let finder = memchr::memmem::Finder::new(BANNER);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut addr = kernel.start;
    while addr < kernel.end {
        let n = (kernel.end - addr).min(CHUNK) as usize;
        if mem.read_slice(&mut buf[..n], GuestAddress(addr)).is_err() {
            return false;
        }
        if finder.find(&buf[..n]).is_some() {
            return true;
        }
        if n <= BANNER.len() {
            break;
        }
        // Overlap the chunks so that a banner across a boundary is found.
        addr += (n - (BANNER.len() - 1)) as u64;
    }
    false
}

/// The command line the guest gets: the one given (or the default for the
/// kernel), with `extra` (flatlet's device entries and host flags) added to
/// the kernel's part: before a `--`, after which Linux passes everything to
/// init.
pub fn build_cmdline(boot: &BootSource, extra: &[String]) -> Result<String, LoaderError> {
    let default = match boot.kernel {
        Kernel::Builtin(_) => BUILTIN_DEFAULT_CMDLINE,
        Kernel::Path(_) => LINUX_DEFAULT_CMDLINE,
    };
    let given = boot.boot_args.clone().unwrap_or_else(|| default.to_string());
    let (kernel_part, init_part) = split_init_args(&given);
    let mut line = kernel_part.trim_end().to_string();
    for e in extra {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(e);
    }
    if let Some(init) = init_part {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str("--");
        if !init.is_empty() {
            line.push(' ');
            line.push_str(init);
        }
    }
    validate_cmdline(&line).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    Ok(line)
}

/// Splits a command line at its first `--` word: the kernel's part, and
/// (if there is a `--`) init's arguments after it.
fn split_init_args(line: &str) -> (&str, Option<&str>) {
    let mut at = 0;
    for word in line.split(' ') {
        if word == "--" {
            return (&line[..at], Some(line[at + 2..].trim_start()));
        }
        at += word.len() + 1;
    }
    (line, None)
}

/// Writes the command line at its place; returns its size with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, line: &str) -> Result<usize, LoaderError> {
    let cmdline =
        Cmdline::try_from(line, CMDLINE_MAX_SIZE).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    Ok(line.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    fn tmpfile(bytes: &[u8]) -> vmm_sys_util::tempfile::TempFile {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(bytes).unwrap();
        f
    }

    /// A minimal x86-64 ELF executable: one PT_LOAD of `code` at `paddr`.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8], machine: u16) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes());
        e[18..20].copy_from_slice(&machine.to_le_bytes());
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut e[64..];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn loads_an_elf_at_its_physical_address() {
        let m = mem(16);
        let elf = tiny_elf(0x20_0000, &[0xf4, 0x90, 0x90], EM_X86_64);
        let k = load_kernel(&m, &Kernel::Builtin(Box::leak(elf.into_boxed_slice()))).unwrap();
        assert_eq!(k.entry, 0x20_0000);
        assert!(k.setup_header.is_none());
        let b: u8 = m.read_obj(GuestAddress(0x20_0000)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn refuses_what_is_not_an_x86_64_kernel() {
        let m = mem(16);
        let text = tmpfile(b"#!/bin/sh\necho not a kernel\n");
        let e = load_kernel(&m, &Kernel::Path(text.as_path().to_path_buf())).unwrap_err();
        assert!(matches!(e, LoaderError::NotAKernel { .. }), "{e}");
        let arm = tiny_elf(0x20_0000, &[0; 4], 183);
        let e = load_kernel(&m, &Kernel::Builtin(Box::leak(arm.into_boxed_slice()))).unwrap_err();
        assert!(matches!(e, LoaderError::WrongArchitecture { .. }), "{e}");
        let empty = tmpfile(b"");
        assert!(matches!(
            load_kernel(&m, &Kernel::Path(empty.as_path().to_path_buf())),
            Err(LoaderError::NotAKernel { .. })
        ));
    }

    #[test]
    fn missing_or_unreadable_kernel() {
        let m = mem(16);
        let e = load_kernel(&m, &Kernel::Path("/nonexistent/vmlinux".into())).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
        let e = load_kernel(&m, &Kernel::Path("/".into())).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn linux_is_told_from_other_kernels() {
        let m = mem(16);
        // Loaded from memory, but searched as a kernel from a file is.
        let load = |elf: &'static [u8]| LoadedKernel {
            builtin: false,
            ..load_kernel(&m, &Kernel::Builtin(elf)).unwrap()
        };
        let plain = tiny_elf(0x10_0000, &[0x90; 4096], EM_X86_64);
        assert!(!is_linux(&m, &load(Box::leak(plain.into_boxed_slice()))));
        assert!(!is_linux(&m, &load(flatlet_guest_like())));
        // The banner anywhere in the image, across the scan's chunks too.
        for at in [0usize, 100, (1 << 20) - 5, (1 << 20) + 3] {
            let mut code = vec![0x90u8; (1 << 20) + 4096];
            code[at..at + 14].copy_from_slice(b"Linux version ");
            let elf = tiny_elf(0x10_0000, &code, EM_X86_64);
            let k = load(Box::leak(elf.into_boxed_slice()));
            assert!(is_linux(&m, &k), "banner at {at}");
            // The built-in guest is never searched.
            assert!(!is_linux(&m, &LoadedKernel { builtin: true, ..k }));
        }
    }

    /// A kernel with "Linux" in it, but not the banner.
    fn flatlet_guest_like() -> &'static [u8] {
        let mut code = vec![0x90u8; 256];
        code[10..30].copy_from_slice(b"Linux boot protocol ");
        Box::leak(tiny_elf(0x10_0000, &code, EM_X86_64).into_boxed_slice())
    }

    #[test]
    fn kernel_beyond_memory_is_too_big() {
        let m = mem(16);
        let elf = tiny_elf(0x200_0000, &[0x90; 16], EM_X86_64);
        let e = load_kernel(&m, &Kernel::Builtin(Box::leak(elf.into_boxed_slice()))).unwrap_err();
        assert!(matches!(e, LoaderError::KernelOutsideMemory { .. }), "{e}");
        assert!(!e.to_string().contains("0xffffffffffffffff"), "{e}");
    }

    #[test]
    fn a_truncated_elf_is_reported_as_truncated() {
        let m = mem(16);
        let mut elf = tiny_elf(0x10_0000, &[0x90; 4096], EM_X86_64);
        elf.truncate(elf.len() - 2048);
        let e = load_kernel(&m, &Kernel::Builtin(Box::leak(elf.into_boxed_slice()))).unwrap_err();
        assert!(matches!(e, LoaderError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn bzimage_header_is_recognised_and_needs_64_bit_entry() {
        // A fake bzImage: boot protocol 2.12, loadflags LOADED_HIGH, one
        // setup sector, no 64-bit entry.
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 1; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
        img[0x211] = 1; // loadflags
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        let m = mem(16);
        let e = load_kernel(&m, &Kernel::Builtin(Box::leak(img.clone().into_boxed_slice()))).unwrap_err();
        assert!(matches!(e, LoaderError::No64BitEntry { .. }), "{e}");
        img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        let k = load_kernel(&m, &Kernel::Builtin(Box::leak(img.into_boxed_slice()))).unwrap();
        assert_eq!(k.entry, 0x10_0200);
        assert!(k.setup_header.is_some());
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let m = mem(16);
        let data = vec![0xabu8; 5000];
        let f = tmpfile(&data);
        let kernel = LoadedKernel {
            entry: 0x10_0000,
            end: 0x20_0000,
            start: 0x100000,
            setup_header: None,
            builtin: false,
        };
        let (addr, size) = load_initrd(&m, f.as_path(), &kernel, 16 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 16 << 20 && addr >= 0x20_0000);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0xab);

        let big = tmpfile(&vec![0u8; 15 << 20]);
        let e = load_initrd(&m, big.as_path(), &kernel, 16 << 20).unwrap_err();
        assert!(matches!(e, LoaderError::InitrdTooBig { .. }), "{e}");
        let e = load_initrd(&m, Path::new("/nope"), &kernel, 16 << 20).unwrap_err();
        assert!(matches!(e, LoaderError::InitrdRead { .. }), "{e}");
    }

    #[test]
    fn cmdline_defaults_extras_and_limit() {
        let builtin = BootSource {
            kernel: Kernel::Builtin(&[]),
            boot_args: None,
            initrd: None,
        };
        assert_eq!(build_cmdline(&builtin, &[]).unwrap(), BUILTIN_DEFAULT_CMDLINE);
        let linux = BootSource {
            kernel: Kernel::Path("/k".into()),
            boot_args: Some("root=/dev/vda".into()),
            initrd: None,
        };
        assert_eq!(
            build_cmdline(&linux, &["virtio_mmio.device=4K@0xc0001000:5".into()]).unwrap(),
            "root=/dev/vda virtio_mmio.device=4K@0xc0001000:5"
        );
        // Init's arguments stay last, after flatlet's entries.
        let extra = [
            "virtio_mmio.device=4K@0xc0001000:5".to_string(),
            "noxsave".to_string(),
        ];
        for (given, expected) in [
            (
                "console=ttyS0 -- sh -c 'echo -- hi'",
                "console=ttyS0 virtio_mmio.device=4K@0xc0001000:5 noxsave -- sh -c 'echo -- hi'",
            ),
            (
                "console=ttyS0 --",
                "console=ttyS0 virtio_mmio.device=4K@0xc0001000:5 noxsave --",
            ),
            (
                "-- init-arg",
                "virtio_mmio.device=4K@0xc0001000:5 noxsave -- init-arg",
            ),
            // Not a word of its own: no split.
            (
                "a=--b c--",
                "a=--b c-- virtio_mmio.device=4K@0xc0001000:5 noxsave",
            ),
        ] {
            let boot = BootSource {
                boot_args: Some(given.into()),
                ..linux.clone()
            };
            assert_eq!(build_cmdline(&boot, &extra).unwrap(), expected, "{given}");
        }
        let long = BootSource {
            boot_args: Some("x".repeat(2040)),
            ..linux
        };
        assert!(build_cmdline(&long, &["y".repeat(10)]).is_err());

        let m = mem(1);
        assert_eq!(write_cmdline(&m, "console=ttyS0").unwrap(), 14);
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }
}
