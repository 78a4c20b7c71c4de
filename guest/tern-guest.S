/*
 * tern-guest: a tiny multiboot (v1) kernel that gives live-migration tests a
 * guest whose memory is full of real data and keeps changing.
 *
 * Build (tests/common/guest.rs does this):
 *     as --32 guest/tern-guest.S -o tern-guest.o
 *     ld -m elf_i386 -T guest/tern-guest.ld tern-guest.o -o tern-guest.elf
 * Boot:
 *     qemu-system-x86_64 -m 512 -kernel tern-guest.elf -append "ws=16" \
 *         -display none -nodefaults -serial stdio
 *
 * What it does:
 *   1. Reads the RAM size from the multiboot info (mem_upper, flags bit 0) and
 *      the working set from the command line (flags bit 2): "ws=N", N in MiB,
 *      decimal, as a word of its own (QEMU passes "KERNEL-PATH APPEND-TEXT";
 *      the last "ws=" word wins). Absent or unparsable: 16. Clamped to
 *      1 .. (RAM above 2 MiB).
 *   2. Writes every page from 2 MiB to the end of RAM: each dword of a page
 *      holds the page's address (non-zero, so the migration has to carry it;
 *      QEMU sends zero pages as almost nothing).
 *   3. Sets READY, then loops forever over the working set [2 MiB, 2 MiB + ws):
 *      pass P fills each page with the dword (page address + P), so every page
 *      is dirty and non-zero again on each pass, and COUNTER goes up by one
 *      after each page.
 *   COM1 (0x3f8) gets one line at boot, one when ready, then the counter
 *   about ten times a second while the vCPU runs (the TSC, checked every 16
 *   pages, measured against the PIT once at ready), so a test that cannot
 *   use QMP can watch -serial:
 *      "tern-guest: 512 MiB, working set 16 MiB, filling"
 *      "tern-guest: 512 MiB, working set 16 MiB, ready"
 *      "tern-guest: count 123456"
 *
 * Status block, physical 0x7000 (all fields little-endian u64; read with
 * HMP "xp /1gx ADDR"). Zeroed by the kernel first thing; SeaBIOS leaves the
 * page zero (its stack grows down from below 0x7000) and no BIOS code runs
 * after the kernel starts (interrupts stay off), so nothing else writes it.
 *   0x7000  COUNTER          pages rewritten by the loop; moves only while a
 *                            vCPU runs (64-bit add/adc: a reader can see a
 *                            torn value once every 2^32 pages)
 *   0x7008  READY            0 while filling, 1 once every page was written
 *   0x7010  RAM_MIB          RAM size found: 1 MiB + mem_upper, rounded up to
 *                            a whole MiB. Equals QEMU's -m as long as all RAM
 *                            sits below 4 GiB (-m up to 2 GiB on q35, 3 GiB
 *                            on pc; QEMU maps the rest above 4 GiB, which this
 *                            guest neither counts nor writes)
 *   0x7018  WORKING_SET_MIB  working set in use, after clamping
 *   0x7020  PASS             working-set pass in progress (1, 2, ...; 0 until
 *                            the loop starts)
 *
 * TCG: QEMU before 9.0 can lose guest writes during a migration under TCG
 * (fixed by "physmem: Fix migration dirty bitmap coherency with TCG memory
 * access", 2024): once a page's TLB entry is marked dirty, writes through it
 * are not tracked again until the entry leaves the TLB, so a page the guest
 * keeps hot (this counter, the stack) can arrive stale on the destination.
 * Seen with QEMU 7.2 on a loaded host: without the workaround, 0x7000 and
 * the stack page differed between source and destination after 5 migrations
 * in 18; with it, in none of 18. The workaround: the loop runs INVLPG on each
 * page it has written (INVLPG works with paging off), so the next write
 * refills the entry and QEMU tracks it. Pages written only once (the initial
 * fill) are not covered: migrate after READY.
 *
 * Other memory: the kernel at 1 MiB (a few KiB, stack included; the linker
 * script keeps it under 2 MiB), QEMU's multiboot info (0x9500 with QEMU
 * 7.2), memory map and command line (read before anything is written). Nothing below
 * 2 MiB is filled, so the guest's data starts at 0x200000.
 *
 * No paging, no interrupts: flat 32-bit protected mode as multiboot leaves
 * it, with our own GDT. Only RAM below 4 GiB is reachable this way.
 */
        .code32

        .set MB_MAGIC,       0x1BADB002      /* multiboot header magic */
        .set MB_FLAGS,       0x00000003      /* bit 0: align modules; bit 1: want memory info */
        .set MB_BOOT_MAGIC,  0x2BADB002      /* what the loader puts in %eax */

        .set MBI_FLAGS,      0               /* multiboot info fields */
        .set MBI_MEM_UPPER,  8               /* KiB above 1 MiB (flags bit 0) */
        .set MBI_CMDLINE,    16              /* char * (flags bit 2) */

        .set STATUS,         0x7000
        .set COUNTER,        STATUS + 0x00
        .set READY,          STATUS + 0x08
        .set RAM_MIB,        STATUS + 0x10
        .set WS_MIB,         STATUS + 0x18
        .set PASS,           STATUS + 0x20

        .set FILL_START,     0x200000        /* 2 MiB: first byte of guest data */
        .set DEFAULT_WS_MIB, 16
        .set COM1,           0x3f8
        .set PIT_CH0,        0x40            /* PIT channel 0 data port */
        .set PIT_MODE,       0x43            /* PIT mode/command port */
        .set PIT_10MS,       11932           /* PIT ticks (1.193182 MHz) in 10 ms */

/* ------------------------------------------------------------------------ */
        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------------ */
        .text
        .globl _start
_start:
        cli
        cld
        cmpl $MB_BOOT_MAGIC, %eax
        jne no_multiboot                /* %ebx is not a multiboot info */

        /* Our own flat GDT and segments, and a stack. %ebx (the info) stays. */
        lgdt gdt_desc
        ljmp $0x08, $1f
1:      movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %fs
        movw %ax, %gs
        movw %ax, %ss
        movl $stack_top, %esp

        /* --- RAM: %ebp = RAM in MiB, %edi = its end (the fill's end).
         * mem_upper stops short of the top ~128 KiB, which SeaBIOS reserves
         * for its tables; rounding up to a MiB gives back QEMU's -m, and the
         * fill covers that reserved top too (nothing here reads those tables). */
        testl $1, MBI_FLAGS(%ebx)
        jz no_meminfo
        movl MBI_MEM_UPPER(%ebx), %eax  /* KiB above 1 MiB */
        cmpl $(0x3FFC00 - 0x400), %eax
        jbe 1f
        movl $(0x3FFC00 - 0x400), %eax  /* at most 4095 MiB in all */
1:      addl $(0x400 + 0x3ff), %eax     /* KiB from 0, plus rounding */
        shrl $10, %eax                  /* MiB, rounded up */
        movl %eax, %ebp
        shll $20, %eax
        movl %eax, %edi                 /* end of RAM: 0x100000 .. 0xFFF00000 */
        cmpl $(FILL_START + 0x100000), %edi
        jb too_small                    /* need at least 1 MiB above 2 MiB */

        /* --- Working set: %edx = MiB asked for on the command line. */
        movl $DEFAULT_WS_MIB, %edx
        testl $4, MBI_FLAGS(%ebx)
        jz ws_clamp
        movl MBI_CMDLINE(%ebx), %esi
        call parse_ws

ws_clamp:
        testl %edx, %edx
        jnz 1f
        movl $1, %edx                   /* at least 1 MiB */
1:      movl %edi, %eax
        subl $FILL_START, %eax
        shrl $20, %eax                  /* whole MiB available above 2 MiB */
        cmpl %eax, %edx
        jbe 1f
        movl %eax, %edx
1:
        /* --- Status block: zero the page, then publish RAM and working set.
         *     (The multiboot info is not needed any more.) */
        pushl %edi
        movl $STATUS, %edi
        xorl %eax, %eax
        movl $1024, %ecx
        rep stosl
        popl %edi
        movl %ebp, RAM_MIB
        movl %edx, WS_MIB
        movl %edi, fill_end
        shll $20, %edx
        addl $FILL_START, %edx
        movl %edx, ws_end

        movl $msg_filling, %esi
        call print_status

        /* --- Initial fill: every page from 2 MiB to the end of RAM. */
        movl $FILL_START, %edx
1:      movl %edx, %edi
        movl %edx, %eax                 /* pattern: the page's address */
        movl $1024, %ecx
        rep stosl
        addl $4096, %edx
        cmpl fill_end, %edx
        jb 1b

        movl $1, READY
        movl $msg_ready, %esi
        call print_status

        call calibrate_tsc

        /* --- Forever: rewrite the working set, one pass after another. */
pass:
        addl $1, PASS
        adcl $0, PASS + 4
        movl PASS, %ebx                 /* low dword of the pass number */
        movl $FILL_START, %edx
1:      movl %edx, %edi
        leal (%edx, %ebx), %eax         /* pattern: page address + pass */
        movl $1024, %ecx
        rep stosl
        addl $1, COUNTER
        adcl $0, COUNTER + 4
        testb $15, COUNTER
        jnz 2f
        call tick                       /* every 16 pages: time to print? */
        /* Drop the TLB entries of the pages just written, so that QEMU's
         * TCG sees the next write to each (see "TCG" above). */
2:      invlpg (%edx)                   /* the working-set page */
        invlpg STATUS                   /* the counter */
        invlpg bss_page                 /* variables and stack */
        addl $4096, %edx
        cmpl ws_end, %edx
        jb 1b
        jmp pass

/* --- Failures: say why on COM1 and stop (READY stays 0). */
no_multiboot:
        movl $stack_top, %esp
        movl $msg_no_multiboot, %esi
        jmp die
no_meminfo:
        movl $msg_no_meminfo, %esi
        jmp die
too_small:
        movl $msg_too_small, %esi
die:
        call puts
1:      hlt
        jmp 1b

/*
 * parse_ws: %esi = NUL-terminated command line. Returns %edx = N of the last
 * "ws=N" word (N decimal digits followed by a space or the end), or leaves
 * %edx unchanged if there is none. Large values saturate (they get clamped).
 * Clobbers %eax, %ecx, %esi.
 */
parse_ws:
        pushl %edi
        movb $' ', %ah                  /* previous char: start = word start */
2:      movb (%esi), %al
        testb %al, %al
        jz 9f
        cmpb $' ', %ah
        jne 8f                          /* not at a word start */
        cmpb $'w', %al
        jne 8f
        cmpb $'s', 1(%esi)
        jne 8f
        cmpb $'=', 2(%esi)
        jne 8f
        leal 3(%esi), %edi              /* first digit */
        xorl %ecx, %ecx                 /* value */
3:      movzbl (%edi), %eax
        subl $'0', %eax
        cmpl $9, %eax
        ja 4f
        cmpl $100000000, %ecx
        jae 5f                          /* saturate instead of overflowing */
        imull $10, %ecx
        addl %eax, %ecx
5:      incl %edi
        jmp 3b
4:      leal 3(%esi), %eax
        cmpl %eax, %edi
        je 8f                           /* no digits */
        movb (%edi), %al
        testb %al, %al
        jz 6f
        cmpb $' ', %al
        jne 8f                          /* "ws=12x": not a number */
6:      movl %ecx, %edx
8:      movb (%esi), %ah
        incl %esi
        jmp 2b
9:      popl %edi
        ret

/*
 * tick: once the TSC passes the deadline, print "tern-guest: count N" and set
 * the next deadline 100 ms on. If the TSC went back by more than that (it
 * may, across a migration), just start over from now. Keeps all registers.
 */
tick:
        pushal
        rdtsc
        movl %eax, %esi
        movl %edx, %edi                 /* %edi:%esi = now */
        subl deadline, %eax
        sbbl deadline + 4, %edx         /* now - deadline */
        jns 1f                          /* due */
        addl period, %eax
        adcl period + 4, %edx           /* now - deadline + period */
        jns 9f                          /* not yet */
        call next_deadline              /* the TSC went back */
        jmp 9f
1:      call next_deadline
        movl $msg_count, %esi
        call puts
        movl COUNTER, %eax
        movl COUNTER + 4, %edx
        call putdec64
        movb $'\n', %al
        call putc
9:      popal
        ret

/* next_deadline: deadline = %edi:%esi (a TSC value) + period. */
next_deadline:
        addl period, %esi
        adcl period + 4, %edi
        movl %esi, deadline
        movl %edi, deadline + 4
        ret

/*
 * calibrate_tsc: period = TSC cycles in 100 ms, from the cycles that pass
 * while the PIT counts 10 ms; then the first deadline. The PIT (channel 0,
 * mode 2, reload 65536: a 16-bit counter going down at 1.193182 MHz) is only
 * read, never used for interrupts. Clobbers %eax, %ebx, %ecx, %edx, %esi, %edi.
 */
calibrate_tsc:
        movb $0x34, %al                 /* channel 0, lo/hi byte, mode 2, binary */
        outb %al, $PIT_MODE
        xorl %eax, %eax
        outb %al, $PIT_CH0
        outb %al, $PIT_CH0
        call pit_read
        movl %eax, %ebx                 /* last PIT count */
        rdtsc
        movl %eax, %esi
        movl %edx, %edi                 /* TSC at the start */
        xorl %ecx, %ecx                 /* PIT ticks so far */
1:      call pit_read
        subl %eax, %ebx                 /* it counts down: last - now */
        andl $0xffff, %ebx              /* modulo the wrap */
        addl %ebx, %ecx
        movl %eax, %ebx
        cmpl $PIT_10MS, %ecx
        jb 1b
        rdtsc
        subl %esi, %eax                 /* cycles in 10 ms (< 2^32 below 400 GHz) */
        movl $10, %ecx
        mull %ecx                       /* %edx:%eax = cycles in 100 ms */
        movl %eax, period
        movl %edx, period + 4
        rdtsc
        movl %eax, %esi
        movl %edx, %edi
        jmp next_deadline

/* pit_read: %eax = PIT channel 0's current count (0 .. 0xffff). */
pit_read:
        xorl %eax, %eax
        outb %al, $PIT_MODE             /* latch channel 0 */
        inb $PIT_CH0, %al               /* low byte */
        movb %al, %ah
        inb $PIT_CH0, %al               /* high byte */
        xchgb %al, %ah
        ret

/* print_status: "tern-guest: R MiB, working set W MiB, " then the string at %esi. */
print_status:
        pushl %esi
        movl $msg_prefix, %esi
        call puts
        movl RAM_MIB, %eax
        movl RAM_MIB + 4, %edx
        call putdec64
        movl $msg_mib_ws, %esi
        call puts
        movl WS_MIB, %eax
        movl WS_MIB + 4, %edx
        call putdec64
        movl $msg_mib_comma, %esi
        call puts
        popl %esi
        jmp puts

/* puts: write the NUL-terminated string at %esi to COM1. */
puts:
        lodsb
        testb %al, %al
        jz 1f
        call putc
        jmp puts
1:      ret

/* putdec64: write %edx:%eax in decimal to COM1. Clobbers %eax, %ecx, %edx. */
putdec64:
        pushl %ebx
        pushl %esi
        movl $10, %ecx
        pushl $0                        /* end marker */
1:      movl %eax, %esi                 /* low dword */
        movl %edx, %eax
        xorl %edx, %edx
        divl %ecx                       /* high / 10 */
        movl %eax, %ebx                 /* high dword of the quotient */
        movl %esi, %eax
        divl %ecx                       /* (remainder:low) / 10 */
        addl $'0', %edx                 /* the digit */
        pushl %edx
        movl %ebx, %edx                 /* %edx:%eax = quotient */
        movl %eax, %esi
        orl %edx, %esi
        jnz 1b
2:      popl %eax
        testl %eax, %eax
        jz 3f
        call putc
        jmp 2b
3:      popl %esi
        popl %ebx
        ret

/* putc: write %al to COM1 once its transmitter is free. With no UART the
 * status port reads 0xff, so this never blocks. */
putc:
        pushl %edx
        pushl %eax
        movw $COM1 + 5, %dx             /* line status register */
1:      inb %dx, %al
        testb $0x20, %al                /* transmit holding register empty */
        jz 1b
        popl %eax
        movw $COM1, %dx
        outb %al, %dx
        popl %edx
        ret

/* ------------------------------------------------------------------------ */
        .section .rodata
        .align 8
gdt:
        .quad 0                         /* null */
        .quad 0x00CF9A000000FFFF        /* 0x08: code, base 0, 4 GiB, 32-bit */
        .quad 0x00CF92000000FFFF        /* 0x10: data, base 0, 4 GiB */
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt

msg_prefix:        .asciz "tern-guest: "
msg_mib_ws:        .asciz " MiB, working set "
msg_mib_comma:     .asciz " MiB, "
msg_filling:       .asciz "filling\n"
msg_ready:         .asciz "ready\n"
msg_count:         .asciz "tern-guest: count "
msg_no_multiboot:  .asciz "tern-guest: error: not booted by a multiboot loader\n"
msg_no_meminfo:    .asciz "tern-guest: error: no memory size in the multiboot info\n"
msg_too_small:     .asciz "tern-guest: error: needs at least 3 MiB of RAM\n"

/* ------------------------------------------------------------------------ */
        .bss
        .align 4096
        .globl bss_page, stack_top      /* for the check in tern-guest.ld */
bss_page:                               /* all of .bss, one page: */
fill_end:  .long 0                      /* end of RAM (page aligned) */
ws_end:    .long 0                      /* end of the working set */
        .align 8
period:    .quad 0                      /* TSC cycles in 100 ms */
deadline:  .quad 0                      /* TSC value of the next count line */
        .align 16
stack:     .skip 2048
stack_top:
        /* (tern-guest.ld checks that this all fits in bss_page's page.) */

        .section .note.GNU-stack, "", @progbits
