use std::path::{Path, PathBuf};

use super::DataError;

/// Text to train on, and held-out text to validate on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corpus {
    pub train: String,
    pub validation: String,
}

/// Documents are joined with a blank line, as they would be read one after another.
const SEPARATOR: &str = "\n\n";

macro_rules! plays {
    ($dir:literal: $($name:literal),+ $(,)?) => {
        &[$(include_str!(concat!("../../data/shakespeare/", $dir, "/", $name, ".txt"))),+]
    };
}

const SHAKESPEARE_TRAIN: &[&str] = plays!("train":
    "a-midsummer-night-s-dream", "hamlet", "julius-caesar", "king-lear",
    "much-ado-about-nothing", "othello", "romeo-and-juliet", "twelfth-night",
);
const SHAKESPEARE_VALIDATION: &[&str] =
    plays!("validation": "as-you-like-it", "the-comedy-of-errors");

impl Corpus {
    /// Ten Shakespeare plays embedded in the binary: eight to train on, two held out.
    pub fn shakespeare() -> Self {
        Self {
            train: SHAKESPEARE_TRAIN.join(SEPARATOR),
            validation: SHAKESPEARE_VALIDATION.join(SEPARATOR),
        }
    }

    /// Reads UTF-8 text from `path`: a directory with `train/` and `validation/`
    /// subdirectories of `.txt` files, or else a file or a directory of `.txt` files, of
    /// which the last tenth (at a line break) is held out for validation.
    pub fn from_path(path: &Path) -> Result<Self, DataError> {
        let train_dir = path.join("train");
        let validation_dir = path.join("validation");
        if train_dir.is_dir() && validation_dir.is_dir() {
            return Ok(Self {
                train: read_documents(&train_dir, "training")?,
                validation: read_documents(&validation_dir, "validation")?,
            });
        }
        let text = if path.is_dir() {
            read_documents(path, "training")?
        } else {
            read_text(path)?
        };
        let (train, validation) = hold_out_tenth(&text);
        if validation.is_empty() {
            return Err(DataError::Empty {
                path: path.to_owned(),
                what: "validation",
            });
        }
        Ok(Self {
            train: train.to_owned(),
            validation: validation.to_owned(),
        })
    }

    /// Identifies the text, so shards made from other text are never reused.
    pub fn fingerprint(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        h.update(self.train.as_bytes());
        h.update(&[0]);
        h.update(self.validation.as_bytes());
        format!(
            "{}:{}:{:08x}",
            self.train.len(),
            self.validation.len(),
            h.finalize()
        )
    }
}

fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
    String::from_utf8(bytes).map_err(|_| DataError::NotText {
        path: path.to_owned(),
    })
}

/// Every `.txt` file in `dir`, in name order, joined.
fn read_documents(dir: &Path, what: &'static str) -> Result<String, DataError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(DataError::io(dir))?
        .map(|entry| entry.map(|e| e.path()).map_err(DataError::io(dir)))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "txt") && p.is_file());
    files.sort();
    if files.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_owned(),
            what,
        });
    }
    let texts = files
        .iter()
        .map(|p| read_text(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(texts.join(SEPARATOR))
}

/// Splits off the last tenth of `text`, at the first line break after the 90% mark.
fn hold_out_tenth(text: &str) -> (&str, &str) {
    let mut cut = text.len() - text.len() / 10;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let cut = text[cut..].find('\n').map_or(text.len(), |i| cut + i + 1);
    text.split_at(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shakespeare_holds_out_whole_plays() {
        let c = Corpus::shakespeare();
        assert!(c.train.len() > 900_000 && c.validation.len() > 150_000);
        assert!(c.train.starts_with("A Midsummer Night"));
        assert!(c.validation.contains("The Comedy of Errors"));
        // No held-out play leaks into training.
        assert!(!c.train.contains("DROMIO OF EPHESUS"));
        assert!(!c.validation.contains("HAMLET"));
    }

    #[test]
    fn directories_files_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("train")).unwrap();
        std::fs::create_dir_all(root.join("validation")).unwrap();
        std::fs::write(root.join("train/b.txt"), "second").unwrap();
        std::fs::write(root.join("train/a.txt"), "first").unwrap();
        std::fs::write(root.join("train/notes.md"), "ignored").unwrap();
        std::fs::write(root.join("validation/v.txt"), "held out").unwrap();
        let c = Corpus::from_path(root).unwrap();
        assert_eq!(c.train, "first\n\nsecond");
        assert_eq!(c.validation, "held out");

        let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let file = root.join("one.txt");
        std::fs::write(&file, &lines).unwrap();
        let c = Corpus::from_path(&file).unwrap();
        assert_eq!(format!("{}{}", c.train, c.validation), lines);
        assert!(
            c.validation.starts_with("line 9"),
            "{:?}",
            &c.validation[..10]
        );

        std::fs::write(root.join("validation/bad.txt"), [0xff, 0xfe]).unwrap();
        let err = Corpus::from_path(root).unwrap_err();
        assert!(matches!(err, DataError::NotText { .. }), "{err}");
        let err = Corpus::from_path(&root.join("missing")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Corpus::from_path(empty.path()),
            Err(DataError::Empty { .. })
        ));
    }
}
