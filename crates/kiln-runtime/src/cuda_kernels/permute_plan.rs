//! How `kernels/permute.cu` copies a strided tensor (always compiled, so the planning is tested on
//! machines without a GPU: [`tests`] replays the kernel's index math on the host).

/// Axes the kernel takes after collapsing.
pub(crate) const MAX_RANK: usize = 6;

/// One launch of `kiln_permute_b{unit_bytes}`: output dims and input strides in units, outermost
/// first (`rank` of the six used), `units` outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) struct PermutePlan {
    pub unit_bytes: usize,
    /// Elements per unit (1, or 16 / element bytes for the vector path).
    pub per_unit: usize,
    pub rank: usize,
    pub dims: [u32; MAX_RANK],
    pub strides: [u32; MAX_RANK],
    pub units: u32,
}

/// The copy as (output dim, input stride) pairs in elements, outermost first: unit axes dropped and
/// neighbours that stay adjacent in the input merged. Empty for a single element.
pub(crate) fn collapse(dims: &[usize], strides: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(dims.len());
    for (&d, &s) in dims.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == s * d => *last = (last.0 * d, s),
            _ => out.push((d, s)),
        }
    }
    out
}

/// The launch for a view with `dims`/`strides` (elements of `esize` bytes, 2 or 4) starting
/// `start` elements into its buffer and reaching `reach` elements from there; `None` when the
/// kernel does not take it (other element sizes, nothing to copy, more than [`MAX_RANK`] axes after
/// collapsing, 2^31 units or offsets and more).
#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn plan_permute(
    dims: &[usize],
    strides: &[usize],
    esize: usize,
    start: usize,
    reach: usize,
) -> Option<PermutePlan> {
    if esize != 2 && esize != 4 {
        return None;
    }
    let total: usize = dims.iter().product();
    let axes = collapse(dims, strides);
    if total == 0 || axes.is_empty() || axes.len() > MAX_RANK {
        return None;
    }
    // 16-byte units: the innermost axis contiguous in the input, its bytes and every other stride a
    // multiple of 16 bytes, and the start aligned (candle's allocations are).
    let per16 = 16 / esize;
    let &(inner_d, inner_s) = axes.last()?;
    let vector = inner_s == 1
        && inner_d.is_multiple_of(per16)
        && start.is_multiple_of(per16)
        && axes[..axes.len() - 1].iter().all(|&(_, s)| s.is_multiple_of(per16));
    let (unit_bytes, per_unit) = if vector { (16, per16) } else { (esize, 1) };
    let mut plan = PermutePlan {
        unit_bytes,
        per_unit,
        rank: axes.len(),
        dims: [0; MAX_RANK],
        strides: [0; MAX_RANK],
        units: 0,
    };
    let last = axes.len() - 1;
    for (k, &(d, s)) in axes.iter().enumerate() {
        // In units: the innermost axis of the vector path is whole vectors at stride one vector.
        let (d, s) = if vector && k == last {
            (d / per_unit, 1)
        } else {
            (d, s / per_unit)
        };
        plan.dims[k] = u32::try_from(d).ok()?;
        plan.strides[k] = u32::try_from(s).ok()?;
    }
    let units = total / per_unit;
    if units > i32::MAX as usize || reach / per_unit > i32::MAX as usize {
        return None;
    }
    plan.units = units as u32;
    Some(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// `kiln_permute_b*` on the host: y[i] = x[offset(i)] over whole units.
    fn replay(plan: &PermutePlan, src: &[u8]) -> Vec<u8> {
        let u = plan.unit_bytes;
        let mut out = Vec::with_capacity(plan.units as usize * u);
        for i in 0..plan.units {
            let (mut rem, mut off) = (i, 0u32);
            for k in (1..plan.rank).rev() {
                let d = plan.dims[k];
                off += (rem % d) * plan.strides[k];
                rem /= d;
            }
            off += rem * plan.strides[0];
            let at = off as usize * u;
            out.extend_from_slice(&src[at..at + u]);
        }
        out
    }

    #[test]
    fn plans_reproduce_the_permuted_copy() {
        // (shape, perm, narrow the last axis by): head transposes (vector path for both element
        // sizes), reversals and rank 6 (element path), strided sources, broadcast-free collapses.
        let cases: &[(&[usize], &[usize], usize)] = &[
            (&[2, 5, 3, 16], &[0, 2, 1, 3], 0),
            (&[3, 7, 5], &[2, 1, 0], 0),
            (&[2, 3, 2, 3, 2, 5], &[5, 0, 4, 1, 3, 2], 0),
            (&[4, 9, 6], &[1, 0, 2], 2),
            (&[4, 9, 16], &[1, 0, 2], 8),
            (&[2, 3, 4, 5], &[0, 1, 3, 2], 0),
            (&[6, 1, 8], &[2, 1, 0], 0),
            (&[64, 12, 9, 64], &[0, 2, 1, 3], 0),
        ];
        let mut vector_plans = 0;
        for dt in [DType::F32, DType::F16] {
            for &(dims, perm, narrow) in cases {
                let n: usize = dims.iter().product();
                let x = Tensor::arange(0u32, n as u32, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .reshape(dims)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let last = dims.len() - 1;
                let x = x.narrow(last, narrow, dims[last] - narrow).unwrap();
                let view = x.permute(perm).unwrap();
                let want = view.contiguous().unwrap();
                let (storage, layout) = x.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    unreachable!()
                };
                let buf: Vec<u8> = match cpu {
                    candle_core::CpuStorage::F32(v) => bytemuck::cast_slice(v).to_vec(),
                    candle_core::CpuStorage::F16(v) => bytemuck::cast_slice(v).to_vec(),
                    _ => unreachable!(),
                };
                let start = layout.start_offset();
                let esize = dt.size_in_bytes();
                let vl = view.layout();
                let plan = plan_permute(view.dims(), vl.stride(), esize, start, buf.len() / esize - start)
                    .unwrap_or_else(|| panic!("{dims:?} {perm:?}: planned"));
                vector_plans += usize::from(plan.unit_bytes == 16);
                let got = replay(&plan, &buf[start * esize..]);
                let want_bytes: Vec<u8> = match dt {
                    DType::F32 => bytemuck::cast_slice(&want.flatten_all().unwrap().to_vec1::<f32>().unwrap()).to_vec(),
                    _ => bytemuck::cast_slice(&want.flatten_all().unwrap().to_vec1::<half::f16>().unwrap()).to_vec(),
                };
                assert_eq!(
                    got, want_bytes,
                    "{dt:?} {dims:?} perm {perm:?} narrow {narrow}: {plan:?}"
                );
            }
        }
        assert!(vector_plans >= 4, "the 16-byte path was planned {vector_plans} times");
    }

    #[test]
    fn unsupported_copies_are_declined() {
        assert_eq!(plan_permute(&[3, 4], &[1, 3], 8, 0, 12), None, "8-byte elements");
        assert_eq!(plan_permute(&[3, 4], &[1, 3], 1, 0, 12), None, "1-byte elements");
        assert_eq!(plan_permute(&[0, 4], &[1, 0], 4, 0, 0), None, "empty");
        assert_eq!(
            plan_permute(&[2; 7], &[1, 2, 4, 8, 16, 32, 64], 4, 0, 1 << 7),
            None,
            "seven axes that do not collapse"
        );
        assert_eq!(
            plan_permute(&[1 << 16, 1 << 16], &[1, 1 << 16], 2, 0, 1 << 32),
            None,
            "2^32 units"
        );
    }
}
