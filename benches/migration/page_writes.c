/* How to fill a fresh tmpfs file with pages, and how to read them back (BENCHMARKS.md, "Round 0 at the
 * copy bound"): the destination's and source's options for round 0, without the rest of a migration.
 *
 *   cc -O2 -o /tmp/page_writes benches/migration/page_writes.c
 *   /tmp/page_writes write MODE GIB [PATH]   MODE: 0 memcpy into a shared mapping (a fault per 4 KiB page),
 *       1 MADV_POPULATE_WRITE of each 256 KiB, then memcpy, 2 pwrite per 4 KiB page, 3 pwrite per 256 KiB,
 *       4 fallocate of each 256 KiB, then memcpy, 5 pwritev of 64 4-KiB pieces
 *   /tmp/page_writes read MODE FILE          MODE: 0 4 KiB copies out of a shared mapping (read faults, with
 *       the kernel's fault-around), 1 MADV_POPULATE_READ of the whole mapping first, 2 MADV_POPULATE_READ
 *       of each 256 KiB first, 3 pread per 4 KiB page, 4 pread per 256 KiB
 *
 * PATH defaults to /dev/shm/page_writes (removed afterwards). Warm memory first (write and remove a file
 * twice the size): on a VM the first touch of never-used memory is several times slower. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define CHUNK (256 << 10)
#define PAGE 4096

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int write_test(int mode, size_t size, const char *path) {
    unlink(path);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || ftruncate(fd, size) != 0) return perror(path), 1;
    char *m = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *buf = aligned_alloc(PAGE, CHUNK);
    for (size_t i = 0; i < CHUNK; i++) buf[i] = (char)(i * 7 + 1);
    double t = now();
    for (size_t off = 0; off < size; off += CHUNK) {
        switch (mode) {
        case 0: memcpy(m + off, buf, CHUNK); break;
        case 1: madvise(m + off, CHUNK, MADV_POPULATE_WRITE); memcpy(m + off, buf, CHUNK); break;
        case 2: for (size_t p = 0; p < CHUNK; p += PAGE) pwrite(fd, buf + p, PAGE, off + p); break;
        case 3: pwrite(fd, buf, CHUNK, off); break;
        case 4: fallocate(fd, 0, off, CHUNK); memcpy(m + off, buf, CHUNK); break;
        case 5: {
            struct iovec v[CHUNK / PAGE];
            for (int i = 0; i < CHUNK / PAGE; i++) v[i] = (struct iovec){buf + i * PAGE, PAGE};
            pwritev(fd, v, CHUNK / PAGE, off);
        } break;
        }
    }
    double dt = now() - t;
    printf("write mode %d: %.3f s (%.2f GB/s)\n", mode, dt, size / dt / 1e9);
    munmap(m, size);
    close(fd);
    unlink(path);
    return 0;
}

static int read_test(int mode, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return perror(path), 1;
    size_t size = lseek(fd, 0, SEEK_END);
    char *m = mmap(0, size, PROT_READ, MAP_SHARED, fd, 0);
    char *buf = aligned_alloc(PAGE, CHUNK);
    unsigned long sum = 0;
    double t = now();
    if (mode == 1) madvise(m, size, MADV_POPULATE_READ);
    for (size_t off = 0; off < size; off += CHUNK) {
        switch (mode) {
        case 2: madvise(m + off, CHUNK, MADV_POPULATE_READ); /* fall through */
        case 0:
        case 1: for (size_t p = 0; p < CHUNK; p += PAGE) memcpy(buf + p, m + off + p, PAGE); break;
        case 3: for (size_t p = 0; p < CHUNK; p += PAGE) pread(fd, buf + p, PAGE, off + p); break;
        case 4: pread(fd, buf, CHUNK, off); break;
        }
        sum += (unsigned char)buf[17];
    }
    double dt = now() - t;
    printf("read mode %d: %.3f s (%.2f GB/s) [%lu]\n", mode, dt, size / dt / 1e9, sum & 1);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "write"))
        return write_test(atoi(argv[2]), (size_t)atol(argv[3]) << 30,
                          argc > 4 ? argv[4] : "/dev/shm/page_writes");
    if (argc == 4 && !strcmp(argv[1], "read")) return read_test(atoi(argv[2]), argv[3]);
    fprintf(stderr, "usage: %s write MODE GIB [PATH] | read MODE FILE\n", argv[0]);
    return 2;
}
