// Runs every kernel of kernels/*.cu under the CPU emulator (emu.cpp) on small odd-sized inputs and
// compares with plain double-precision loops: f32 within 1e-4 and f16 within 1e-2 of the largest
// reference value. The launch configurations are the ones crates/kiln-runtime/src/cuda_kernels/
// launch/*.rs use. Exit status 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_fp16.h"
#include "emu.h"

using ll = long long;

extern "C" {
void kiln_layer_norm_f32(const float*, const float*, const float*, float*, int, float);
void kiln_layer_norm_f16(const __half*, const float*, const float*, __half*, int, float);
void kiln_rms_norm_f32(const float*, const float*, const float*, float*, int, float);
void kiln_rms_norm_f16(const __half*, const float*, const float*, __half*, int, float);
#define BIAS_DECL(N)                                                          \
    void kiln_bias_##N##_f32(const float*, const float*, float*, size_t, int); \
    void kiln_bias_##N##_f16(const __half*, const float*, __half*, size_t, int);
BIAS_DECL(gelu_erf)
BIAS_DECL(gelu_tanh)
BIAS_DECL(relu)
BIAS_DECL(none)
#define SOFTMAX_DECL(K, S, T) \
    void kiln_softmax_##K##_##S(const T*, T*, const float*, ll, int, int, int, float, ll, ll, ll, ll, int, int);
SOFTMAX_DECL(warp, f32, float)
SOFTMAX_DECL(block, f32, float)
SOFTMAX_DECL(warp, f16, __half)
SOFTMAX_DECL(block, f16, __half)
#define ATTN_DECL(S, T, D)                                                                                     \
    void kiln_attention_##S##_d##D(const T*, const T*, const T*, T*, const float*, ll, ll, ll, ll, const int*, \
                                   int, int, int, int, int, float, int, int);
ATTN_DECL(f32, float, 32)
ATTN_DECL(f32, float, 64)
ATTN_DECL(f32, float, 128)
ATTN_DECL(f16, __half, 32)
ATTN_DECL(f16, __half, 64)
ATTN_DECL(f16, __half, 128)
#define PAGED_DECL(S, T, D)                                                                                 \
    void kiln_paged_attention_##S##_d##D(const T*, const T*, const T*, T*, const int*, const int*, const int*, \
                                         int, int, int, float);
PAGED_DECL(f32, float, 32)
PAGED_DECL(f32, float, 64)
PAGED_DECL(f32, float, 96)
PAGED_DECL(f32, float, 128)
PAGED_DECL(f16, __half, 32)
PAGED_DECL(f16, __half, 64)
PAGED_DECL(f16, __half, 96)
PAGED_DECL(f16, __half, 128)
void kiln_reshape_and_cache_f32(const float*, const float*, float*, float*, const int*, int, int, int);
void kiln_reshape_and_cache_f16(const __half*, const __half*, __half*, __half*, const int*, int, int, int);
struct KilnPermuteParams {
    unsigned dims[6];
    unsigned strides[6];
};
void kiln_permute_b2(const uint16_t*, uint16_t*, unsigned, int, KilnPermuteParams);
void kiln_permute_b4(const uint32_t*, uint32_t*, unsigned, int, KilnPermuteParams);
void kiln_permute_b16(const uint4*, uint4*, unsigned, int, KilnPermuteParams);
struct KilnIm2colParams {
    int c, h, w, kh, kw, oh, ow, sh, sw, dh, dw, pt, pl, ones;
};
void kiln_im2col_f32(const float*, float*, KilnIm2colParams);
void kiln_im2col_f16(const __half*, __half*, KilnIm2colParams);
void kiln_int8_gemm_f32_nn(const float*, const signed char*, const float*, float*, int, int, int);
void kiln_int8_gemm_f32_nt(const float*, const signed char*, const float*, float*, int, int, int);
void kiln_int8_gemm_f16_nn(const __half*, const signed char*, const float*, __half*, int, int, int);
void kiln_int8_gemm_f16_nt(const __half*, const signed char*, const float*, __half*, int, int, int);
}

static int failures = 0;
static uint64_t seed_state = 1;

static std::vector<float> values(size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) {
        seed_state = seed_state * 6364136223846793005ull + 1442695040888963407ull;
        x = (float((seed_state >> 40) & 0xffffff) / float(1 << 24) * 2.f - 1.f) * scale;
    }
    return v;
}

// Inputs rounded to T (so the reference sees exactly what the kernel reads).
template <typename T> struct Buf;
template <> struct Buf<float> {
    static constexpr double tol = 1e-4;
    static constexpr const char* name = "f32";
    static float to(float x) { return x; }
    static float from(float x) { return x; }
};
template <> struct Buf<__half> {
    static constexpr double tol = 1e-2;
    static constexpr const char* name = "f16";
    static __half to(float x) { return __float2half_rn(x); }
    static float from(__half x) { return __half2float(x); }
};

template <typename T>
static std::vector<T> conv(const std::vector<float>& v) {
    std::vector<T> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = Buf<T>::to(v[i]);
    return o;
}
template <typename T>
static std::vector<double> back(const std::vector<T>& v) {
    std::vector<double> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = Buf<T>::from(v[i]);
    return o;
}

static void check(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double tol) {
    double scale = 1e-6, err = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    bool finite = true;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) finite = false;
        err = std::max(err, std::fabs(got[i] - want[i]));
    }
    const bool ok = finite && err <= tol * scale;
    std::printf("%s %s: max |d| %.3e, max |ref| %.3e\n", ok ? "ok  " : "FAIL", what.c_str(), err, scale);
    if (!ok) ++failures;
}

// ---- layer_norm.cu ----
template <typename T>
static void layer_norm(int rows, int cols, bool rms, bool params) {
    auto xf = values(size_t(rows) * cols, 3.f);
    auto g = values(cols, 1.5f), b = values(cols, 0.5f);
    auto x = conv<T>(xf);
    auto xd = back(x);
    std::vector<T> y(x.size());
    const float* gp = params ? g.data() : nullptr;
    const float* bp = params && !rms ? b.data() : nullptr;
    const unsigned threads = std::clamp((cols / 8 + 31) / 32, 1, 16) * 32;
    emu_launch({unsigned(rows)}, {threads}, [&] {
        if constexpr (std::is_same_v<T, float>) {
            (rms ? kiln_rms_norm_f32 : kiln_layer_norm_f32)(x.data(), gp, bp, y.data(), cols, 1e-5f);
        } else {
            (rms ? kiln_rms_norm_f16 : kiln_layer_norm_f16)(x.data(), gp, bp, y.data(), cols, 1e-5f);
        }
    });
    std::vector<double> want(x.size());
    for (int r = 0; r < rows; ++r) {
        const double* xr = &xd[size_t(r) * cols];
        double mean = 0, var = 0;
        for (int c = 0; c < cols; ++c) mean += xr[c];
        mean /= cols;
        for (int c = 0; c < cols; ++c) var += rms ? xr[c] * xr[c] : (xr[c] - mean) * (xr[c] - mean);
        var /= cols;
        const double inv = 1 / std::sqrt(var + 1e-5);
        for (int c = 0; c < cols; ++c) {
            double v = (xr[c] - (rms ? 0 : mean)) * inv;
            if (gp) v *= g[c];
            if (bp) v += b[c];
            want[size_t(r) * cols + c] = v;
        }
    }
    check(std::string(rms ? "rms_norm " : "layer_norm ") + Buf<T>::name + " " + std::to_string(rows) + "x" +
              std::to_string(cols) + (params ? "" : " no params"),
          back(y), want, Buf<T>::tol);
}

// ---- bias_act.cu ----
template <typename T>
static void bias_act(int act, size_t rows, int n, bool with_bias, int misalign) {
    const size_t total = rows * n;
    auto xs = conv<T>(values(total + misalign, 4.f));
    auto bias = values(n, 1.f);
    std::vector<T> ys(total + misalign);
    const T* x = xs.data() + misalign;
    T* y = ys.data() + misalign;
    const int vec = std::is_same_v<T, float> ? 4 : 8;
    const unsigned blocks = unsigned(std::clamp<size_t>((total + 256 * vec - 1) / (256 * vec), 1, 8192));
    const float* bp = with_bias ? bias.data() : nullptr;
    emu_launch({blocks}, {256}, [&] {
        if constexpr (std::is_same_v<T, float>) {
            (act == 0   ? kiln_bias_gelu_erf_f32
             : act == 1 ? kiln_bias_gelu_tanh_f32
             : act == 2 ? kiln_bias_relu_f32
                        : kiln_bias_none_f32)(x, bp, y, total, n);
        } else {
            (act == 0   ? kiln_bias_gelu_erf_f16
             : act == 1 ? kiln_bias_gelu_tanh_f16
             : act == 2 ? kiln_bias_relu_f16
                        : kiln_bias_none_f16)(x, bp, y, total, n);
        }
    });
    std::vector<double> want(total), got(total);
    for (size_t i = 0; i < total; ++i) {
        double v = Buf<T>::from(x[i]) + (bp ? bp[i % n] : 0.0);
        if (act == 0) v = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
        else if (act == 1) v = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
        else if (act == 2) v = std::max(v, 0.0);
        want[i] = v;
        got[i] = Buf<T>::from(y[i]);
    }
    const char* names[] = {"gelu_erf", "gelu_tanh", "relu", "none"};
    check(std::string("bias_") + names[act] + " " + Buf<T>::name + " " + std::to_string(rows) + "x" + std::to_string(n) +
              (with_bias ? "" : " no bias") + (misalign ? " misaligned" : ""),
          got, want, Buf<T>::tol);
}

// ---- softmax.cu ----
template <typename T>
static void softmax(int B, int H, int S, int cols, bool masked, bool causal, int offset) {
    const ll rows = ll(B) * H * S;
    auto x = conv<T>(values(size_t(rows) * cols, 6.f));
    auto xd = back(x);
    // Key-padding mask [B, 1, 1, cols]: batch 1 masks its last third.
    auto m = values(size_t(B) * cols, 1.f);
    for (int j = 2 * cols / 3; j < cols && B > 1; ++j) m[cols + j] = -INFINITY;
    std::vector<T> y(x.size());
    const float scale = 0.37f;
    const float* mp = masked ? m.data() : nullptr;
    const bool warp = cols <= 1024;
    const dim3 grid = warp ? dim3{unsigned((rows + 3) / 4)} : dim3{unsigned(rows)};
    const dim3 block = warp ? dim3{32, 4} : dim3{cols >= 8192 ? 512u : 256u};
    emu_launch(grid, block, [&] {
        if constexpr (std::is_same_v<T, float>) {
            (warp ? kiln_softmax_warp_f32 : kiln_softmax_block_f32)(x.data(), y.data(), mp, rows, cols, H, S, scale,
                                                                    cols, 0, 0, 1, causal, offset);
        } else {
            (warp ? kiln_softmax_warp_f16 : kiln_softmax_block_f16)(x.data(), y.data(), mp, rows, cols, H, S, scale,
                                                                    cols, 0, 0, 1, causal, offset);
        }
    });
    std::vector<double> want(x.size(), 0.0);
    for (ll r = 0; r < rows; ++r) {
        const int b = int(r / (ll(H) * S)), s = int(r % S);
        std::vector<double> l(cols);
        double mx = -INFINITY;
        for (int j = 0; j < cols; ++j) {
            l[j] = (causal && j > s + offset) ? -INFINITY : scale * xd[r * cols + j] + (mp ? mp[size_t(b) * cols + j] : 0);
            mx = std::max(mx, l[j]);
        }
        if (mx == -INFINITY) continue;
        double sum = 0;
        for (int j = 0; j < cols; ++j) sum += std::exp(l[j] - mx);
        for (int j = 0; j < cols; ++j) want[r * cols + j] = std::exp(l[j] - mx) / sum;
    }
    check(std::string("softmax ") + Buf<T>::name + " rows " + std::to_string(rows) + " cols " + std::to_string(cols) +
              (masked ? " masked" : "") + (causal ? " causal+" + std::to_string(offset) : ""),
          back(y), want, Buf<T>::tol);
}

// ---- attention.cu ----
template <typename T>
static void attention(int B, int Hq, int Hk, int S, int Tk, int d, bool mask, bool causal, bool kv_len) {
    auto q = conv<T>(values(size_t(B) * Hq * S * d, 1.f));
    auto k = conv<T>(values(size_t(B) * Hk * Tk * d, 1.f));
    auto v = conv<T>(values(size_t(B) * Hk * Tk * d, 1.f));
    auto qd = back(q), kd = back(k), vd = back(v);
    // Additive mask [B, 1, S, T] (broadcast over heads): finite bias, batch 0's first query row all -inf.
    auto m = values(size_t(B) * S * Tk, 2.f);
    for (int j = 0; j < Tk; ++j) m[j] = -INFINITY;
    std::vector<int> lens(B);
    for (int b = 0; b < B; ++b) lens[b] = std::max(1, Tk - b * Tk / 3);
    std::vector<T> out(q.size());
    const float scale = 1.f / std::sqrt(float(d));
    const float* mp = mask ? m.data() : nullptr;
    const int* lp = kv_len ? lens.data() : nullptr;
    const ll sb = ll(S) * Tk, sh = 0, ss = Tk, sj = 1;
    const int tile = d <= 32 ? 32 : d <= 64 ? 64 : 128;
    emu_launch({unsigned((S + 15) / 16), unsigned(Hq), unsigned(B)}, {128}, [&] {
        auto f = [&](auto fn) { fn(q.data(), k.data(), v.data(), out.data(), mp, sb, sh, ss, sj, lp, Hq, Hk, S, Tk, d, scale, causal, 0); };
        if constexpr (std::is_same_v<T, float>) {
            f(tile == 32 ? kiln_attention_f32_d32 : tile == 64 ? kiln_attention_f32_d64 : kiln_attention_f32_d128);
        } else {
            f(tile == 32 ? kiln_attention_f16_d32 : tile == 64 ? kiln_attention_f16_d64 : kiln_attention_f16_d128);
        }
    });
    std::vector<double> want(q.size(), 0.0);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hq; ++h)
            for (int s = 0; s < S; ++s) {
                const int kh = h / (Hq / Hk);
                const int end = kv_len ? std::min(lens[b], Tk) : Tk;
                const int off = kv_len ? lens[b] - S : 0;
                std::vector<double> l(Tk, -INFINITY);
                double mx = -INFINITY;
                for (int j = 0; j < end; ++j) {
                    if (causal && j > s + off) continue;
                    double dot = 0;
                    for (int c = 0; c < d; ++c)
                        dot += qd[((size_t(b) * Hq + h) * S + s) * d + c] * kd[((size_t(b) * Hk + kh) * Tk + j) * d + c];
                    l[j] = dot * scale + (mp ? mp[size_t(b) * S * Tk + size_t(s) * Tk + j] : 0);
                    mx = std::max(mx, l[j]);
                }
                if (mx == -INFINITY) continue;
                double sum = 0;
                for (int j = 0; j < Tk; ++j) sum += l[j] == -INFINITY ? 0 : std::exp(l[j] - mx);
                for (int c = 0; c < d; ++c) {
                    double acc = 0;
                    for (int j = 0; j < Tk; ++j)
                        if (l[j] != -INFINITY) acc += std::exp(l[j] - mx) / sum * vd[((size_t(b) * Hk + kh) * Tk + j) * d + c];
                    want[((size_t(b) * Hq + h) * S + s) * d + c] = acc;
                }
            }
    check(std::string("attention ") + Buf<T>::name + " B" + std::to_string(B) + " Hq" + std::to_string(Hq) + " Hk" +
              std::to_string(Hk) + " S" + std::to_string(S) + " T" + std::to_string(Tk) + " d" + std::to_string(d) +
              (mask ? " mask" : "") + (causal ? " causal" : "") + (kv_len ? " kv_len" : ""),
          back(out), want, Buf<T>::tol);
}

// ---- paged_attention.cu ----
// One mixed step of several sequences over a paged cache with scattered block tables, as
// launch/paged_attention.rs runs it: reshape_and_cache writes the step's new K/V (plus a padding
// token with slot -1) into their slots, then paged attention attends causally. Every slot no
// sequence has written holds NaN, so a read past a context or a missed write shows up. The cache
// must match the expected one bit for bit; the attention output is compared with a double loop
// over each sequence's logical (unpaged) K/V.
template <typename T>
static void paged_attention(int H, int KV, int D, int bs, const std::vector<std::pair<int, int>>& seqs,
                            bool misalign) {
    int lbs = 0;
    while ((1 << lbs) < bs) ++lbs;
    int used = 0, T_ = 0;
    for (auto [ctx, nq] : seqs) {
        used += (ctx + bs - 1) / bs;
        T_ += nq;
    }
    // Block ids: a shuffled permutation of a cache with a few spare blocks.
    const int NB = used + 5;
    std::vector<int> perm(NB);
    for (int i = 0; i < NB; ++i) perm[i] = i;
    auto shuffle_key = values(NB, 1.f);
    for (int i = NB - 1; i > 0; --i) std::swap(perm[i], perm[int((shuffle_key[i] + 1.f) / 2.f * float(i + 1)) % (i + 1)]);
    // The caches with one guard block on each side (must stay NaN: no write lands outside).
    const size_t row = size_t(KV) * D, blk_n = size_t(KV) * bs * D, cache_n = (size_t(NB) + 2) * blk_n;
    const T nan = Buf<T>::to(NAN);
    std::vector<T> kbuf(cache_n, nan), vbuf(cache_n, nan);
    T* kc = kbuf.data() + blk_n;
    T* vc = vbuf.data() + blk_n;
    std::vector<int> tables, tstart, ctxs, slots;
    std::vector<std::vector<double>> kl, vl;   // per sequence, logical [ctx][KV][D]
    auto q = conv<T>(values(size_t(T_) * H * D, 3.f));
    std::vector<T> knew_buf((size_t(T_) + 1) * row + 1), vnew_buf((size_t(T_) + 1) * row);
    T* knew = knew_buf.data() + (misalign ? 1 : 0);
    T* vnew = vnew_buf.data();
    auto at = [&](int blk, int h, int s) { return ((size_t(blk) * KV + h) * bs + s) * D; };
    int used_so_far = 0, t = 0;
    for (auto [ctx, nq] : seqs) {
        const int start = int(tables.size());
        for (int b = 0; b < (ctx + bs - 1) / bs; ++b) tables.push_back(perm[used_so_far++]);
        auto kv = conv<T>(values(size_t(ctx) * row, 1.f)), vv = conv<T>(values(size_t(ctx) * row, 1.f));
        kl.push_back(back(kv));
        vl.push_back(back(vv));
        for (int j = 0; j < ctx; ++j) {
            const int blk = tables[start + j / bs], s = j % bs;
            if (j < ctx - nq) {   // earlier steps' keys: already in the cache
                for (int h = 0; h < KV; ++h)
                    for (int c = 0; c < D; ++c) {
                        kc[at(blk, h, s) + c] = kv[size_t(j) * row + size_t(h) * D + c];
                        vc[at(blk, h, s) + c] = vv[size_t(j) * row + size_t(h) * D + c];
                    }
            } else {   // this step's query token t: its new K/V go through reshape_and_cache
                std::copy_n(&kv[size_t(j) * row], row, knew + size_t(t) * row);
                std::copy_n(&vv[size_t(j) * row], row, vnew + size_t(t) * row);
                tstart.push_back(start);
                ctxs.push_back(j + 1);
                slots.push_back(blk * bs + s);
                ++t;
            }
        }
    }
    // A padding token: slot -1, its (finite) K/V must not land anywhere.
    std::fill_n(knew + size_t(T_) * row, row, Buf<T>::to(7.f));
    std::fill_n(vnew + size_t(T_) * row, row, Buf<T>::to(7.f));
    slots.push_back(-1);
    // The expected cache: every query token's K/V in its slot.
    std::vector<T> kwant = kbuf, vwant = vbuf;
    for (int i = 0; i < T_; ++i) {
        const int blk = slots[i] / bs, s = slots[i] % bs;
        for (int h = 0; h < KV; ++h)
            for (int c = 0; c < D; ++c) {
                kwant[blk_n + at(blk, h, s) + c] = knew[size_t(i) * row + size_t(h) * D + c];
                vwant[blk_n + at(blk, h, s) + c] = vnew[size_t(i) * row + size_t(h) * D + c];
            }
    }
    emu_launch({unsigned(T_ + 1)}, {128}, [&] {
        if constexpr (std::is_same_v<T, float>) {
            kiln_reshape_and_cache_f32(knew, vnew, kc, vc, slots.data(), KV, D, lbs);
        } else {
            kiln_reshape_and_cache_f16(knew, vnew, kc, vc, slots.data(), KV, D, lbs);
        }
    });
    std::string ctx_list;
    for (auto [ctx, nq] : seqs) ctx_list += (ctx_list.empty() ? "" : ",") + std::to_string(ctx) + "/" + std::to_string(nq);
    const std::string what = std::string(Buf<T>::name) + " H" + std::to_string(H) + " KV" + std::to_string(KV) + " D" +
                             std::to_string(D) + " bs" + std::to_string(bs) + " T" + std::to_string(T_);
    const bool same = std::memcmp(kbuf.data(), kwant.data(), cache_n * sizeof(T)) == 0 &&
                      std::memcmp(vbuf.data(), vwant.data(), cache_n * sizeof(T)) == 0;
    std::printf("%s reshape_and_cache %s%s: %d slots + 1 padding token, cache %s\n", same ? "ok  " : "FAIL",
                what.c_str(), misalign ? " misaligned" : "", T_, same ? "bit-exact" : "differs");
    if (!same) ++failures;

    std::vector<T> out(q.size());
    const float scale = 1.f / std::sqrt(float(D));
    emu_launch({unsigned(T_ * H)}, {128}, [&] {
        auto f = [&](auto fn) {
            fn(q.data(), kc, vc, out.data(), tables.data(), tstart.data(), ctxs.data(), H, KV, lbs, scale);
        };
        if constexpr (std::is_same_v<T, float>) {
            f(D == 32 ? kiln_paged_attention_f32_d32 : D == 64 ? kiln_paged_attention_f32_d64
                      : D == 96 ? kiln_paged_attention_f32_d96 : kiln_paged_attention_f32_d128);
        } else {
            f(D == 32 ? kiln_paged_attention_f16_d32 : D == 64 ? kiln_paged_attention_f16_d64
                      : D == 96 ? kiln_paged_attention_f16_d96 : kiln_paged_attention_f16_d128);
        }
    });
    auto qd = back(q);
    std::vector<double> want(q.size(), 0.0);
    t = 0;
    for (size_t si = 0; si < seqs.size(); ++si) {
        const auto [ctx, nq] = seqs[si];
        for (int i = 0; i < nq; ++i, ++t) {
            const int n = ctx - nq + i + 1;   // keys 0..position
            for (int h = 0; h < H; ++h) {
                const int kh = h / (H / KV);
                const double* qr = &qd[(size_t(t) * H + h) * D];
                std::vector<double> l(n);
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < n; ++j) {
                    double dot = 0;
                    for (int c = 0; c < D; ++c) dot += qr[c] * kl[si][size_t(j) * row + size_t(kh) * D + c];
                    l[j] = dot * scale;
                    mx = std::max(mx, l[j]);
                }
                for (int j = 0; j < n; ++j) sum += std::exp(l[j] - mx);
                for (int c = 0; c < D; ++c) {
                    double acc = 0;
                    for (int j = 0; j < n; ++j) acc += std::exp(l[j] - mx) / sum * vl[si][size_t(j) * row + size_t(kh) * D + c];
                    want[(size_t(t) * H + h) * D + c] = acc;
                }
            }
        }
    }
    check("paged_attention " + what + " ctx/new " + ctx_list, back(out), want, Buf<T>::tol);
}

// ---- int8_gemm.cu ----
template <typename T>
static void int8_gemm(int M, int K, int N, bool trans) {
    auto a = conv<T>(values(size_t(M) * K, 1.f));
    auto ad = back(a);
    std::vector<signed char> w(size_t(K) * N);
    auto wf = values(w.size(), 127.f);
    for (size_t i = 0; i < w.size(); ++i) w[i] = (signed char)wf[i];
    auto sc = values(N, 0.01f);
    std::vector<T> out(size_t(M) * N);
    emu_launch({unsigned((N + 63) / 64), unsigned((M + 63) / 64)}, {256}, [&] {
        if constexpr (std::is_same_v<T, float>) {
            (trans ? kiln_int8_gemm_f32_nt : kiln_int8_gemm_f32_nn)(a.data(), w.data(), sc.data(), out.data(), M, N, K);
        } else {
            (trans ? kiln_int8_gemm_f16_nt : kiln_int8_gemm_f16_nn)(a.data(), w.data(), sc.data(), out.data(), M, N, K);
        }
    });
    std::vector<double> want(out.size());
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            double acc = 0;
            for (int k = 0; k < K; ++k)
                acc += ad[size_t(m) * K + k] * double(trans ? w[size_t(n) * K + k] : w[size_t(k) * N + n]) * sc[n];
            want[size_t(m) * N + n] = acc;
        }
    check(std::string("int8_gemm ") + Buf<T>::name + (trans ? " nt " : " nn ") + std::to_string(M) + "x" +
              std::to_string(K) + "x" + std::to_string(N),
          back(out), want, Buf<T>::tol);
}

// ---- permute.cu ----
// Units carry their own input index (in .x for the 16-byte units), so the output must equal the
// reference offsets exactly. `in_dims` row-major, output axis k = input axis perm[k]; `extra`
// pads the input's innermost stride (a strided, non-contiguous source).
template <typename U>
static void permute(const std::vector<unsigned>& in_dims, const std::vector<int>& perm, unsigned extra) {
    const int rank = int(in_dims.size());
    // Row-major strides, the innermost axis spread by 1 + extra.
    std::vector<unsigned> in_strides(rank);
    unsigned acc = 1 + extra;
    for (int k = rank - 1; k >= 0; --k) {
        in_strides[k] = k == rank - 1 ? 1 + extra : acc;
        acc *= in_dims[k];
    }
    const size_t in_len = size_t(in_strides[0]) * in_dims[0];
    std::vector<U> x(in_len);
    for (size_t i = 0; i < in_len; ++i) {
        if constexpr (std::is_same_v<U, uint4>) x[i] = uint4{unsigned(i), 7u, 8u, 9u};
        else x[i] = U(i);
    }
    KilnPermuteParams p{};
    unsigned total = 1;
    for (int k = 0; k < rank; ++k) {
        p.dims[k] = in_dims[perm[k]];
        p.strides[k] = in_strides[perm[k]];
        total *= p.dims[k];
    }
    std::vector<U> y(total);
    const unsigned blocks = std::clamp((total + 255) / 256, 1u, 32768u);
    emu_launch({blocks}, {256}, [&] {
        if constexpr (std::is_same_v<U, uint16_t>) kiln_permute_b2(x.data(), y.data(), total, rank, p);
        else if constexpr (std::is_same_v<U, uint32_t>) kiln_permute_b4(x.data(), y.data(), total, rank, p);
        else kiln_permute_b16(x.data(), y.data(), total, rank, p);
    });
    std::vector<double> want(total), got(total);
    for (unsigned i = 0; i < total; ++i) {
        unsigned rem = i, off = 0;
        for (int k = rank - 1; k >= 0; --k) {
            off += (rem % p.dims[k]) * p.strides[k];
            rem /= p.dims[k];
        }
        want[i] = off;
        if constexpr (std::is_same_v<U, uint4>) got[i] = y[i].x + (y[i].y != 7u ? 1e9 : 0.0);
        else got[i] = y[i];
    }
    std::string shape, order;
    for (int k = 0; k < rank; ++k) {
        shape += (k ? "x" : "") + std::to_string(in_dims[k]);
        order += std::to_string(perm[k]);
    }
    check("permute b" + std::to_string(sizeof(U)) + " " + shape + " perm " + order + (extra ? " strided" : ""), got,
          want, 0.0);
}

// ---- im2col.cu ----
// (n, c, h, w), kernel (kh, kw), stride, dilation, pads top/left/bottom/right, ones row.
template <typename T>
static void im2col(int n, int c, int h, int w, int kh, int kw, int sh, int sw, int dh, int dw, int pt, int pl, int pb,
                   int pr, int ones) {
    const int oh = (h + pt + pb - ((kh - 1) * dh + 1)) / sh + 1;
    const int ow = (w + pl + pr - ((kw - 1) * dw + 1)) / sw + 1;
    auto x = conv<T>(values(size_t(n) * c * h * w, 3.f));
    const int taps = c * kh * kw, rows = taps + ones, p = oh * ow;
    std::vector<T> col(size_t(n) * rows * p, Buf<T>::to(77.f));
    KilnIm2colParams g{c, h, w, kh, kw, oh, ow, sh, sw, dh, dw, pt, pl, ones};
    emu_launch({unsigned((p + 255) / 256), unsigned(rows), unsigned(n)}, {256}, [&] {
        if constexpr (std::is_same_v<T, float>) kiln_im2col_f32(x.data(), col.data(), g);
        else kiln_im2col_f16(x.data(), col.data(), g);
    });
    std::vector<double> want(col.size()), got(col.size());
    for (int b = 0; b < n; ++b)
        for (int k = 0; k < rows; ++k)
            for (int q = 0; q < p; ++q) {
                const size_t i = (size_t(b) * rows + k) * p + q;
                double v = 1.0;
                if (k < taps) {
                    const int ci = k / (kh * kw), ky = k / kw % kh, kx = k % kw;
                    const int iy = q / ow * sh - pt + ky * dh, ix = q % ow * sw - pl + kx * dw;
                    v = iy >= 0 && iy < h && ix >= 0 && ix < w ? Buf<T>::from(x[((size_t(b) * c + ci) * h + iy) * w + ix])
                                                               : 0.0;
                }
                want[i] = v;
                got[i] = Buf<T>::from(col[i]);
            }
    check("im2col " + std::string(Buf<T>::name) + " " + std::to_string(n) + "x" + std::to_string(c) + "x" +
              std::to_string(h) + "x" + std::to_string(w) + " k" + std::to_string(kh) + "x" + std::to_string(kw) +
              " s" + std::to_string(sh) + std::to_string(sw) + " d" + std::to_string(dh) + std::to_string(dw) +
              (ones ? " ones" : ""),
          got, want, 0.0);
}

template <typename T>
static void all() {
    for (bool rms : {false, true}) {
        layer_norm<T>(3, 33, rms, true);
        layer_norm<T>(2, 768, rms, true);
        layer_norm<T>(2, 40, rms, false);
        layer_norm<T>(4, 1, rms, true);
    }
    for (int act = 0; act < 4; ++act) {
        bias_act<T>(act, 14, 64, true, 0);
        bias_act<T>(act, 3, 37, true, 0);
        bias_act<T>(act, 5, 64, false, 1);
    }
    softmax<T>(2, 3, 5, 37, true, false, 0);
    softmax<T>(2, 3, 5, 37, false, true, 0);
    softmax<T>(1, 2, 3, 1, false, false, 0);
    softmax<T>(2, 1, 3, 1500, true, true, 700);
    attention<T>(2, 4, 2, 19, 45, 40, true, false, false);
    attention<T>(2, 2, 2, 21, 21, 32, false, true, false);
    attention<T>(3, 2, 1, 5, 70, 80, false, true, true);
    attention<T>(1, 3, 3, 17, 33, 128, true, true, false);
    // Context lengths 1, 15, 16, 17, 100, 300 (block edges at 16), decode tokens and prefill chunks.
    const std::vector<std::pair<int, int>> mixed = {{1, 1}, {15, 1}, {16, 2}, {17, 3}, {100, 1}, {300, 2}};
    paged_attention<T>(9, 3, 128, 16, mixed, false);
    paged_attention<T>(9, 3, 64, 16, mixed, true);
    paged_attention<T>(4, 4, 128, 16, mixed, false);
    paged_attention<T>(4, 4, 64, 16, mixed, false);
    // Other block sizes (smaller and larger than a warp step's 8 keys) and head dims 32, 96.
    paged_attention<T>(4, 2, 32, 4, {{5, 5}, {37, 1}, {9, 2}}, false);
    paged_attention<T>(6, 2, 96, 64, {{70, 1}, {130, 3}}, false);
    // 3x3 pad 1 (ones row), stride 2 with uneven pads, dilation 2, a 1-D conv (h = 1), 1x1, > 256 pixels.
    im2col<T>(2, 3, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1);
    im2col<T>(1, 2, 8, 7, 3, 3, 2, 2, 1, 1, 0, 1, 1, 0, 0);
    im2col<T>(1, 2, 9, 9, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2, 1);
    im2col<T>(2, 4, 1, 19, 1, 5, 1, 2, 1, 1, 0, 2, 0, 2, 0);
    im2col<T>(1, 5, 4, 6, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1);
    im2col<T>(1, 2, 20, 17, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0);
    int8_gemm<T>(37, 70, 65, false);
    int8_gemm<T>(5, 33, 130, true);
}

int main() {
    // Attention-head transposes (B, S, H, D) -> (B, H, S, D), a full reversal, rank 6, a strided source.
    permute<uint16_t>({2, 5, 3, 16}, {0, 2, 1, 3}, 0);
    permute<uint32_t>({3, 7, 5}, {2, 1, 0}, 0);
    permute<uint16_t>({2, 3, 2, 3, 2, 5}, {5, 0, 4, 1, 3, 2}, 0);
    permute<uint32_t>({4, 9}, {1, 0}, 2);
    permute<uint4>({2, 9, 3, 2}, {0, 2, 1, 3}, 0);
    permute<uint4>({5, 3}, {1, 0}, 0);
    all<float>();
    all<__half>();
    std::printf("%s\n", failures ? "FAILED" : "all kernels match the reference");
    return failures ? 1 : 0;
}
