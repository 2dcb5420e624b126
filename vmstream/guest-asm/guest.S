/*
 * vmstream KVM guest program: runs at CPL 3 in 64-bit long mode, flat,
 * identity mapped, no interrupts, no exceptions. Loaded at CODE_GPA and
 * entered at its first byte with:
 *     rdi = vCPU index, rsp = this vCPU's stack top, RFLAGS.IOPL = 3.
 * Everything else comes from the parameter block at PARAMS_GPA.
 * Talks to the VMM only through `in`/`out` (see abi.h, KVM.md).
 *
 * The code is position independent and uses no relocations (build.rs checks),
 * so the flat .text is the whole program.
 *
 * Register plan (all workloads):
 *   rbx  parameter block            r15  xorshift64* PRNG state
 *   r14  this vCPU's record         r13  first block of this vCPU's partition
 *   r12  hot blocks in partition    r11  cold blocks in partition
 *   rsi  progress report mask
 */
#include "abi.h"

    .intel_syntax noprefix
    .code64
    .text

/* rax = next pseudo-random u64 (xorshift64*); clobbers rax only. */
.macro RNG
    mov     rax, r15
    shr     rax, 12
    xor     r15, rax
    mov     rax, r15
    shl     rax, 25
    xor     r15, rax
    mov     rax, r15
    shr     rax, 27
    xor     r15, rax
    movabs  rax, 0x2545f4914f6cdd1d
    imul    rax, r15
.endm

/* rdx = uniform-ish index in [0, \n) (high half of rand * n); clobbers rax, rdx. */
.macro PICK n
    RNG
    mul     \n
.endm

/* Count one transaction (new count left in rax) and report every 2^shift. */
.macro COUNT_TX
    mov     rax, [r14 + VCPU_TX_COUNT]
    inc     rax
    mov     [r14 + VCPU_TX_COUNT], rax
    test    rax, rsi
    jnz     99f
    mov     dx, PORT_PROGRESS
    out     dx, eax
99:
.endm

    .globl _start
_start:
    mov     rbx, PARAMS_GPA
    movabs  rax, PARAMS_MAGIC_VALUE
    cmp     [rbx + PARAM_MAGIC], rax
    jne     bad_params
    cmp     qword ptr [rbx + PARAM_VERSION], PARAMS_VERSION_VALUE
    jne     bad_params
    mov     rcx, [rbx + PARAM_VCPUS]
    test    rcx, rcx
    jz      bad_params

    /* r14 = &record[vcpu] */
    mov     r14, rdi
    shl     r14, 6                      /* VCPU_AREA_STRIDE == 64 */
    add     r14, VCPU_AREA_GPA

    /* PRNG state = seed ^ ((vcpu + 1) * golden ratio), never zero */
    lea     rax, [rdi + 1]
    movabs  rcx, CHECKSUM_K_NUMBER
    imul    rax, rcx
    xor     rax, [rbx + PARAM_SEED]
    jnz     1f
    mov     eax, 1
1:  mov     r15, rax

    /* partition [vcpu * active / vcpus, (vcpu + 1) * active / vcpus) */
    mov     rax, [rbx + PARAM_ACTIVE_BLOCKS]
    mul     rdi
    div     qword ptr [rbx + PARAM_VCPUS]
    mov     r13, rax
    lea     rcx, [rdi + 1]
    mov     rax, [rbx + PARAM_ACTIVE_BLOCKS]
    mul     rcx
    div     qword ptr [rbx + PARAM_VCPUS]
    sub     rax, r13                    /* rax = blocks in partition */
    mov     r8, rax

    /* hot = max(1, part * hot_permille / 1000) if part > 0; cold = part - hot */
    mul     qword ptr [rbx + PARAM_HOT_PERMILLE]
    mov     ecx, 1000
    div     rcx
    test    rax, rax
    jnz     2f
    test    r8, r8
    jz      2f
    mov     eax, 1
2:  cmp     rax, r8
    jbe     3f
    mov     rax, r8
3:  mov     r12, rax
    mov     r11, r8
    sub     r11, rax

    /* rsi = (1 << report_shift) - 1 */
    mov     rcx, [rbx + PARAM_REPORT_SHIFT]
    mov     esi, 1
    shl     rsi, cl
    dec     rsi

    mov     rax, [rbx + PARAM_WORKLOAD]
    cmp     rax, WORKLOAD_TOUCH
    je      touch
    test    r8, r8
    jz      idle                        /* no blocks for this vCPU */
    cmp     rax, WORKLOAD_DBSIM
    je      dbsim
    cmp     rax, WORKLOAD_RANDOM
    je      random
    cmp     rax, WORKLOAD_HOTSET
    je      hotset
    cmp     rax, WORKLOAD_IDLE
    je      idle

bad_params:
    mov     eax, PANIC_BAD_PARAMS
    mov     dx, PORT_PANIC
    out     dx, eax
    ud2

/*
 * dbsim: one transaction = pick a block (hot set with probability
 * hot_hit_permille), change ROWS_PER_TX words in random rows, bump the
 * version, update the checksum incrementally, record the version in the
 * ledger, count. VCPU_INFLIGHT marks the block while it is inconsistent.
 */
dbsim:
    RNG
    shr     rax, 32
    imul    rax, rax, 1000
    shr     rax, 32                     /* rax in [0, 1000) */
    test    r11, r11
    jz      10f                         /* no cold blocks */
    cmp     rax, [rbx + PARAM_HOT_HIT_PERMILLE]
    jb      10f
    PICK    r11
    lea     rbp, [r13 + r12]
    add     rbp, rdx                    /* cold block */
    jmp     11f
10: PICK    r12
    lea     rbp, [r13 + rdx]            /* hot block */
11:
    lea     rax, [rbp + 1]
    mov     [r14 + VCPU_INFLIGHT], rax

    mov     rdi, rbp
    shl     rdi, 13                     /* BLOCK_SIZE == 8192 */
    add     rdi, [rbx + PARAM_BLOCKS_GPA]

    cmp     qword ptr [rdi + BLOCK_HDR_VERSION], 0
    jne     12f
    /* first write: header of an all-zero block */
    mov     [rdi + BLOCK_HDR_NUMBER], rbp
    movabs  rax, CHECKSUM_K_NUMBER
    imul    rax, rbp
    mov     [rdi + BLOCK_HDR_CHECKSUM], rax
12:
    mov     r8, [rdi + BLOCK_HDR_CHECKSUM]
    mov     r9, [rbx + PARAM_ROWS_PER_TX]
13:
    RNG
    mov     edx, eax
    and     edx, 7                      /* word within the row */
    mov     rcx, rax
    shr     rcx, 32
    imul    rcx, rcx, BLOCK_ROWS
    shr     rcx, 32                     /* row */
    lea     rcx, [rcx * 8 + rdx]        /* payload word index */
    mov     edx, eax                    /* xor mask: changes up to 4 bytes */
    shr     edx, 3
    or      edx, 1                      /* never a no-op */
    mov     r10, [rdi + BLOCK_HEADER_SIZE + rcx * 8]
    mov     rax, r10
    xor     rax, rdx
    mov     [rdi + BLOCK_HEADER_SIZE + rcx * 8], rax
    sub     rax, r10                    /* delta */
    lea     rdx, [rcx * 2 + 1]          /* word weight */
    imul    rax, rdx
    add     r8, rax
    dec     r9
    jnz     13b

    mov     rax, [rdi + BLOCK_HDR_VERSION]
    inc     rax
    mov     [rdi + BLOCK_HDR_VERSION], rax
    movabs  rdx, CHECKSUM_K_VERSION
    add     r8, rdx
    mov     [rdi + BLOCK_HDR_CHECKSUM], r8
    mov     rdx, [rbx + PARAM_LEDGER_GPA]
    mov     [rdx + rbp * 8], rax
    COUNT_TX
    mov     qword ptr [r14 + VCPU_INFLIGHT], 0
    jmp     dbsim

/* random: one random u64 store anywhere in the partition per transaction. */
random:
    mov     rcx, r12
    add     rcx, r11
    shl     rcx, 10                     /* words in partition */
    mov     rdi, r13
    shl     rdi, 13
    add     rdi, [rbx + PARAM_BLOCKS_GPA]
20: PICK    rcx
    mov     [rdi + rdx * 8], rax
    COUNT_TX
    jmp     20b

/* hotset: one random u64 store into the partition's hot blocks. */
hotset:
    mov     rcx, r12
    shl     rcx, 10                     /* words in hot set */
    mov     rdi, r13
    shl     rdi, 13
    add     rdi, [rbx + PARAM_BLOCKS_GPA]
30: PICK    rcx
    mov     [rdi + rdx * 8], rax
    COUNT_TX
    jmp     30b

/* idle: count and hand the CPU back to the VMM. */
idle:
    COUNT_TX
    mov     dx, PORT_IDLE
    out     dx, eax
    jmp     idle

/*
 * touch: write exactly the pages the VMM names, nothing else (no stack, no
 * record), so dirty logs can be checked for exactness.
 */
touch:
    xor     r8, r8                      /* value written: 1, 2, 3, ... */
touch_batch:
    xor     r9, r9                      /* pages written in this batch */
40: mov     dx, PORT_TOUCH
    in      eax, dx
    cmp     eax, TOUCH_NONE
    je      40b
    test    eax, eax
    jz      41f
    shl     rax, 12
    inc     r8
    mov     [rax], r8
    inc     r9
    jmp     40b
41: mov     eax, r9d
    mov     dx, PORT_TOUCH_DONE
    out     dx, eax
    jmp     touch_batch
