//! Ring 0: the ELF entry point, the CPU tables, the exception stubs and the interrupt stub.
//!
//! Everything that runs in ring 0 lives in this file, as hand-written assembly that uses only
//! simple integer instructions. A PVM host runs guest ring 0 through KVM's instruction emulator,
//! which is slow (~0.66 µs per instruction) and cannot run SSE, x87, `popcnt`, `int3`, `int n`,
//! `xsave` and friends; so ring 0 does the least it can and hands over to ring 3, where the
//! compiled Rust code (which uses SSE registers) runs natively.
//!
//! Entry (Linux x86 64-bit boot protocol): long mode, paging on with an identity map of at least
//! the first 1 GiB, interrupts off, RSI = physical address of the zero page, RSP undefined.
//!
//! `_start` then, in ring 0:
//! 1. sets its own stack, zeroes `.bss`;
//! 2. loads its own page tables: 0..4 GiB identity-mapped with 2 MiB pages, every level
//!    Present|RW|User (so ring 3 can reach MMIO, the zero page and ACPI tables), and the pages
//!    from 0xc000_0000 (the MMIO hole) uncached (PCD|PWT);
//! 3. CR4: PAE, OSFXSR, OSXMMEXCPT on; SMEP, SMAP, PKE, CET off (the stubs live on user pages),
//!    TSD off (ring 3 reads the TSC for its timeouts);
//!    CR0: EM and TS off, MP on (so SSE works in ring 3);
//! 4. loads its GDT, reloads CS (`lretq`) and the data segments, loads the IDT and the TSS;
//! 5. `iretq`s to ring 3 with IOPL 3 (port I/O allowed), IF 0, on the ring-3 stack, with
//!    RDI = zero page, into `crate::probe_main`.
//!
//! GDT: 0x08 kernel code64, 0x10 kernel data, 0x18 user data, 0x20 user code64, 0x28 TSS. The
//! user selectors are used with RPL 3 (0x1b, 0x23); nothing here uses `syscall`/`sysret`.
//!
//! Every vector enters ring 0 through an interrupt gate on IST1 (the TSS's ring-0 exception
//! stack, also RSP0). The stub for exception N (0..31) reports
//! `probe: FAIL exception N (NAME) at RIP=0x... error=0x... CR2=0x...` on COM1 (error is 0 for
//! vectors that push no error code), writes 1 to the exit device (port 0xf4) and halts.
//!
//! One exception is not fatal: a #GP raised by an `in`/`out` instruction in ring 3. With
//! hardware virtualization, IOPL 3 lets ring 3 do port I/O directly. PVM cannot grant that: it
//! runs guest ring 3 at hardware IOPL 0 (measured: the IOPL in the `iretq` frame is dropped), so
//! every port access from ring 3 faults. The #GP handler then does the access itself in ring 0,
//! steps over the instruction and returns: port I/O works either way, at the cost of one trap
//! per access (roughly 50-100 µs on PVM). It handles only the register forms `io.rs` emits.
//! `sti` and `cli` from ring 3 fault the same way there; the handler sets or clears IF in the
//! frame it returns to (`crate::irq::enable`/`disable`).
//!
//! Vectors 32..255 are external interrupts, which arrive only where ring 3 turned them on (the
//! interrupt-taking modes of `probe.pci_irq`): one stub counts them per vector, reads a
//! virtio-pci ISR for the vector ring 3 named, writes the local APIC's EOI and returns (see
//! `crate::irq`). Integer instructions and one MMIO read and write: all run by the PVM emulator.

use core::arch::global_asm;
use core::cell::UnsafeCell;

/// The linker script, unused at run time: naming it here makes cargo relink when it changes.
const _LINK_SCRIPT: &str = include_str!("../link.ld");

/// Size of a large page.
const PAGE_2M: u64 = 0x20_0000;
/// Number of 2 MiB pages in 4 GiB: four page directories of 512 entries.
const PD_ENTRIES: usize = 2048;
/// Start of the 32-bit MMIO hole; pages from here up to 4 GiB are mapped uncached.
const MMIO_HOLE_START: u64 = 0xc000_0000;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_WRITE_THROUGH: u64 = 1 << 3;
const PTE_CACHE_DISABLE: u64 = 1 << 4;
const PTE_LARGE_PAGE: u64 = 1 << 7;

/// The four page directories of the identity map of 0..4 GiB, computed at compile time.
const fn page_directories() -> [u64; PD_ENTRIES] {
    let mut table = [0u64; PD_ENTRIES];
    let mut i = 0;
    while i < PD_ENTRIES {
        let addr = i as u64 * PAGE_2M;
        let mut entry = addr | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_LARGE_PAGE;
        if addr >= MMIO_HOLE_START {
            entry |= PTE_WRITE_THROUGH | PTE_CACHE_DISABLE;
        }
        table[i] = entry;
        i += 1;
    }
    table
}

/// Page-aligned page directories. The CPU sets accessed/dirty bits in them, hence the cell.
#[repr(C, align(4096))]
struct PageDirectories(UnsafeCell<[u64; PD_ENTRIES]>);

// SAFETY: Rust code never reads or writes the tables; only the CPU's page walker does.
unsafe impl Sync for PageDirectories {}

#[link_section = ".data.probe_pagetables"]
static PROBE_PD: PageDirectories = PageDirectories(UnsafeCell::new(page_directories()));

// Ring-0 entry path. Only integer instructions the PVM emulator runs: no SSE, no x87.
global_asm!(
    r##"
    .section .text.probe_start, "ax"
    .global _start
    .type _start, @function
_start:
    cli
    cld
    mov r15, rsi                                // zero page, kept for ring 3
    lea rsp, [rip + probe_ring0_stack_top]

    // Zero .bss (stacks excluded: they follow __probe_bss_end).
    lea rdi, [rip + __probe_bss_start]
    lea rcx, [rip + __probe_bss_end]
    sub rcx, rdi
    shr rcx, 3
    xor eax, eax
    rep stosq

    // Own page tables.
    lea rax, [rip + probe_pml4]
    mov cr3, rax

    // CR4: clear TSD (bit 2), SMEP (20), SMAP (21), PKE (22), CET (23); set PAE, OSFXSR,
    // OSXMMEXCPT.
    mov rax, cr4
    and rax, -0xf00005
    or rax, 0x620
    mov cr4, rax

    // CR0: clear EM (bit 2) and TS (bit 3), set MP (bit 1).
    mov rax, cr0
    and rax, -0xd
    or rax, 0x2
    mov cr0, rax

    // Own GDT; reload CS with the kernel code selector, then the data segments.
    lgdt [rip + probe_gdt_ptr]
    lea rax, [rip + .Lprobe_reload_cs]
    push 0x08
    push rax
    retfq
.Lprobe_reload_cs:
    mov eax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax

    lidt [rip + probe_idt_ptr]
    mov eax, 0x28
    ltr ax

    // To ring 3: user data in DS/ES, an iretq frame of SS, RSP, RFLAGS, CS, RIP.
    mov eax, 0x1b
    mov ds, ax
    mov es, ax
    push 0x1b
    lea rax, [rip + probe_user_stack_top - 8]   // RSP % 16 == 8, as after a call
    push rax
    push 0x3002                                 // IOPL 3, IF 0, reserved bit 1
    push 0x23
    lea rax, [rip + {probe_main}]
    push rax
    mov rdi, r15
    iretq
    .size _start, . - _start

    // ---- CPU tables ----
    .section .data.probe_cpu, "aw"
    .balign 4096
probe_pml4:
    .quad probe_pdpt + 0x7                      // Present | RW | User
    .fill 511, 8, 0
probe_pdpt:
    .quad {pd} + 0x0007
    .quad {pd} + 0x1007
    .quad {pd} + 0x2007
    .quad {pd} + 0x3007
    .fill 508, 8, 0

    .balign 16
probe_gdt:
    .quad 0                                     // 0x00 null
    .quad 0x00af9a000000ffff                    // 0x08 kernel code, 64-bit, DPL 0
    .quad 0x00cf92000000ffff                    // 0x10 kernel data, DPL 0
    .quad 0x00cff2000000ffff                    // 0x18 user data, DPL 3
    .quad 0x00affa000000ffff                    // 0x20 user code, 64-bit, DPL 3
    .word probe_tss_end - probe_tss - 1         // 0x28 TSS: limit 15:0
    .word __probe_tss_0_15                      //   base 15:0
    .byte __probe_tss_16_23                     //   base 23:16
    .byte 0x89                                  //   present, 64-bit TSS (available)
    .byte 0                                     //   limit 19:16, flags
    .byte __probe_tss_24_31                     //   base 31:24
    .long __probe_tss_32_63                     //   base 63:32
    .long 0
probe_gdt_end:

    .balign 8
    .word 0, 0, 0                               // so that the base below is 8-byte aligned
probe_gdt_ptr:
    .word probe_gdt_end - probe_gdt - 1
    .quad probe_gdt

    .balign 16
    .global probe_tss
probe_tss:
    .long 0
    .quad probe_ring0_stack_top                 // RSP0
    .quad 0, 0                                  // RSP1, RSP2
    .quad 0
    .quad probe_ring0_stack_top                 // IST1
    .quad 0, 0, 0, 0, 0, 0                      // IST2..IST7
    .quad 0
    .word 0
    .word 104                                   // I/O map base past the limit: no bitmap
probe_tss_end:

    .balign 16
probe_idt:
    .set probe_vec, 0
    .rept 256
    .word __probe_isr_0_15 + probe_vec * 16     // offset 15:0
    .word 0x08                                  // kernel code selector
    .byte 1                                     // IST1
    .byte 0x8e                                  // present, DPL 0, 64-bit interrupt gate
    .word __probe_isr_16_31                     // offset 31:16
    .long __probe_isr_32_63                     // offset 63:32
    .long 0
    .set probe_vec, probe_vec + 1
    .endr
probe_idt_end:

    .balign 8
    .word 0, 0, 0
probe_idt_ptr:
    .word probe_idt_end - probe_idt - 1
    .quad probe_idt

    // ---- stacks (not zeroed; see link.ld) ----
    .section .probe_stack, "aw", @nobits
    .balign 4096
probe_user_stack:
    .skip 0x40000                               // 256 KiB: the checks keep device lists and
                                                // 256-byte config snapshots on the stack, and
probe_user_stack_top:                           // an overflow has no guard page to stop it
probe_ring0_stack:
    .skip 0x2000
probe_ring0_stack_top:
"##,
    probe_main = sym crate::probe_main,
    pd = sym PROBE_PD,
);

// Exception and interrupt stubs, 16 bytes apart from a 4 KiB-aligned base, 256 of them filling
// the page (the IDT above depends on all that; a stub that grew past 16 bytes makes `.org` fail
// the build). An exception's stub pushes a dummy error code if the CPU pushes none, then its
// vector, and joins the common reporter; an interrupt's pushes its vector and joins the
// interrupt stub.
global_asm!(
    r##"
    .section .text.probe_isr, "ax"
    .balign 4096
    .global probe_isr_table
probe_isr_table:

    .macro probe_isr vec, has_error, target=probe_isr_common
    .org \vec * 16, 0xcc
    .if \has_error == 0
    push 0
    .endif
    push \vec
    jmp \target
    .endm

    probe_isr 0, 0
    probe_isr 1, 0
    probe_isr 2, 0
    probe_isr 3, 0
    probe_isr 4, 0
    probe_isr 5, 0
    probe_isr 6, 0
    probe_isr 7, 0
    probe_isr 8, 1
    probe_isr 9, 0
    probe_isr 10, 1
    probe_isr 11, 1
    probe_isr 12, 1
    probe_isr 13, 1, probe_gp_handler
    probe_isr 14, 1
    probe_isr 15, 0
    probe_isr 16, 0
    probe_isr 17, 1
    probe_isr 18, 0
    probe_isr 19, 0
    probe_isr 20, 0
    probe_isr 21, 1
    probe_isr 22, 0
    probe_isr 23, 0
    probe_isr 24, 0
    probe_isr 25, 0
    probe_isr 26, 0
    probe_isr 27, 0
    probe_isr 28, 0
    probe_isr 29, 1
    probe_isr 30, 1
    probe_isr 31, 0

    // Vectors 32..255: external interrupts (see crate::irq), no error code.
    .set probe_irq_vec, 32
    .rept 224
    .org probe_irq_vec * 16, 0xcc
    push probe_irq_vec
    jmp probe_irq_common
    .set probe_irq_vec, probe_irq_vec + 1
    .endr
    .org 256 * 16, 0xcc

    // An external interrupt: count it (crate::irq::COUNTS[vector]); for the vector named in
    // crate::irq::ACK_VECTOR, read the byte at crate::irq::ACK_ADDR (a virtio-pci ISR: reading
    // acknowledges a level-triggered INTx before the EOI, as a driver's handler does), OR it
    // into crate::irq::ACK_BITS and count the reads that gave 0 (crate::irq::ACK_EMPTY); then
    // EOI to the local APIC and return.
    // Stack: [rsp] vector, [rsp+8] RIP, CS, RFLAGS, RSP, SS.
probe_irq_common:
    push rax
    push rcx
    mov rcx, [rsp + 16]                         // vector
    lea rax, [rip + {irq_counts}]
    inc dword ptr [rax + rcx * 4]
    cmp ecx, dword ptr [rip + {irq_ack_vector}]
    jne .Lprobe_irq_eoi
    mov rax, [rip + {irq_ack_addr}]
    test rax, rax
    jz .Lprobe_irq_eoi
    movzx eax, byte ptr [rax]
    or dword ptr [rip + {irq_ack_bits}], eax
    test eax, eax
    jnz .Lprobe_irq_eoi
    inc dword ptr [rip + {irq_ack_empty}]
.Lprobe_irq_eoi:
    mov eax, 0xfee000b0                         // local APIC EOI register
    mov dword ptr [rax], 0
    pop rcx
    pop rax
    add rsp, 8                                  // vector
    iretq

    // #GP. An `in`/`out` in ring 3 faults where the hypervisor cannot grant IOPL 3 (PVM runs
    // guest ring 3 at hardware IOPL 0): do the access here in ring 0, skip the instruction and
    // return. Only the register forms are handled (EC/ED/EE/EF, and 66 ED/66 EF for 16 bits),
    // which are the only ones io.rs emits. `sti` (FB) and `cli` (FA) fault the same way: IF is
    // set or cleared in the frame (crate::irq). Any other #GP is reported like other exceptions.
    // Stack: [rsp] 13, [rsp+8] error code, [rsp+16] RIP, CS, RFLAGS, RSP, SS.
probe_gp_handler:
    cmp qword ptr [rsp + 8], 0
    jne probe_isr_common
    test byte ptr [rsp + 24], 3
    jz probe_isr_common                         // from ring 0: a real fault
    push rcx
    mov rcx, [rsp + 24]                         // faulting RIP
    movzx ecx, word ptr [rcx]
    cmp cl, 0xee
    je .Lprobe_gp_out8
    cmp cl, 0xec
    je .Lprobe_gp_in8
    cmp cl, 0xef
    je .Lprobe_gp_out32
    cmp cl, 0xed
    je .Lprobe_gp_in32
    cmp cx, 0xef66
    je .Lprobe_gp_out16
    cmp cx, 0xed66
    je .Lprobe_gp_in16
    cmp cl, 0xfb
    je .Lprobe_gp_sti
    cmp cl, 0xfa
    je .Lprobe_gp_cli
    pop rcx
    jmp probe_isr_common
.Lprobe_gp_sti:
    or qword ptr [rsp + 40], 0x200              // RFLAGS.IF in the frame
    mov ecx, 1
    jmp .Lprobe_gp_done
.Lprobe_gp_cli:
    and qword ptr [rsp + 40], -0x201
    mov ecx, 1
    jmp .Lprobe_gp_done
.Lprobe_gp_out8:
    out dx, al
    mov ecx, 1
    jmp .Lprobe_gp_done
.Lprobe_gp_in8:
    in al, dx
    mov ecx, 1
    jmp .Lprobe_gp_done
.Lprobe_gp_out32:
    out dx, eax
    mov ecx, 1
    jmp .Lprobe_gp_done
.Lprobe_gp_in32:
    in eax, dx
    mov ecx, 1
    jmp .Lprobe_gp_done
.Lprobe_gp_out16:
    out dx, ax
    mov ecx, 2
    jmp .Lprobe_gp_done
.Lprobe_gp_in16:
    in ax, dx
    mov ecx, 2
.Lprobe_gp_done:
    add [rsp + 24], rcx                         // skip the instruction
    pop rcx
    add rsp, 16                                 // vector and error code
    iretq

    // Stack: [rsp] vector, [rsp+8] error code, [rsp+16] RIP, CS, RFLAGS, RSP, SS.
probe_isr_common:
    cld
    lea rsi, [rip + .Lprobe_msg_exception]
    call probe_r0_puts
    mov rax, [rsp]
    call probe_r0_put_dec
    lea rsi, [rip + .Lprobe_msg_open]
    call probe_r0_puts
    mov rax, [rsp]
    and eax, 31
    lea rsi, [rip + probe_exception_names]
    mov rsi, [rsi + rax * 8]
    call probe_r0_puts
    lea rsi, [rip + .Lprobe_msg_rip]
    call probe_r0_puts
    mov rax, [rsp + 16]
    call probe_r0_put_hex
    lea rsi, [rip + .Lprobe_msg_error]
    call probe_r0_puts
    mov rax, [rsp + 8]
    call probe_r0_put_hex
    lea rsi, [rip + .Lprobe_msg_cr2]
    call probe_r0_puts
    mov rax, cr2
    call probe_r0_put_hex
    lea rsi, [rip + .Lprobe_msg_eol]
    call probe_r0_puts
    mov al, 1
    out 0xf4, al                                // exit device: status 1
.Lprobe_isr_halt:
    cli
    hlt
    jmp .Lprobe_isr_halt

    // Writes the NUL-terminated string at RSI. Clobbers RAX, RCX, RDX, RSI, R8.
probe_r0_puts:
    movzx eax, byte ptr [rsi]
    test eax, eax
    jz .Lprobe_puts_done
    call probe_r0_putc
    inc rsi
    jmp probe_r0_puts
.Lprobe_puts_done:
    ret

    // Writes the byte in AL to COM1, waiting (bounded) for the transmitter holding register to
    // empty. Clobbers RAX, RCX, RDX, R8.
probe_r0_putc:
    mov r8d, eax
    mov ecx, 10000
    mov edx, 0x3fd                              // line status register
.Lprobe_putc_wait:
    in al, dx
    test al, 0x20
    jnz .Lprobe_putc_ready
    dec ecx
    jnz .Lprobe_putc_wait
.Lprobe_putc_ready:
    mov eax, r8d
    mov edx, 0x3f8
    out dx, al
    ret

    // Writes RAX as 16 hex digits. Clobbers RAX, RCX, RDX, R8, R9, R10.
probe_r0_put_hex:
    mov r9, rax
    mov r10d, 16
.Lprobe_hex_digit:
    rol r9, 4
    mov eax, r9d
    and eax, 0xf
    cmp eax, 10
    jb .Lprobe_hex_decimal
    add eax, 0x27                               // 'a' - '0' - 10
.Lprobe_hex_decimal:
    add eax, 0x30                               // '0'
    call probe_r0_putc
    dec r10d
    jnz .Lprobe_hex_digit
    ret

    // Writes RAX (0..99) in decimal. Clobbers RAX, RCX, RDX, R8, R9.
probe_r0_put_dec:
    xor r9d, r9d
.Lprobe_dec_tens:
    cmp rax, 10
    jb .Lprobe_dec_units
    sub rax, 10
    inc r9d
    jmp .Lprobe_dec_tens
.Lprobe_dec_units:
    test r9d, r9d
    jz .Lprobe_dec_last
    push rax
    lea eax, [r9 + 0x30]
    call probe_r0_putc
    pop rax
.Lprobe_dec_last:
    add eax, 0x30
    jmp probe_r0_putc

    .section .rodata.probe_exceptions, "a"
.Lprobe_msg_exception: .asciz "probe: FAIL exception "
.Lprobe_msg_open: .asciz " ("
.Lprobe_msg_rip: .asciz ") at RIP=0x"
.Lprobe_msg_error: .asciz " error=0x"
.Lprobe_msg_cr2: .asciz " CR2=0x"
.Lprobe_msg_eol: .asciz "\r\n"
.Lprobe_exc_0: .asciz "#DE divide error"
.Lprobe_exc_1: .asciz "#DB debug"
.Lprobe_exc_2: .asciz "NMI"
.Lprobe_exc_3: .asciz "#BP breakpoint"
.Lprobe_exc_4: .asciz "#OF overflow"
.Lprobe_exc_5: .asciz "#BR bound range"
.Lprobe_exc_6: .asciz "#UD invalid opcode"
.Lprobe_exc_7: .asciz "#NM device not available"
.Lprobe_exc_8: .asciz "#DF double fault"
.Lprobe_exc_9: .asciz "coprocessor segment overrun"
.Lprobe_exc_10: .asciz "#TS invalid TSS"
.Lprobe_exc_11: .asciz "#NP segment not present"
.Lprobe_exc_12: .asciz "#SS stack fault"
.Lprobe_exc_13: .asciz "#GP general protection"
.Lprobe_exc_14: .asciz "#PF page fault"
.Lprobe_exc_15: .asciz "reserved"
.Lprobe_exc_16: .asciz "#MF x87 floating point"
.Lprobe_exc_17: .asciz "#AC alignment check"
.Lprobe_exc_18: .asciz "#MC machine check"
.Lprobe_exc_19: .asciz "#XM SIMD floating point"
.Lprobe_exc_20: .asciz "#VE virtualization"
.Lprobe_exc_21: .asciz "#CP control protection"
.Lprobe_exc_28: .asciz "#HV hypervisor injection"
.Lprobe_exc_29: .asciz "#VC VMM communication"
.Lprobe_exc_30: .asciz "#SX security"

    .balign 8
probe_exception_names:
    .quad .Lprobe_exc_0, .Lprobe_exc_1, .Lprobe_exc_2, .Lprobe_exc_3
    .quad .Lprobe_exc_4, .Lprobe_exc_5, .Lprobe_exc_6, .Lprobe_exc_7
    .quad .Lprobe_exc_8, .Lprobe_exc_9, .Lprobe_exc_10, .Lprobe_exc_11
    .quad .Lprobe_exc_12, .Lprobe_exc_13, .Lprobe_exc_14, .Lprobe_exc_15
    .quad .Lprobe_exc_16, .Lprobe_exc_17, .Lprobe_exc_18, .Lprobe_exc_19
    .quad .Lprobe_exc_20, .Lprobe_exc_21, .Lprobe_exc_15, .Lprobe_exc_15
    .quad .Lprobe_exc_15, .Lprobe_exc_15, .Lprobe_exc_15, .Lprobe_exc_15
    .quad .Lprobe_exc_28, .Lprobe_exc_29, .Lprobe_exc_30, .Lprobe_exc_15
"##,
    irq_counts = sym crate::irq::COUNTS,
    irq_ack_vector = sym crate::irq::ACK_VECTOR,
    irq_ack_addr = sym crate::irq::ACK_ADDR,
    irq_ack_bits = sym crate::irq::ACK_BITS,
    irq_ack_empty = sym crate::irq::ACK_EMPTY,
);
