//! Single-thread GFLOP/s of the packed GEMM against the `gemm` crate (candle's), alternating the
//! engines and keeping each one's best round (the dev machine is shared and noisy).
use kiln_runtime::sgemm::{
    gemm_packed_a, gemm_packed_a_rows, gemm_packed_b, rows_available, Bias, MatRef, PackedA, PackedB, RowsB,
};
use std::time::Instant;

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().unwrap();
    let all = [
        (512, 384, 1536),
        (512, 1536, 384),
        (512, 384, 384),
        (64, 768, 3072),
        (64, 3072, 768),
        (64, 768, 768),
        (96, 864, 6400),
        (48, 96, 6400),
        // Convs: PP-OCR det's 3x3 96 -> 24 at 80x80 (as a plain product: B here is 22 MB streamed from
        // memory, where the conv's im2col rows overlap in a 2.6 MB input), SqueezeNet's last 1x1
        // (512 -> 1000 at 13x13).
        (24, 864, 6400),
        (1000, 512, 169),
        // A 32-sequence decode step of SmolLM2-135M (hidden 576, MLP 1536, 3 KV heads of 64, vocabulary 49152).
        (32, 576, 1536),
        (32, 1536, 576),
        (32, 576, 576),
        (32, 576, 192),
        (32, 576, 49152),
    ];
    // `sgemm M,K,N ...` runs only the given shapes.
    let picked: Vec<(usize, usize, usize)> = std::env::args()
        .skip(1)
        .map(|s| {
            let v: Vec<usize> = s.split(',').map(|x| x.parse().expect("M,K,N")).collect();
            (v[0], v[1], v[2])
        })
        .collect();
    let shapes = if picked.is_empty() { all.to_vec() } else { picked };
    for &(m, k, n) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let reps = ((0.3e9 / flops) as usize).max(2);
        let pb = PackedB::pack(MatRef::row_major(&b, k, n)).unwrap();
        let pa = PackedA::pack(MatRef::row_major(&a, m, k)).unwrap();
        // The rows GEMM reads B in place: row p at p * n (a pointwise conv's input planes).
        let offs: Vec<usize> = (0..k).map(|p| p * n).collect();
        let mut best = [0f64; 4];
        for _round in 0..9 {
            for (e, slot) in best.iter_mut().enumerate() {
                let t = Instant::now();
                for _ in 0..reps {
                    match e {
                        0 => gemm_packed_b(MatRef::row_major(&a, m, k), &pb, Bias::None, &mut c, n).unwrap(),
                        1 => gemm_packed_a(&pa, MatRef::row_major(&b, k, n), Bias::None, &mut c, n).unwrap(),
                        3 if rows_available() => gemm_packed_a_rows(
                            &pa,
                            RowsB {
                                data: &b,
                                offs: &offs,
                                n,
                            },
                            None,
                            None,
                            &mut c,
                            n,
                        )
                        .unwrap(),
                        3 => {}
                        2 => unsafe {
                            gemm::gemm(
                                m,
                                n,
                                k,
                                c.as_mut_ptr(),
                                1,
                                n as isize,
                                false,
                                a.as_ptr(),
                                1,
                                k as isize,
                                b.as_ptr(),
                                1,
                                n as isize,
                                0.0f32,
                                1.0f32,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            )
                        },
                        _ => unreachable!(),
                    }
                }
                let g = flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
                *slot = slot.max(g);
            }
        }
        println!(
            "m {m:4} k {k:4} n {n:5}: packedB {:6.1}  packedA {:6.1}  gemm-crate {:6.1}  packedA+rows {:6.1} GFLOP/s (best of 9 rounds)",
            best[0], best[1], best[2], best[3]
        );
    }
}
