#!/usr/bin/env python3
"""Emulates, lane by lane, the mma.m16n8k16 operand fragments that kernels/attention/uniform_decode.cu builds from
packed 2/4-bit codes (key_channel / value_channel orders, LOP3 masks and shifts, PRMT pairing) and checks that the
products equal the plain dot products for head_dim 64 and 128. Keep it in step with the kernel: a change of the
fragment orders there must pass here first (no GPU needed). Run: python3 scripts/emulate_uniform_mma.py"""
import random
import sys

random.seed(1)
failed = False
def key_channel(BITS,j,reg,q,hi):
    return 16*j+2*q+reg+8*hi if BITS==2 else 16*j+8*reg+q+4*hi
def value_channel(BITS,mt,row):
    if BITS==2: return 16*mt+row
    rr=row&7; return 16*mt+8*(rr>>2)+(rr&3)+4*(row>>3)
def extract(w, mask):  # returns (lo, hi) fields
    x = w & mask
    return (x & 0xFFFF, x >> 16)
for BITS in (2,4):
  for D in (64,128):
    WPT=D*BITS//32; KS=D//16; M=(1<<BITS)-1
    codes=[[random.randint(0,M) for c in range(D)] for t in range(16)]
    words=[[0]*WPT for t in range(16)]
    for t in range(16):
        for c in range(D):
            words[t][c*BITS//32] |= codes[t][c] << (c*BITS%32)
    Q=[[random.uniform(-1,1) for c in range(D)] for h in range(8)]
    # scores via fragments
    S=[[0.0]*8 for t in range(16)]
    for j in range(KS):
        A=[[None]*16 for m in range(16)]; B=[[None]*8 for k in range(16)]
        for lane in range(32):
            r=lane>>2; q=lane&3
            def regs(t):
                if BITS==2:
                    x=words[t][j] >> (4*q)
                    lo0,hi0=extract(x,0x00030003); lo1,hi1=extract(x,0x000C000C); lo1//=4; hi1//=4
                    return (lo0,hi0),(lo1,hi1)
                else:
                    x0=words[t][2*j]>>(4*q); x1=words[t][2*j+1]>>(4*q)
                    return extract(x0,0x000F000F), extract(x1,0x000F000F)
            r0a,r1a=regs(r); r0b,r1b=regs(r+8)
            # a0a1: row r k 2q,2q+1 ; a2a3 row r+8 ; a4a5 row r k 2q+8 ; a6a7 row r+8 k 2q+8
            A[r][2*q],A[r][2*q+1]=r0a; A[r+8][2*q],A[r+8][2*q+1]=r0b
            A[r][2*q+8],A[r][2*q+9]=r1a; A[r+8][2*q+8],A[r+8][2*q+9]=r1b
            n=r
            B[2*q][n]=Q[n][key_channel(BITS,j,0,q,0)]; B[2*q+1][n]=Q[n][key_channel(BITS,j,0,q,1)]
            B[2*q+8][n]=Q[n][key_channel(BITS,j,1,q,0)]; B[2*q+9][n]=Q[n][key_channel(BITS,j,1,q,1)]
        for m in range(16):
            for n in range(8):
                S[m][n]+=sum(A[m][k]*B[k][n] for k in range(16))
    err=max(abs(S[t][h]-sum(Q[h][c]*codes[t][c] for c in range(D))) for t in range(16) for h in range(8))
    # values: O^T[c][h] = sum_t codes[t][c] P[t][h]
    P=[[random.random() for h in range(8)] for t in range(16)]
    O=[[0.0]*8 for c in range(D)]
    for mt in range(KS):
        A=[[None]*16 for m in range(16)]; B=[[None]*8 for k in range(16)]
        for lane in range(32):
            r=lane>>2; q=lane&3
            u = mt//(4 if BITS==2 else 2); k = mt%(4 if BITS==2 else 2)
            def word(t):
                chunk=words[t][4*u:4*u+4]
                if BITS==2: return chunk[k], 2*r
                return (chunk[2*k+1] if r>=4 else chunk[2*k]), 4*(r&3)
            vals={}
            for t in (2*q,2*q+1,2*q+8,2*q+9):
                w,sh=word(t); vals[t]=extract(w>>sh, M|(M<<16))
            # a0: row r tokens 2q,2q+1 (lo halves); a1: row r+8 (hi) ; a2 row r tokens 2q+8.. ; a3 row r+8
            A[r][2*q],A[r][2*q+1]=vals[2*q][0],vals[2*q+1][0]
            A[r+8][2*q],A[r+8][2*q+1]=vals[2*q][1],vals[2*q+1][1]
            A[r][2*q+8],A[r][2*q+9]=vals[2*q+8][0],vals[2*q+9][0]
            A[r+8][2*q+8],A[r+8][2*q+9]=vals[2*q+8][1],vals[2*q+9][1]
            B[2*q][r]=P[2*q][r]; B[2*q+1][r]=P[2*q+1][r]; B[2*q+8][r]=P[2*q+8][r]; B[2*q+9][r]=P[2*q+9][r]
        for row in range(16):
            for n in range(8):
                O[value_channel(BITS,mt,row)][n]+=sum(A[row][kk]*B[kk][n] for kk in range(16))
    verr=max(abs(O[c][h]-sum(codes[t][c]*P[t][h] for t in range(16))) for c in range(D) for h in range(8))
    chans=sorted(value_channel(BITS,mt,row) for mt in range(KS) for row in range(16))
    kch=sorted(key_channel(BITS,j,reg,q,hi) for j in range(KS) for reg in (0,1) for q in range(4) for hi in (0,1))
    ok = err < 1e-9 and verr < 1e-9 and chans == list(range(D)) and kch == list(range(D))
    print(f"bits {BITS} head_dim {D}: score error {err:.3g}, value error {verr:.3g}, channel orders are permutations:",
          chans == list(range(D)) and kch == list(range(D)), "OK" if ok else "FAILED")
    failed = failed or not ok
sys.exit(1 if failed else 0)
