# Lists the entries of the fatbin images in a file (a .fatbin, an object or a binary): PTX or
# SASS, and the architecture. Usage: python3 fatbin_entries.py FILE (no CUDA toolkit needed).
import struct, sys
data = open(sys.argv[1], 'rb').read()
pos = 0
while True:
    pos = data.find(struct.pack('<I', 0xBA55ED50), pos)
    if pos < 0:
        break
    magic, version, header_size, fat_size = struct.unpack_from('<IHHQ', data, pos)
    entry = pos + header_size
    end = entry + fat_size
    while entry < end:
        kind, ver, eh_size, padded = struct.unpack_from('<HHII', data, entry)
        sm = struct.unpack_from('<I', data, entry + 28)[0]
        print({1: 'PTX ', 2: 'SASS'}.get(kind, f'kind{kind}'), f'sm_{sm}')
        entry += eh_size + padded
    pos = end
