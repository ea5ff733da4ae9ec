//! Where models live: `--model` names a file, or a model in the models
//! directory (`~/Library/Application Support/tensorlink/models` on macOS, the
//! XDG data directory on Linux), so a cluster.toml can say just the name.

use std::path::{Path, PathBuf};

/// The default models directory of this platform.
pub fn default_dir() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("tensorlink").join("models"))
}

#[derive(Debug, thiserror::Error)]
pub enum ModelLookupError {
    #[error("no model `{name}`: it is not a file, and {dir} has {}", list(.available))]
    NotFound {
        name: String,
        dir: String,
        available: Vec<String>,
    },
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "no .gguf files".into()
    } else {
        format!("only {}", names.join(", "))
    }
}

/// The `.gguf` files in `dir`, sorted; none when it does not exist.
pub fn available(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    names.sort();
    names
}

/// Resolves `--model`: a path to a file, else a name (with or without
/// `.gguf`) in `dir`.
pub fn resolve(model: &str, dir: Option<&Path>) -> Result<PathBuf, ModelLookupError> {
    let direct = PathBuf::from(model);
    if direct.is_file() {
        return Ok(direct);
    }
    if let Some(dir) = dir {
        for candidate in [dir.join(model), dir.join(format!("{model}.gguf"))] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(ModelLookupError::NotFound {
        name: model.to_owned(),
        dir: dir.map_or_else(|| "no models directory".into(), |d| d.display().to_string()),
        available: dir.map(available).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_by_path_by_name_and_names_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tiny.gguf"), b"x").unwrap();
        let file = dir.path().join("tiny.gguf");
        assert_eq!(resolve(file.to_str().unwrap(), None).unwrap(), file);
        assert_eq!(resolve("tiny", Some(dir.path())).unwrap(), file);
        assert_eq!(resolve("tiny.gguf", Some(dir.path())).unwrap(), file);
        let err = resolve("big", Some(dir.path())).unwrap_err().to_string();
        assert!(
            err.contains("no model `big`") && err.contains("only tiny.gguf"),
            "{err}"
        );
    }
}
