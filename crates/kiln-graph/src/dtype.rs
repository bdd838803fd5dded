use std::fmt;

/// Element types of Kiln tensors, named as in ONNX.
///
/// The "exotic" types (8-bit floats, 4-bit floats and 2/4-bit integers) are held on the host in
/// their ONNX encoding: one byte per element for the 8-bit floats, packed two (4-bit) or four
/// (2-bit) per byte, low bits first, for the narrower ones. [`DType::encode`] and
/// [`DType::decode`] convert single elements; [`DType::pack`] / [`DType::unpack`] handle the
/// packing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I8,
    U8,
    I16,
    U16,
    I32,
    I64,
    U32,
    U64,
    Bool,
    String,
    /// FLOAT8E4M3FN: 1-4-3, bias 7, no infinity, NaN = S.1111.111, max 448.
    F8E4M3FN,
    /// FLOAT8E4M3FNUZ: 1-4-3, bias 8, no infinity, no negative zero, NaN = 0x80, max 240.
    F8E4M3FNUZ,
    /// FLOAT8E5M2: 1-5-2, bias 15, IEEE-like (infinities and NaNs), max 57344.
    F8E5M2,
    /// FLOAT8E5M2FNUZ: 1-5-2, bias 16, no infinity, no negative zero, NaN = 0x80, max 57344.
    F8E5M2FNUZ,
    /// UINT4, packed two per byte.
    U4,
    /// INT4, packed two per byte.
    I4,
    /// FLOAT4E2M1: 1-2-1, bias 1, no infinity or NaN, max 6; packed two per byte.
    F4E2M1,
    /// FLOAT8E8M0: unsigned power of two 2^(e-127), 0xFF = NaN.
    F8E8M0,
    /// UINT2, packed four per byte.
    U2,
    /// INT2, packed four per byte.
    I2,
}

/// Rounding of conversions to FLOAT8E8M0 (Cast's `round_mode` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum E8M0Round {
    Up,
    Down,
    Nearest,
}

impl E8M0Round {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "up" => E8M0Round::Up,
            "down" => E8M0Round::Down,
            "nearest" => E8M0Round::Nearest,
            _ => return None,
        })
    }
}

/// Layout of a small float format: exponent bits, mantissa bits, bias, and special values.
struct MiniFloat {
    exp_bits: u32,
    man_bits: u32,
    bias: i32,
    /// Largest finite magnitude.
    max: f64,
    /// IEEE-style infinities (exponent all ones, mantissa zero).
    has_inf: bool,
    /// FNUZ: 0x80 is the single NaN, there is no negative zero.
    fnuz: bool,
    /// The encoding of +NaN (sign bit added for negative NaNs where the format has one);
    /// `None` for formats without NaN.
    nan: Option<u8>,
}

const E4M3FN: MiniFloat = MiniFloat {
    exp_bits: 4,
    man_bits: 3,
    bias: 7,
    max: 448.0,
    has_inf: false,
    fnuz: false,
    nan: Some(0x7F),
};
const E4M3FNUZ: MiniFloat = MiniFloat {
    exp_bits: 4,
    man_bits: 3,
    bias: 8,
    max: 240.0,
    has_inf: false,
    fnuz: true,
    nan: Some(0x80),
};
const E5M2: MiniFloat = MiniFloat {
    exp_bits: 5,
    man_bits: 2,
    bias: 15,
    max: 57344.0,
    has_inf: true,
    fnuz: false,
    nan: Some(0x7E),
};
const E5M2FNUZ: MiniFloat = MiniFloat {
    exp_bits: 5,
    man_bits: 2,
    bias: 16,
    max: 57344.0,
    has_inf: false,
    fnuz: true,
    nan: Some(0x80),
};
const E2M1: MiniFloat = MiniFloat {
    exp_bits: 2,
    man_bits: 1,
    bias: 1,
    max: 6.0,
    has_inf: false,
    fnuz: false,
    nan: None,
};

impl MiniFloat {
    fn sign_bit(&self) -> u8 {
        1 << (self.exp_bits + self.man_bits)
    }

    fn decode(&self, bits: u8) -> f32 {
        let total = self.exp_bits + self.man_bits + 1;
        let bits = if total < 8 { bits & ((1u8 << total) - 1) } else { bits };
        let sign = bits & self.sign_bit() != 0;
        let exp = ((bits >> self.man_bits) & ((1u8 << self.exp_bits) - 1)) as i32;
        let man = (bits & ((1u8 << self.man_bits) - 1)) as i32;
        let exp_max = (1i32 << self.exp_bits) - 1;
        let man_max = (1i32 << self.man_bits) - 1;
        if self.fnuz {
            if bits == 0x80 {
                return f32::NAN;
            }
        } else if self.has_inf {
            if exp == exp_max {
                return match (man, sign) {
                    (0, false) => f32::INFINITY,
                    (0, true) => f32::NEG_INFINITY,
                    (_, false) => f32::NAN,
                    (_, true) => -f32::NAN,
                };
            }
        } else if self.nan.is_some() && exp == exp_max && man == man_max {
            // Keep the sign so that encoding gives the same pattern back.
            return if sign { -f32::NAN } else { f32::NAN };
        }
        let mag = if exp == 0 {
            man as f64 * 2f64.powi(1 - self.bias - self.man_bits as i32)
        } else {
            ((1i32 << self.man_bits) + man) as f64 * 2f64.powi(exp - self.bias - self.man_bits as i32)
        };
        let v = if sign { -mag } else { mag };
        v as f32
    }

    /// Round-to-nearest-even encoding. Out-of-range values become +-max when `saturate`
    /// (also infinities), otherwise infinity (formats that have it) or NaN. Formats without
    /// NaN (float4) always saturate and map NaN to a zero like `ml_dtypes`.
    fn encode(&self, x: f64, saturate: bool) -> u8 {
        let sign = if x.is_sign_negative() { self.sign_bit() } else { 0 };
        let Some(nan) = self.nan else {
            // float4e2m1: no NaN, no infinity. ml_dtypes turns +NaN into -0 and -NaN into +0.
            if x.is_nan() {
                return if x.is_sign_negative() { 0 } else { self.sign_bit() };
            }
            return self.encode_finite(x.abs().min(self.max), sign);
        };
        let nan_bits = if self.fnuz { nan } else { nan | sign };
        if x.is_nan() {
            return nan_bits;
        }
        let a = x.abs();
        if a.is_infinite() {
            return if saturate {
                self.encode_finite(self.max, sign)
            } else if self.has_inf {
                self.inf_bits() | sign
            } else {
                nan_bits
            };
        }
        let (q, r) = self.round(a);
        if q * r > self.max {
            return if saturate {
                self.encode_finite(self.max, sign)
            } else if self.has_inf {
                self.inf_bits() | sign
            } else {
                nan_bits
            };
        }
        self.encode_finite(a, sign)
    }

    fn inf_bits(&self) -> u8 {
        (((1u32 << self.exp_bits) - 1) << self.man_bits) as u8
    }

    /// Quantum and rounded integer multiple of it for magnitude `a`.
    fn round(&self, a: f64) -> (f64, f64) {
        let emin = 1 - self.bias;
        let e = if a > 0.0 {
            (a.log2().floor() as i32).max(emin)
        } else {
            emin
        };
        // log2 may be off by one near powers of two; fix the binade exactly.
        let mut e = e;
        while e > emin && a < 2f64.powi(e) {
            e -= 1;
        }
        while a >= 2f64.powi(e + 1) {
            e += 1;
        }
        let q = 2f64.powi(e - self.man_bits as i32);
        (q, (a / q).round_ties_even())
    }

    /// Encodes magnitude `a` (finite, rounds to at most max) with the given sign bit.
    fn encode_finite(&self, a: f64, sign: u8) -> u8 {
        let (q, r) = self.round(a);
        if r == 0.0 {
            return if self.fnuz { 0 } else { sign };
        }
        let v = q * r;
        let emin = 1 - self.bias;
        let mut e = emin;
        while v >= 2f64.powi(e + 1) {
            e += 1;
        }
        let implicit = 1u32 << self.man_bits;
        let (exp_field, man) = if v >= 2f64.powi(emin) {
            let m = (v / 2f64.powi(e - self.man_bits as i32)) as u32;
            ((e + self.bias) as u32, m - implicit)
        } else {
            (0, (v / 2f64.powi(emin - self.man_bits as i32)) as u32)
        };
        ((exp_field << self.man_bits) | man) as u8 | sign
    }
}

fn e8m0_decode(bits: u8) -> f32 {
    if bits == 0xFF {
        f32::NAN
    } else {
        2f64.powi(bits as i32 - 127) as f32
    }
}

/// FLOAT8E8M0 encoding, following `onnx.numpy_helper.to_float8e8m0` on the float32 bits.
fn e8m0_encode(x: f64, saturate: bool, round: E8M0Round) -> u8 {
    let bits = (x as f32).to_bits();
    let exp = (bits >> 23) & 0xFF;
    if exp == 0xFF {
        return 0xFF;
    }
    let frac = bits & 0x7F_FFFF;
    if exp == 0 && frac == 0x40_0000 {
        // Exactly 2^-127, the smallest value (a float32 subnormal).
        return 0;
    }
    let up = match round {
        E8M0Round::Down => false,
        E8M0Round::Up => frac > 0,
        E8M0Round::Nearest => {
            let g = bits & 0x40_0000 != 0;
            let r = bits & 0x20_0000 != 0;
            let s = bits & 0x1F_FFFF != 0;
            g && (r || s || exp > 0)
        }
    };
    let up = up && !(saturate && exp == 0xFE);
    (exp + up as u32) as u8
}

impl DType {
    /// Maps an ONNX `TensorProto.DataType` code; `None` for unknown or unsupported codes.
    pub fn from_onnx(code: i32) -> Option<Self> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            8 => DType::String,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            16 => DType::BF16,
            17 => DType::F8E4M3FN,
            18 => DType::F8E4M3FNUZ,
            19 => DType::F8E5M2,
            20 => DType::F8E5M2FNUZ,
            21 => DType::U4,
            22 => DType::I4,
            23 => DType::F4E2M1,
            24 => DType::F8E8M0,
            25 => DType::U2,
            26 => DType::I2,
            _ => return None,
        })
    }

    /// The ONNX `TensorProto.DataType` code.
    pub fn to_onnx(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::String => 8,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
            DType::F8E4M3FN => 17,
            DType::F8E4M3FNUZ => 18,
            DType::F8E5M2 => 19,
            DType::F8E5M2FNUZ => 20,
            DType::U4 => 21,
            DType::I4 => 22,
            DType::F4E2M1 => 23,
            DType::F8E8M0 => 24,
            DType::U2 => 25,
            DType::I2 => 26,
        }
    }

    /// Bytes per element, rounded up for the packed 4- and 2-bit types (0 for strings, which
    /// have no fixed size). Use [`DType::packed_size`] for the byte size of a tensor.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F8E8M0 => 1,
            DType::U4 | DType::I4 | DType::F4E2M1 | DType::U2 | DType::I2 => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::String => 0,
        }
    }

    /// Bits per element (0 for strings).
    pub fn bits(self) -> usize {
        match self {
            DType::U4 | DType::I4 | DType::F4E2M1 => 4,
            DType::U2 | DType::I2 => 2,
            d => d.size_in_bytes() * 8,
        }
    }

    /// Whether elements are packed several per byte (4- and 2-bit types).
    pub fn is_packed(self) -> bool {
        self.bits() < 8 && self != DType::String
    }

    /// Bytes of `count` elements in the ONNX encoding (packed types round up to whole bytes);
    /// `None` on overflow.
    pub fn packed_size(self, count: usize) -> Option<usize> {
        if self.is_packed() {
            let per = 8 / self.bits();
            Some(count.div_ceil(per))
        } else {
            count.checked_mul(self.size_in_bytes())
        }
    }

    /// Whether this is one of the sub-16-bit ONNX types (float8, float4, int4, int2 families)
    /// that the runtime stores as f32.
    pub fn is_exotic(self) -> bool {
        matches!(
            self,
            DType::F8E4M3FN
                | DType::F8E4M3FNUZ
                | DType::F8E5M2
                | DType::F8E5M2FNUZ
                | DType::U4
                | DType::I4
                | DType::F4E2M1
                | DType::F8E8M0
                | DType::U2
                | DType::I2
        )
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32
                | DType::F16
                | DType::BF16
                | DType::F64
                | DType::F8E4M3FN
                | DType::F8E4M3FNUZ
                | DType::F8E5M2
                | DType::F8E5M2FNUZ
                | DType::F4E2M1
                | DType::F8E8M0
        )
    }

    pub fn is_int(self) -> bool {
        matches!(
            self,
            DType::I8
                | DType::U8
                | DType::I16
                | DType::U16
                | DType::I32
                | DType::I64
                | DType::U32
                | DType::U64
                | DType::U4
                | DType::I4
                | DType::U2
                | DType::I2
        )
    }

    pub fn is_signed(self) -> bool {
        matches!(
            self,
            DType::I8
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::F32
                | DType::F16
                | DType::BF16
                | DType::F64
                | DType::F8E4M3FN
                | DType::F8E4M3FNUZ
                | DType::F8E5M2
                | DType::F8E5M2FNUZ
                | DType::I4
                | DType::F4E2M1
                | DType::I2
        )
    }

    /// Range of the small integer types (`I4`, `U4`, `I2`, `U2`).
    pub fn small_int_range(self) -> Option<(i64, i64)> {
        Some(match self {
            DType::I4 => (-8, 7),
            DType::U4 => (0, 15),
            DType::I2 => (-2, 1),
            DType::U2 => (0, 3),
            _ => return None,
        })
    }

    /// Decodes one element of an exotic type from its bit pattern (low bits of `bits` for the
    /// packed types). Every value is exact in f32. `None` for other dtypes.
    pub fn decode(self, bits: u8) -> Option<f32> {
        Some(match self {
            DType::F8E4M3FN => E4M3FN.decode(bits),
            DType::F8E4M3FNUZ => E4M3FNUZ.decode(bits),
            DType::F8E5M2 => E5M2.decode(bits),
            DType::F8E5M2FNUZ => E5M2FNUZ.decode(bits),
            DType::F4E2M1 => E2M1.decode(bits),
            DType::F8E8M0 => e8m0_decode(bits),
            DType::U4 => (bits & 0x0F) as f32,
            DType::I4 => (((bits & 0x0F) << 4) as i8 >> 4) as f32,
            DType::U2 => (bits & 0x03) as f32,
            DType::I2 => (((bits & 0x03) << 6) as i8 >> 6) as f32,
            _ => return None,
        })
    }

    /// Encodes one value as an exotic type (unpacked bit pattern), like ONNX `Cast`:
    /// float8 types round to nearest even, and with `saturate` clamp out-of-range values
    /// (and infinities) to +-max, otherwise they become infinity (E5M2) or NaN; float4 always
    /// saturates; E8M0 rounds up (Cast's default `round_mode`); the integer types truncate
    /// toward zero and wrap (NaN and infinities give 0). `None` for other dtypes.
    pub fn encode(self, x: f64, saturate: bool) -> Option<u8> {
        self.encode_with(x, saturate, "up")
    }

    /// Whether `mode` is a valid Cast `round_mode` ("up", "down", "nearest").
    pub fn is_round_mode(mode: &str) -> bool {
        E8M0Round::parse(mode).is_some()
    }

    /// [`DType::encode`] with Cast's `round_mode` for FLOAT8E8M0 ("up", "down", "nearest");
    /// `None` for other dtypes or an unknown mode.
    pub fn encode_with(self, x: f64, saturate: bool, round_mode: &str) -> Option<u8> {
        let round = E8M0Round::parse(round_mode)?;
        Some(match self {
            DType::F8E4M3FN => E4M3FN.encode(x, saturate),
            DType::F8E4M3FNUZ => E4M3FNUZ.encode(x, saturate),
            DType::F8E5M2 => E5M2.encode(x, saturate),
            DType::F8E5M2FNUZ => E5M2FNUZ.encode(x, saturate),
            DType::F4E2M1 => E2M1.encode(x, true),
            DType::F8E8M0 => e8m0_encode(x, saturate, round),
            DType::U4 | DType::I4 => wrap_int(x) as u8 & 0x0F,
            DType::U2 | DType::I2 => wrap_int(x) as u8 & 0x03,
            _ => return None,
        })
    }

    /// Packs unpacked bit patterns (one per byte) into the ONNX layout: 4-bit types two per
    /// byte and 2-bit types four per byte, first element in the low bits. Other exotic (8-bit)
    /// types are returned as is.
    pub fn pack(self, codes: &[u8]) -> Vec<u8> {
        if !self.is_packed() {
            return codes.to_vec();
        }
        let bits = self.bits();
        let per = 8 / bits;
        let mask = ((1u16 << bits) - 1) as u8;
        codes
            .chunks(per)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u8, |acc, (i, &v)| acc | ((v & mask) << (i * bits)))
            })
            .collect()
    }

    /// Unpacks `count` elements from the ONNX layout into one bit pattern per byte (missing
    /// trailing elements read as 0).
    pub fn unpack(self, bytes: &[u8], count: usize) -> Vec<u8> {
        if !self.is_packed() {
            let mut v = bytes.to_vec();
            v.resize(count, 0);
            return v;
        }
        let bits = self.bits();
        let per = 8 / bits;
        let mask = ((1u16 << bits) - 1) as u8;
        (0..count)
            .map(|i| {
                let b = bytes.get(i / per).copied().unwrap_or(0);
                (b >> ((i % per) * bits)) & mask
            })
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
            DType::String => "string",
            DType::F8E4M3FN => "float8e4m3fn",
            DType::F8E4M3FNUZ => "float8e4m3fnuz",
            DType::F8E5M2 => "float8e5m2",
            DType::F8E5M2FNUZ => "float8e5m2fnuz",
            DType::U4 => "uint4",
            DType::I4 => "int4",
            DType::F4E2M1 => "float4e2m1",
            DType::F8E8M0 => "float8e8m0",
            DType::U2 => "uint2",
            DType::I2 => "int2",
        }
    }
}

/// Truncates toward zero to an integer whose low bits are kept (NaN and infinities give 0).
fn wrap_int(x: f64) -> i64 {
    if !x.is_finite() {
        return 0;
    }
    let t = x.trunc();
    if t.abs() < 9.0e18 {
        t as i64
    } else {
        // Beyond i64: the low bits of such huge values are zero anyway.
        0
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOAT8: [DType; 5] = [
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::F8E8M0,
    ];

    #[test]
    fn codes_round_trip() {
        for code in 1..=26 {
            if let Some(d) = DType::from_onnx(code) {
                assert_eq!(d.to_onnx(), code);
            }
        }
        assert_eq!(DType::from_onnx(22), Some(DType::I4));
        assert_eq!(DType::from_onnx(27), None);
    }

    #[test]
    fn known_bit_patterns() {
        let cases: &[(DType, u8, f32)] = &[
            (DType::F8E4M3FN, 0x38, 1.0),
            (DType::F8E4M3FN, 0x7E, 448.0),
            (DType::F8E4M3FN, 0xFE, -448.0),
            (DType::F8E4M3FN, 0x01, 0.001953125),
            (DType::F8E4M3FN, 0x08, 0.015625),
            (DType::F8E4M3FNUZ, 0x40, 1.0),
            (DType::F8E4M3FNUZ, 0x7F, 240.0),
            (DType::F8E4M3FNUZ, 0x01, 0.0009765625),
            (DType::F8E5M2, 0x3C, 1.0),
            (DType::F8E5M2, 0x7B, 57344.0),
            (DType::F8E5M2, 0x7C, f32::INFINITY),
            (DType::F8E5M2, 0xFC, f32::NEG_INFINITY),
            (DType::F8E5M2, 0x01, 2f32.powi(-16)),
            (DType::F8E5M2FNUZ, 0x40, 1.0),
            (DType::F8E5M2FNUZ, 0x7F, 57344.0),
            (DType::F4E2M1, 0x1, 0.5),
            (DType::F4E2M1, 0x7, 6.0),
            (DType::F4E2M1, 0xF, -6.0),
            (DType::F4E2M1, 0x5, 3.0),
            (DType::F8E8M0, 127, 1.0),
            (DType::F8E8M0, 128, 2.0),
            (DType::I4, 0x8, -8.0),
            (DType::I4, 0xF, -1.0),
            (DType::U4, 0xF, 15.0),
            (DType::I2, 0x2, -2.0),
            (DType::U2, 0x3, 3.0),
        ];
        for &(d, bits, v) in cases {
            assert_eq!(d.decode(bits), Some(v), "{d} decode {bits:#x}");
            assert_eq!(d.encode(v as f64, false), Some(bits), "{d} encode {v}");
        }
        assert_eq!(DType::F8E8M0.decode(0), Some(2f32.powi(-127)));
        assert!(DType::F8E8M0.decode(0xFF).unwrap().is_nan());
        assert!(DType::F8E4M3FN.decode(0x7F).unwrap().is_nan());
        assert!(DType::F8E4M3FNUZ.decode(0x80).unwrap().is_nan());
        assert!(DType::F8E5M2FNUZ.decode(0x80).unwrap().is_nan());
        assert!(DType::F8E5M2.decode(0x7E).unwrap().is_nan());
    }

    #[test]
    fn every_code_round_trips() {
        for d in FLOAT8
            .iter()
            .copied()
            .chain([DType::F4E2M1, DType::I4, DType::U4, DType::I2, DType::U2])
        {
            let n = if d.is_packed() { 1u16 << d.bits() } else { 256 };
            for b in 0..n {
                let b = b as u8;
                let v = d.decode(b).unwrap();
                let back = d.encode(v as f64, false).unwrap();
                if v.is_nan() && (d.name().contains("fnuz") || d == DType::F8E8M0) {
                    assert!(d.decode(back).unwrap().is_nan(), "{d} {b:#x}");
                } else if v.is_nan() {
                    // NaN payloads are not kept, the sign is.
                    assert_eq!(back & 0x80, b & 0x80, "{d} {b:#x}");
                    assert!(d.decode(back).unwrap().is_nan(), "{d} {b:#x}");
                } else {
                    assert_eq!(back, b, "{d} {b:#x} -> {v}");
                }
            }
        }
    }

    #[test]
    fn rounding_and_saturation() {
        let e4 = DType::F8E4M3FN;
        // Round to nearest even: 464 is halfway between 448 (even) and 480 (NaN code).
        assert_eq!(e4.encode(464.0, false), Some(0x7E));
        assert_eq!(e4.encode(465.0, false), Some(0x7F));
        assert_eq!(e4.encode(465.0, true), Some(0x7E));
        assert_eq!(e4.encode(f64::INFINITY, true), Some(0x7E));
        assert_eq!(e4.encode(f64::NEG_INFINITY, false), Some(0xFF));
        assert_eq!(e4.encode(-1e-9, true), Some(0x80));
        assert_eq!(e4.encode(1.0625, true), Some(0x38)); // tie -> even (1.0)
        assert_eq!(e4.encode(1.1875, true), Some(0x3A)); // tie -> even (1.25)
        let e5 = DType::F8E5M2;
        assert_eq!(e5.encode(1e6, false), Some(0x7C));
        assert_eq!(e5.encode(-1e6, true), Some(0xFB));
        assert_eq!(e5.encode(f64::NAN, true), Some(0x7E));
        let uz = DType::F8E4M3FNUZ;
        assert_eq!(uz.encode(-1e-9, true), Some(0x00));
        assert_eq!(uz.encode(1e6, false), Some(0x80));
        assert_eq!(uz.encode(f64::INFINITY, true), Some(0x7F));
        let f4 = DType::F4E2M1;
        assert_eq!(f4.encode(100.0, false), Some(0x7));
        assert_eq!(f4.encode(0.25, true), Some(0x0));
        assert_eq!(f4.encode(0.75, true), Some(0x2));
        assert_eq!(f4.encode(5.5, true), Some(0x7));
        assert_eq!(f4.encode(f64::NAN, true), Some(0x8));
        // Integers truncate toward zero and wrap.
        assert_eq!(DType::I4.encode(-9.7, true), Some(0x7));
        assert_eq!(DType::U4.encode(-2.5, true), Some(14));
        assert_eq!(DType::I2.encode(2.5, true), Some(0x2));
        // E8M0 round modes.
        let e8 = DType::F8E8M0;
        assert_eq!(e8.encode(3.0, true), Some(129));
        assert_eq!(e8.encode_with(3.0, true, "down"), Some(128));
        assert_eq!(e8.encode_with(3.0, true, "nearest"), Some(129));
        assert_eq!(e8.encode_with(2.5, true, "nearest"), Some(128));
        assert_eq!(e8.encode(f32::MAX as f64, true), Some(0xFE));
        assert_eq!(e8.encode(f32::MAX as f64, false), Some(0xFF));
        assert_eq!(e8.encode_with(1.0, true, "sideways"), None);
    }

    #[test]
    fn packing() {
        assert_eq!(DType::I4.pack(&[0x1, 0xF, 0x3]), vec![0xF1, 0x03]);
        assert_eq!(DType::I4.unpack(&[0xF1, 0x03], 3), vec![0x1, 0xF, 0x3]);
        assert_eq!(DType::U2.pack(&[1, 2, 3, 0, 3]), vec![0b0011_1001, 0b11]);
        assert_eq!(DType::U2.unpack(&[0b0011_1001, 0b11], 5), vec![1, 2, 3, 0, 3]);
        assert_eq!(DType::I4.packed_size(3), Some(2));
        assert_eq!(DType::I2.packed_size(5), Some(2));
        assert_eq!(DType::F8E5M2.packed_size(5), Some(5));
    }
}
