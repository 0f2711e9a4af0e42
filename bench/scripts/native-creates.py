#!/usr/bin/env python3
"""Creates, deletes and creates again 5,000 files of 4 KiB on the native disk
(docs/benchmarks.md, session 16): how fast ext4 allocates inodes right after many were
freed. Usage: bench/scripts/native-creates.py DIR (DIR is made, and emptied after)."""
import os, shutil, sys, time

base = sys.argv[1]


def create(d, n):
    os.makedirs(d, exist_ok=True)
    t = time.time()
    for i in range(n):
        with open(f"{d}/f{i}", "wb") as f:
            f.write(b"x" * 4096)
    return n / (time.time() - t)


def delete(d, n):
    t = time.time()
    for i in range(n):
        os.unlink(f"{d}/f{i}")
    return n / (time.time() - t)


print("create, fresh directory", int(create(base + "/a", 5000)))
print("delete", int(delete(base + "/a", 5000)))
print("create again, same directory", int(create(base + "/a", 5000)))
print("create, another directory", int(create(base + "/b", 5000)))
shutil.rmtree(base)
