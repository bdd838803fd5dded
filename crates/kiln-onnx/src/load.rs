use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;

use crate::{import_model, proto, OnnxError, Result};

/// Where a model came from; external tensor data is resolved relative to `base_dir`.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    pub base_dir: Option<PathBuf>,
    /// Bounds checked while loading.
    pub limits: LoadLimits,
    /// The mapped file the model is being decoded from, when it is (see [`MappedModel`]).
    pub(crate) mapping: Option<Arc<MappedModel>>,
}

impl ModelSource {
    /// Called by the importer once it has copied `part` (a tensor payload it read from the
    /// model's buffer) into a buffer of its own.
    pub(crate) fn copied(&self, part: &[u8]) {
        if let Some(m) = &self.mapping {
            m.release(part);
        }
    }
}

/// Files at least this large are mapped while they load instead of read into memory.
const MAP_MIN_BYTES: u64 = 16 << 20;

/// A model file mapped read-only while it is decoded and imported.
///
/// Reading a file into memory, decoding it and copying every tensor out would hold two copies of
/// the weights at the peak (the file's bytes and the imported tensors). Mapped, the protobuf
/// decodes with each tensor's `raw_data` a slice of the mapping (no copy), the importer copies
/// each tensor once into its own buffer and then hands the pages it came from back to the kernel
/// (`MADV_DONTNEED`), so the load holds about one copy plus the tensor in flight. The mapping is
/// gone when the load returns.
///
/// A file truncated by another process while it is mapped makes the loader's next read of the
/// lost pages fault (SIGBUS), as with every loader that maps files (ONNX Runtime maps external
/// data the same way): replace model files by renaming a new file into place, not by rewriting
/// them where they are. Files under 16 MiB are read, not mapped.
#[derive(Debug)]
pub(crate) struct MappedModel {
    map: memmap2::Mmap,
}

impl MappedModel {
    /// Gives the kernel the whole pages inside `part` back (when `part` lies in the mapping).
    fn release(&self, part: &[u8]) {
        const PAGE: usize = 4096;
        let base = self.map.as_ptr() as usize;
        let start = part.as_ptr() as usize;
        if part.len() < 4 * PAGE || start < base || start + part.len() > base + self.map.len() {
            return;
        }
        let off = start - base;
        let first = off.div_ceil(PAGE) * PAGE;
        let end = (off + part.len()) / PAGE * PAGE;
        if end > first {
            // SAFETY: the mapping is private and read-only, so nothing was written to these pages;
            // dropped pages of a private file mapping read back from the file on the next access,
            // so every slice into them keeps its contents. (memmap2 widens the start to the real
            // page size where that is larger than 4 KiB; those pages read back the same way.)
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
            };
        }
    }
}

impl AsRef<[u8]> for MappedShare {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// The mapping as the owner of the `Bytes` the protobuf decodes from.
struct MappedShare(Arc<MappedModel>);

/// Bounds on what loading a model may cost, checked before the work they bound (a file's size
/// before reading it, a tensor's declared size before allocating it). The defaults admit any
/// model protobuf can encode whose single tensors fit in 16 GiB; a server taking models from
/// elsewhere sets tighter ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// Largest model file (the protobuf itself; external data files are bounded per tensor).
    /// Default 2 GiB, protobuf's own limit for one message.
    pub max_file_bytes: u64,
    /// Most nodes over all graphs, subgraph bodies and inlined functions included. Default 1M.
    pub max_nodes: u64,
    /// Deepest nesting of subgraphs (If/Loop/Scan bodies) and model-local function calls.
    /// Default 32.
    pub max_nesting: u64,
    /// Largest initializer or constant tensor by its declared dims and dtype, inline or external.
    /// Default 16 GiB.
    pub max_tensor_bytes: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_file_bytes: 2 << 30,
            max_nodes: 1_000_000,
            max_nesting: 32,
            max_tensor_bytes: 16 << 30,
        }
    }
}

impl LoadLimits {
    /// `Err(Limit)` when `value > limit`.
    pub(crate) fn check(what: impl Into<String>, value: u128, limit: u64, field: &'static str) -> Result<()> {
        if value > u128::from(limit) {
            return Err(OnnxError::Limit {
                what: what.into(),
                value,
                limit,
                field,
            });
        }
        Ok(())
    }
}

/// Reads, decodes and imports an ONNX model file into Kiln IR.
pub fn load_model(path: impl AsRef<Path>) -> Result<kiln_graph::Model> {
    load_model_with(path, &LoadLimits::default())
}

/// [`load_model`] within `limits`.
pub fn load_model_with(path: impl AsRef<Path>, limits: &LoadLimits) -> Result<kiln_graph::Model> {
    let path = path.as_ref();
    let io = |cause| OnnxError::Io {
        path: path.display().to_string(),
        cause,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    LoadLimits::check(
        "the model file size in bytes",
        size.into(),
        limits.max_file_bytes,
        "max_file_bytes",
    )?;
    let base_dir = path
        .parent()
        .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let mut source = ModelSource {
        base_dir: base_dir.map(Path::to_path_buf),
        limits: *limits,
        mapping: None,
    };
    let bytes = if size >= MAP_MIN_BYTES {
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private; see `MappedModel` for what a concurrent
        // truncation of the file does.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mapped = Arc::new(MappedModel { map });
        source.mapping = Some(Arc::clone(&mapped));
        bytes::Bytes::from_owner(MappedShare(mapped))
    } else {
        bytes::Bytes::from(std::fs::read(path).map_err(io)?)
    };
    let model = decode_model_bytes(bytes)?;
    import_model(&model, &source)
}

/// Decodes and imports a model from bytes. External data is refused (there is no directory).
pub fn load_model_bytes(bytes: &[u8]) -> Result<kiln_graph::Model> {
    load_model_bytes_with(bytes, &LoadLimits::default())
}

/// [`load_model_bytes`] within `limits`.
pub fn load_model_bytes_with(bytes: &[u8], limits: &LoadLimits) -> Result<kiln_graph::Model> {
    LoadLimits::check(
        "the model size in bytes",
        bytes.len() as u128,
        limits.max_file_bytes,
        "max_file_bytes",
    )?;
    let model = decode_model(bytes)?;
    let source = ModelSource {
        base_dir: None,
        limits: *limits,
        mapping: None,
    };
    import_model(&model, &source)
}

/// Decodes a `ModelProto`, with a clear error for garbage and truncated files.
pub fn decode_model(bytes: &[u8]) -> Result<proto::ModelProto> {
    decode_model_from(bytes)
}

/// [`decode_model`] from a shared buffer: tensors' `raw_data` become slices of `bytes`, not copies.
pub fn decode_model_bytes(bytes: bytes::Bytes) -> Result<proto::ModelProto> {
    decode_model_from(bytes)
}

fn decode_model_from(bytes: impl bytes::Buf) -> Result<proto::ModelProto> {
    if !bytes.has_remaining() {
        return Err(OnnxError::Unsupported("the model file is empty".into()));
    }
    proto::ModelProto::decode(bytes).map_err(|cause| OnnxError::Decode {
        what: "ModelProto",
        cause,
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use crate::proto;

    fn tensor(name: &str, len: usize, seed: u32) -> (proto::TensorProto, Vec<u8>) {
        let mut s = seed;
        let bytes: Vec<u8> = (0..len * 4)
            .map(|_| {
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (s >> 16) as u8
            })
            .collect();
        let t = proto::TensorProto {
            name: Some(name.into()),
            dims: vec![len as i64],
            data_type: Some(1),
            raw_data: Some(bytes.clone().into()),
            ..Default::default()
        };
        (t, bytes)
    }

    /// A file over the mapping threshold loads through the mapping with every tensor's bytes as
    /// written, neighbours of released pages included (odd sizes put tensor edges mid-page), and
    /// the same as decoding the bytes from memory.
    #[test]
    fn mapped_load_keeps_every_tensor_intact() {
        let sizes = [3_000_001usize, 1_237, 2_500_003, 40_000];
        let mut graph = proto::GraphProto {
            name: Some("g".into()),
            ..Default::default()
        };
        let mut want = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let (t, bytes) = tensor(&format!("w{i}"), len, i as u32 + 1);
            graph.initializer.push(t);
            graph.output.push(proto::ValueInfoProto {
                name: Some(format!("w{i}")),
                ..Default::default()
            });
            want.push(bytes);
        }
        let model = proto::ModelProto {
            ir_version: Some(8),
            opset_import: vec![proto::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(graph),
            ..Default::default()
        };
        let encoded = model.encode_to_vec();
        assert!(encoded.len() as u64 >= super::MAP_MIN_BYTES, "the file must be mapped");
        let dir = std::env::temp_dir().join(format!("kiln-mapped-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, &encoded).unwrap();
        let mapped = super::load_model(&path).unwrap();
        let in_memory = super::load_model_bytes(&encoded).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for (i, bytes) in want.iter().enumerate() {
            let find = |m: &kiln_graph::Model| {
                let id = m.graph.outputs[i];
                m.graph.initializers[&id].bytes().to_vec()
            };
            assert!(find(&mapped) == *bytes, "tensor {i} differs after a mapped load");
            assert!(find(&in_memory) == *bytes, "tensor {i} differs after an in-memory load");
        }
    }
}
