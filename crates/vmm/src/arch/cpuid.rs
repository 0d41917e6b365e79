//! Guest CPUID: what KVM supports, shaped per vCPU (APIC ID, topology),
//! with timing information for guests without a PIT, and, on nested hosts
//! whose instruction emulator runs guest ring-0 code, without the features
//! that emulator cannot execute.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// KVM's paravirtual features (EAX).
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// The VMware-defined timing leaf: TSC and LAPIC bus frequency in kHz.
pub const LEAF_TIMING: u32 = 0x4000_0010;
const LEAF_EXT_AMD: u32 = 0x8000_0001;

/// KVM's local APIC timer counts at 1 GHz (one tick a nanosecond).
pub const LAPIC_BUS_KHZ: u32 = 1_000_000;

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

// Leaf 1 ECX.
const ECX_PCID: u32 = 1 << 17;
const ECX_CX16: u32 = 1 << 13;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 EBX.
const EBX7_FSGSBASE: u32 = 1 << 0;
const EBX7_AVX2: u32 = 1 << 5;
const EBX7_ERMS: u32 = 1 << 9;
const EBX7_INVPCID: u32 = 1 << 10;
const EBX7_AVX512F: u32 = 1 << 16;
const EBX7_RDSEED: u32 = 1 << 18;
const EBX7_SMAP: u32 = 1 << 20;
const EBX7_CLFLUSHOPT: u32 = 1 << 23;
const EBX7_CLWB: u32 = 1 << 24;
// Leaf 7 ECX and EDX.
const ECX7_PKU: u32 = 1 << 3;
const ECX7_RDPID: u32 = 1 << 22;
const EDX7_FSRM: u32 = 1 << 4;
// Leaf 0x8000_0001 EDX.
const EDX_EXT_RDTSCP: u32 = 1 << 27;
// Leaf 0x4000_0001 EAX: the KVM features a guest uses through hypercalls.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 1 << 16;

/// What shapes one vCPU's CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidParams {
    /// This vCPU's APIC ID.
    pub apic_id: u8,
    /// vCPUs in the VM.
    pub cpu_count: u8,
    /// Two threads per core.
    pub smt: bool,
    /// KVM emulates the TSC-deadline timer.
    pub tsc_deadline: bool,
    /// TSC frequency in kHz, if known.
    pub tsc_khz: Option<u32>,
    /// Hide what a nested host's instruction emulator cannot execute.
    pub mask_for_emulator: bool,
}

fn entries(cpuid: &mut CpuId, function: u32) -> impl Iterator<Item = &mut kvm_cpuid_entry2> {
    cpuid
        .as_mut_slice()
        .iter_mut()
        .filter(move |e| e.function == function)
}

/// Shapes `cpuid` (KVM's supported CPUID) for one vCPU.
pub fn shape(cpuid: &mut CpuId, p: &CpuidParams) {
    let threads = if p.smt && p.cpu_count > 1 { 2u32 } else { 1 };
    let count = u32::from(p.cpu_count.max(1));
    let cores = (count / threads).max(1);

    for e in entries(cpuid, LEAF_FEATURES) {
        e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(p.apic_id) << 24) | (count << 16);
        e.ecx |= ECX_HYPERVISOR;
        if p.tsc_deadline {
            e.ecx |= ECX_TSC_DEADLINE;
        }
        if count > 1 {
            e.edx |= EDX_HTT;
        } else {
            e.edx &= !EDX_HTT;
        }
    }
    for e in entries(cpuid, LEAF_CACHE) {
        let level = (e.eax >> 5) & 0x7;
        let sharing = if level <= 2 { threads } else { count };
        e.eax = (e.eax & 0x3fff) | ((sharing - 1) << 14) | ((cores - 1) << 26);
    }
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        set_topology(cpuid, leaf, p.apic_id, threads, count);
    }
    // No performance monitoring: it costs exits and is not virtualised here.
    for e in entries(cpuid, LEAF_PMU) {
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
    }
    add_timing_leaf(cpuid, p.tsc_khz);
    if p.mask_for_emulator {
        mask_for_emulator(cpuid);
    }
}

/// Replaces the sub-leaves of a topology leaf (0xB or 0x1F) that KVM
/// reports with the VM's own: SMT level, core level, end of list. KVM's list
/// cannot be shaped in place: it copies the host's levels, and a nested host
/// may give only an empty sub-leaf 0 (seen here), which without a core level
/// puts every vCPU in a package of its own.
fn set_topology(cpuid: &mut CpuId, leaf: u32, apic_id: u8, threads: u32, count: u32) {
    if entries(cpuid, leaf).next().is_none() {
        return;
    }
    cpuid.retain(|e| e.function != leaf);
    let smt_shift = if threads > 1 { 1 } else { 0 };
    let package_shift = u32::BITS - (count - 1).leading_zeros();
    let levels = [
        (smt_shift, threads, 1),
        (package_shift.max(smt_shift), count, 2),
        (0, 0, 0),
    ];
    for (index, (shift, logical, kind)) in (0u32..).zip(levels) {
        let e = kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: INDEXED_FLAG,
            eax: shift,
            ebx: logical,
            ecx: (kind << 8) | index,
            edx: u32::from(apic_id),
            ..Default::default()
        };
        // Push fails only at KVM_MAX_CPUID_ENTRIES, far above the three
        // entries just removed and put back.
        let _ = cpuid.push(e);
    }
}

/// Adds leaf 0x4000_0010 (TSC and LAPIC bus kHz), which lets a guest
/// without a PIT program its LAPIC timer without calibrating it.
fn add_timing_leaf(cpuid: &mut CpuId, tsc_khz: Option<u32>) {
    let Some(tsc_khz) = tsc_khz else { return };
    let mut has_hypervisor_leaf = false;
    for e in entries(cpuid, LEAF_HYPERVISOR) {
        e.eax = e.eax.max(LEAF_TIMING);
        has_hypervisor_leaf = true;
    }
    if !has_hypervisor_leaf {
        return;
    }
    let timing = kvm_cpuid_entry2 {
        function: LEAF_TIMING,
        eax: tsc_khz,
        ebx: LAPIC_BUS_KHZ,
        ..Default::default()
    };
    if let Some(e) = entries(cpuid, LEAF_TIMING).next() {
        *e = timing;
        return;
    }
    // Push fails only at KVM_MAX_CPUID_ENTRIES; the leaf is optional.
    let _ = cpuid.push(timing);
}

/// Clears features whose instructions the nested (PVM) host's emulator
/// cannot run in guest ring 0. (On such hosts KVM_SET_CPUID2 does not hide
/// every one of them from the guest: Linux guests also get the matching
/// `clearcpuid=` flags on their command line.)
fn mask_for_emulator(cpuid: &mut CpuId) {
    let mut xsave_cleared = false;
    for e in entries(cpuid, LEAF_FEATURES) {
        e.ecx &=
            !(ECX_CX16 | ECX_POPCNT | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_RDRAND | ECX_MOVBE | ECX_PCID);
        xsave_cleared = true;
    }
    for e in entries(cpuid, LEAF_EXT_FEATURES).filter(|e| e.index == 0) {
        e.ebx &= !(EBX7_FSGSBASE
            | EBX7_AVX2
            | EBX7_ERMS
            | EBX7_INVPCID
            | EBX7_AVX512F
            | EBX7_RDSEED
            | EBX7_SMAP
            | EBX7_CLFLUSHOPT
            | EBX7_CLWB);
        e.ecx &= !(ECX7_PKU | ECX7_RDPID);
        e.edx &= !EDX7_FSRM;
    }
    for e in entries(cpuid, LEAF_EXT_AMD) {
        e.edx &= !EDX_EXT_RDTSCP;
    }
    // A guest `vmcall` in emulated ring 0 is retried forever there, without
    // an exit: a Linux guest with two vCPUs hung in its first
    // paravirtual IPI. Hide the features that make hypercalls; their
    // native equivalents (IPIs through the LAPIC, halt) work.
    for e in entries(cpuid, LEAF_KVM_FEATURES) {
        e.eax &= !(KVM_FEATURE_PV_UNHALT
            | KVM_FEATURE_PV_SEND_IPI
            | KVM_FEATURE_PV_SCHED_YIELD
            | KVM_FEATURE_HC_MAP_GPA_RANGE);
    }
    if xsave_cleared {
        for e in entries(cpuid, LEAF_XSAVE) {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
    }
}

/// The `clearcpuid=` names matching what [`mask_for_emulator`] hides, for a
/// Linux guest's command line.
pub const EMULATOR_CLEARCPUID: &str = "cx16,popcnt,xsave,rdrand,rdseed,fsgsbase,smap,invpcid,pcid,pku,rdtscp,rdpid,avx,avx2,movbe,clflushopt,clwb,erms,fsrm,avx512f";

/// Marks entries whose sub-leaf index matters, as KVM requires for the
/// leaves it treats that way (KVM's own list already carries the flag).
pub fn is_indexed(function: u32) -> bool {
    matches!(
        function,
        LEAF_CACHE | LEAF_EXT_FEATURES | LEAF_TOPOLOGY | LEAF_XSAVE | LEAF_TOPOLOGY_V2
    )
}

/// The flag value for indexed entries.
pub const INDEXED_FLAG: u32 = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if is_indexed(function) { INDEXED_FLAG } else { 0 },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(
                LEAF_FEATURES,
                0,
                0x806f0,
                0x0008_0800,
                ECX_CX16 | ECX_POPCNT | ECX_XSAVE | 1,
                EDX_HTT | 1,
            ),
            entry(LEAF_CACHE, 0, (1 << 5) | 0x1, 0, 0, 0),
            entry(LEAF_CACHE, 3, (3 << 5) | 0x3, 0, 0, 0),
            entry(
                LEAF_EXT_FEATURES,
                0,
                0,
                EBX7_AVX2 | EBX7_SMAP | (1 << 7),
                ECX7_PKU,
                EDX7_FSRM,
            ),
            entry(LEAF_PMU, 0, 0x0703_0802, 1, 2, 3),
            entry(LEAF_TOPOLOGY, 0, 9, 9, 9, 9),
            entry(LEAF_TOPOLOGY, 1, 9, 9, 9, 9),
            entry(LEAF_TOPOLOGY, 2, 9, 9, 9, 9),
            // What the nested host here reports: an empty sub-leaf 0 only.
            entry(LEAF_TOPOLOGY_V2, 0, 0, 0, 0, 0),
            entry(LEAF_XSAVE, 0, 7, 0x240, 0x240, 0),
            entry(LEAF_HYPERVISOR, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(LEAF_KVM_FEATURES, 0, 0x0001_ffff, 0, 0, 0),
            entry(LEAF_EXT_AMD, 0, 0, 0, 0, EDX_EXT_RDTSCP | 1),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn params(apic_id: u8, cpu_count: u8) -> CpuidParams {
        CpuidParams {
            apic_id,
            cpu_count,
            smt: false,
            tsc_deadline: true,
            tsc_khz: Some(2_000_000),
            mask_for_emulator: false,
        }
    }

    #[test]
    fn apic_id_count_and_flags_in_leaf_1() {
        let mut c = sample();
        shape(&mut c, &params(3, 4));
        let e = find(&c, LEAF_FEATURES, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        assert_ne!(e.ecx & ECX_CX16, 0, "not masked unless asked");

        let mut one = sample();
        shape(&mut one, &params(0, 1));
        assert_eq!(find(&one, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_the_vm() {
        let mut c = sample();
        shape(&mut c, &params(5, 6));
        let smt = find(&c, LEAF_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 5));
        let core = find(&c, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (3, 6, 2, 5));
        let end = find(&c, LEAF_TOPOLOGY, 2);
        assert_eq!((end.eax, end.ebx, end.ecx >> 8), (0, 0, 0));
        for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
            let subleaves: Vec<_> = c.as_slice().iter().filter(|e| e.function == leaf).collect();
            assert_eq!(subleaves.len(), 3, "leaf {leaf:#x}: SMT, core, end");
            assert!(subleaves.iter().all(|e| e.flags == INDEXED_FLAG));
        }
        let core_v2 = find(&c, LEAF_TOPOLOGY_V2, 1);
        assert_eq!(
            (core_v2.eax, core_v2.ebx, core_v2.ecx >> 8),
            (3, 6, 2),
            "built, not copied"
        );
        let l1 = find(&c, LEAF_CACHE, 0);
        assert_eq!((l1.eax >> 26, (l1.eax >> 14) & 0xfff), (5, 0));
        let l3 = find(&c, LEAF_CACHE, 3);
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (5, 5));

        let mut smt_vm = sample();
        shape(
            &mut smt_vm,
            &CpuidParams {
                smt: true,
                ..params(1, 4)
            },
        );
        let t = find(&smt_vm, LEAF_TOPOLOGY, 0);
        assert_eq!((t.eax, t.ebx), (1, 2));
        assert_eq!(find(&smt_vm, LEAF_CACHE, 0).eax >> 26, 1, "two cores");
    }

    #[test]
    fn pmu_hidden_and_timing_leaf_added() {
        let mut c = sample();
        shape(&mut c, &params(0, 1));
        let pmu = find(&c, LEAF_PMU, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        assert_eq!(find(&c, LEAF_HYPERVISOR, 0).eax, LEAF_TIMING);
        let t = find(&c, LEAF_TIMING, 0);
        assert_eq!((t.eax, t.ebx), (2_000_000, LAPIC_BUS_KHZ));
        // Shaping twice does not add a second timing leaf.
        shape(&mut c, &params(0, 1));
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == LEAF_TIMING).count(),
            1
        );
    }

    #[test]
    fn emulator_mask_hides_what_nested_hosts_cannot_run() {
        let mut c = sample();
        shape(
            &mut c,
            &CpuidParams {
                mask_for_emulator: true,
                ..params(0, 1)
            },
        );
        let f = find(&c, LEAF_FEATURES, 0);
        assert_eq!(f.ecx & (ECX_CX16 | ECX_POPCNT | ECX_XSAVE), 0);
        assert_eq!(f.ecx & 1, 1, "other features stay");
        let e7 = find(&c, LEAF_EXT_FEATURES, 0);
        assert_eq!((e7.ebx, e7.ecx, e7.edx), (1 << 7, 0, 0), "SMEP stays");
        assert_eq!(find(&c, LEAF_XSAVE, 0).eax, 0);
        assert_eq!(find(&c, LEAF_EXT_AMD, 0).edx, 1);
        let kvm = find(&c, LEAF_KVM_FEATURES, 0).eax;
        assert_eq!(
            kvm & (KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_UNHALT),
            0,
            "no hypercalls"
        );
        assert_eq!(kvm & 1, 1, "kvm-clock stays");

        let mut native = sample();
        shape(&mut native, &params(0, 2));
        assert_eq!(
            find(&native, LEAF_KVM_FEATURES, 0).eax,
            0x0001_ffff,
            "untouched on hardware"
        );
    }
}
