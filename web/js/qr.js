/**
 * QR Code encoder (ISO/IEC 18004:2015), byte mode, versions 1–40, error
 * correction levels L/M/Q/H, Reed–Solomon over GF(256), the eight data masks
 * and the penalty rules of §7.8.3.1. No dependencies, no network.
 *
 *   import { encodeQR, drawQR } from "/static/js/qr.js";
 *   const qr = encodeQR("https://host/camera/cam1?token=…", { ecc: "M" });
 *   drawQR(canvas, qr, { scale: 6 });
 *
 * encodeQR returns { version, size, ecc, mask, modules } where modules[row][col]
 * is 1 for a dark module. Options: ecc ("L"|"M"|"Q"|"H", default "M"),
 * version (force one), minVersion/maxVersion (search range, default 1..40),
 * mask (force 0..7; otherwise the lowest penalty wins, ties to the lower
 * number). The mask evaluation reads the symbol with the format and version
 * areas (and the dark module) still light, as §7.8 prescribes and the segno
 * reference implementation does, so for the same input, version, level and
 * mask the module matrix is identical to segno's (tests/e2e/test_qr.py).
 */

const ECC_LEVELS = ["L", "M", "Q", "H"];
// Format information bits for each level (§7.9.1, Table 12).
const ECC_FORMAT_BITS = { L: 1, M: 0, Q: 3, H: 2 };

// Error correction codewords per block, index [level][version] (Table 9).
const EC_PER_BLOCK = {
  L: [-1, 7, 10, 15, 20, 26, 18, 20, 24, 30, 18, 20, 24, 26, 30, 22, 24, 28, 30, 28, 28, 28, 28, 30, 30, 26, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
  M: [-1, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26, 26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28],
  Q: [-1, 13, 22, 18, 26, 18, 24, 18, 22, 20, 24, 28, 26, 24, 20, 30, 24, 28, 28, 26, 30, 28, 30, 30, 30, 30, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
  H: [-1, 17, 28, 22, 16, 22, 28, 26, 26, 24, 28, 24, 28, 22, 24, 24, 30, 28, 28, 26, 28, 30, 24, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
};
// Number of error correction blocks, index [level][version] (Table 9).
const NUM_BLOCKS = {
  L: [-1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8, 8, 9, 9, 10, 12, 12, 12, 13, 14, 15, 16, 17, 18, 19, 19, 20, 21, 22, 24, 25],
  M: [-1, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18, 20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49],
  Q: [-1, 1, 1, 2, 2, 4, 4, 6, 6, 8, 8, 8, 10, 12, 16, 12, 17, 16, 18, 21, 20, 23, 23, 25, 27, 29, 34, 34, 35, 38, 40, 43, 45, 48, 51, 53, 56, 59, 62, 65, 68],
  H: [-1, 1, 1, 2, 4, 4, 4, 5, 6, 8, 8, 11, 11, 16, 16, 18, 16, 19, 21, 25, 25, 25, 34, 30, 32, 35, 37, 40, 42, 45, 48, 51, 54, 57, 60, 63, 66, 70, 74, 77, 81],
};

// ---------------------------------------------------------------- GF(256)
// Reed–Solomon over GF(2^8) with the primitive polynomial x^8+x^4+x^3+x^2+1
// (0x11D), generator roots α^0 … α^(n-1) (§7.5.2).
const EXP = new Uint8Array(512);
const LOG = new Uint8Array(256);
(() => {
  let x = 1;
  for (let i = 0; i < 255; i++) {
    EXP[i] = x;
    LOG[x] = i;
    x <<= 1;
    if (x & 0x100) x ^= 0x11d;
  }
  for (let i = 255; i < 512; i++) EXP[i] = EXP[i - 255];
})();

function gfMul(a, b) {
  return a === 0 || b === 0 ? 0 : EXP[LOG[a] + LOG[b]];
}

const generatorCache = new Map();
/** Generator polynomial coefficients (highest degree first, leading 1 dropped). */
function rsGenerator(degree) {
  let g = generatorCache.get(degree);
  if (g) return g;
  let poly = [1];
  for (let i = 0; i < degree; i++) {
    const next = new Array(poly.length + 1).fill(0);
    for (let j = 0; j < poly.length; j++) {
      next[j] ^= poly[j];
      next[j + 1] ^= gfMul(poly[j], EXP[i]);
    }
    poly = next;
  }
  g = poly.slice(1);
  generatorCache.set(degree, g);
  return g;
}

/** The `degree` error correction codewords for `data` (polynomial remainder). */
export function rsRemainder(data, degree) {
  const gen = rsGenerator(degree);
  const rem = new Array(degree).fill(0);
  for (const byte of data) {
    const factor = byte ^ rem.shift();
    rem.push(0);
    if (factor !== 0) for (let i = 0; i < degree; i++) rem[i] ^= gfMul(gen[i], factor);
  }
  return rem;
}

// ---------------------------------------------------------------- capacity

/** Modules available for data + EC codewords (incl. remainder bits). */
function rawDataModules(ver) {
  let n = (16 * ver + 128) * ver + 64;
  if (ver >= 2) {
    const align = Math.floor(ver / 7) + 2;
    n -= (25 * align - 10) * align - 55;
    if (ver >= 7) n -= 36;
  }
  return n;
}

function dataCodewords(ver, ecc) {
  return Math.floor(rawDataModules(ver) / 8) - EC_PER_BLOCK[ecc][ver] * NUM_BLOCKS[ecc][ver];
}

/** Byte-mode capacity in bytes of a version/level (header included). */
export function byteCapacity(ver, ecc = "M") {
  const countBits = ver <= 9 ? 8 : 16;
  const bits = dataCodewords(ver, ecc) * 8 - 4 - countBits;
  return Math.max(0, Math.floor(bits / 8));
}

function alignmentPositions(ver) {
  if (ver === 1) return [];
  const size = ver * 4 + 17;
  const n = Math.floor(ver / 7) + 2;
  const step = ver === 32 ? 26 : Math.ceil((ver * 4 + 4) / (n * 2 - 2)) * 2;
  const out = [6];
  for (let i = n - 2; i >= 0; i--) out.push(size - 7 - i * step);
  return out.sort((a, b) => a - b);
}

// ---------------------------------------------------------------- bit stream

function utf8(input) {
  if (input instanceof Uint8Array) return input;
  return new TextEncoder().encode(String(input));
}

/** The final interleaved data + EC codeword sequence (§7.6); exported for tests. */
export function buildCodewords(bytes, ver, ecc) {
  const capacityBits = dataCodewords(ver, ecc) * 8;
  const bits = [];
  const put = (value, len) => {
    for (let i = len - 1; i >= 0; i--) bits.push((value >>> i) & 1);
  };
  put(0b0100, 4); // byte mode indicator (§7.4.5, Table 2)
  put(bytes.length, ver <= 9 ? 8 : 16); // character count (Table 3)
  for (const b of bytes) put(b, 8);
  if (bits.length > capacityBits) throw new RangeError("data too long for this version");
  put(0, Math.min(4, capacityBits - bits.length)); // terminator (§7.4.9)
  while (bits.length % 8) bits.push(0);
  const data = [];
  for (let i = 0; i < bits.length; i += 8) {
    let v = 0;
    for (let j = 0; j < 8; j++) v = (v << 1) | bits[i + j];
    data.push(v);
  }
  for (let pad = 0xec; data.length < capacityBits / 8; pad ^= 0xec ^ 0x11) data.push(pad); // §7.4.10

  // Split into blocks, add EC, interleave (§7.5.2, §7.6).
  const numBlocks = NUM_BLOCKS[ecc][ver];
  const ecLen = EC_PER_BLOCK[ecc][ver];
  const rawCodewords = Math.floor(rawDataModules(ver) / 8);
  const numShort = numBlocks - (rawCodewords % numBlocks);
  const shortLen = Math.floor(rawCodewords / numBlocks) - ecLen; // data bytes in a short block
  const blocks = [];
  const ecBlocks = [];
  for (let i = 0, k = 0; i < numBlocks; i++) {
    const len = shortLen + (i < numShort ? 0 : 1);
    const block = data.slice(k, k + len);
    k += len;
    blocks.push(block);
    ecBlocks.push(rsRemainder(block, ecLen));
  }
  const out = [];
  for (let i = 0; i <= shortLen; i++) for (const b of blocks) if (i < b.length) out.push(b[i]);
  for (let i = 0; i < ecLen; i++) for (const b of ecBlocks) out.push(b[i]);
  return out;
}

// ---------------------------------------------------------------- matrix

const MASKS = [
  (r, c) => (r + c) % 2 === 0,
  (r) => r % 2 === 0,
  (r, c) => c % 3 === 0,
  (r, c) => (r + c) % 3 === 0,
  (r, c) => (Math.floor(r / 2) + Math.floor(c / 3)) % 2 === 0,
  (r, c) => ((r * c) % 2) + ((r * c) % 3) === 0,
  (r, c) => (((r * c) % 2) + ((r * c) % 3)) % 2 === 0,
  (r, c) => (((r + c) % 2) + ((r * c) % 3)) % 2 === 0,
];

function bchFormat(ecc, mask) {
  const data = (ECC_FORMAT_BITS[ecc] << 3) | mask;
  let rem = data;
  for (let i = 0; i < 10; i++) rem = (rem << 1) ^ ((rem >>> 9) * 0x537);
  return ((data << 10) | rem) ^ 0x5412; // §7.9.1
}

function bchVersion(ver) {
  let rem = ver;
  for (let i = 0; i < 12; i++) rem = (rem << 1) ^ ((rem >>> 11) * 0x1f25);
  return (ver << 12) | rem; // §7.10
}

class Matrix {
  constructor(ver) {
    this.ver = ver;
    this.size = ver * 4 + 17;
    this.mod = Array.from({ length: this.size }, () => new Uint8Array(this.size));
    this.fn = Array.from({ length: this.size }, () => new Uint8Array(this.size));
  }

  set(r, c, dark, isFunction = true) {
    this.mod[r][c] = dark ? 1 : 0;
    if (isFunction) this.fn[r][c] = 1;
  }

  drawFunctionPatterns() {
    const n = this.size;
    for (let i = 0; i < n; i++) {
      // Timing patterns (§6.3.5)
      this.set(6, i, i % 2 === 0);
      this.set(i, 6, i % 2 === 0);
    }
    // Finder patterns + separators (§6.3.3)
    for (const [r0, c0] of [[3, 3], [3, n - 4], [n - 4, 3]]) {
      for (let dr = -4; dr <= 4; dr++) {
        for (let dc = -4; dc <= 4; dc++) {
          const r = r0 + dr;
          const c = c0 + dc;
          if (r < 0 || r >= n || c < 0 || c >= n) continue;
          const d = Math.max(Math.abs(dr), Math.abs(dc));
          this.set(r, c, d !== 2 && d !== 4);
        }
      }
    }
    // Alignment patterns (§6.3.6, Annex E)
    const pos = alignmentPositions(this.ver);
    for (const r of pos) {
      for (const c of pos) {
        if ((r === 6 && c === 6) || (r === 6 && c === n - 7) || (r === n - 7 && c === 6)) continue;
        for (let dr = -2; dr <= 2; dr++) {
          for (let dc = -2; dc <= 2; dc++) {
            this.set(r + dr, c + dc, Math.max(Math.abs(dr), Math.abs(dc)) !== 1);
          }
        }
      }
    }
    // Reserve format areas (light for now) and, from version 7, version areas.
    for (let i = 0; i < 9; i++) {
      if (i !== 6) {
        this.set(8, i, false);
        this.set(i, 8, false);
      }
    }
    for (let i = 0; i < 8; i++) {
      this.set(8, n - 1 - i, false);
      this.set(n - 1 - i, 8, false);
    }
    if (this.ver >= 7) {
      for (let i = 0; i < 6; i++) {
        for (let j = 0; j < 3; j++) {
          this.set(n - 11 + j, i, false);
          this.set(i, n - 11 + j, false);
        }
      }
    }
  }

  /** Zig-zag placement of the final codewords (§7.7.3), remainder bits light. */
  placeCodewords(codewords) {
    const n = this.size;
    let bit = 0;
    const total = codewords.length * 8;
    for (let right = n - 1; right >= 1; right -= 2) {
      if (right === 6) right = 5;
      for (let v = 0; v < n; v++) {
        for (let j = 0; j < 2; j++) {
          const c = right - j;
          const upward = ((right + 1) & 2) === 0;
          const r = upward ? n - 1 - v : v;
          if (this.fn[r][c]) continue;
          let dark = false;
          if (bit < total) dark = ((codewords[bit >>> 3] >>> (7 - (bit & 7))) & 1) === 1;
          this.mod[r][c] = dark ? 1 : 0;
          bit++;
        }
      }
    }
  }

  applyMask(mask) {
    const f = MASKS[mask];
    for (let r = 0; r < this.size; r++) {
      for (let c = 0; c < this.size; c++) if (!this.fn[r][c] && f(r, c)) this.mod[r][c] ^= 1;
    }
  }

  drawFormatAndVersion(ecc, mask) {
    const n = this.size;
    const bits = bchFormat(ecc, mask);
    const b = (i) => ((bits >>> i) & 1) === 1;
    // First copy, around the top-left finder.
    for (let i = 0; i <= 5; i++) this.set(i, 8, b(i));
    this.set(7, 8, b(6));
    this.set(8, 8, b(7));
    this.set(8, 7, b(8));
    for (let i = 9; i < 15; i++) this.set(8, 14 - i, b(i));
    // Second copy, split between the top-right and bottom-left finders.
    for (let i = 0; i < 8; i++) this.set(8, n - 1 - i, b(i));
    for (let i = 8; i < 15; i++) this.set(n - 15 + i, 8, b(i));
    this.set(n - 8, 8, true); // dark module
    if (this.ver >= 7) {
      const v = bchVersion(this.ver);
      for (let i = 0; i < 18; i++) {
        const dark = ((v >>> i) & 1) === 1;
        const a = n - 11 + (i % 3);
        const q = Math.floor(i / 3);
        this.set(a, q, dark);
        this.set(q, a, dark);
      }
    }
  }
}

// ---------------------------------------------------------------- penalty

/** Penalty score of a masked symbol (§7.8.3.1, Table 11): N1+N2+N3+N4. */
export function penalty(mod) {
  const n = mod.length;
  let score = 0;
  let dark = 0;
  const col = new Uint8Array(n);
  const n3 = (seq) => {
    // 1:1:3:1:1 dark:light:dark:light:dark with 4 light modules on either
    // side (outside the symbol counts as light).
    let s = 0;
    let idx = findPattern(seq, 0);
    while (idx !== -1) {
      let next = idx + 7;
      const before = idx === 0 || idx === n - 7 || !anyDark(seq, Math.max(idx - 4, 0), idx)
        || !anyDark(seq, idx + 7, Math.min(idx + 11, n));
      if (before) s += 40;
      else next = idx + 4;
      idx = findPattern(seq, next);
    }
    return s;
  };
  for (let i = 0; i < n; i++) {
    const row = mod[i];
    let rowRun = 0;
    let colRun = 0;
    let rowPrev = -1;
    let colPrev = -1;
    for (let j = 0; j < n; j++) {
      const rb = row[j];
      const cb = mod[j][i];
      col[j] = cb;
      dark += rb;
      if (rb === rowPrev) rowRun++;
      else {
        if (rowRun >= 5) score += rowRun - 2;
        rowRun = 1;
      }
      if (cb === colPrev) colRun++;
      else {
        if (colRun >= 5) score += colRun - 2;
        colRun = 1;
      }
      if (i > 0 && j > 0 && rb === row[j - 1] && rb === mod[i - 1][j] && rb === mod[i - 1][j - 1]) score += 3;
      rowPrev = rb;
      colPrev = cb;
    }
    if (rowRun >= 5) score += rowRun - 2;
    if (colRun >= 5) score += colRun - 2;
    score += n3(row) + n3(col);
  }
  score += 10 * Math.floor(Math.abs((dark * 100) / (n * n) - 50) / 5);
  return score;
}

const N3 = [1, 0, 1, 1, 1, 0, 1];
function findPattern(seq, from) {
  outer: for (let i = Math.max(0, from); i <= seq.length - 7; i++) {
    for (let k = 0; k < 7; k++) if (seq[i + k] !== N3[k]) continue outer;
    return i;
  }
  return -1;
}
function anyDark(seq, a, b) {
  for (let i = a; i < b; i++) if (seq[i]) return true;
  return false;
}

// ---------------------------------------------------------------- API

/** Encode text (UTF-8) or bytes as a QR Code symbol in byte mode. */
export function encodeQR(input, opts = {}) {
  const ecc = (opts.ecc || "M").toUpperCase();
  if (!ECC_LEVELS.includes(ecc)) throw new RangeError(`unknown error correction level ${opts.ecc}`);
  const bytes = utf8(input);
  let ver = opts.version;
  if (ver === undefined) {
    const lo = opts.minVersion || 1;
    const hi = opts.maxVersion || 40;
    for (let v = lo; v <= hi; v++) {
      if (byteCapacity(v, ecc) >= bytes.length) {
        ver = v;
        break;
      }
    }
    if (ver === undefined) throw new RangeError(`${bytes.length} bytes do not fit in a version ${hi}-${ecc} QR Code`);
  }
  if (!Number.isInteger(ver) || ver < 1 || ver > 40) throw new RangeError("version must be 1..40");
  const codewords = buildCodewords(bytes, ver, ecc);
  const m = new Matrix(ver);
  m.drawFunctionPatterns();
  // The dark module (§7.9.1) is a function module but stays light while masks
  // are evaluated, like the format and version areas.
  m.fn[m.size - 8][8] = 1;
  m.placeCodewords(codewords);
  let mask = opts.mask;
  if (mask === undefined) {
    let best = Infinity;
    for (let k = 0; k < 8; k++) {
      m.applyMask(k);
      const p = penalty(m.mod);
      if (p < best) {
        best = p;
        mask = k;
      }
      m.applyMask(k); // undo (XOR)
    }
  }
  if (!Number.isInteger(mask) || mask < 0 || mask > 7) throw new RangeError("mask must be 0..7");
  m.applyMask(mask);
  m.drawFormatAndVersion(ecc, mask);
  return { version: ver, size: m.size, ecc, mask, modules: m.mod.map((row) => Array.from(row)) };
}

/**
 * Draw a symbol on a canvas: `scale` pixels per module, a quiet zone of
 * `margin` modules (4 by the standard), dark on light.
 */
export function drawQR(canvas, qr, { scale = 4, margin = 4, dark = "#000", light = "#fff" } = {}) {
  const px = (qr.size + margin * 2) * scale;
  canvas.width = px;
  canvas.height = px;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = light;
  ctx.fillRect(0, 0, px, px);
  ctx.fillStyle = dark;
  for (let r = 0; r < qr.size; r++) {
    for (let c = 0; c < qr.size; c++) {
      if (qr.modules[r][c]) ctx.fillRect((c + margin) * scale, (r + margin) * scale, scale, scale);
    }
  }
  return canvas;
}
