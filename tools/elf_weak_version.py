#!/usr/bin/env python3
"""Mark one ELF version requirement (default GLIBCXX_3.4.32) as weak.

TorchSharp-cpu 0.107.0's libLibTorchSharp.so requires GLIBCXX_3.4.32 only for the
unused marker symbol _ZSt21ios_base_library_initv; Debian 12's libstdc++ stops at
3.4.30, so ld.so refuses to load it. Setting VER_FLG_WEAK on that Vernaux entry in
.gnu.version_r makes the missing version non-fatal. Exactly one u16 field changes.
"""
import argparse
import os
import struct
import sys

SHT_REL, SHT_RELA = 9, 4
SHT_GNU_VERNEED, SHT_GNU_VERSYM = 0x6FFFFFFE, 0x6FFFFFFF
VER_FLG_WEAK = 0x2


class ElfError(Exception):
    pass


def unpack(fmt, data, off):
    # Every read goes through here so a truncated/corrupt file is an ElfError, not a crash.
    if off < 0 or off + struct.calcsize(fmt) > len(data):
        raise ElfError(f"truncated or corrupt (read past end at offset {off:#x})")
    return struct.unpack_from(fmt, data, off)


def sections(data):
    if data[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("not ELF64 little-endian (only ELFCLASS64/ELFDATA2LSB supported)")
    shoff, = unpack("<Q", data, 0x28)
    shentsize, shnum = unpack("<HH", data, 0x3A)
    if shoff == 0 or shentsize < 64:
        raise ElfError("no section headers")
    if shnum == 0:  # extended numbering: real count lives in section 0's sh_size
        shnum = unpack("<Q", data, shoff + 0x20)[0]
    keys = ("name", "type", "flags", "addr", "offset", "size", "link", "info", "align", "entsize")
    return [dict(zip(keys, unpack("<IIQQQQIIQQ", data, shoff + i * shentsize)))
            for i in range(shnum)]


def cstr(data, strtab, idx):
    start = strtab["offset"] + idx
    if idx >= strtab["size"] or start >= len(data):
        raise ElfError(f"string index {idx} out of range")
    end = data.find(b"\0", start, strtab["offset"] + strtab["size"])
    return data[start:end if end >= 0 else start].decode("ascii", "replace")


def find_vernaux(data, shdrs, version):
    """List of (file offset of vna_flags, vna_flags, vna_other), one per matching Vernaux.

    The same name can be required from several files (e.g. GLIBC_2.2.5 from libc and libm).
    """
    found = []
    for sec in shdrs:
        if sec["type"] != SHT_GNU_VERNEED or sec["link"] >= len(shdrs):
            continue
        strtab, off = shdrs[sec["link"]], sec["offset"]
        for _ in range(sec["info"] or 1 << 16):  # sh_info = number of Verneed entries
            _, cnt, _, aux, nxt = unpack("<HHIII", data, off)
            a = off + aux
            for _ in range(cnt):
                _, flags, other, name, anext = unpack("<IHHII", data, a)
                if cstr(data, strtab, name) == version:
                    found.append((a + 4, flags, other))
                if anext == 0:
                    break
                a += anext
            if nxt == 0:
                break
            off += nxt
    return found


def usage(data, shdrs, ver_indices):
    """Symbols bound to ver_indices in .gnu.version, and relocations that reference them."""
    syms, dynsym = set(), None
    for sec in shdrs:
        if sec["type"] == SHT_GNU_VERSYM:
            dynsym = sec["link"]
            for i in range(sec["size"] // 2):
                if unpack("<H", data, sec["offset"] + 2 * i)[0] & 0x7FFF in ver_indices:
                    syms.add(i)
    nrel = 0
    for sec in shdrs:
        # Only relocations against the dynamic symbol table use versym indices.
        if sec["type"] not in (SHT_RELA, SHT_REL) or sec["link"] != dynsym:
            continue
        ent = 24 if sec["type"] == SHT_RELA else 16
        for i in range(sec["size"] // ent):
            r_info, = unpack("<Q", data, sec["offset"] + i * ent + 8)
            nrel += (r_info >> 32) in syms
    return len(syms), nrel


def process(path, version, check):
    with open(path, "rb") as f:
        data = f.read()
    shdrs = sections(data)
    found = find_vernaux(data, shdrs, version)
    if not found:
        print(f"{path}: no {version} requirement, nothing to do")
        return 0
    todo = [(off, flags) for off, flags, _ in found if not flags & VER_FLG_WEAK]
    if not todo:
        print(f"{path}: {version} already weak")
        return 0
    nsyms, nrel = usage(data, shdrs, {other for _, _, other in found})
    if nrel:
        # A relocation really binds to a symbol of this version: weakening would hide a real
        # missing-symbol failure until runtime, so refuse.
        print(f"refusing: {nrel} relocations use symbols of version {version} in {path}")
        return 3
    msg = f"{version} weak ({nsyms} symbols, 0 relocations use it)"
    if check:
        print(f"{path}: would mark {msg}")
        return 1
    with open(path, "r+b") as f:
        for off, flags in todo:  # normally exactly one entry: one u16 changes
            f.seek(off)
            f.write(struct.pack("<H", flags | VER_FLG_WEAK))
        f.flush()
        os.fsync(f.fileno())
    print(f"{path}: marked {msg}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="report only; exit 1 if a patch is needed")
    ap.add_argument("--version", default="GLIBCXX_3.4.32", help="version string to weaken")
    ap.add_argument("files", nargs="+", metavar="FILE")
    args = ap.parse_args()
    rc = 0
    for path in args.files:
        try:
            rc = max(rc, process(path, args.version, args.check))
        except (ElfError, OSError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            rc = max(rc, 2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
