#!/usr/bin/env python3
"""Independent reference implementation used ONCE to generate extract_v1.txt.

The file is frozen: the Rust tests check the crate against it, so any change to the field,
the Cauchy points or the byte order fails loudly. Do not regenerate it to make a test pass.
"""
import hashlib

def gmul(a, b):
    p = 0
    while b:
        if b & 1:
            p ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return p

def ginv(a):
    assert a != 0
    return next(x for x in range(1, 256) if gmul(a, x) == 1)

def cauchy(n, c):
    rows = n - c
    return [[ginv(i ^ (rows + j)) for j in range(n)] for i in range(rows)]

def extract(n, c, blocks, m):
    M = cauchy(n, c)
    L = -(-m // (n - c))
    out = []
    for i in range(L):
        for r in range(n - c):
            acc = 0
            for j in range(n):
                acc ^= gmul(M[r][j], blocks[j][i])
            out.append(acc)
    return bytes(out[:m])

def blocks_for(n, L, tag):
    return [b"".join(hashlib.sha256(f"dqkd-kat-{tag}-{j}-{k}".encode()).digest()
                     for k in range(-(-L // 32)))[:L] for j in range(n)]

cases = [(1, 0, 4), (2, 1, 2), (3, 1, 32), (3, 1, 33), (3, 0, 32), (3, 2, 5),
         (4, 1, 17), (10, 1, 32), (10, 1, 100), (5, 3, 64)]
print("# n c m blocks(hex, comma-separated, server order) key(hex)")
for idx, (n, c, m) in enumerate(cases):
    L = -(-m // (n - c))
    bl = blocks_for(n, L, idx)
    key = extract(n, c, bl, m)
    print(n, c, m, ",".join(b.hex() for b in bl), key.hex())
