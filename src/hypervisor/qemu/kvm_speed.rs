//! How fast KVM is on this host, measured with a guest of our own: no
//! QEMU, a vCPU in flat 32-bit protected mode that halts at once (the cost
//! of a guest exit back to the host's userspace) and one that writes a word
//! to each page of fresh guest memory (the cost of a guest's first touch of
//! a page: the host's page fault and the hypervisor's mapping of it). A
//! host that is itself a virtual machine runs KVM nested, where each exit
//! crosses two hypervisors: guests work, but every exit and first touch is
//! several times slower — the trap this project met on its own machines,
//! where KVM ran guests slower than emulation.

use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

/// Where the code sits, and the memory the touch loop writes.
const CODE: u64 = 0x1000;
const HALT: u64 = 0x2000;
const TOUCHED: u64 = 0x10_0000;
const PAGE: u64 = 4096;
/// 16 MiB of touches: a few tens of milliseconds even nested.
const TOUCH_PAGES: u32 = 4096;
/// Exits timed; the median is kept.
const EXITS: usize = 101;

/// Bare-metal KVM answers an exit in one to two microseconds; past this,
/// the guests of this host run their exits (timers, I/O, interrupts) slowly.
pub const SLOW_EXIT_US: f64 = 5.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvmSpeed {
    /// A guest exit to the host's userspace and back, in microseconds.
    pub exit_us: f64,
    /// A guest's first write to a page of its memory, in microseconds.
    pub first_touch_us: f64,
    /// The CPU says it runs under a hypervisor (`hypervisor` in cpuinfo).
    pub nested: bool,
}

impl KvmSpeed {
    pub fn slow(&self) -> bool {
        self.exit_us > SLOW_EXIT_US
    }

    pub fn describe(&self) -> String {
        format!(
            "a guest exit takes {:.1} µs (bare metal: 1 to 2) and a first touch of guest memory \
             {:.1} µs a page{}",
            self.exit_us,
            self.first_touch_us,
            if self.nested {
                "; this host is itself a virtual machine (KVM runs nested)"
            } else {
                ""
            }
        )
    }
}

/// Guest memory: anonymous, page-aligned, unmapped on drop (after the VM
/// that used it, which must be dropped first).
struct Memory {
    base: *mut u8,
    size: usize,
}

impl Memory {
    fn new(size: usize) -> Result<Memory, String> {
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {size} bytes of guest memory: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Memory {
            base: base.cast(),
            size,
        })
    }

    fn write(&mut self, at: u64, bytes: &[u8]) {
        assert!(at as usize + bytes.len() <= self.size);
        // SAFETY: in bounds (asserted) of a mapping this struct owns.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at as usize), bytes.len())
        };
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}

/// The touch loop: write EAX to `pages` pages from [`TOUCHED`], then halt.
fn touch_code(pages: u32) -> Vec<u8> {
    let mut code = vec![0xBF]; // mov edi, TOUCHED
    code.extend_from_slice(&(TOUCHED as u32).to_le_bytes());
    code.push(0xB9); // mov ecx, pages
    code.extend_from_slice(&pages.to_le_bytes());
    code.extend_from_slice(&[
        0x89, 0x07, // again: mov [edi], eax
        0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, // add edi, 4096
        0x49, // dec ecx
        0x75, 0xF5, // jnz again
        0xF4, // hlt
    ]);
    code
}

/// Flat 32-bit protected mode: every segment from 0 to 4 GiB, no paging.
fn protected_mode(vcpu: &VcpuFd) -> Result<(), String> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let mut segment = sregs.cs;
    segment.base = 0;
    segment.limit = 0xffff_ffff;
    segment.g = 1;
    segment.db = 1;
    segment.s = 1;
    segment.present = 1;
    segment.dpl = 0;
    segment.l = 0;
    segment.type_ = 11; // code: execute, read, accessed
    segment.selector = 8;
    sregs.cs = segment;
    segment.type_ = 3; // data: read, write, accessed
    segment.selector = 16;
    sregs.ds = segment;
    sregs.es = segment;
    sregs.fs = segment;
    sregs.gs = segment;
    sregs.ss = segment;
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))
}

/// Run from `at` until the guest halts; how long it took.
fn run(vcpu: &mut VcpuFd, at: u64) -> Result<std::time::Duration, String> {
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = at;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let started = Instant::now();
    loop {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::Hlt => return Ok(started.elapsed()),
            VcpuExit::Intr => continue,
            other => return Err(format!("the test guest stopped unexpectedly: {other:?}")),
        }
    }
}

fn nested() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
    })
}

/// Measure KVM here (about 50 ms; blocking). Err: why no guest runs.
pub fn measure() -> Result<KvmSpeed, String> {
    let size = (TOUCHED + u64::from(TOUCH_PAGES) * PAGE) as usize;
    // Declared before the VM: dropped after it.
    let mut memory = Memory::new(size)?;
    memory.write(CODE, &touch_code(TOUCH_PAGES));
    memory.write(HALT, &[0xF4]);
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: memory.base as u64,
        flags: 0,
    };
    // SAFETY: the region is `memory`'s mapping, which outlives the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    protected_mode(&vcpu)?;
    let touched = run(&mut vcpu, CODE)?;
    let mut exits = (0..EXITS)
        .map(|_| run(&mut vcpu, HALT))
        .collect::<Result<Vec<_>, _>>()?;
    exits.sort();
    let exit = exits[EXITS / 2];
    Ok(KvmSpeed {
        exit_us: exit.as_secs_f64() * 1e6,
        first_touch_us: touched.saturating_sub(exit).as_secs_f64() * 1e6 / f64::from(TOUCH_PAGES),
        nested: nested(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_touch_loop_jumps_back_to_its_store() {
        let code = touch_code(3);
        // mov edi (5) + mov ecx (5): the loop starts at 10; jnz's offset
        // is counted from the byte after it.
        let jnz = code.iter().position(|&b| b == 0x75).unwrap();
        let back = code[jnz + 1] as i8 as isize;
        assert_eq!(jnz as isize + 2 + back, 10);
        assert_eq!(&code[10..12], &[0x89, 0x07], "mov [edi], eax");
        assert_eq!(*code.last().unwrap(), 0xF4, "hlt");
    }

    /// Where KVM opens (this machine's CI), the guest runs and halts.
    #[test]
    fn a_guest_runs_where_kvm_opens() {
        if std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            assert!(measure().unwrap_err().contains("/dev/kvm"));
            return;
        }
        let speed = measure().expect("measure");
        assert!(
            speed.exit_us > 0.0 && speed.first_touch_us >= 0.0,
            "{speed:?}"
        );
    }
}
