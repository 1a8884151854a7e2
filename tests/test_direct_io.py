"""Asynchronous O_DIRECT writes and the page cache (issue 10: data must never be stale).

Writers submit 4 KiB O_DIRECT writes with io_submit or io_uring (raw
syscalls, in a small C program built here), each block carrying its block
number and a sequence number; buffered readers note, before each read, the
sequence of the last write to each block that has completed, and every byte
they read must come from that write or a later one.  Kernel tmpfs, the
oracle, passes; so must mmfs.  And a file nobody opens with O_DIRECT keeps its
pages across opens: reading it again sends no READ.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount, patched_daemon_command, read_uncached, stop_mmfs

RACER = r"""
/* Asynchronous O_DIRECT writers against buffered readers: a read that starts
   after a write completed must see that write (or a later one). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define WORDS (BLOCK / 8)
#define MAGIC 0x6d6d6673ULL

static const char *path;
static int nblocks, nwriters, depth, nreaders, reopen, use_uring;
static double seconds;
static _Atomic uint64_t *completed;
static atomic_int stop;
static atomic_ulong writes, reads, stale, bad;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fill(uint64_t *buf, uint64_t block, uint64_t seq) {
    for (int i = 0; i < WORDS; i++) buf[i] = (MAGIC << 40) ^ (block << 32) ^ seq;
}

static void die(const char *what) { perror(what); exit(2); }

/* --- io_submit ------------------------------------------------------------ */
static void *aio_writer(void *arg) {
    int t = (int)(intptr_t)arg;
    int fd = open(path, O_RDWR | O_DIRECT);
    if (fd < 0) die("open O_DIRECT");
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) < 0) die("io_setup");
    uint64_t *bufs;
    if (posix_memalign((void **)&bufs, BLOCK, (size_t)BLOCK * depth)) die("posix_memalign");
    struct iocb *cbs = calloc(depth, sizeof *cbs);
    struct io_event *events = calloc(depth, sizeof *events);
    uint64_t *seqs = calloc(nblocks, sizeof *seqs);
    int next = t, inflight = 0;
    while (!atomic_load(&stop) || inflight) {
        while (!atomic_load(&stop) && inflight < depth) {
            int slot = -1;
            for (int i = 0; i < depth; i++) if (!cbs[i].aio_data) { slot = i; break; }
            int b = next;
            next += nwriters;
            if (next >= nblocks) next = t;
            /* one write in flight per block: skip blocks still being written */
            int busy = 0;
            for (int i = 0; i < depth; i++) if (cbs[i].aio_data && (int)(cbs[i].aio_offset / BLOCK) == b) busy = 1;
            if (busy) break;
            uint64_t *buf = bufs + (size_t)slot * WORDS;
            fill(buf, b, ++seqs[b]);
            struct iocb *cb = &cbs[slot];
            memset(cb, 0, sizeof *cb);
            cb->aio_data = slot + 1;
            cb->aio_lio_opcode = IOCB_CMD_PWRITE;
            cb->aio_fildes = fd;
            cb->aio_buf = (uint64_t)(uintptr_t)buf;
            cb->aio_nbytes = BLOCK;
            cb->aio_offset = (int64_t)b * BLOCK;
            struct iocb *list[1] = {cb};
            if (syscall(SYS_io_submit, ctx, 1, list) != 1) die("io_submit");
            inflight++;
        }
        if (!inflight) break;
        long n = syscall(SYS_io_getevents, ctx, 1, depth, events, NULL);
        if (n < 0) { if (errno == EINTR) continue; die("io_getevents"); }
        for (long i = 0; i < n; i++) {
            struct iocb *cb = &cbs[events[i].data - 1];
            if (events[i].res != BLOCK) { fprintf(stderr, "write res %lld\n", (long long)events[i].res); exit(2); }
            int b = (int)(cb->aio_offset / BLOCK);
            atomic_store(&completed[b], seqs[b]);
            cb->aio_data = 0;
            inflight--;
            atomic_fetch_add(&writes, 1);
        }
    }
    close(fd);
    return NULL;
}

/* --- io_uring (raw syscalls) ---------------------------------------------- */
static void *uring_writer(void *arg) {
    int t = (int)(intptr_t)arg;
    int fd = open(path, O_RDWR | O_DIRECT);
    if (fd < 0) die("open O_DIRECT");
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int ring = (int)syscall(SYS_io_uring_setup, depth, &p);
    if (ring < 0) die("io_uring_setup");
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(NULL, p.sq_entries * sizeof *sqes, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) die("mmap ring");
    _Atomic unsigned *sq_tail = (void *)(sq + p.sq_off.tail);
    unsigned sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *sq_array = (void *)(sq + p.sq_off.array);
    _Atomic unsigned *cq_head = (void *)(cq + p.cq_off.head);
    _Atomic unsigned *cq_tail = (void *)(cq + p.cq_off.tail);
    unsigned cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (void *)(cq + p.cq_off.cqes);
    uint64_t *bufs;
    if (posix_memalign((void **)&bufs, BLOCK, (size_t)BLOCK * depth)) die("posix_memalign");
    int *slot_block = calloc(depth, sizeof(int));
    uint64_t *seqs = calloc(nblocks, sizeof *seqs);
    for (int i = 0; i < depth; i++) slot_block[i] = -1;
    int next = t, inflight = 0;
    while (!atomic_load(&stop) || inflight) {
        unsigned submitted = 0;
        while (!atomic_load(&stop) && inflight < depth) {
            int slot = -1, busy = 0, b = next;
            for (int i = 0; i < depth; i++) {
                if (slot_block[i] < 0 && slot < 0) slot = i;
                if (slot_block[i] == b) busy = 1;
            }
            if (busy) break;
            next += nwriters;
            if (next >= nblocks) next = t;
            uint64_t *buf = bufs + (size_t)slot * WORDS;
            fill(buf, b, ++seqs[b]);
            slot_block[slot] = b;
            unsigned tail = atomic_load_explicit(sq_tail, memory_order_relaxed);
            struct io_uring_sqe *sqe = &sqes[tail & sq_mask];
            memset(sqe, 0, sizeof *sqe);
            sqe->opcode = IORING_OP_WRITE;
            sqe->fd = fd;
            sqe->addr = (uint64_t)(uintptr_t)buf;
            sqe->len = BLOCK;
            sqe->off = (uint64_t)b * BLOCK;
            sqe->user_data = slot;
            sq_array[tail & sq_mask] = tail & sq_mask;
            atomic_store_explicit(sq_tail, tail + 1, memory_order_release);
            submitted++;
            inflight++;
        }
        if (!inflight) break;
        if (syscall(SYS_io_uring_enter, ring, submitted, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
            if (errno == EINTR) continue;
            die("io_uring_enter");
        }
        unsigned head = atomic_load_explicit(cq_head, memory_order_relaxed);
        while (head != atomic_load_explicit(cq_tail, memory_order_acquire)) {
            struct io_uring_cqe *cqe = &cqes[head & cq_mask];
            int slot = (int)cqe->user_data;
            if (cqe->res != BLOCK) { fprintf(stderr, "uring write res %d\n", cqe->res); exit(2); }
            int b = slot_block[slot];
            atomic_store(&completed[b], seqs[b]);
            slot_block[slot] = -1;
            inflight--;
            atomic_fetch_add(&writes, 1);
            head++;
        }
        atomic_store_explicit(cq_head, head, memory_order_release);
    }
    close(fd);
    close(ring);
    return NULL;
}

/* --- buffered readers ------------------------------------------------------ */
static void *reader(void *arg) {
    unsigned seed = (unsigned)(intptr_t)arg * 7919 + 1;
    int span = 16; /* blocks per read: 64 KiB, so readahead takes part */
    uint64_t *buf = malloc((size_t)BLOCK * span);
    uint64_t *floor = malloc(sizeof(uint64_t) * span);
    int fd = reopen ? -1 : open(path, O_RDONLY);
    while (!atomic_load(&stop)) {
        int first = rand_r(&seed) % (nblocks - span + 1);
        for (int i = 0; i < span; i++) floor[i] = atomic_load(&completed[first + i]);
        if (reopen) fd = open(path, O_RDONLY);
        if (fd < 0) die("open reader");
        ssize_t n = pread(fd, buf, (size_t)BLOCK * span, (off_t)first * BLOCK);
        if (reopen) close(fd);
        if (n != (ssize_t)BLOCK * span) { fprintf(stderr, "short read %zd\n", n); exit(2); }
        atomic_fetch_add(&reads, 1);
        for (int i = 0; i < span; i++) {
            uint64_t b = first + i;
            for (int w = 0; w < WORDS; w++) {
                uint64_t v = buf[i * WORDS + w];
                uint64_t seq = v ^ (MAGIC << 40) ^ (b << 32);
                if (seq >> 32) {
                    if (atomic_fetch_add(&bad, 1) < 5) fprintf(stderr, "block %llu word %d: garbage %#llx\n",
                                                               (unsigned long long)b, w, (unsigned long long)v);
                    break;
                }
                if (seq < floor[i]) {
                    if (atomic_fetch_add(&stale, 1) < 5)
                        fprintf(stderr, "block %llu: read seq %llu after write %llu completed\n",
                                (unsigned long long)b, (unsigned long long)seq, (unsigned long long)floor[i]);
                    break;
                }
            }
        }
    }
    if (!reopen) close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s FILE BLOCKS WRITERS DEPTH READERS SECONDS REOPEN(0|1) aio|uring\n", argv[0]);
        return 2;
    }
    path = argv[1];
    nblocks = atoi(argv[2]);
    nwriters = atoi(argv[3]);
    depth = atoi(argv[4]);
    nreaders = atoi(argv[5]);
    seconds = atof(argv[6]);
    reopen = atoi(argv[7]);
    use_uring = strcmp(argv[8], "uring") == 0;
    completed = calloc(nblocks, sizeof *completed);
    /* the starting contents, sequence 0 everywhere, written and read through the page cache */
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("open");
    uint64_t block[WORDS];
    for (int b = 0; b < nblocks; b++) {
        fill(block, b, 0);
        if (pwrite(fd, block, BLOCK, (off_t)b * BLOCK) != BLOCK) die("pwrite");
    }
    for (int b = 0; b < nblocks; b++)
        if (pread(fd, block, BLOCK, (off_t)b * BLOCK) != BLOCK) die("pread");
    close(fd);
    pthread_t threads[64];
    int n = 0;
    for (int t = 0; t < nwriters; t++)
        pthread_create(&threads[n++], NULL, use_uring ? uring_writer : aio_writer, (void *)(intptr_t)t);
    for (int r = 0; r < nreaders; r++) pthread_create(&threads[n++], NULL, reader, (void *)(intptr_t)r);
    double end = now() + seconds;
    while (now() < end) usleep(10000);
    atomic_store(&stop, 1);
    for (int i = 0; i < n; i++) pthread_join(threads[i], NULL);
    printf("writes=%lu reads=%lu stale=%lu garbage=%lu\n", atomic_load(&writes), atomic_load(&reads),
           atomic_load(&stale), atomic_load(&bad));
    return atomic_load(&stale) || atomic_load(&bad) ? 1 : 0;
}
"""

SECONDS = 8  # per mmfs case: without the page drop, 2 of the 4 cases failed in each of two runs
ORACLE_SECONDS = 2  # kernel tmpfs only shows that the expectation is fair


@pytest.fixture(scope="module")
def racer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("racer")
    (where / "racer.c").write_text(RACER)
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(where / "racer"), str(where / "racer.c")],
        check=True,
        capture_output=True,
    )
    return where / "racer"


def race(racer: Path, path: Path, interface: str, reopen: bool, seconds: int = SECONDS) -> None:
    """64 blocks, 1 writer 16 writes deep, 2 readers of 64 KiB; no stale byte."""
    result = subprocess.run(
        [str(racer), str(path), "64", "1", "16", "2", str(seconds), "1" if reopen else "0", interface],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    counts = dict(item.split("=") for item in result.stdout.split())
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(counts["writes"]) > 0 and int(counts["reads"]) > 0, result.stdout


@pytest.mark.parametrize("reopen", [False, True], ids=["open-readers", "reopening-readers"])
@pytest.mark.parametrize("interface", ["aio", "uring"])
def test_kernel_tmpfs_never_serves_bytes_older_than_a_completed_direct_write(
    racer: Path, kernel_tmpfs: Path, interface: str, reopen: bool
) -> None:
    race(racer, kernel_tmpfs / "f", interface, reopen, ORACLE_SECONDS)


@pytest.mark.parametrize("reopen", [False, True], ids=["open-readers", "reopening-readers"])
@pytest.mark.parametrize("interface", ["aio", "uring"])
def test_mmfs_never_serves_bytes_older_than_a_completed_direct_write(
    racer: Path, mnt: Path, interface: str, reopen: bool
) -> None:
    race(racer, mnt / "f", interface, reopen)


def read_counting_daemon(counter: Path) -> list[str]:
    """A daemon that keeps in ``counter`` the number of READs it served."""
    return patched_daemon_command(f"""
        from mmfs import fs
        served = 0
        original_read = fs.Filesystem.read
        def counted_read(self, *args, **kwargs):
            global served
            served += 1
            with open({str(counter)!r}, "w") as file:
                file.write(str(served))
            return original_read(self, *args, **kwargs)
        fs.Filesystem.read = counted_read
    """)


def reads_served(counter: Path) -> int:
    return int(counter.read_text()) if counter.exists() else 0


def test_a_file_nobody_opens_o_direct_keeps_its_pages_across_opens(
    mmfs_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    counter = tmp_path / "reads"
    mount = mmfs_factory("tmpfs", options="size=64m", program=read_counting_daemon(counter))
    path = mount.path / "f"
    data = os.urandom(4 << 20)
    path.write_bytes(data)
    assert path.read_bytes() == data  # whatever the write left out of the page cache comes in here
    before = reads_served(counter)
    for _ in range(2):  # each its own open: keep_cache keeps the pages
        assert path.read_bytes() == data
    assert reads_served(counter) == before, "a cached file's pages were read from the daemon again"
    assert read_uncached(path) == data  # the counter does see READs
    assert reads_served(counter) > before
    stop_mmfs(mount)


@pytest.mark.parametrize("atime", ["noatime", "relatime"])
def test_on_noatime_a_small_write_keeps_the_rest_of_the_files_pages(
    mmfs_factory: Callable[..., Mount], tmp_path: Path, atime: str
) -> None:
    """mmfs is the only writer of its files: on a noatime mount a write (and the
    new mtime that the next fstat brings back) must not make the kernel drop the
    file's cached pages (FUSE_CAP_AUTO_INVAL_DATA, which libfuse turns on and
    mmfs's pyfuse3 patch lets it clear).  Elsewhere the drop stays: the first
    read after a write must reach the daemon to update atime (test_atime)."""
    counter = tmp_path / "reads"
    mount = mmfs_factory("tmpfs", options=f"size=128m,{atime}", program=read_counting_daemon(counter))
    path = mount.path / "f"
    data = bytearray(os.urandom(16 << 20))
    path.write_bytes(data)
    assert path.read_bytes() == data  # everything is cached now
    fd = os.open(path, os.O_RDWR)
    try:
        before = reads_served(counter)
        mtime = os.fstat(fd).st_mtime_ns
        assert os.pwrite(fd, b"!", 4096) == 1
        data[4096] = ord("!")
        assert os.fstat(fd).st_mtime_ns != mtime  # the GETATTR that brings the new mtime back
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    if atime == "noatime":
        assert reads_served(counter) == before, f"{reads_served(counter) - before} READs after a 1-byte write"
    else:
        assert reads_served(counter) >= before + 4, "16 MiB read again in READs of at most 1 MiB after the write"
    stop_mmfs(mount)
