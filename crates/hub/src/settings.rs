//! Where the cache is, which endpoint and token to use, and whether to stay offline: the
//! environment variables of Python's `huggingface_hub` (`constants.py`), resolved the same way.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the Hub and where its files are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The folder holding `models--org--name/` (`HF_HUB_CACHE`, else `HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT` without a trailing `/`, else the public Hub.
    pub endpoint: String,
    /// `HF_TOKEN`, else the token file `huggingface-cli login` writes (`HF_HOME/token`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: no request at all, the cache only.
    pub offline: bool,
}

impl HubSettings {
    /// The settings of this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::resolve(
            |name| std::env::var(name).ok().filter(|v| !v.is_empty()),
            |path| std::fs::read_to_string(path).ok(),
        )
    }

    /// The settings for the environment `var` (unset and empty variables are `None`), reading
    /// the token file through `read`.
    pub fn resolve(
        var: impl Fn(&str) -> Option<String>,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Result<Self> {
        let home = var("HOME").or_else(|| var("USERPROFILE"));
        let expand = |value: String| -> PathBuf {
            match &home {
                Some(home) if value == "~" || value.starts_with("~/") => {
                    Path::new(home).join(value.trim_start_matches('~').trim_start_matches('/'))
                }
                _ => PathBuf::from(value),
            }
        };
        let hf_home = match var("HF_HOME") {
            Some(dir) => Some(expand(dir)),
            None => match var("XDG_CACHE_HOME") {
                Some(dir) => Some(expand(dir).join("huggingface")),
                None => home
                    .as_ref()
                    .map(|home| Path::new(home).join(".cache").join("huggingface")),
            },
        };
        let cache_dir = match var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
            Some(dir) => expand(dir),
            None => hf_home
                .as_ref()
                .map(|home| home.join("hub"))
                .ok_or_else(|| Error::NoCacheDir {
                    reason: "HOME is not set; set HF_HOME or HF_HUB_CACHE".to_string(),
                })?,
        };
        let token_file = var("HF_TOKEN_PATH")
            .map(expand)
            .or_else(|| hf_home.map(|home| home.join("token")));
        let token = var("HF_TOKEN")
            .or_else(|| token_file.and_then(|path| read(&path)))
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty());
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        Ok(Self {
            cache_dir,
            endpoint,
            token,
            offline,
        })
    }
}

/// `huggingface_hub`'s `_is_true`: 1, ON, YES, TRUE in any case.
fn is_true(value: &str) -> bool {
    ["1", "on", "yes", "true"].contains(&value.trim().to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)], files: &[(&str, &str)]) -> Result<HubSettings> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let files: HashMap<PathBuf, String> = files
            .iter()
            .map(|(k, v)| (PathBuf::from(k), v.to_string()))
            .collect();
        HubSettings::resolve(
            |name| vars.get(name).cloned(),
            |path| files.get(path).cloned(),
        )
    }

    #[test]
    fn cache_defaults_to_home_then_follows_hf_home_and_hf_hub_cache() {
        let s = settings(&[("HOME", "/home/u")], &[]).unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert!(!s.offline);
        assert_eq!(s.token, None);
        let s = settings(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")], &[]).unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
        let s = settings(&[("HOME", "/home/u"), ("HF_HOME", "~/hf")], &[]).unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/hf/hub"));
        let s = settings(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/cache")], &[]).unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/cache"));
    }

    #[test]
    fn no_home_and_no_cache_variable_is_an_error() {
        let err = settings(&[], &[]).unwrap_err().to_string();
        assert!(
            err.contains("HF_HOME") && err.contains("HF_HUB_CACHE"),
            "{err}"
        );
    }

    #[test]
    fn token_comes_from_hf_token_then_the_token_file() {
        let file = [("/hf/token", "hf_file\n")];
        let s = settings(&[("HF_HOME", "/hf")], &file).unwrap();
        assert_eq!(s.token.as_deref(), Some("hf_file"));
        let s = settings(&[("HF_HOME", "/hf"), ("HF_TOKEN", "hf_env")], &file).unwrap();
        assert_eq!(s.token.as_deref(), Some("hf_env"));
        // The token file belongs to HF_HOME, not to the hub cache folder.
        let s = settings(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c")], &file).unwrap();
        assert_eq!(s.token.as_deref(), Some("hf_file"));
        let s = settings(&[("HF_HOME", "/x"), ("HF_TOKEN_PATH", "/hf/token")], &file).unwrap();
        assert_eq!(s.token.as_deref(), Some("hf_file"));
    }

    #[test]
    fn endpoint_and_offline_follow_the_variables() {
        let s = settings(
            &[
                ("HOME", "/h"),
                ("HF_ENDPOINT", "http://127.0.0.1:8080/"),
                ("HF_HUB_OFFLINE", "1"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.endpoint, "http://127.0.0.1:8080");
        assert!(s.offline);
        for (value, offline) in [("TRUE", true), ("yes", true), ("0", false), ("no", false)] {
            let s = settings(&[("HOME", "/h"), ("HF_HUB_OFFLINE", value)], &[]).unwrap();
            assert_eq!(s.offline, offline, "{value}");
        }
    }
}
