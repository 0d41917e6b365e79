//! Every `unsafe` operation of flatlet, in one place.
//!
//! Each function here wraps one operation the safe crates do not offer,
//! and states the invariant that makes it sound. Nothing else in the
//! workspace uses `unsafe`.

use std::cell::Cell;
use std::marker::PhantomData;
use std::os::raw::{c_int, c_void};

use kvm_bindings::{kvm_run, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Maps every region of `memory` into the VM, one memory slot each,
/// starting at slot 0.
///
/// The caller must keep `memory` alive, and unchanged, for as long as the
/// VM exists: the `Vm` owns both, and drops its KVM file descriptors
/// before the memory.
///
/// With `log_dirty`, KVM logs the pages the guest writes
/// (`KVM_MEM_LOG_DIRTY_PAGES`), for Diff snapshots.
pub fn map_guest_memory(
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mmap of `region.len()`
        // bytes owned by `memory`, which the caller keeps alive and mapped
        // as long as the VM (see the function's contract). The regions do
        // not overlap (vm-memory refuses overlapping regions), so slots do
        // not either.
        unsafe { vm.set_user_memory_region(desc) }?;
    }
    Ok(())
}

/// The contents of a `KVM_EXIT_INTERNAL_ERROR` exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InternalError {
    /// `KVM_INTERNAL_ERROR_*` suberror.
    pub suberror: u32,
    /// Valid words in `data`.
    pub ndata: u32,
    /// Suberror-specific data.
    pub data: [u64; 16],
}

/// Reads the internal-error details of the exit `vcpu` just returned.
/// Call only right after `KVM_RUN` returned `KVM_EXIT_INTERNAL_ERROR`.
pub fn internal_error(vcpu: &mut VcpuFd) -> InternalError {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return InternalError::default();
    }
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM
    // fills the `internal` member of the union; every bit pattern is a
    // valid value of that member (plain integers).
    let internal = unsafe { run.__bindgen_anon_1.internal };
    InternalError {
        suberror: internal.suberror,
        ndata: internal.ndata.min(16),
        data: internal.data,
    }
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick
    /// signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal handler: makes the current (or next) `KVM_RUN` of this
/// thread return `EINTR` at once, so a kick can never be lost between a
/// check of the vCPU's mailbox and its entry into the guest.
extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was stored by this thread's `RunningVcpu`,
        // points to its vCPU's kvm_run mapping, and is cleared before that
        // mapping is unmapped; the handler runs on that same thread, so
        // the mapping is live. A byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the handler of the vCPU kick signal (process-wide, once).
pub fn install_kick_handler(signum: c_int) -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(signum, kick_handler)
}

/// A vCPU owned by the thread that runs it, registered for kicks.
///
/// Not `Send`: it must stay on the thread whose thread-local slot points
/// to its `kvm_run` page.
pub struct RunningVcpu {
    fd: VcpuFd,
    _not_send: PhantomData<*const ()>,
}

impl RunningVcpu {
    /// Registers `fd` as the vCPU of the calling thread.
    pub fn register(mut fd: VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|slot| slot.set(run));
        Self {
            fd,
            _not_send: PhantomData,
        }
    }

    /// The vCPU.
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }
}

impl Drop for RunningVcpu {
    fn drop(&mut self) {
        // Unregister before `fd` (and its kvm_run mapping) goes away.
        KVM_RUN.with(|slot| slot.set(std::ptr::null_mut()));
    }
}

/// Bytes of `memory` that are resident: the guest memory the VM touched.
pub fn resident_bytes(memory: &GuestMemoryMmap) -> u64 {
    let page = 4096usize;
    let mut total = 0u64;
    for region in memory.iter() {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host` is the page-aligned start of a live mapping of
        // `len` bytes (owned by `memory`, borrowed here), and `vec` has
        // one byte per page of it, as mincore(2) requires.
        let rc = unsafe { libc::mincore(host.cast::<c_void>(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page as u64;
        }
    }
    total
}

/// `KVM_SET_XSAVE` with the legacy 4 KiB area, refused (`EINVAL`) when
/// the VM's XSAVE state is larger than that area.
///
/// `xsave2_size` is `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` of the VM: the
/// bytes KVM copies in (0 when the capability is absent, and KVM then
/// copies `sizeof(struct kvm_xsave)`).
pub fn set_xsave(
    fd: &VcpuFd,
    xsave: &kvm_bindings::kvm_xsave,
    xsave2_size: i32,
) -> Result<(), kvm_ioctls::Error> {
    if usize::try_from(xsave2_size).unwrap_or(usize::MAX) > size_of::<kvm_bindings::kvm_xsave>() {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    // SAFETY: KVM reads `max(KVM_CAP_XSAVE2, sizeof(kvm_xsave))` bytes
    // from `xsave`; the check above makes that the size of `*xsave`, a
    // live reference, so KVM never reads past its end. The contents are
    // plain data that KVM validates (it refuses bad XSTATE headers).
    unsafe { fd.set_xsave(xsave) }
}

/// Which pages of `region` are resident (touched), one flag per 4 KiB
/// page; all `true` when the host cannot tell (then every page is saved).
pub fn resident_pages(region: &vm_memory::GuestRegionMmap) -> Vec<bool> {
    let page = 4096usize;
    let len = region.len() as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
        return vec![true; vec.len()];
    };
    // SAFETY: `host` is the page-aligned start of a live mapping of `len`
    // bytes (owned by `region`, borrowed here), and `vec` has one byte per
    // page of it, as mincore(2) requires.
    let rc = unsafe { libc::mincore(host.cast::<c_void>(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return vec![true; vec.len()];
    }
    vec.iter().map(|b| b & 1 != 0).collect()
}

const TUN_IOCTL: u32 = b'T' as u32;
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, TUN_IOCTL, 202, c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, TUN_IOCTL, 208, std::os::raw::c_uint);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, TUN_IOCTL, 216, c_int);

/// `struct ifreq` as TUNSETIFF reads it: a name and flags (40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens the TAP device `name` (non-blocking), with a virtio-net header of
/// `vnet_hdr_len` bytes in front of every frame and no offloads.
pub fn open_tap(name: &str, vnet_hdr_len: i32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.len() >= 16 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its
    // layout and size (16-byte name, flags, padding to 40 bytes) and lives
    // across the call. `file` is an open /dev/net/tun.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let hdr: c_int = vnet_hdr_len;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which `hdr` is; `file` is the
    // TAP just attached.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value (no pointer is
    // dereferenced); `file` is the TAP.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_val(&file, TUNSETOFFLOAD(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Marks every file descriptor above stderr close-on-exec, so that a
/// program this process executes inherits only stdin, stdout and stderr.
pub fn cloexec_inherited_fds() -> std::io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors (it closes nothing and touches no memory); every
    // descriptor this process (and Rust's std) holds stays valid until the
    // exec that follows.
    let rc = unsafe { libc::close_range(3, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC as libc::c_int) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps the allocator inside the seccomp policy: every thread allocates
/// from glibc's main arena, which grows and shrinks with `brk` (and takes
/// large blocks with `mmap`/`munmap`), never from per-thread arenas.
///
/// A per-thread arena lives in `mmap`ed heaps, and glibc trims those
/// through `shrink_heap`, which opens `/proc/sys/vm/overcommit_memory`
/// the first time: a call no thread's filter allows (it killed flatlet
/// under light API load). flatlet has few threads, so one arena costs
/// nothing measurable in contention. Call before any thread starts.
pub fn single_malloc_arena() -> bool {
    // SAFETY: mallopt(3) only changes a glibc malloc parameter; with
    // M_ARENA_MAX it takes an int and touches no memory of the caller.
    // Called before any other thread exists, so no allocation races it.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
}

/// `madvise(MADV_HUGEPAGE)` on every region of guest memory.
pub fn advise_huge_pages(memory: &GuestMemoryMmap) -> std::io::Result<()> {
    for region in memory.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT))?;
        // SAFETY: `host` is the page-aligned start of a live mapping of
        // `region.len()` bytes owned by `memory` (borrowed here);
        // MADV_HUGEPAGE only changes how the kernel backs it, never its
        // contents or its mapping.
        let rc = unsafe { libc::madvise(host.cast::<c_void>(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Fills `buf` from the kernel's entropy pool, `getrandom(2)` (blocking
/// only before the pool is first initialised, early in the host's boot).
pub fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes into
        // `rest`, a live, writable slice borrowed for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast::<c_void>(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}
