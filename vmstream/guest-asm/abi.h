/*
 * ABI between the vmstream KVM VMM and its guest program (guest.S).
 *
 * Single source of truth: build.rs turns every `#define NAME value // doc`
 * line below into `pub const NAME: u64 = value;` for the Rust side
 * (`guest::kvm::abi`, src/guest/kvm/mod.rs), so both sides always agree. Values must be plain
 * integer literals (decimal or 0x hex).
 */
#ifndef VMSTREAM_GUEST_ABI_H
#define VMSTREAM_GUEST_ABI_H

/* ---- guest-physical layout of the reserved system area [0, 2 MiB) ---- */
#define GDT_GPA 0x1000 // GDT: null, user code64 (DPL3), user data (DPL3), 64-bit TSS
#define TSS_GPA 0x1800 // 64-bit TSS; its I/O permission bitmap lets CPL 3 use our ports
#define TSS_IOMAP_OFFSET 0x68 // I/O bitmap right after the 104-byte TSS
#define TSS_IOMAP_BYTES 0x100 // bitmap covers ports 0..0x7ff (all allowed), then one 0xff byte
#define PML4_GPA 0x2000 // level-4 page table
#define PDPT_GPA 0x3000 // level-3 page table (one, covers 512 GiB)
#define PD_GPA 0x4000 // first level-2 page table; one 4 KiB table per GiB of RAM
#define PD_MAX_TABLES 64 // page tables reserved: guest RAM is at most 64 GiB
#define PARAMS_GPA 0x80000 // parameter block written by the VMM (see PARAM_*)
#define VCPU_AREA_GPA 0x81000 // per-vCPU records, VCPU_AREA_STRIDE bytes each
#define VCPU_AREA_STRIDE 64 // one cache line per vCPU
#define CODE_GPA 0x100000 // guest program (.text of guest.S, flat)
#define CODE_MAX 0x20000 // at most 128 KiB of code
#define STACK_AREA_GPA 0x140000 // stacks: vCPU i uses [top - STACK_SIZE, top), top = STACK_TOP_GPA - i * STACK_SIZE
#define STACK_TOP_GPA 0x200000 // top of vCPU 0's stack
#define STACK_SIZE 0x1000 // 4 KiB stack per vCPU
#define MAX_VCPUS 64 // limited by the stack area
#define SYSTEM_AREA_SIZE 0x200000 // the ledger starts here

/* ---- segment selectors ---- */
#define SEL_USER_CODE 0x0b // GDT index 1, RPL 3
#define SEL_USER_DATA 0x13 // GDT index 2, RPL 3
#define SEL_TSS 0x18 // GDT index 3 (16-byte system descriptor)

/* ---- parameter block: offsets from PARAMS_GPA, all fields u64 ---- */
#define PARAM_MAGIC 0x00 // must equal PARAMS_MAGIC_VALUE
#define PARAM_VERSION 0x08 // must equal PARAMS_VERSION_VALUE
#define PARAM_WORKLOAD 0x10 // one of WORKLOAD_*
#define PARAM_VCPUS 0x18 // number of vCPUs running the workload
#define PARAM_SEED 0x20 // PRNG seed; vCPU i uses a state derived from seed and i
#define PARAM_LEDGER_GPA 0x28 // ledger: u64 latest version per block
#define PARAM_BLOCKS_GPA 0x30 // first data block
#define PARAM_BLOCK_COUNT 0x38 // data blocks in guest RAM
#define PARAM_ACTIVE_BLOCKS 0x40 // blocks the workload touches; the rest stay zero
#define PARAM_REPORT_SHIFT 0x48 // progress `out` every 2^shift transactions
#define PARAM_HOT_PERMILLE 0x50 // share of each vCPU's blocks that form its hot set
#define PARAM_HOT_HIT_PERMILLE 0x58 // share of transactions that go to the hot set
#define PARAM_ROWS_PER_TX 0x60 // words changed per dbsim transaction
#define PARAM_MEMORY_SIZE 0x68 // guest RAM size in bytes
#define PARAM_DISK_AREA_GPA 0x70 // disk area (process guests' layout, STORAGE.md), 0 = no disks
#define PARAM_DISK_BUFFER_GPA 0x78 // the diskio workload's write buffer (one disk block)
#define PARAMS_SIZE 0x80 // bytes of the parameter block in use

#define PARAMS_MAGIC_VALUE 0x54534555474d5356 // "VSMGUEST" little-endian
#define PARAMS_VERSION_VALUE 1 // parameter block layout version

/* ---- per-vCPU record: offsets from VCPU_AREA_GPA + i * VCPU_AREA_STRIDE ---- */
#define VCPU_TX_COUNT 0x00 // u64 transactions completed by this vCPU
#define VCPU_INFLIGHT 0x08 // u64 block number + 1 of the dbsim transaction in progress, 0 if none
#define VCPU_BLK_OP 0x10 // u64 block request: BLK_OP_*
#define VCPU_BLK_DISK 0x18 // u64 block request: disk index
#define VCPU_BLK_OFFSET 0x20 // u64 block request: byte offset on the disk
#define VCPU_BLK_LEN 0x28 // u64 block request: bytes, 1..=BLK_MAX_LEN
#define VCPU_BLK_BUFFER 0x30 // u64 block request: guest-physical address of the data
#define VCPU_BLK_STATUS 0x38 // u64 block request: BLK_STATUS_*, written by the VMM

/* ---- workloads ---- */
#define WORKLOAD_DBSIM 0 // versioned 8 KiB blocks + ledger, 80/20 hot set
#define WORKLOAD_RANDOM 1 // one random u64 store per transaction over the vCPU's blocks
#define WORKLOAD_HOTSET 2 // random u64 stores into the vCPU's hot set only
#define WORKLOAD_IDLE 3 // counts and yields to the VMM (PORT_IDLE) in a loop
#define WORKLOAD_TOUCH 4 // writes exactly the pages the VMM hands out through PORT_TOUCH
#define WORKLOAD_FILEDB 5 // dbsim in the file-backed guests' image format (WORKLOADS.md) at IMAGE_GPA; vCPU 0 writes, others idle
#define WORKLOAD_DISKIO 6 // random stamped disk block writes through the block device; vCPU 0 writes, others idle

/* ---- file-backed guest image (WORKLOADS.md, src/layout.rs), used by WORKLOAD_FILEDB ---- */
#define IMAGE_GPA 0x200000 // the image starts right after the system area and runs to the end of RAM
#define IMG_SB_DATA_OFFSET 48 // superblock: u64 byte offset of block 0
#define IMG_SB_ACTIVE_BLOCKS 56 // superblock: u64 active blocks
#define IMG_SB_HOT_BLOCKS 64 // superblock: u64 hot blocks (every 10th block is hot)
#define IMG_SB_RNG_STATE 88 // superblock: u64 RNG state (not verified)
#define IMG_SB_TX_COUNT 96 // superblock: u64 committed transactions
#define IMG_SB_JOURNAL_SEQ 128 // superblock: u64 armed transaction, 0 = empty
#define IMG_SB_JOURNAL_BLOCK 136 // superblock: u64 journal target block
#define IMG_SB_JOURNAL_VERSION 144 // superblock: u64 journal new version
#define IMG_SB_JOURNAL_KIND 152 // superblock: u32 journal kind (1 = row updates)
#define IMG_SB_JOURNAL_COUNT 156 // superblock: u32 journal update count
#define IMG_SB_JOURNAL_UPDATES 160 // superblock: 8 entries of (u32 offset, u32 len, 56 data bytes)
#define IMG_LEDGER_OFFSET 4096 // ledger: u64 per block
#define IMG_BLOCK_LAST_TX 24 // block header: u64 sequence of the last writer
#define IMG_HOT_STRIDE 10 // every 10th block is hot
#define IMG_HOT_PERCENT 80 // share of transactions going to hot blocks
#define IMG_ROWS 63 // rows of 128 bytes per 8 KiB block
#define IMG_ROW_SIZE 128 // bytes per row
#define IMG_FNV_OFFSET 0xcbf29ce484222325 // block checksum: FNV-1a offset basis (lane j starts at basis ^ j)
#define IMG_FNV_PRIME 0x100000001b3 // block checksum: FNV-1a prime

/* ---- dbsim block format ---- */
#define BLOCK_SIZE 8192 // bytes per block
#define BLOCK_HEADER_SIZE 64 // block_no u64, version u64, checksum u64, 5 reserved u64 (zero)
#define BLOCK_HDR_NUMBER 0x00 // u64 block number
#define BLOCK_HDR_VERSION 0x08 // u64 version, 0 = never written
#define BLOCK_HDR_CHECKSUM 0x10 // u64, see KVM.md
#define BLOCK_ROW_SIZE 64 // bytes per row
#define BLOCK_ROWS 127 // (BLOCK_SIZE - BLOCK_HEADER_SIZE) / BLOCK_ROW_SIZE
#define CHECKSUM_K_NUMBER 0x9e3779b97f4a7c15 // checksum weight of the block number
#define CHECKSUM_K_VERSION 0xc2b2ae3d27d4eb4f // checksum weight of the version

/* ---- port protocol (32-bit `out`/`in` with IOPL 3) ---- */
#define PORT_PROGRESS 0x510 // out: low 32 bits of this vCPU's transaction count
#define PORT_IDLE 0x511 // out: guest has nothing to do; the VMM sleeps ~1 ms
#define PORT_PANIC 0x512 // out: guest found an error (value = PANIC_* code); vCPU stops
#define PORT_TOUCH 0x513 // in: next page number to write, TOUCH_NONE = none yet, 0 = batch done
#define PORT_TOUCH_DONE 0x514 // out: a touch batch is complete (value = pages written)
#define TOUCH_NONE 0xffffffff // PORT_TOUCH reply: no page queued, ask again
#define PANIC_BAD_PARAMS 1 // parameter block magic/version/workload invalid
#define PANIC_DISK_IO 2 // a block request ended with an error status (left in VCPU_BLK_STATUS)
#define PORT_BLOCK 0x515 // out: perform this vCPU's block request (VCPU_BLK_*); the status is set when `out` returns

/* ---- paravirtual block device (KVM.md, STORAGE.md) ---- */
#define BLK_OP_READ 1 // read LEN bytes at OFFSET of DISK into BUFFER
#define BLK_OP_WRITE 2 // write LEN bytes from BUFFER at OFFSET of DISK (through the block layer)
#define BLK_MAX_LEN 0x1000000 // longest request: 16 MiB (a checkpoint is one request)
#define BLK_STATUS_PENDING 0xffffffffffffffff // set by the guest before the kick; never left by the VMM
#define BLK_STATUS_OK 0 // done
#define BLK_STATUS_BAD_OP 1 // unknown BLK_OP_*
#define BLK_STATUS_BAD_DISK 2 // no such disk
#define BLK_STATUS_BAD_LENGTH 3 // LEN is 0 or above BLK_MAX_LEN
#define BLK_STATUS_BAD_RANGE 4 // OFFSET + LEN is past the disk's end
#define BLK_STATUS_BAD_BUFFER 5 // BUFFER + LEN is outside guest RAM
#define BLK_STATUS_IO_ERROR 6 // the host's read or write failed

/* ---- disk area (guest/file/disks/area.rs `da`, checked equal at compile time) ---- */
#define DA_DISKS 16 // u64 number of disks
#define DA_BLOCK_SIZE 24 // u64 stamp block size
#define DA_SEED 40 // u64 seed of the fill patterns
#define DA_RNG_STATE 48 // u64 splitmix64 state of the disk workload
#define DA_WRITES 56 // u64 disk writes committed
#define DA_CHECKPOINT_SEQ 64 // u64 checkpoints begun
#define DA_INTENT_SEQ 72 // u64 intent of the write in progress: WRITES + 1, 0 = none
#define DA_INTENT_DISK 80 // u64 intent: disk
#define DA_INTENT_BLOCK 88 // u64 intent: block
#define DA_INTENT_VERSION 96 // u64 intent: version being written
#define DA_DISK_BLOCKS 256 // 16 u64 block counts
#define DA_LEDGER 384 // 16 u64 ledger offsets from the area's start
#define CKPT_MAGIC 0 // checkpoint header: u64 CKPT_MAGIC_VALUE
#define CKPT_DISK 8 // checkpoint header: u64 disk index
#define CKPT_SEQ 16 // checkpoint header: u64 sequence
#define CKPT_WRITES 24 // checkpoint header: u64 writes committed
#define CKPT_BLOCKS 32 // checkpoint header: u64 ledger entries after the header page
#define CKPT_CHECKSUM 40 // checkpoint header: u64 FNV-1a lanes of the ledger pages
#define CKPT_MAGIC_VALUE 0x54504b4344534d56 // "VMSDCKPT" little-endian
#define CHECKPOINT_EVERY 256 // disk writes between two checkpoints (a power of two)
#define DISK_SEED_K 0xa0761d6478bd642f // disk d's fill seed = seed ^ (d + 1) * DISK_SEED_K
#define FILL_K_VERSION 0xd1b54a32d192ed03 // fill state = (seed ^ b * CHECKSUM_K_NUMBER ^ version * FILL_K_VERSION) | 1
#define SPLITMIX_GAMMA 0x9e3779b97f4a7c15 // splitmix64 increment
#define SPLITMIX_M1 0xbf58476d1ce4e5b9 // splitmix64 first multiplier
#define SPLITMIX_M2 0x94d049bb133111eb // splitmix64 second multiplier

#endif
