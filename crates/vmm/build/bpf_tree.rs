//! Reshapes a seccompiler program so that the syscall number is found by a
//! binary search instead of a linear chain of comparisons.
//!
//! Why: when a filter is installed, Linux (5.11 and later) works out which
//! syscalls the filter always allows by emulating it once for every syscall
//! number. With seccompiler's linear chain that costs the chain's length per
//! number: measured here, installing the 417-instruction VMM filter took
//! ~390 µs, and a linear 150-syscall chain ~650 µs against ~130 µs for the
//! same syscalls as a tree. Every flatlet thread installs a filter on the
//! launch path, so this is launch time.
//!
//! seccompiler lays a filter out as: the architecture check; `ld nr`; one
//! block per syscall, `jeq nr` then the syscall's rules (which end in `ret`);
//! the default `ret`. A block is entered at the instruction after its `jeq`
//! when the number matches; when it does not, a path of `ja`s leads to the
//! next block. The reshaped program keeps the architecture check, replaces
//! the chain of `jeq`s by a search tree whose leaves jump to the block
//! bodies, and copies each body (its jumps are relative and stay inside
//! it). A test in `seccomp.rs` runs both programs on every syscall number
//! and checks they agree.
//!
//! Each body is also compacted where that is sound (see `compact`):
//! seccompiler spends 4 instructions on a rule without arguments and 5 on
//! one `dword eq` comparison, where 1 and 1 do. The cost of installing a
//! filter grows with its length (the kernel converts and JIT-compiles the
//! whole program, in several passes): issue 16's profile found the three
//! installs of a launch at ~0.55 ms of CPU. A body that is a single `ret`
//! after compaction is put in the tree's leaf itself.

use seccompiler::sock_filter;

const LD_W_ABS: u16 = 0x20;
const JA: u16 = 0x05;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
/// Offset of the syscall number in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
/// A leaf of the tree tests up to this many numbers in a row.
const LEAF: usize = 3;

/// One syscall's block in the linear program.
struct Block {
    nr: u32,
    /// The instructions after the `jeq`, up to the next block.
    body: Vec<sock_filter>,
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Where a jump of the tree goes, resolved once the layout is known.
enum Target {
    /// The first instruction of block `n`'s body.
    Body(usize),
    /// An instruction of the tree.
    At(usize),
}

/// Reshapes `prog` (seccompiler's output for one filter).
pub fn reshape(prog: &[sock_filter]) -> Result<Vec<sock_filter>, String> {
    let ld_nr = prog
        .iter()
        .position(|i| i.code == LD_W_ABS && i.k == NR_OFFSET)
        .ok_or("no load of the syscall number")?;
    let prologue = &prog[..ld_nr];
    // The architecture check may only return or fall through to `ld nr`.
    for (n, i) in prologue.iter().enumerate() {
        if i.code == JEQ_K && n + 1 + usize::from(i.jt.max(i.jf)) > ld_nr {
            return Err(format!("the prologue jumps past the syscall load at {n}"));
        }
        if ![LD_W_ABS, JEQ_K, RET_K].contains(&i.code) {
            return Err(format!("unexpected instruction {:#x} in the prologue", i.code));
        }
    }

    let mut blocks = Vec::new();
    let mut at = ld_nr + 1;
    let default = loop {
        let i = prog
            .get(at)
            .cloned()
            .ok_or("the program ends inside the syscall chain")?;
        if i.code == RET_K {
            break i;
        }
        if i.code != JEQ_K || i.jt != 0 {
            return Err(format!(
                "expected a syscall comparison at {at}, found {:#x}",
                i.code
            ));
        }
        // Follow the mismatch path to the next block.
        let mut next = at + 1 + usize::from(i.jf);
        while let Some(j) = prog.get(next).filter(|j| j.code == JA) {
            next = next + 1 + j.k as usize;
        }
        if next <= at + 1 || next >= prog.len() {
            return Err(format!("the block of syscall {} at {at} has no end", i.k));
        }
        blocks.push(Block {
            nr: i.k,
            body: prog[at + 1..next].to_vec(),
        });
        at = next;
    };
    blocks.sort_by_key(|b| b.nr);
    if blocks.windows(2).any(|w| w[0].nr == w[1].nr) {
        return Err("a syscall has two blocks".into());
    }
    for b in &mut blocks {
        if let Some(body) = compact(&b.body) {
            b.body = body;
        }
    }

    let mut tree: Vec<(sock_filter, Option<Target>)> = Vec::new();
    let nrs: Vec<(u32, usize)> = blocks.iter().enumerate().map(|(n, b)| (b.nr, n)).collect();
    emit(&nrs, &default, &mut tree);

    let mut out = prologue.to_vec();
    out.push(insn(LD_W_ABS, 0, 0, NR_OFFSET));
    let tree_start = out.len();
    // A body of one instruction (a `ret`) replaces the leaf's jump to it.
    let inline = |b: &Block| b.body.len() == 1 && b.body[0].code == RET_K;
    let mut body_start = Vec::with_capacity(blocks.len());
    let mut pos = tree_start + tree.len();
    for b in &blocks {
        body_start.push(pos);
        if !inline(b) {
            pos += b.body.len();
        }
    }
    for (n, (mut i, target)) in tree.into_iter().enumerate() {
        match target {
            Some(Target::Body(b)) if inline(&blocks[b]) => i = blocks[b].body[0].clone(),
            Some(t) => {
                let to = match t {
                    Target::Body(b) => body_start[b],
                    Target::At(a) => tree_start + a,
                };
                i.k = u32::try_from(to - (tree_start + n + 1)).map_err(|_| "jump too far")?;
            }
            None => {}
        }
        out.push(i);
    }
    for b in blocks.into_iter().filter(|b| !inline(b)) {
        out.extend(b.body);
    }
    out.push(default);
    if out.len() >= 4096 {
        return Err(format!(
            "the reshaped filter is too long ({} instructions)",
            out.len()
        ));
    }
    Ok(out)
}

/// The outcome of running a body on one value of the word it loads: its
/// `ret` value, or None when the body does something `compact` does not
/// model (then the body is kept as it is).
fn run_body(body: &[sock_filter], word: u32) -> Option<u32> {
    let mut loaded = false;
    let mut pc = 0usize;
    // Every jump goes forward, so the body ends within its length.
    for _ in 0..=body.len() {
        let i = body.get(pc)?;
        pc += 1;
        match i.code {
            LD_W_ABS => loaded = true,
            JA => pc += i.k as usize,
            // A comparison before any load would test the syscall number.
            JEQ_K if loaded => pc += usize::from(if word == i.k { i.jt } else { i.jf }),
            RET_K => return Some(i.k),
            _ => return None,
        }
    }
    None
}

/// A shorter body that decides every input as `body` does, or None.
///
/// Sound for the bodies seccompiler writes for `dword eq` rules: if every
/// load in the body reads the same argument word and every comparison is
/// `jeq` against a constant, the body's outcome depends only on which of
/// its constants that word equals (or on none of them). So it is run once
/// for each constant and once for a value that is none of them, and the
/// result is written as `ld word; jeq c -> ret ...; ret <none>`.
fn compact(body: &[sock_filter]) -> Option<Vec<sock_filter>> {
    let mut words = body.iter().filter(|i| i.code == LD_W_ABS).map(|i| i.k);
    let word = words.next();
    if words.any(|k| Some(k) != word) {
        return None;
    }
    let mut constants: Vec<u32> = body.iter().filter(|i| i.code == JEQ_K).map(|i| i.k).collect();
    constants.sort_unstable();
    constants.dedup();
    let other = (0..=u32::MAX).find(|v| constants.binary_search(v).is_err())?;
    let otherwise = run_body(body, other)?;
    let mut matches = Vec::new();
    for &c in &constants {
        let action = run_body(body, c)?;
        if action != otherwise {
            matches.push((c, action));
        }
    }
    let Some(word) = word.filter(|_| !matches.is_empty()) else {
        return Some(vec![insn(RET_K, 0, 0, otherwise)]);
    };
    let mut actions: Vec<u32> = matches.iter().map(|&(_, a)| a).collect();
    actions.sort_unstable();
    actions.dedup();
    // ld; one jeq per constant; ret otherwise; one ret per action.
    let mut out = vec![insn(LD_W_ABS, 0, 0, word)];
    let m = matches.len();
    for (n, &(c, action)) in matches.iter().enumerate() {
        let slot = actions.binary_search(&action).ok()?;
        // From the jeq after this one's, past the rest and `ret otherwise`.
        let jt = u8::try_from(m - 1 - n + 1 + slot).ok()?;
        out.push(insn(JEQ_K, jt, 0, c));
    }
    out.push(insn(RET_K, 0, 0, otherwise));
    out.extend(actions.iter().map(|&a| insn(RET_K, 0, 0, a)));
    Some(out)
}

/// Emits the search over `nrs` (sorted): at a leaf, `jeq` then `ja` to the
/// body for each number, then the default action; above, `jge` on the
/// middle number splits the range. Conditional jumps only skip the next
/// instruction; `ja`, whose offset is 32 bits, does the long jumps.
fn emit(nrs: &[(u32, usize)], default: &sock_filter, tree: &mut Vec<(sock_filter, Option<Target>)>) {
    if nrs.len() <= LEAF {
        for &(nr, block) in nrs {
            tree.push((insn(JEQ_K, 0, 1, nr), None));
            tree.push((insn(JA, 0, 0, 0), Some(Target::Body(block))));
        }
        tree.push((default.clone(), None));
        return;
    }
    let (low, high) = nrs.split_at(nrs.len() / 2);
    tree.push((insn(JGE_K, 0, 1, high[0].0), None));
    let to_high = tree.len();
    tree.push((insn(JA, 0, 0, 0), None));
    emit(low, default, tree);
    tree[to_high].1 = Some(Target::At(tree.len()));
    emit(high, default, tree);
}
