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

/// Where `--model` will be once fetched: the path it names (anything with a
/// `/`), else its name in `dir`, as a `.gguf` file. None without a directory
/// to put a bare name in, or when the file's own directory does not exist.
pub fn target(model: &str, dir: Option<&Path>) -> Option<PathBuf> {
    let path = if model.contains('/') {
        PathBuf::from(model)
    } else {
        let name = if model.ends_with(".gguf") {
            model.to_owned()
        } else {
            format!("{model}.gguf")
        };
        dir?.join(name)
    };
    path.parent().filter(|p| p.is_dir())?;
    Some(path)
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

    #[test]
    fn a_missing_model_is_fetched_to_its_path_or_into_the_models_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(target("big", Some(d)), Some(d.join("big.gguf")));
        assert_eq!(target("big.gguf", Some(d)), Some(d.join("big.gguf")));
        assert_eq!(target("big", None), None);
        let path = d.join("x.gguf");
        assert_eq!(target(path.to_str().unwrap(), None), Some(path));
        // Nowhere to write it: the user named a folder that is not there.
        let nowhere = d.join("no/such/x.gguf");
        assert_eq!(target(nowhere.to_str().unwrap(), Some(d)), None);
    }
}
