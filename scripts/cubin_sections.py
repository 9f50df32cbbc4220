#!/usr/bin/env python3
"""Lists the device code of CUDA object files, to show that a move of code between .cu files left it unchanged
(cuobjdump is not installed on the build machines).

  scripts/cubin_sections.py OBJ.o [OBJ2.o ...] > listing.txt
  diff <(scripts/cubin_sections.py before/x.cu.o) <(scripts/cubin_sections.py after/y.cu.o after/z.cu.o)

For every cubin in the objects' .nv_fatbin sections (zstd-compressed payloads are decompressed with the zstd
command; objcopy extracts the section), one line per per-function section: .text (the machine code), .nv.info
(registers, parameters, attributes), .nv.shared and .nv.constant0, each with its size and the first 16 hex digits
of the sha256 of its bytes, sorted. Anonymous-namespace ids (which depend on the file's name) become ANON, and the
symbol index in .nv.info's constant-bank attribute becomes the symbol's name (symbol numbering depends on what
else the cubin holds). Every cubin adds one empty .nv.shared.reserved.0 line."""
import hashlib, re, struct, subprocess, sys, tempfile, os

def sections(elf):
    (e_shoff,) = struct.unpack_from('<Q', elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from('<HHH', elf, 0x3A)
    secs = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        name, typ, flags, addr, offset, size = struct.unpack_from('<IIQQQQ', elf, off)
        secs.append((name, typ, offset, size))
    stro = secs[e_shstrndx][2]
    out = []
    for name, typ, offset, size in secs:
        end = elf.index(b'\0', stro + name)
        nm = elf[stro + name:end].decode()
        data = elf[offset:offset + size] if typ != 8 else b''  # NOBITS
        out.append((nm, size, data))
    return out

def symbols(elf, secs):
    """Symbol names by index (.symtab entries: st_name u32, info, other, shndx u16, value, size)."""
    byname = {nm: data for nm, size, data in secs}
    symtab, strtab = byname.get('.symtab', b''), byname.get('.strtab', b'')
    names = []
    for off in range(0, len(symtab), 24):
        (st_name,) = struct.unpack_from('<I', symtab, off)
        names.append(strtab[st_name:strtab.index(b'\0', st_name)].decode())
    return names

def nvinfo(data, names):
    """.nv.info attributes (4-byte header: format, attribute, u16 value or size) with the symbol index of
    EIATTR_PARAM_CBANK (0x0a) replaced by the symbol's name: symbol numbering depends on what else the cubin holds."""
    out, off = [], 0
    while off + 4 <= len(data):
        fmt, attr, v = data[off], data[off + 1], struct.unpack_from('<H', data, off + 2)[0]
        if fmt == 4:
            val = data[off + 4:off + 4 + v]
            if attr == 0x0a and len(val) >= 4:
                (si,) = struct.unpack_from('<I', val, 0)
                val = norm(names[si]).encode() + val[4:]
            out.append(bytes([fmt, attr]) + val)
            off += 4 + v
        else:
            out.append(data[off:off + 4])
            off += 4
    return b'|'.join(out)

def elf_size(d, s):
    (e_shoff,) = struct.unpack_from('<Q', d, s + 0x28)
    e_shentsize, e_shnum = struct.unpack_from('<HH', d, s + 0x3A)
    return e_shoff + e_shentsize * e_shnum

def norm(n):
    return re.sub(r'\d+_GLOBAL__N__[0-9a-f]+_\d+_[A-Za-z0-9_]+?_[0-9a-f]{8}', 'ANON', n)

def cubins(d):
    """The ELF entries of every fatbin in d (zstd-compressed payloads are decompressed)."""
    out = []
    pos = 0
    while True:
        pos = d.find(b'\x50\xed\x55\xba', pos)
        if pos < 0:
            return out
        _, _, hs, fs = struct.unpack_from('<IHHQ', d, pos)
        off = pos + hs
        while off < pos + hs + fs:
            kind, _, ehs, size = struct.unpack_from('<HHIQ', d, off)
            payload = d[off + ehs:off + ehs + size]
            if kind == 2:
                if payload[:4] == b'\x28\xb5\x2f\xfd':
                    payload = subprocess.run(['zstd', '-d', '-c', '-q'], input=payload.rstrip(b'\0'),
                                             check=True, capture_output=True).stdout
                assert payload[:4] == b'\x7fELF', 'unknown fatbin payload'
                out.append(payload[:elf_size(payload, 0)])
            off += ehs + size
        pos = pos + hs + fs

def main(objs):
    rows = []
    elves = []
    for obj in objs:
        with tempfile.TemporaryDirectory() as t:
            fb = os.path.join(t, 'fb')
            subprocess.check_call(['objcopy', '-O', 'binary', '--only-section=.nv_fatbin', obj, fb])
            elves += cubins(open(fb, 'rb').read())
    for elf in elves:
        secs = sections(elf)
        names = symbols(elf, secs)
        for nm, size, data in secs:
            if nm.startswith('.nv.info.'):
                data = nvinfo(data, names)
            for pre in ('.text.', '.nv.info.', '.nv.shared.', '.nv.constant0.'):
                if nm.startswith(pre):
                    rows.append(f'{pre}{norm(nm[len(pre):])} {size} {hashlib.sha256(data).hexdigest()[:16]}')
    for r in sorted(rows):
        print(r)

if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit('usage: cubin_sections.py OBJ.o [OBJ2.o ...]')
    main(sys.argv[1:])
