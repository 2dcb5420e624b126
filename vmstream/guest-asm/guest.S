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
    cmp     rax, WORKLOAD_DISKIO
    jne     not_diskio
    test    rdi, rdi
    jz      diskio                      /* one stream: vCPU 0 writes, the others idle */
    jmp     idle
not_diskio:
    cmp     rax, WORKLOAD_FILEDB
    jne     1f
    test    rdi, rdi
    jz      filedb                      /* one stream: vCPU 0 writes, the others idle */
    jmp     idle
1:
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

/*
 * filedb: dbsim in the file-backed guests' image format (WORKLOADS.md) at
 * IMAGE_GPA, with the same redo-journal commit protocol, so the image
 * verifies with the file-backed guests' verifier at any pause:
 *   1. journal record (block, version, kind, updates) while JOURNAL_SEQ = 0
 *   2. arm: JOURNAL_SEQ = seq
 *   3. apply updates, seal header (number, version, last_tx, checksum last),
 *      ledger[b] = version, TX_COUNT = seq
 *   4. disarm: JOURNAL_SEQ = 0
 * Register plan: r13 image, r12 hot blocks, r11 cold blocks, r15 PRNG,
 * rbp block, r8 seq, r9 version, r10 updates left, rdi journal entry.
 */
filedb:
    mov     r13, IMAGE_GPA
    mov     r12, [r13 + IMG_SB_HOT_BLOCKS]
    mov     r11, [r13 + IMG_SB_ACTIVE_BLOCKS]
    sub     r11, r12
    mov     r15, [r13 + IMG_SB_RNG_STATE]
    or      r15, 1

fdb_tx:
    /* pick: a hot block (b % 10 == 0) with IMG_HOT_PERCENT %, else the k-th other one */
    RNG
    mov     ecx, 100
    mul     rcx                         /* rdx in [0, 100) */
    test    r11, r11
    jz      51f
    cmp     rdx, IMG_HOT_PERCENT
    jb      51f
    PICK    r11                         /* k in [0, cold) */
    mov     rax, rdx
    xor     edx, edx
    mov     ecx, IMG_HOT_STRIDE - 1
    div     rcx                         /* rax = k / 9, rdx = k % 9 */
    imul    rax, rax, IMG_HOT_STRIDE
    lea     rbp, [rax + rdx + 1]
    jmp     52f
51: PICK    r12
    imul    rbp, rdx, IMG_HOT_STRIDE
52:
    mov     r8, [r13 + IMG_SB_TX_COUNT]
    inc     r8                          /* seq */
    mov     r9, [r13 + IMG_LEDGER_OFFSET + rbp * 8]
    inc     r9                          /* new version */

    /* 1. the journal record: 1..4 row-field updates */
    mov     [r13 + IMG_SB_JOURNAL_BLOCK], rbp
    mov     [r13 + IMG_SB_JOURNAL_VERSION], r9
    mov     dword ptr [r13 + IMG_SB_JOURNAL_KIND], 1
    RNG
    and     eax, 3
    inc     eax
    mov     r10d, eax
    mov     dword ptr [r13 + IMG_SB_JOURNAL_COUNT], r10d
    lea     rdi, [r13 + IMG_SB_JOURNAL_UPDATES]
53: RNG
    mov     rcx, rax                    /* r */
    mov     edx, IMG_ROWS
    mul     rdx                         /* rdx = row in [0, 63) */
    shl     rdx, 7                      /* * IMG_ROW_SIZE */
    add     rdx, BLOCK_HEADER_SIZE
    mov     [rdi], edx                  /* offset = row start, + field below */
    mov     eax, ecx
    imul    rax, rax, 5
    shr     rax, 32                     /* field in [0, 5) */
    mov     rdx, rcx
    shr     rdx, 16
    cmp     eax, 1
    jb      54f
    je      55f
    cmp     eax, 3
    jb      56f
    je      57f
    add     dword ptr [rdi], 64         /* comment: 10..41 letters */
    and     edx, 31
    add     edx, 10
    jmp     58f
57: add     dword ptr [rdi], 32         /* name: 4..19 letters */
    and     edx, 15
    add     edx, 4
58: mov     [rdi + 4], edx
    push    r11
    xor     eax, eax
59: imul    rcx, rcx, 0x5851f42d        /* LCG step for the letters */
    add     rcx, 1442695041
    mov     r11, rcx
    shr     r11, 60
    add     r11d, 97                    /* 'a'..'p' */
    mov     [rdi + 8 + rax], r11b
    inc     eax
    cmp     eax, edx
    jb      59b
    pop     r11
    jmp     60f
54: add     dword ptr [rdi], 8          /* balance: 8 bytes */
    mov     dword ptr [rdi + 4], 8
    mov     [rdi + 8], rdx
    jmp     60f
55: add     dword ptr [rdi], 16         /* quantity: 4 bytes */
    mov     dword ptr [rdi + 4], 4
    and     edx, 511
    mov     [rdi + 8], edx
    jmp     60f
56: add     dword ptr [rdi], 24         /* updated_tx: 8 bytes */
    mov     dword ptr [rdi + 4], 8
    mov     [rdi + 8], r8
60: add     rdi, 64
    dec     r10d
    jnz     53b

    /* 2. arm */
    mov     [r13 + IMG_SB_JOURNAL_SEQ], r8

    /* 3. apply: copy each update into the block (rep movsb) */
    mov     rdi, rbp
    shl     rdi, 13                     /* BLOCK_SIZE == 8192 */
    add     rdi, [r13 + IMG_SB_DATA_OFFSET]
    add     rdi, r13                    /* rdi = block */
    mov     r10d, [r13 + IMG_SB_JOURNAL_COUNT]
    lea     rdx, [r13 + IMG_SB_JOURNAL_UPDATES]
    push    rsi
    push    rdi
61: mov     rax, rdi                    /* block */
    mov     ecx, [rdx]
    add     rdi, rcx                    /* destination */
    lea     rsi, [rdx + 8]
    mov     ecx, [rdx + 4]
    rep     movsb
    mov     rdi, rax
    add     rdx, 64
    dec     r10d
    jnz     61b
    pop     rdi
    pop     rsi

    /* seal: number, version, last_tx, then the checksum */
    mov     [rdi + BLOCK_HDR_NUMBER], rbp
    mov     [rdi + BLOCK_HDR_VERSION], r9
    mov     [rdi + IMG_BLOCK_LAST_TX], r8
    /* the checksum over the whole block, its own word read as zero */
    xor     eax, eax
    mov     [rdi + BLOCK_HDR_CHECKSUM], rax
    push    rsi
    push    r15
    mov     rsi, rdi
    mov     edx, BLOCK_SIZE
    call    fnv_lanes
    pop     r15
    pop     rsi
    mov     [rdi + BLOCK_HDR_CHECKSUM], rax

    mov     [r13 + IMG_LEDGER_OFFSET + rbp * 8], r9
    mov     [r13 + IMG_SB_TX_COUNT], r8

    /* 4. disarm */
    mov     qword ptr [r13 + IMG_SB_JOURNAL_SEQ], 0

    mov     [r13 + IMG_SB_RNG_STATE], r15
    mov     rax, r8
    mov     [r14 + VCPU_TX_COUNT], rax
    test    rax, rsi
    jnz     fdb_tx
    mov     dx, PORT_PROGRESS
    out     dx, eax
    jmp     fdb_tx

/*
 * diskio: random whole-block writes to the disks through the paravirtual
 * block device (PORT_BLOCK), in the process guests' disk format (STORAGE.md):
 * each block stamped with its number, version, last write and checksum, its
 * payload the fill pattern of (disk seed, block, version); the ledger in the
 * disk area records each block's latest version. Per write, as the process
 * guests' diskio does:
 *   1. arm the intent (disk, block, version, seq = WRITES + 1)
 *   2. the block request (write, status set by the VMM when `out` returns);
 *      an error status is fatal: PORT_PANIC with PANIC_DISK_IO
 *   3. ledger[d][b] = version, WRITES = seq; 4. disarm
 * Register plan: r13 disk area, r12 write buffer, r8 disk, rbp block,
 * r9 version, r10 &ledger[d][b], r11 seq, r15 splitmix64 state / scratch.
 */
diskio:
    mov     r13, [rbx + PARAM_DISK_AREA_GPA]
    test    r13, r13
    jz      bad_params
    mov     r12, [rbx + PARAM_DISK_BUFFER_GPA]

dio_write:
    /* disk = splitmix64 % disks, block = splitmix64 % blocks[disk] */
    mov     r15, [r13 + DA_RNG_STATE]
    call    splitmix64
    xor     edx, edx
    div     qword ptr [r13 + DA_DISKS]
    mov     r8, rdx
    call    splitmix64
    xor     edx, edx
    div     qword ptr [r13 + DA_DISK_BLOCKS + r8 * 8]
    mov     rbp, rdx
    mov     [r13 + DA_RNG_STATE], r15

    mov     r10, [r13 + DA_LEDGER + r8 * 8]
    add     r10, r13
    lea     r10, [r10 + rbp * 8]
    mov     r9, [r10]
    inc     r9                          /* version */
    mov     r11, [r13 + DA_WRITES]
    inc     r11                         /* seq */

    /* payload: xorshift64 from (disk seed ^ b * K_NUMBER ^ version * K_VERSION) | 1 */
    lea     rax, [r8 + 1]
    movabs  rcx, DISK_SEED_K
    imul    rax, rcx
    xor     rax, [r13 + DA_SEED]
    movabs  rcx, CHECKSUM_K_NUMBER
    imul    rcx, rbp
    xor     rax, rcx
    movabs  rcx, FILL_K_VERSION
    imul    rcx, r9
    xor     rax, rcx
    or      rax, 1
    mov     rdi, r12
    mov     rcx, [r13 + DA_BLOCK_SIZE]
    mov     edx, BLOCK_HEADER_SIZE
70: mov     r15, rax
    shl     r15, 13
    xor     rax, r15
    mov     r15, rax
    shr     r15, 7
    xor     rax, r15
    mov     r15, rax
    shl     r15, 17
    xor     rax, r15
    mov     [rdi + rdx], rax
    add     rdx, 8
    cmp     rdx, rcx
    jb      70b

    /* stamp: number, version, checksum (0 while summed), last write, zeros */
    mov     [rdi + BLOCK_HDR_NUMBER], rbp
    mov     [rdi + BLOCK_HDR_VERSION], r9
    xor     eax, eax
    mov     [rdi + BLOCK_HDR_CHECKSUM], rax
    mov     [rdi + IMG_BLOCK_LAST_TX], r11
    mov     [rdi + 32], rax
    mov     [rdi + 40], rax
    mov     [rdi + 48], rax
    mov     [rdi + 56], rax

    /* checksum: four FNV-1a lanes over the whole block (its own word reads as 0) */
    push    rsi
    mov     rsi, rdi
    mov     rdx, [r13 + DA_BLOCK_SIZE]
    call    fnv_lanes
    pop     rsi
    mov     [rdi + BLOCK_HDR_CHECKSUM], rax

    /* 1. arm the intent */
    mov     [r13 + DA_INTENT_DISK], r8
    mov     [r13 + DA_INTENT_BLOCK], rbp
    mov     [r13 + DA_INTENT_VERSION], r9
    mov     [r13 + DA_INTENT_SEQ], r11

    /* 2. the block request */
    mov     qword ptr [r14 + VCPU_BLK_OP], BLK_OP_WRITE
    mov     [r14 + VCPU_BLK_DISK], r8
    mov     rax, [r13 + DA_BLOCK_SIZE]
    mov     [r14 + VCPU_BLK_LEN], rax
    imul    rax, rbp
    mov     [r14 + VCPU_BLK_OFFSET], rax
    mov     [r14 + VCPU_BLK_BUFFER], r12
    mov     qword ptr [r14 + VCPU_BLK_STATUS], -1  /* BLK_STATUS_PENDING */
    mov     dx, PORT_BLOCK
    out     dx, eax
    cmp     qword ptr [r14 + VCPU_BLK_STATUS], BLK_STATUS_OK
    jne     disk_failed

    /* 3. commit, 4. disarm */
    mov     [r10], r9
    mov     [r13 + DA_WRITES], r11
    mov     qword ptr [r13 + DA_INTENT_SEQ], 0
    COUNT_TX
    test    r11, CHECKPOINT_EVERY - 1
    jnz     dio_write
    call    dio_checkpoint
    jmp     dio_write

/*
 * Every CHECKPOINT_EVERY writes: each disk's ledger to its checkpoint region
 * (after its blocks) in one request, header page first (magic, disk, seq,
 * writes, blocks, checksum of the ledger pages), built in the checkpoint
 * buffer after the write buffer. The sequence is counted first, so a copy
 * taken mid-checkpoint has each disk at this checkpoint or the one before.
 * Keeps rbx, r12, r13, r14, rsi.
 */
dio_checkpoint:
    mov     r11, [r13 + DA_CHECKPOINT_SEQ]
    inc     r11
    mov     [r13 + DA_CHECKPOINT_SEQ], r11
    xor     r8d, r8d                    /* disk */
80: cmp     r8, [r13 + DA_DISKS]
    jae     89f
    mov     rdi, r12
    add     rdi, [r13 + DA_BLOCK_SIZE]  /* the checkpoint buffer */
    mov     r10, [r13 + DA_DISK_BLOCKS + r8 * 8]
    lea     r9, [r10 * 8 + 4095]
    and     r9, -4096                   /* bytes of ledger pages */
    push    rsi
    push    rdi
    xor     eax, eax
    mov     ecx, 512
    rep     stosq                       /* the header page, zero */
    mov     rsi, [r13 + DA_LEDGER + r8 * 8]
    add     rsi, r13
    mov     rcx, r10
    rep     movsq                       /* the ledger */
    mov     rcx, r9
    shr     rcx, 3
    sub     rcx, r10
    rep     stosq                       /* zero to the page's end */
    pop     rdi
    pop     rsi

    push    rsi
    lea     rsi, [rdi + 4096]           /* the ledger pages */
    mov     rdx, r9
    call    fnv_lanes
    pop     rsi

    mov     [rdi + CKPT_CHECKSUM], rax
    movabs  rax, CKPT_MAGIC_VALUE
    mov     [rdi + CKPT_MAGIC], rax
    mov     [rdi + CKPT_DISK], r8
    mov     [rdi + CKPT_SEQ], r11
    mov     rax, [r13 + DA_WRITES]
    mov     [rdi + CKPT_WRITES], rax
    mov     [rdi + CKPT_BLOCKS], r10

    mov     qword ptr [r14 + VCPU_BLK_OP], BLK_OP_WRITE
    mov     [r14 + VCPU_BLK_DISK], r8
    mov     rax, r10
    imul    rax, [r13 + DA_BLOCK_SIZE]  /* the region: right after the blocks */
    mov     [r14 + VCPU_BLK_OFFSET], rax
    lea     rax, [r9 + 4096]
    mov     [r14 + VCPU_BLK_LEN], rax
    mov     [r14 + VCPU_BLK_BUFFER], rdi
    mov     qword ptr [r14 + VCPU_BLK_STATUS], -1  /* BLK_STATUS_PENDING */
    mov     dx, PORT_BLOCK
    out     dx, eax
    cmp     qword ptr [r14 + VCPU_BLK_STATUS], BLK_STATUS_OK
    jne     disk_failed
    inc     r8
    jmp     80b
89: ret

/*
 * rax = four FNV-1a lanes over [rsi, rsi + rdx) (rdx a non-zero multiple of 32), folded
 * from lane 0: guest/file/layout.rs's words_checksum, for image and disk blocks and checkpoints.
 * Clobbers rcx, rdx, rsi and r15.
 */
fnv_lanes:
    push    rbx
    push    rbp
    add     rdx, rsi                    /* the end */
    movabs  rax, IMG_FNV_OFFSET
    mov     rcx, rax
    xor     rcx, 1
    mov     rbx, rax
    xor     rbx, 2
    mov     r15, rax
    xor     r15, 3
    movabs  rbp, IMG_FNV_PRIME
90: xor     rax, [rsi]
    imul    rax, rbp
    xor     rcx, [rsi + 8]
    imul    rcx, rbp
    xor     rbx, [rsi + 16]
    imul    rbx, rbp
    xor     r15, [rsi + 24]
    imul    r15, rbp
    add     rsi, 32
    cmp     rsi, rdx
    jb      90b
    xor     rax, rcx
    imul    rax, rbp
    xor     rax, rbx
    imul    rax, rbp
    xor     rax, r15
    imul    rax, rbp
    pop     rbp
    pop     rbx
    ret

disk_failed:
    mov     eax, PANIC_DISK_IO
    mov     dx, PORT_PANIC
    out     dx, eax
    ud2

/* rax = next splitmix64 value of the state in r15 (advanced); clobbers rcx. */
splitmix64:
    movabs  rcx, SPLITMIX_GAMMA
    add     r15, rcx
    mov     rax, r15
    mov     rcx, rax
    shr     rcx, 30
    xor     rax, rcx
    movabs  rcx, SPLITMIX_M1
    imul    rax, rcx
    mov     rcx, rax
    shr     rcx, 27
    xor     rax, rcx
    movabs  rcx, SPLITMIX_M2
    imul    rax, rcx
    mov     rcx, rax
    shr     rcx, 31
    xor     rax, rcx
    ret
