//! What a `-m` argument names: a folder or `.safetensors` file on disk, a short name for a
//! canonical repo, or a Hugging Face repo id `org/name` with an optional `@revision`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The branch the Hub serves when no revision is given.
pub const DEFAULT_REVISION: &str = "main";

/// A model repo on the Hub at a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    /// `org/name`.
    pub repo_id: String,
    /// A branch, tag or commit hash; `main` when not given.
    pub revision: String,
}

impl RepoRef {
    /// `org/name` or `org/name@revision`.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidReference {
            reference: text.to_string(),
            reason,
        };
        let (id, revision) = match text.split_once('@') {
            Some((id, revision)) => {
                if revision.is_empty() || revision.contains(char::is_whitespace) {
                    return Err(invalid(format!(
                        "the revision after `@` must be a branch, tag or commit, got {revision:?}"
                    )));
                }
                (id, revision)
            }
            None => (text, DEFAULT_REVISION),
        };
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() != 2 {
            return Err(invalid(
                "a Hugging Face repo id has the form org/name (optionally org/name@revision)"
                    .to_string(),
            ));
        }
        for part in parts {
            if let Some(reason) = name_problem(part) {
                return Err(invalid(format!("{part:?} {reason}")));
            }
        }
        Ok(Self {
            repo_id: id.to_string(),
            revision: revision.to_string(),
        })
    }

    /// Whether the revision is a full commit hash (which names one snapshot forever).
    pub fn is_commit(&self) -> bool {
        self.revision.len() == 40 && self.revision.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

impl fmt::Display for RepoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.revision == DEFAULT_REVISION {
            write!(f, "{}", self.repo_id)
        } else {
            write!(f, "{}@{}", self.repo_id, self.revision)
        }
    }
}

/// The Hub's rules for an org or repo name: 1-96 of `[A-Za-z0-9_.-]`, not starting or ending
/// with `-` or `.`, without `--` or `..` (which the cache's folder names rely on).
fn name_problem(part: &str) -> Option<&'static str> {
    if part.is_empty() || part.len() > 96 {
        return Some("must have 1 to 96 characters");
    }
    if !part
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Some("may only hold letters, digits, `_`, `-` and `.`");
    }
    if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
        return Some("may not start or end with `-` or `.`");
    }
    if part.contains("--") || part.contains("..") {
        return Some("may not contain `--` or `..`");
    }
    None
}

/// What a model argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A folder (diffusers layout) or a single checkpoint file on disk.
    Local(PathBuf),
    /// A repo on the Hub (short names already expanded).
    Hub(RepoRef),
}

impl ModelRef {
    /// Parses `text`; `aliases` maps short names to repo ids (`("sd15", "org/name")`).
    /// A path that exists wins over everything else, as in diffusers' `from_pretrained`.
    pub fn parse(text: &str, aliases: &[(&str, &str)]) -> Result<Self> {
        Self::parse_with(text, aliases, |path| path.exists())
    }

    /// [`Self::parse`] with the existence check supplied (for tests).
    pub fn parse_with(
        text: &str,
        aliases: &[(&str, &str)],
        exists: impl Fn(&Path) -> bool,
    ) -> Result<Self> {
        if text.trim().is_empty() {
            return Err(Error::InvalidReference {
                reference: text.to_string(),
                reason: "empty".to_string(),
            });
        }
        if exists(Path::new(text)) {
            return Ok(Self::Local(PathBuf::from(text)));
        }
        let (name, revision) = match text.split_once('@') {
            Some((name, revision)) => (name, Some(revision)),
            None => (text, None),
        };
        if let Some((_, repo_id)) = aliases.iter().find(|(alias, _)| *alias == name) {
            let full = match revision {
                Some(revision) => format!("{repo_id}@{revision}"),
                None => repo_id.to_string(),
            };
            return RepoRef::parse(&full).map(Self::Hub);
        }
        let short_names = || {
            let names: Vec<&str> = aliases.iter().map(|(alias, _)| *alias).collect();
            names.join(", ")
        };
        if looks_like_a_path(name) {
            return Err(Error::InvalidReference {
                reference: text.to_string(),
                reason: "no such file or folder".to_string(),
            });
        }
        if !name.contains('/') {
            return Err(Error::InvalidReference {
                reference: text.to_string(),
                reason: format!(
                    "not a file or folder, not a short name ({}) and not a Hugging Face repo id (org/name)",
                    short_names()
                ),
            });
        }
        RepoRef::parse(text).map(Self::Hub)
    }
}

/// Text that can only be meant as a path: absolute or relative markers, more than one `/`, or a
/// weights-file extension.
fn looks_like_a_path(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    text.starts_with(['/', '.', '~'])
        || text.contains('\\')
        || text.matches('/').count() > 1
        || [".safetensors", ".ckpt", ".bin", ".pt", ".pth"]
            .iter()
            .any(|ext| lower.ends_with(ext))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIASES: &[(&str, &str)] = &[
        ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("taesd", "madebyollin/taesd"),
    ];

    fn parse(text: &str) -> Result<ModelRef> {
        ModelRef::parse_with(text, ALIASES, |p| p == Path::new("models/mine"))
    }

    fn hub(id: &str, revision: &str) -> ModelRef {
        ModelRef::Hub(RepoRef {
            repo_id: id.to_string(),
            revision: revision.to_string(),
        })
    }

    #[test]
    fn existing_paths_win() {
        assert_eq!(
            parse("models/mine").unwrap(),
            ModelRef::Local(PathBuf::from("models/mine"))
        );
    }

    #[test]
    fn short_names_expand_with_an_optional_revision() {
        assert_eq!(
            parse("sd15").unwrap(),
            hub("stable-diffusion-v1-5/stable-diffusion-v1-5", "main")
        );
        assert_eq!(parse("taesd@v2").unwrap(), hub("madebyollin/taesd", "v2"));
    }

    #[test]
    fn repo_ids_with_and_without_revision() {
        assert_eq!(parse("org/name").unwrap(), hub("org/name", "main"));
        assert_eq!(parse("org/name@fp16").unwrap(), hub("org/name", "fp16"));
        assert_eq!(
            parse("org/my.model_v1-2@refs/pr/1").unwrap(),
            hub("org/my.model_v1-2", "refs/pr/1")
        );
    }

    #[test]
    fn missing_paths_and_bad_names_are_refused_with_the_reason() {
        let message = |text: &str| parse(text).unwrap_err().to_string();
        assert!(
            message("./nope").contains("no such file"),
            "{}",
            message("./nope")
        );
        assert!(message("x.safetensors").contains("no such file"));
        assert!(message("a/b/c").contains("no such file"));
        let unknown = message("sd14");
        assert!(
            unknown.contains("sd15, taesd") && unknown.contains("org/name"),
            "{unknown}"
        );
        assert!(message("org/na me").contains("letters, digits"));
        assert!(message("org/-x").contains("start or end"));
        assert!(message("org/a--b").contains("--"));
        assert!(message("org/name@").contains("revision"));
        assert!(message("").contains("empty"));
    }

    #[test]
    fn commits_are_recognised_and_display_omits_main() {
        let commit = RepoRef::parse(&format!("org/name@{}", "a".repeat(40))).unwrap();
        assert!(commit.is_commit());
        assert!(!RepoRef::parse("org/name@main").unwrap().is_commit());
        assert_eq!(RepoRef::parse("org/name").unwrap().to_string(), "org/name");
        assert_eq!(
            RepoRef::parse("org/name@v1").unwrap().to_string(),
            "org/name@v1"
        );
    }
}
