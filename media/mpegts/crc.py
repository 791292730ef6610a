"""CRC-32/MPEG-2 for PSI sections (ISO/IEC 13818-1 Annex A).

Polynomial 0x04C11DB7, initial value 0xFFFFFFFF, no reflection, no final
XOR. Running it over a whole section including its CRC_32 field gives 0
(§2.4.4.10: "the CRC_32 field ... gives a zero output of the registers").
"""

from __future__ import annotations

__all__ = ["crc32_mpeg2"]


def _make_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return tuple(table)


_TABLE = _make_table()


def crc32_mpeg2(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    table = _TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc
