//! The model repository on disk: `<repo>/<model>/config.toml` and numbered version folders
//! `<repo>/<model>/<n>/model.onnx`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Result, ServeError};

/// Size and modification time of a file: a changed signature means "reload".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSig {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl FileSig {
    /// `None` when the file does not exist.
    pub fn of(path: &Path) -> Option<FileSig> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileSig {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// What a loaded version was built from; both must be unchanged for it to stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionSig {
    pub model: Option<FileSig>,
    pub config: Option<FileSig>,
}

/// Whether a directory entry is a folder, following symlinks (a model folder may be a link, as
/// Kubernetes volume and ConfigMap mounts make them).
fn is_dir(e: &std::fs::DirEntry) -> bool {
    e.path().is_dir()
}

/// Model names in the repository: folders (or links to folders) not starting with '.', sorted.
pub fn list_models(repo: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(repo).map_err(|source| ServeError::Io {
        path: repo.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(is_dir)
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Version numbers under a model folder that hold `filename`.
pub fn list_versions(model_dir: &Path, filename: &str) -> Result<Vec<u64>> {
    let rd = std::fs::read_dir(model_dir).map_err(|source| ServeError::Io {
        path: model_dir.to_path_buf(),
        source,
    })?;
    let mut versions: Vec<u64> = rd
        .filter_map(|e| e.ok())
        .filter(is_dir)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .filter(|v| *v > 0 && model_dir.join(v.to_string()).join(filename).is_file())
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// Why `dir` looks like one model's folder rather than a repository of model folders (it holds
/// `config.toml` or a numbered version folder with a `model.onnx`), so pointing a server at it
/// would serve nothing: `None` when it does not.
pub fn looks_like_model_folder(dir: &Path) -> Option<String> {
    if dir.join("config.toml").is_file() {
        return Some("it holds config.toml".into());
    }
    let versions = list_versions(dir, "model.onnx").ok()?;
    let v = versions.first()?;
    Some(format!("it holds {v}/model.onnx"))
}

/// A model name as it may appear in a URL or request: no path separators or dot-dot.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\']) && name.len() <= 255
}

pub fn model_dir(repo: &Path, name: &str) -> PathBuf {
    repo.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_models_and_versions() {
        let dir = std::env::temp_dir().join(format!("kiln-repo-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for p in ["a/1", "a/3", "a/x", "a/0", "a/7", ".hidden/1", "b"] {
            std::fs::create_dir_all(dir.join(p)).unwrap();
        }
        for p in ["a/1/model.onnx", "a/3/model.onnx", "a/x/model.onnx", "a/0/model.onnx"] {
            std::fs::write(dir.join(p), b"x").unwrap();
        }
        std::fs::write(dir.join("file.txt"), b"x").unwrap();
        assert_eq!(list_models(&dir).unwrap(), vec!["a", "b"]);
        // 7 has no model file, x is not a number, 0 is not a version.
        assert_eq!(list_versions(&dir.join("a"), "model.onnx").unwrap(), vec![1, 3]);
        assert!(list_versions(&dir.join("b"), "model.onnx").unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn linked_folders_count_and_model_folders_are_recognised() {
        let dir = std::env::temp_dir().join(format!("kiln-repo-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = dir.join("store/m");
        std::fs::create_dir_all(store.join("2")).unwrap();
        std::fs::write(store.join("2/model.onnx"), b"x").unwrap();
        std::fs::create_dir_all(dir.join("repo")).unwrap();
        std::os::unix::fs::symlink(&store, dir.join("repo/m")).unwrap();
        assert_eq!(list_models(&dir.join("repo")).unwrap(), vec!["m"]);
        assert_eq!(list_versions(&dir.join("repo/m"), "model.onnx").unwrap(), vec![2]);
        assert_eq!(looks_like_model_folder(&dir.join("repo")), None);
        assert!(looks_like_model_folder(&store).unwrap().contains("2/model.onnx"));
        std::fs::write(store.join("config.toml"), b"").unwrap();
        assert!(looks_like_model_folder(&store).unwrap().contains("config.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn model_names() {
        assert!(valid_model_name("mlp"));
        assert!(!valid_model_name(".."));
        assert!(!valid_model_name("a/b"));
        assert!(!valid_model_name(""));
    }
}
