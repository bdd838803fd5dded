//! Operator family `rnn`: RNN, GRU, LSTM.
//!
//! The input projection of every time step is one matmul over the whole sequence; each step then
//! runs whole-batch candle ops. Half-precision inputs are computed in f32.

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::{DType, TensorData};

use super::common::{tin, tin_opt};
use super::{kernel, NodeCtx, OpKernel, Registry};
use crate::fastmath::{self, f32_view, Func};
use crate::sgemm;
use crate::{bail, Result, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("RNN", |n| build(n, Kind::Rnn));
    r.add("GRU", |n| build(n, Kind::Gru));
    r.add("LSTM", |n| build(n, Kind::Lstm));
    r.add_domain("com.microsoft", "DynamicQuantizeLSTM", dynamic_quantize_lstm);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rnn,
    Gru,
    Lstm,
}

impl Kind {
    fn gates(self) -> usize {
        match self {
            Kind::Rnn => 1,
            Kind::Gru => 3,
            Kind::Lstm => 4,
        }
    }
    fn default_acts(self) -> &'static [&'static str] {
        match self {
            Kind::Rnn => &["Tanh"],
            Kind::Gru => &["Sigmoid", "Tanh"],
            Kind::Lstm => &["Sigmoid", "Tanh", "Tanh"],
        }
    }
}

#[derive(Clone, Copy)]
enum ActKind {
    Relu,
    Tanh,
    Sigmoid,
    Affine,
    LeakyRelu,
    ThresholdedRelu,
    ScaledTanh,
    HardSigmoid,
    Elu,
    Softsign,
    Softplus,
}

#[derive(Clone, Copy)]
struct Act {
    kind: ActKind,
    alpha: f64,
    beta: f64,
}

impl Act {
    fn apply(&self, x: &CT) -> candle_core::Result<CT> {
        let (a, b) = (self.alpha, self.beta);
        match self.kind {
            ActKind::Relu => x.relu(),
            ActKind::Tanh => x.tanh(),
            ActKind::Sigmoid => x.neg()?.exp()?.affine(1.0, 1.0)?.recip(),
            ActKind::Affine => x.affine(a, b),
            ActKind::LeakyRelu => {
                let pos = x.relu()?;
                let neg = x.sub(&pos)?;
                pos.add(&neg.affine(a, 0.0)?)
            }
            ActKind::ThresholdedRelu => {
                let m = x.gt(a)?;
                m.where_cond(x, &x.zeros_like()?)
            }
            ActKind::ScaledTanh => x.affine(b, 0.0)?.tanh()?.affine(a, 0.0),
            ActKind::HardSigmoid => x.affine(a, b)?.clamp(0.0, 1.0),
            ActKind::Elu => {
                let m = x.ge(0.0)?;
                let e = x.exp()?.affine(a, -a)?;
                m.where_cond(x, &e)
            }
            ActKind::Softsign => x.div(&x.abs()?.affine(1.0, 1.0)?),
            ActKind::Softplus => {
                // log(1 + exp(x)), stable: max(x,0) + log(1 + exp(-|x|))
                let r = x.relu()?;
                r.add(&x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)
            }
        }
    }
}

fn parse_act(name: &str, alphas: &[f32], betas: &[f32], ai: &mut usize, bi: &mut usize) -> Option<Act> {
    let lower = name.to_ascii_lowercase();
    // (kind, needs alpha, needs beta, default alpha, default beta)
    let (kind, na, nb, da, db) = match lower.as_str() {
        "relu" => (ActKind::Relu, false, false, 0.0, 0.0),
        "tanh" => (ActKind::Tanh, false, false, 0.0, 0.0),
        "sigmoid" => (ActKind::Sigmoid, false, false, 0.0, 0.0),
        "affine" => (ActKind::Affine, true, true, 1.0, 0.0),
        "leakyrelu" => (ActKind::LeakyRelu, true, false, 0.01, 0.0),
        "thresholdedrelu" => (ActKind::ThresholdedRelu, true, false, 1.0, 0.0),
        "scaledtanh" => (ActKind::ScaledTanh, true, true, 1.0, 1.0),
        "hardsigmoid" => (ActKind::HardSigmoid, true, true, 0.2, 0.5),
        "elu" => (ActKind::Elu, true, false, 1.0, 0.0),
        "softsign" => (ActKind::Softsign, false, false, 0.0, 0.0),
        "softplus" => (ActKind::Softplus, false, false, 0.0, 0.0),
        _ => return None,
    };
    let mut alpha = da;
    let mut beta = db;
    if na {
        if let Some(v) = alphas.get(*ai) {
            alpha = *v as f64;
            *ai += 1;
        }
    }
    if nb {
        if let Some(v) = betas.get(*bi) {
            beta = *v as f64;
            *bi += 1;
        }
    }
    Some(Act { kind, alpha, beta })
}

struct Cfg {
    kind: Kind,
    /// `reverse` flag per direction.
    dirs: Vec<bool>,
    /// Activations per direction.
    acts: Vec<Vec<Act>>,
    clip: Option<f64>,
    hidden: Option<usize>,
    layout: i64,
    linear_before_reset: bool,
    input_forget: bool,
    /// Allow the plain-loop f32 LSTM (tests turn it off to compare against the candle-op path).
    fast: bool,
}

fn build(n: &NodeCtx, kind: Kind) -> Result<Box<dyn OpKernel>> {
    let cfg = parse_cfg(n, kind)?;
    let packs = match (n.const_input(1), n.const_input(2)) {
        (Some(w), Some(r)) if n.options.device.is_cpu() => match (w.values::<f32>(), r.values::<f32>()) {
            (Some(wv), Some(rv)) => pack_weights(&cfg, &w.dims, &wv, &r.dims, &rv),
            _ => None,
        },
        _ => None,
    };
    let held: usize = packs.iter().flatten().map(DirPack::bytes).sum();
    n.note_held_bytes(held);
    Ok(kernel(move |_, ins| run_packed(&cfg, ins, packs.as_deref())))
}

/// One direction's constant weights packed for the f32 GEMM at plan time: `W^T` (`[input,
/// gates*H]`), `R^T` (all gates; for a GRU without `linear_before_reset` only z and r) and, for
/// that GRU, `R_h^T` apart (its product needs `r * h`, known only after the first one).
struct DirPack {
    w: sgemm::PackedB,
    r: sgemm::PackedB,
    rh: Option<sgemm::PackedB>,
}

impl DirPack {
    fn bytes(&self) -> usize {
        self.w.bytes() + self.r.bytes() + self.rh.as_ref().map_or(0, sgemm::PackedB::bytes)
    }
}

/// Packs `W` (`[dirs, gates*H, input]`) and `R` (`[dirs, gates*H, H]`) per direction for the
/// plain-loop LSTM/GRU; `None` when the packed GEMM is unavailable, the node is not an LSTM/GRU or
/// the shapes do not fit (the run-time checks then report them).
fn pack_weights(cfg: &Cfg, wd: &[usize], w: &[f32], rd: &[usize], r: &[f32]) -> Option<Vec<DirPack>> {
    if !sgemm::available() || cfg.kind == Kind::Rnn || !cfg.fast {
        return None;
    }
    let nd = cfg.dirs.len();
    let (&[wn, wg, wi], &[rn, rg, h]) = (wd, rd) else {
        return None;
    };
    let g = cfg.kind.gates();
    if wn != nd || rn != nd || wg != g * h || rg != g * h || wi == 0 || h == 0 {
        return None;
    }
    // Rows [from, to) of a direction's row-major [gates*H, cols] weight, transposed: [cols, to - from].
    let pack_t = |m: &[f32], cols: usize, from: usize, to: usize| {
        sgemm::PackedB::pack(sgemm::MatRef {
            data: &m[from * cols..to * cols],
            rows: cols,
            cols: to - from,
            rs: 1,
            cs: cols,
        })
        .ok()
    };
    let split = cfg.kind == Kind::Gru && !cfg.linear_before_reset;
    (0..nd)
        .map(|d| {
            let wdir = &w[d * wg * wi..(d + 1) * wg * wi];
            let rdir = &r[d * rg * h..(d + 1) * rg * h];
            Some(DirPack {
                w: pack_t(wdir, wi, 0, wg)?,
                r: pack_t(rdir, h, 0, if split { 2 * h } else { rg })?,
                rh: if split { Some(pack_t(rdir, h, 2 * h, rg)?) } else { None },
            })
        })
        .collect()
}

fn parse_cfg(n: &NodeCtx, kind: Kind) -> Result<Cfg> {
    let direction = n.attr_s("direction", "forward")?;
    let dirs = match direction.as_str() {
        "forward" => vec![false],
        "reverse" => vec![true],
        "bidirectional" => vec![false, true],
        d => return Err(n.err(format!("unknown direction '{d}'"))),
    };
    let nacts = kind.default_acts().len();
    let names: Vec<String> = match n.attr("activations") {
        Some(kiln_graph::Attribute::Strings(v)) => v.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect(),
        Some(_) => return Err(n.err("attribute 'activations' should be strings")),
        None => kind.default_acts().iter().map(|s| s.to_string()).collect(),
    };
    let alphas = n.attr_floats("activation_alpha")?.unwrap_or_default();
    let betas = n.attr_floats("activation_beta")?.unwrap_or_default();
    let (mut ai, mut bi) = (0, 0);
    let mut parsed = Vec::with_capacity(names.len());
    for name in &names {
        parsed.push(
            parse_act(name, &alphas, &betas, &mut ai, &mut bi)
                .ok_or_else(|| n.err(format!("unsupported activation '{name}'")))?,
        );
    }
    let mut acts = Vec::new();
    for d in 0..dirs.len() {
        let start = if parsed.len() >= nacts * (d + 1) { nacts * d } else { 0 };
        if parsed.len() < start + nacts {
            return Err(n.err(format!(
                "expected {} activations, found {}",
                nacts * dirs.len(),
                parsed.len()
            )));
        }
        acts.push(parsed[start..start + nacts].to_vec());
    }
    let clip = n.attr_f_opt("clip")?.map(f64::from);
    if let Some(c) = clip {
        if c.is_nan() || c < 0.0 {
            return Err(n.err("clip must be nonnegative"));
        }
    }
    let hidden = match n.attr_i_opt("hidden_size")? {
        Some(h) if h <= 0 => return Err(n.err("hidden_size must be positive")),
        Some(h) => Some(h as usize),
        None => None,
    };
    let layout = n.attr_i("layout", 0)?;
    if layout != 0 && layout != 1 {
        return Err(n.err(format!("layout {layout} is not supported")));
    }
    let cfg = Cfg {
        kind,
        dirs,
        acts,
        clip,
        hidden,
        layout,
        linear_before_reset: n.attr_i("linear_before_reset", 0)? != 0,
        input_forget: n.attr_i("input_forget", 0)? != 0,
        fast: true,
    };
    Ok(cfg)
}

/// `com.microsoft::DynamicQuantizeLSTM` (ONNX Runtime's quantizer writes it for every LSTM with
/// constant weights): an LSTM whose `W` (`[dirs, input, 4*hidden]`) and `R` (`[dirs, hidden,
/// 4*hidden]`), transposed against ONNX's LSTM, are 8-bit with scales and zero points per direction
/// or per gate column (inputs 8-11: `W_scale`, `W_zero_point`, `R_scale`, `R_zero_point`). Kiln
/// dequantizes the weights to f32 (once, at plan time, when they are constants) and runs the f32
/// LSTM; ONNX Runtime also quantizes the activations of each product, so the two agree to that
/// rounding (cosine >= 0.999 on the tested models), not bit for bit.
fn dynamic_quantize_lstm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let cfg = parse_cfg(n, Kind::Lstm)?;
    let device = n.options.device.clone();
    let planned = |q: usize, s: usize, z: usize| -> Result<Option<Value>> {
        let (Some(qd), Some(sd)) = (n.const_input(q), n.const_input(s)) else {
            return Ok(None);
        };
        let zd = match n.has_input(z) {
            true => match n.const_input(z) {
                Some(zd) => Some(zd),
                None => return Ok(None),
            },
            false => None,
        };
        let w = dequantize_gate_weight(qd, sd, zd).map_err(|e| n.err(e.to_string()))?;
        Ok(Some(Value::Tensor(w.to_device(&device)?)))
    };
    let planned_w = planned(1, 8, 9)?;
    let planned_r = planned(2, 10, 11)?;
    let packs = match (&planned_w, &planned_r) {
        (Some(Value::Tensor(w)), Some(Value::Tensor(r))) if device.is_cpu() => {
            let (wv, rv) = (f32_view(w.candle()), f32_view(r.candle()));
            match (wv, rv) {
                (Some(wv), Some(rv)) => pack_weights(&cfg, w.dims(), wv.slice(), r.dims(), rv.slice()),
                _ => None,
            }
        }
        _ => None,
    };
    Ok(kernel(move |_, ins| {
        let runtime = |q: usize, s: usize, z: usize| -> Result<Value> {
            let data = |i: usize, what: &str| -> Result<TensorData> { tin(ins, i)?.to_data(what) };
            let zd = match tin_opt(ins, z)? {
                Some(t) => Some(t.to_data("zero_point")?),
                None => None,
            };
            let w = dequantize_gate_weight(&data(q, "weight")?, &data(s, "scale")?, zd.as_ref())?;
            Ok(Value::Tensor(w.to_device(tin(ins, 0)?.device())?))
        };
        let w = match &planned_w {
            Some(w) => w.clone(),
            None => runtime(1, 8, 9)?,
        };
        let r = match &planned_r {
            Some(r) => r.clone(),
            None => runtime(2, 10, 11)?,
        };
        let mut lstm_ins: Vec<Option<&Value>> = ins.iter().take(8).copied().collect();
        lstm_ins.resize(8, None);
        lstm_ins[1] = Some(&w);
        lstm_ins[2] = Some(&r);
        run_packed(&cfg, &lstm_ins, packs.as_deref())
    }))
}

/// An 8-bit `[dirs, rows, cols]` weight with a scale and zero point per tensor, per direction
/// (`[dirs]`) or per column (`[dirs, cols]`), as f32 `[dirs, cols, rows]`: `(q - zero_point) *
/// scale`, transposed into ONNX LSTM's layout.
fn dequantize_gate_weight(q: &TensorData, scale: &TensorData, zp: Option<&TensorData>) -> Result<Tensor> {
    let [nd, rows, cols] = q.dims[..] else {
        bail!("quantized LSTM weight should be 3-D, found dims {:?}", q.dims);
    };
    let values: Vec<i32> = match q.dtype {
        DType::I8 => q.bytes().iter().map(|&b| b as i8 as i32).collect(),
        DType::U8 => q.bytes().iter().map(|&b| b as i32).collect(),
        other => bail!("quantized LSTM weight should be int8 or uint8, found {other}"),
    };
    let Some(scales) = scale.values::<f32>() else {
        bail!("LSTM weight scale should be float32, found {}", scale.dtype);
    };
    let zps: Vec<i64> = match zp {
        Some(z) => match z.to_i64_vec() {
            Some(v) if z.dtype == q.dtype => v,
            _ => bail!(
                "LSTM weight zero point should be {} like the weight, found {}",
                q.dtype,
                z.dtype
            ),
        },
        None => vec![0],
    };
    // Index of (direction, column) into a per-tensor / per-direction / per-column parameter.
    let at = |len: usize, what: &str| -> Result<Box<dyn Fn(usize, usize) -> usize>> {
        Ok(match len {
            1 => Box::new(|_, _| 0),
            l if l == nd => Box::new(|d, _| d),
            l if l == nd * cols => Box::new(move |d, c| d * cols + c),
            l => bail!("LSTM weight {what} has {l} values for {nd} direction(s) of {cols} columns"),
        })
    };
    let (si, zi) = (at(scales.len(), "scale")?, at(zps.len(), "zero point")?);
    let mut out = vec![0f32; nd * rows * cols];
    for d in 0..nd {
        for r in 0..rows {
            let src = &values[(d * rows + r) * cols..(d * rows + r + 1) * cols];
            for (c, &v) in src.iter().enumerate() {
                let z = zps[zi(d, c)] as i32;
                out[(d * cols + c) * rows + r] = (v - z) as f32 * scales[si(d, c)];
            }
        }
    }
    Tensor::new(
        CT::from_vec(out, (nd, cols, rows), &candle_core::Device::Cpu)?,
        DType::F32,
    )
}

fn compute_dtype(dt: DType) -> Result<CDType> {
    Ok(match dt {
        DType::F64 => CDType::F64,
        DType::F32 | DType::F16 | DType::BF16 => CDType::F32,
        other => bail!("RNN ops expect float inputs, found {other}"),
    })
}

/// Index map that reverses each batch's first `len[b]` steps (an involution on `(S, B)` rows).
fn reverse_index(s: usize, lens: &[usize]) -> Vec<u32> {
    let b = lens.len();
    let mut v = Vec::with_capacity(s * b);
    for t in 0..s {
        for (bi, &l) in lens.iter().enumerate() {
            let src = if t < l { l - 1 - t } else { t };
            v.push((src * b + bi) as u32);
        }
    }
    v
}

#[cfg(test)]
fn run(cfg: &Cfg, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    run_packed(cfg, ins, None)
}

fn run_packed(cfg: &Cfg, ins: &[Option<&Value>], packs: Option<&[DirPack]>) -> Result<Vec<Value>> {
    let kind = cfg.kind;
    let x = tin(ins, 0)?;
    let w = tin(ins, 1)?;
    let r = tin(ins, 2)?;
    let bias = tin_opt(ins, 3)?;
    let seq_lens = tin_opt(ins, 4)?;
    let h0 = tin_opt(ins, 5)?;
    let (c0, p) = if kind == Kind::Lstm {
        (tin_opt(ins, 6)?, tin_opt(ins, 7)?)
    } else {
        (None, None)
    };
    let dt = x.dtype();
    let cd = compute_dtype(dt)?;
    let conv = |t: &Tensor| -> Result<CT> { Ok(t.candle().to_dtype(cd)?) };
    let mut xc = conv(x)?;
    if xc.rank() != 3 {
        bail!("X must be 3-D");
    }
    if cfg.layout == 1 {
        xc = xc.transpose(0, 1)?.contiguous()?;
    }
    let (s, b, isz) = xc.dims3()?;
    let nd = cfg.dirs.len();
    let g = kind.gates();
    let (wd, wg, wi) = w.candle().dims3()?;
    let (rd, rg, hsz) = r.candle().dims3()?;
    if let Some(h) = cfg.hidden {
        if h != hsz {
            bail!("hidden_size {h} does not match R's last dimension {hsz}");
        }
    }
    if wd != nd || rd != nd || wg != g * hsz || rg != g * hsz || wi != isz {
        bail!(
            "weight shapes W {:?} / R {:?} do not match {nd} directions, {g} gates, hidden {hsz}, input {isz}",
            w.dims(),
            r.dims()
        );
    }
    let wc = conv(w)?;
    let rc = conv(r)?;
    let bc = match bias {
        Some(bt) => {
            if bt.dims() != [nd, 2 * g * hsz] {
                bail!("B shape {:?} should be [{nd}, {}]", bt.dims(), 2 * g * hsz);
            }
            conv(bt)?
        }
        None => CT::zeros((nd, 2 * g * hsz), cd, xc.device())?,
    };
    let state = |t: Option<&Tensor>, what: &str| -> Result<CT> {
        match t {
            Some(t) => {
                let mut c = conv(t)?;
                if cfg.layout == 1 && c.rank() == 3 {
                    c = c.transpose(0, 1)?.contiguous()?;
                }
                if c.dims() != [nd, b, hsz] {
                    bail!("{what} shape {:?} should be [{nd}, {b}, {hsz}]", t.dims());
                }
                Ok(c)
            }
            None => Ok(CT::zeros((nd, b, hsz), cd, xc.device())?),
        }
    };
    let h0c = state(h0, "initial_h")?;
    let c0c = state(c0, "initial_c")?;
    let pc = match p {
        Some(pt) => {
            if pt.dims() != [nd, 3 * hsz] {
                bail!("P shape {:?} should be [{nd}, {}]", pt.dims(), 3 * hsz);
            }
            Some(conv(pt)?)
        }
        None => None,
    };
    let lens: Vec<usize> = match seq_lens {
        Some(sl) => {
            let v = sl.to_i64_vec()?;
            if v.len() != b {
                bail!("sequence_lens has {} entries for batch size {b}", v.len());
            }
            v.into_iter()
                .map(|l| {
                    if l < 0 || l as usize > s {
                        bail!("sequence length {l} is out of range 0..={s}");
                    }
                    Ok(l as usize)
                })
                .collect::<Result<_>>()?
        }
        None => vec![s; b],
    };
    if b == 0 || hsz == 0 || isz == 0 {
        bail!("RNN ops need a nonempty batch, input size and hidden size");
    }
    let operands = Operands {
        dims: (s, b, isz, hsz),
        x: &xc,
        w: &wc,
        r: &rc,
        bias: &bc,
        h0: &h0c,
        c0: &c0c,
        p: pc.as_ref(),
        lens: &lens,
    };
    if let Some(outs) = recurrent_f32(cfg, dt, &operands, packs)? {
        return Ok(outs);
    }
    let masked = lens.iter().any(|&l| l < s);
    // masks[t]: (B, H) u8, 1 where step t is valid for the batch entry.
    let masks: Option<Vec<CT>> = if masked {
        let mut v = Vec::with_capacity(s);
        for t in 0..s {
            let m: Vec<u8> = lens.iter().map(|&l| (t < l) as u8).collect();
            v.push(
                CT::from_vec(m, (b, 1), xc.device())?
                    .broadcast_as((b, hsz))?
                    .contiguous()?,
            );
        }
        Some(v)
    } else {
        None
    };

    let mut ys = Vec::with_capacity(nd);
    let mut hs = Vec::with_capacity(nd);
    let mut cs = Vec::with_capacity(nd);
    for (d, &rev) in cfg.dirs.iter().enumerate() {
        let idx = if rev {
            Some(CT::from_vec(reverse_index(s, &lens), s * b, xc.device())?)
        } else {
            None
        };
        let x2 = xc.reshape((s * b, isz))?;
        let xd = match &idx {
            Some(i) => x2.index_select(i, 0)?,
            None => x2,
        };
        let bd = bc.get(d)?;
        let wb = bd.narrow(0, 0, g * hsz)?;
        let rb = bd.narrow(0, g * hsz, g * hsz)?;
        let xw = xd
            .matmul(&wc.get(d)?.t()?.contiguous()?)?
            .broadcast_add(&wb)?
            .reshape((s, b, g * hsz))?;
        let rd = rc.get(d)?;
        let rt = rd.t()?.contiguous()?;
        let acts = &cfg.acts[d];
        let clip = |t: CT| -> Result<CT> {
            match cfg.clip {
                Some(c) => Ok(t.clamp(-c, c)?),
                None => Ok(t),
            }
        };
        let mut h = h0c.get(d)?;
        let mut c = c0c.get(d)?;
        let peep = match &pc {
            Some(p) => {
                let pd = p.get(d)?;
                Some((
                    pd.narrow(0, 0, hsz)?.unsqueeze(0)?,
                    pd.narrow(0, hsz, hsz)?.unsqueeze(0)?,
                    pd.narrow(0, 2 * hsz, hsz)?.unsqueeze(0)?,
                ))
            }
            None => None,
        };
        let mut y = Vec::with_capacity(s);
        for t in 0..s {
            let xt = xw.get(t)?;
            let (h_new, c_new) = match kind {
                Kind::Rnn => {
                    let pre = xt.add(&h.matmul(&rt)?)?.broadcast_add(&rb)?;
                    (acts[0].apply(&clip(pre)?)?, None)
                }
                Kind::Gru => {
                    let (f, gg) = (&acts[0], &acts[1]);
                    let hr = h.matmul(&rt)?;
                    let zr = xt
                        .narrow(1, 0, 2 * hsz)?
                        .add(&hr.narrow(1, 0, 2 * hsz)?)?
                        .broadcast_add(&rb.narrow(0, 0, 2 * hsz)?)?;
                    let zr = f.apply(&clip(zr)?)?;
                    let z = zr.narrow(1, 0, hsz)?;
                    let rg = zr.narrow(1, hsz, hsz)?;
                    let rbh = rb.narrow(0, 2 * hsz, hsz)?;
                    let xh = xt.narrow(1, 2 * hsz, hsz)?;
                    let pre = if cfg.linear_before_reset {
                        let hh = hr.narrow(1, 2 * hsz, hsz)?.broadcast_add(&rbh)?;
                        xh.add(&rg.mul(&hh)?)?
                    } else {
                        let rh_t = rd.narrow(0, 2 * hsz, hsz)?.t()?.contiguous()?;
                        xh.add(&rg.mul(&h)?.matmul(&rh_t)?)?.broadcast_add(&rbh)?
                    };
                    let hh = gg.apply(&clip(pre)?)?;
                    // (1 - z) * hh + z * h = hh + z * (h - hh)
                    (hh.add(&z.mul(&h.sub(&hh)?)?)?, None)
                }
                Kind::Lstm => {
                    let (f, gg, hf) = (&acts[0], &acts[1], &acts[2]);
                    let gates = xt.add(&h.matmul(&rt)?)?.broadcast_add(&rb)?;
                    let gi = gates.narrow(1, 0, hsz)?;
                    let go = gates.narrow(1, hsz, hsz)?;
                    let gf = gates.narrow(1, 2 * hsz, hsz)?;
                    let gc = gates.narrow(1, 3 * hsz, hsz)?;
                    let (gi, gf) = match &peep {
                        Some((pi, _, pf)) => (gi.add(&c.broadcast_mul(pi)?)?, gf.add(&c.broadcast_mul(pf)?)?),
                        None => (gi, gf),
                    };
                    let i = f.apply(&clip(gi)?)?;
                    let fg = if cfg.input_forget {
                        i.affine(-1.0, 1.0)?
                    } else {
                        f.apply(&clip(gf)?)?
                    };
                    let cc = gg.apply(&clip(gc)?)?;
                    let c_new = fg.mul(&c)?.add(&i.mul(&cc)?)?;
                    let go = match &peep {
                        Some((_, po, _)) => go.add(&c_new.broadcast_mul(po)?)?,
                        None => go,
                    };
                    let o = f.apply(&clip(go)?)?;
                    (o.mul(&hf.apply(&c_new)?)?, Some(c_new))
                }
            };
            match &masks {
                Some(ms) => {
                    let m = &ms[t];
                    let zeros = h_new.zeros_like()?;
                    y.push(m.where_cond(&h_new, &zeros)?);
                    h = m.where_cond(&h_new, &h)?;
                    if let Some(cn) = c_new {
                        c = m.where_cond(&cn, &c)?;
                    }
                }
                None => {
                    y.push(h_new.clone());
                    h = h_new;
                    if let Some(cn) = c_new {
                        c = cn;
                    }
                }
            }
        }
        let yd = if s == 0 {
            CT::zeros((0, b, hsz), cd, xc.device())?
        } else {
            CT::stack(&y, 0)?
        };
        let yd = match &idx {
            Some(i) => yd.reshape((s * b, hsz))?.index_select(i, 0)?.reshape((s, b, hsz))?,
            None => yd,
        };
        ys.push(yd);
        hs.push(h);
        cs.push(c);
    }
    let mut y = CT::stack(&ys, 1)?; // (S, dirs, B, H)
    let mut yh = CT::stack(&hs, 0)?; // (dirs, B, H)
    let mut yc = CT::stack(&cs, 0)?;
    if cfg.layout == 1 {
        y = y.permute((2, 0, 1, 3))?.contiguous()?;
        yh = yh.transpose(0, 1)?.contiguous()?;
        yc = yc.transpose(0, 1)?.contiguous()?;
    }
    let out = |t: CT| -> Result<Value> {
        Ok(Value::Tensor(Tensor::new(
            t.to_dtype(crate::tensor::storage_dtype(dt)?)?,
            dt,
        )?))
    };
    let mut outs = vec![out(y)?, out(yh)?];
    if kind == Kind::Lstm {
        outs.push(out(yc)?);
    }
    Ok(outs)
}

/// Rows of `x` (`n` x `k`) times a weight packed at plan time (`k` x `m`): `n` x `m`. A few rows
/// take [`project`]'s matrix-vector products over the row-major weight `w_rows` (measured faster
/// for one row: 0.39 against 0.55 ms for a bidirectional GRU of hidden 256 over 16 steps).
fn project_packed(x: &[f32], n: usize, k: usize, w: &sgemm::PackedB, w_rows: &[f32]) -> Result<Vec<f32>> {
    if n <= 4 {
        let mut out = vec![0f32; n * w.n()];
        for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(w.n())) {
            fastmath::gemv(w_rows, k, row, o);
        }
        return Ok(out);
    }
    let mut out = vec![0f32; n * w.n()];
    sgemm::gemm_packed_b(
        sgemm::MatRef::row_major(&x[..n * k], n, k),
        w,
        sgemm::Bias::None,
        &mut out,
        w.n(),
    )
    .map_err(|e| crate::RuntimeError::msg(e.to_string()))?;
    Ok(out)
}

/// Rows of `x` (`n` x `k`) times the transpose of `w` (`m` x `k`, row-major; `w_ct` is the same
/// matrix as a tensor): `n` x `m`. A few rows go through [`fastmath::gemv`]; more through gemm.
fn project(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, w_ct: &CT) -> Result<Vec<f32>> {
    if n <= 4 {
        let mut out = vec![0f32; n * m];
        for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
            fastmath::gemv(w, k, row, o);
        }
        return Ok(out);
    }
    let a = CT::from_slice(x, (n, k), w_ct.device())?;
    Ok(a.matmul(&w_ct.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The f32 tensors of one recurrent node, shared by the plain-loop paths.
struct Operands<'a> {
    dims: (usize, usize, usize, usize),
    x: &'a CT,
    w: &'a CT,
    r: &'a CT,
    bias: &'a CT,
    h0: &'a CT,
    c0: &'a CT,
    p: Option<&'a CT>,
    lens: &'a [usize],
}

/// One direction's result: `y` as `[S, B, H]` and the final hidden (and, for LSTM, cell) state.
type DirOut = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Runs `dir` for each direction (both at once on the thread pool when bidirectional) and
/// assembles ONNX's outputs: `Y` `[S, dirs, B, H]`, `Y_h` and (with `cell`) `Y_c` `[dirs, B, H]`.
fn per_direction(
    nd: usize,
    dims: (usize, usize, usize, usize),
    dt: DType,
    dev: &candle_core::Device,
    cell: bool,
    dir: impl Fn(usize) -> Result<DirOut> + Sync,
) -> Result<Vec<Value>> {
    let (s, b, _, hsz) = dims;
    let outs: Vec<DirOut> = if nd == 2 {
        let (a, c) = rayon::join(|| dir(0), || dir(1));
        vec![a?, c?]
    } else {
        (0..nd).map(&dir).collect::<Result<_>>()?
    };
    let bh = b * hsz;
    let mut y = vec![0f32; s * nd * bh];
    let mut yh = Vec::with_capacity(nd * bh);
    let mut yc = Vec::with_capacity(nd * bh);
    for (d, (yd, h, c)) in outs.into_iter().enumerate() {
        for t in 0..s {
            y[(t * nd + d) * bh..(t * nd + d + 1) * bh].copy_from_slice(&yd[t * bh..(t + 1) * bh]);
        }
        yh.extend_from_slice(&h);
        yc.extend_from_slice(&c);
    }
    let out = |v: Vec<f32>, dims: &[usize]| -> Result<Value> {
        Ok(Value::Tensor(Tensor::new(CT::from_vec(v, dims, dev)?, dt)?))
    };
    let mut v = vec![out(y, &[s, nd, b, hsz])?, out(yh, &[nd, b, hsz])?];
    if cell {
        v.push(out(yc, &[nd, b, hsz])?);
    }
    Ok(v)
}

/// Whether every direction uses exactly these activations.
fn acts_are(cfg: &Cfg, kinds: &[ActKind]) -> bool {
    cfg.acts.iter().all(|a| {
        a.len() == kinds.len()
            && a.iter()
                .zip(kinds)
                .all(|(a, k)| std::mem::discriminant(&a.kind) == std::mem::discriminant(k))
    })
}

/// Clamps to `[-clip, clip]` when the node has a clip.
fn clip_slice(clip: Option<f64>, v: &mut [f32]) {
    if let Some(c) = clip {
        let c = c as f32;
        v.iter_mut().for_each(|e| *e = e.clamp(-c, c));
    }
}

/// LSTM and GRU on f32 CPU tensors with the default activations and layout 0, as plain loops: one
/// projection of the whole input sequence, then per step a matrix-vector (or, for larger batches,
/// gemm) product with R and the gate arithmetic in place; the two directions of a bidirectional
/// node run at once. The candle-op path below costs ~20 tensor allocations per step, which
/// dominated small recurrent models (Silero VAD: one step, hidden 128; a bidirectional GRU of
/// hidden 256 took ~1 ms per node). `None` when the node or its tensors do not qualify.
fn recurrent_f32(cfg: &Cfg, dt: DType, o: &Operands, packs: Option<&[DirPack]>) -> Result<Option<Vec<Value>>> {
    use ActKind::{Sigmoid, Tanh};
    let qualifies = match cfg.kind {
        Kind::Lstm => !cfg.input_forget && acts_are(cfg, &[Sigmoid, Tanh, Tanh]),
        Kind::Gru => acts_are(cfg, &[Sigmoid, Tanh]),
        Kind::Rnn => false,
    };
    if !cfg.fast || !qualifies || cfg.layout != 0 || dt != DType::F32 {
        return Ok(None);
    }
    let views = (
        f32_view(o.x),
        f32_view(o.w),
        f32_view(o.r),
        f32_view(o.bias),
        f32_view(o.h0),
        f32_view(o.c0),
    );
    let (Some(xv), Some(wv), Some(rv), Some(bv), Some(h0v), Some(c0v)) = views else {
        return Ok(None);
    };
    let pv = match o.p.map(f32_view) {
        Some(None) => return Ok(None),
        other => other.flatten(),
    };
    let sl = Slices {
        x: xv.slice(),
        w: wv.slice(),
        r: rv.slice(),
        bias: bv.slice(),
        h0: h0v.slice(),
        c0: c0v.slice(),
        p: pv.as_ref().map(|v| v.slice()),
    };
    let nd = cfg.dirs.len();
    let dev = o.x.device();
    let (_, _, isz, hsz) = o.dims;
    // Packed weights whose shapes are not this run's (they come from the same constants, so this
    // only guards against a mismatch the run-time checks already reject) are not used.
    let rows_r = if cfg.kind == Kind::Gru && !cfg.linear_before_reset {
        2
    } else {
        cfg.kind.gates()
    };
    let packs = packs.filter(|p| {
        p.len() == nd
            && p.iter()
                .all(|dp| (dp.w.k(), dp.w.n(), dp.r.k(), dp.r.n()) == (isz, cfg.kind.gates() * hsz, hsz, rows_r * hsz))
    });
    let pack = |d: usize| packs.map(|p| &p[d]);
    Ok(Some(match cfg.kind {
        Kind::Lstm => per_direction(nd, o.dims, dt, dev, true, |d| lstm_direction(cfg, o, &sl, d, pack(d)))?,
        _ => per_direction(nd, o.dims, dt, dev, false, |d| gru_direction(cfg, o, &sl, d, pack(d)))?,
    }))
}

struct Slices<'a> {
    x: &'a [f32],
    w: &'a [f32],
    r: &'a [f32],
    bias: &'a [f32],
    h0: &'a [f32],
    c0: &'a [f32],
    p: Option<&'a [f32]>,
}

/// One LSTM direction: gate order i, o, f, c; peepholes `P = [p_i, p_o, p_f]`.
fn lstm_direction(cfg: &Cfg, o: &Operands, sl: &Slices, d: usize, pack: Option<&DirPack>) -> Result<DirOut> {
    let (s, b, isz, hsz) = o.dims;
    let rev = cfg.dirs[d];
    let g4 = 4 * hsz;
    let wd = &sl.w[d * g4 * isz..(d + 1) * g4 * isz];
    let rd = &sl.r[d * g4 * hsz..(d + 1) * g4 * hsz];
    let bd = &sl.bias[d * 2 * g4..(d + 1) * 2 * g4];
    let bsum: Vec<f32> = bd[..g4].iter().zip(&bd[g4..]).map(|(a, c)| a + c).collect();
    let pd = sl.p.map(|p| &p[d * 3 * hsz..(d + 1) * 3 * hsz]);
    let xw = match pack {
        Some(p) => project_packed(sl.x, s * b, isz, &p.w, wd)?,
        None => project(sl.x, s * b, isz, wd, g4, &o.w.get(d)?)?,
    };
    let rct = o.r.get(d)?;
    let mut h = sl.h0[d * b * hsz..(d + 1) * b * hsz].to_vec();
    let mut c = sl.c0[d * b * hsz..(d + 1) * b * hsz].to_vec();
    let mut y = vec![0f32; s * b * hsz];
    let (mut pre, mut act, mut tc) = (vec![0f32; g4], vec![0f32; g4], vec![0f32; hsz]);
    for step in 0..s {
        let rec = match pack {
            Some(p) => project_packed(&h, b, hsz, &p.r, &rd[..p.r.n() * hsz])?,
            None => project(&h, b, hsz, rd, g4, &rct)?,
        };
        for (bi, &len) in o.lens.iter().enumerate() {
            if step >= len {
                continue;
            }
            let t = if rev { len - 1 - step } else { step };
            let xrow = &xw[(t * b + bi) * g4..(t * b + bi + 1) * g4];
            let rrow = &rec[bi * g4..(bi + 1) * g4];
            for j in 0..g4 {
                pre[j] = xrow[j] + rrow[j] + bsum[j];
            }
            let hb = &mut h[bi * hsz..(bi + 1) * hsz];
            let cb = &mut c[bi * hsz..(bi + 1) * hsz];
            if let Some(pd) = pd {
                for k in 0..hsz {
                    pre[k] += pd[k] * cb[k];
                    pre[2 * hsz + k] += pd[2 * hsz + k] * cb[k];
                }
            }
            clip_slice(cfg.clip, &mut pre[..hsz]);
            clip_slice(cfg.clip, &mut pre[2 * hsz..]);
            fastmath::map_slice(Func::Sigmoid, &pre[..hsz], &mut act[..hsz]);
            fastmath::map_slice(Func::Sigmoid, &pre[2 * hsz..3 * hsz], &mut act[2 * hsz..3 * hsz]);
            fastmath::map_slice(Func::Tanh, &pre[3 * hsz..], &mut act[3 * hsz..]);
            for k in 0..hsz {
                cb[k] = act[2 * hsz + k] * cb[k] + act[k] * act[3 * hsz + k];
            }
            if let Some(pd) = pd {
                for k in 0..hsz {
                    pre[hsz + k] += pd[hsz + k] * cb[k];
                }
            }
            clip_slice(cfg.clip, &mut pre[hsz..2 * hsz]);
            fastmath::map_slice(Func::Sigmoid, &pre[hsz..2 * hsz], &mut act[hsz..2 * hsz]);
            fastmath::map_slice(Func::Tanh, cb, &mut tc);
            for k in 0..hsz {
                hb[k] = act[hsz + k] * tc[k];
            }
            y[(t * b + bi) * hsz..(t * b + bi + 1) * hsz].copy_from_slice(hb);
        }
    }
    Ok((y, h, c))
}

/// One GRU direction: gate order z, r, h; `B = [Wb_z, Wb_r, Wb_h, Rb_z, Rb_r, Rb_h]`. With
/// `linear_before_reset` the candidate is `tanh(x Wh + Wbh + r * (h Rh + Rbh))`, else
/// `tanh(x Wh + Wbh + (r * h) Rh + Rbh)`, which needs a second product once `r` is known; then
/// `h = (1 - z) * candidate + z * h`.
fn gru_direction(cfg: &Cfg, o: &Operands, sl: &Slices, d: usize, pack: Option<&DirPack>) -> Result<DirOut> {
    let (s, b, isz, hsz) = o.dims;
    let rev = cfg.dirs[d];
    let (h2, g3) = (2 * hsz, 3 * hsz);
    let wd = &sl.w[d * g3 * isz..(d + 1) * g3 * isz];
    let rd = &sl.r[d * g3 * hsz..(d + 1) * g3 * hsz];
    let bd = &sl.bias[d * 2 * g3..(d + 1) * 2 * g3];
    let (wb, rb) = bd.split_at(g3);
    let xw = match pack {
        Some(p) => project_packed(sl.x, s * b, isz, &p.w, wd)?,
        None => project(sl.x, s * b, isz, wd, g3, &o.w.get(d)?)?,
    };
    let rct = o.r.get(d)?;
    let (rzr_ct, rh_ct) = (rct.narrow(0, 0, h2)?, rct.narrow(0, h2, hsz)?);
    let (rzr, rh) = rd.split_at(h2 * hsz);
    let lbr = cfg.linear_before_reset;
    let mut h = sl.h0[d * b * hsz..(d + 1) * b * hsz].to_vec();
    let mut y = vec![0f32; s * b * hsz];
    let mut zr = vec![0f32; b * h2];
    let mut rh_in = vec![0f32; b * hsz];
    let (mut pre, mut cand) = (vec![0f32; h2], vec![0f32; hsz]);
    let row = |t: usize, bi: usize| (t * b + bi) * g3;
    for step in 0..s {
        let active = |bi: usize| step < o.lens[bi];
        let time = |bi: usize| if rev { o.lens[bi] - 1 - step } else { step };
        // With linear_before_reset one product gives all three gates' recurrent terms.
        let rec = match (pack, lbr) {
            (Some(p), _) => project_packed(&h, b, hsz, &p.r, &rd[..p.r.n() * hsz])?,
            (None, true) => project(&h, b, hsz, rd, g3, &rct)?,
            (None, false) => project(&h, b, hsz, rzr, h2, &rzr_ct)?,
        };
        let rw = if lbr { g3 } else { h2 };
        for bi in (0..b).filter(|&bi| active(bi)) {
            let x = &xw[row(time(bi), bi)..row(time(bi), bi) + g3];
            let r = &rec[bi * rw..bi * rw + h2];
            for j in 0..h2 {
                pre[j] = x[j] + wb[j] + r[j] + rb[j];
            }
            clip_slice(cfg.clip, &mut pre);
            fastmath::map_slice(Func::Sigmoid, &pre, &mut zr[bi * h2..(bi + 1) * h2]);
            if !lbr {
                for k in 0..hsz {
                    rh_in[bi * hsz + k] = zr[bi * h2 + hsz + k] * h[bi * hsz + k];
                }
            }
        }
        let rec_h = match (lbr, pack.and_then(|p| p.rh.as_ref())) {
            (true, _) => None,
            (false, Some(p)) => Some(project_packed(&rh_in, b, hsz, p, rh)?),
            (false, None) => Some(project(&rh_in, b, hsz, rh, hsz, &rh_ct)?),
        };
        for bi in (0..b).filter(|&bi| active(bi)) {
            let t = time(bi);
            let x = &xw[row(t, bi) + h2..row(t, bi) + g3];
            let (z, r) = zr[bi * h2..(bi + 1) * h2].split_at(hsz);
            match &rec_h {
                Some(rh) => {
                    for k in 0..hsz {
                        cand[k] = x[k] + wb[h2 + k] + rh[bi * hsz + k] + rb[h2 + k];
                    }
                }
                None => {
                    let hr = &rec[bi * g3 + h2..(bi + 1) * g3];
                    for k in 0..hsz {
                        cand[k] = x[k] + wb[h2 + k] + r[k] * (hr[k] + rb[h2 + k]);
                    }
                }
            }
            clip_slice(cfg.clip, &mut cand);
            let hb = &mut h[bi * hsz..(bi + 1) * hsz];
            let yb = &mut y[(t * b + bi) * hsz..(t * b + bi + 1) * hsz];
            fastmath::map_slice(Func::Tanh, &cand, yb);
            for k in 0..hsz {
                // (1 - z) * hh + z * h = hh + z * (h - hh)
                let hh = yb[k];
                hb[k] = hh + z[k] * (hb[k] - hh);
                yb[k] = hb[k];
            }
        }
    }
    Ok((y, h, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[usize], seed: usize, scale: f32) -> Value {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((((i + seed * 977) * 7919) % 1999) as f32 / 1999.0 - 0.5) * scale)
            .collect();
        Value::Tensor(Tensor::new(CT::from_vec(v, dims, &candle_core::Device::Cpu).unwrap(), DType::F32).unwrap())
    }

    /// The plain-loop path, unpacked and with W/R packed, against the candle-op path: `outputs`
    /// outputs each, within 1e-5.
    fn agrees_with_op_path(mut cfg: Cfg, ins: &[Option<Value>], outputs: usize, what: &str) {
        let refs: Vec<Option<&Value>> = ins.iter().map(Option::as_ref).collect();
        let fast = run(&cfg, &refs).unwrap();
        let packed = run_packed(&cfg, &refs, packs_for(&cfg, ins).as_deref()).unwrap();
        cfg.fast = false;
        let slow = run(&cfg, &refs).unwrap();
        assert_eq!(
            (fast.len(), packed.len(), slow.len()),
            (outputs, outputs, outputs),
            "{what}"
        );
        for (f, o) in fast.iter().chain(&packed).zip(slow.iter().cycle()) {
            let (f, o) = (f.as_tensor().unwrap().candle(), o.as_tensor().unwrap().candle());
            assert_eq!(f.dims(), o.dims(), "{what}");
            let d = (f - o).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{what}: {d}");
        }
    }

    /// W and R (inputs 1 and 2) packed as a plan would pack constants.
    fn packs_for(cfg: &Cfg, ins: &[Option<Value>]) -> Option<Vec<DirPack>> {
        let t = |i: usize| ins[i].as_ref().unwrap().as_tensor().unwrap().candle().clone();
        let (w, r) = (t(1), t(2));
        let v = |t: &CT| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p = pack_weights(cfg, w.dims(), &v(&w), r.dims(), &v(&r));
        assert_eq!(p.is_some(), sgemm::available());
        p
    }

    fn lstm_cfg(dirs: Vec<bool>, clip: Option<f64>) -> Cfg {
        let act = |kind| Act {
            kind,
            alpha: 0.0,
            beta: 0.0,
        };
        Cfg {
            kind: Kind::Lstm,
            acts: vec![vec![act(ActKind::Sigmoid), act(ActKind::Tanh), act(ActKind::Tanh)]; dirs.len()],
            dirs,
            clip,
            hidden: None,
            layout: 0,
            linear_before_reset: false,
            input_forget: false,
            fast: true,
        }
    }

    /// The plain-loop LSTM against the candle-op path: directions, sequence lengths (0, partial,
    /// full), peepholes, clip, and batches on both sides of the gemv/gemm switch.
    #[test]
    fn fast_lstm_matches_the_op_path() {
        let (isz, hsz) = (5, 7);
        for (dirs, s, b, clip, peep, lens) in [
            (vec![false], 1, 1, None, false, None),
            (vec![false], 3, 2, None, true, None),
            (vec![true], 4, 6, Some(0.9), false, Some(vec![4i64, 2, 0, 1, 3, 4])),
            (vec![false, true], 5, 5, None, true, Some(vec![5i64, 1, 3, 0, 5])),
        ] {
            let nd = dirs.len();
            let g4 = 4 * hsz;
            let ins = [
                Some(tensor(&[s, b, isz], 1, 2.0)),
                Some(tensor(&[nd, g4, isz], 2, 1.0)),
                Some(tensor(&[nd, g4, hsz], 3, 1.0)),
                Some(tensor(&[nd, 2 * g4], 4, 0.5)),
                lens.map(|l| {
                    Value::Tensor(
                        Tensor::from_candle(CT::new(l.as_slice(), &candle_core::Device::Cpu).unwrap()).unwrap(),
                    )
                }),
                Some(tensor(&[nd, b, hsz], 5, 1.0)),
                Some(tensor(&[nd, b, hsz], 6, 1.0)),
                peep.then(|| tensor(&[nd, 3 * hsz], 7, 1.0)),
            ];
            agrees_with_op_path(lstm_cfg(dirs, clip), &ins, 3, &format!("s {s} b {b}"));
        }
    }

    /// The plain-loop GRU against the candle-op path: both `linear_before_reset` forms, directions,
    /// sequence lengths (0, partial, full), clip, and batches on both sides of the gemv/gemm switch.
    #[test]
    fn fast_gru_matches_the_op_path() {
        let (isz, hsz) = (6, 5);
        for (dirs, s, b, clip, lbr, lens) in [
            (vec![false], 1, 1, None, false, None),
            (vec![false], 3, 2, None, true, None),
            (vec![true], 4, 6, Some(0.8), false, Some(vec![4i64, 2, 0, 1, 3, 4])),
            (vec![false, true], 5, 5, None, true, Some(vec![5i64, 1, 3, 0, 5])),
            (vec![false, true], 6, 7, Some(1.5), false, None),
        ] {
            let nd = dirs.len();
            let g3 = 3 * hsz;
            let ins = [
                Some(tensor(&[s, b, isz], 11, 2.0)),
                Some(tensor(&[nd, g3, isz], 12, 1.0)),
                Some(tensor(&[nd, g3, hsz], 13, 1.0)),
                Some(tensor(&[nd, 2 * g3], 14, 0.5)),
                lens.map(|l| {
                    Value::Tensor(
                        Tensor::from_candle(CT::new(l.as_slice(), &candle_core::Device::Cpu).unwrap()).unwrap(),
                    )
                }),
                Some(tensor(&[nd, b, hsz], 15, 1.0)),
            ];
            let act = |kind| Act {
                kind,
                alpha: 0.0,
                beta: 0.0,
            };
            let cfg = Cfg {
                kind: Kind::Gru,
                acts: vec![vec![act(ActKind::Sigmoid), act(ActKind::Tanh)]; nd],
                dirs,
                clip,
                hidden: None,
                layout: 0,
                linear_before_reset: lbr,
                input_forget: false,
                fast: true,
            };
            agrees_with_op_path(cfg, &ins, 2, &format!("s {s} b {b} lbr {lbr}"));
        }
    }

    #[test]
    fn reverse_index_respects_lengths() {
        // S = 3, B = 2, lengths [3, 1]: batch 0 fully reversed, batch 1 keeps padded rows in place.
        assert_eq!(reverse_index(3, &[3, 1]), vec![4, 1, 2, 3, 0, 5]);
    }
}
