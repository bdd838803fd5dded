//! Real-model references (`KILN_MODELS`: models/fetch.sh, models/make_bert.py,
//! models/make_reference.py): locating them and reading their `.npy` files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln::TensorData;

/// Same rule as `make_reference.py`'s `clean`: characters outside `[A-Za-z0-9_.-]` become `_`.
pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The reference directory of a model, or the reason the test is skipped.
pub fn reference_dir(stem: &str) -> Result<(PathBuf, PathBuf), String> {
    let dir = std::env::var_os("KILN_MODELS").ok_or("KILN_MODELS is not set (scripts/test.sh sets it up)")?;
    let dir = PathBuf::from(dir);
    let model = dir.join(format!("{stem}.onnx"));
    let refs = dir.join(format!("{stem}.ref"));
    if !model.is_file() {
        return Err(format!("{} is missing (run models/fetch.sh)", model.display()));
    }
    if !refs.is_dir() {
        return Err(format!("{} is missing (run models/make_reference.py)", refs.display()));
    }
    Ok((model, refs))
}

/// A model file in `KILN_MODELS` (models/fetch.sh writes them there), or the reason a test skips it.
pub fn model_file(file: &str) -> Result<PathBuf, String> {
    let dir = std::env::var_os("KILN_MODELS").ok_or("KILN_MODELS is not set (scripts/test.sh sets it up)")?;
    let path = PathBuf::from(dir).join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} is missing (run models/fetch.sh)", path.display()))
    }
}

/// Whether a missing model fails the test: `KILN_MODELS_REQUIRED` is set (scripts/test.sh sets it).
pub fn models_required() -> bool {
    std::env::var_os("KILN_MODELS_REQUIRED").is_some()
}

/// Reports a test skipped for a missing model: panics when models are required, otherwise prints
/// `SKIP <what>: <reason>` to stderr.
pub fn skip_missing(what: &str, reason: &str) {
    assert!(!models_required(), "{what}: {reason} (KILN_MODELS_REQUIRED is set)");
    eprintln!("SKIP {what}: {reason}");
}

pub fn read_npy(path: &Path, name: &str) -> TensorData {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dims: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => panic!("{}: unsupported npy dtype {other:?}", path.display()),
    };
    let t = match descr.as_str() {
        "<f4" => TensorData::from_values(name, dims, &npy.into_vec::<f32>().expect("f32 data")),
        "<i8" => TensorData::from_values(name, dims, &npy.into_vec::<i64>().expect("i64 data")),
        "<i4" => TensorData::from_values(name, dims, &npy.into_vec::<i32>().expect("i32 data")),
        "|b1" => TensorData::from_values(name, dims, &npy.into_vec::<bool>().expect("bool data")),
        other => panic!("{}: unsupported npy dtype {other}", path.display()),
    };
    t.unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    v.sort();
    v
}

/// One reference case: `<model>.ref/<case>/{inputs,expected}/<name>.npy`.
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
}

impl Case {
    /// The case's inputs, named by file stem.
    pub fn feeds(&self) -> Vec<(String, TensorData)> {
        sorted_entries(&self.dir.join("inputs"))
            .iter()
            .map(|p| {
                let name = p.file_stem().expect("file stem").to_string_lossy().into_owned();
                let t = read_npy(p, &name);
                (name, t)
            })
            .collect()
    }

    /// ONNX Runtime's value of output `name`.
    pub fn expected(&self, name: &str) -> TensorData {
        let path = self.dir.join("expected").join(format!("{}.npy", file_safe(name)));
        read_npy(&path, name)
    }
}

/// The complete cases under a model's reference directory (those `make_reference.py` finished).
pub fn cases(refs: &Path) -> Vec<Case> {
    sorted_entries(refs)
        .into_iter()
        .filter(|dir| dir.join(".complete").is_file())
        .map(|dir| Case {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir,
        })
        .collect()
}
