//! The `huggingface_hub` cache layout, read without any request: `models--org--name/` holding
//! `blobs/<etag>`, `snapshots/<commit>/<path>` (links to the blobs) and `refs/<revision>` (the
//! commit a branch or tag pointed to when last fetched).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::reference::RepoRef;

/// The cache folder of a model repo.
pub fn repo_dir(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// The commit and snapshot folder the cache holds for `repo` at its revision: the commit itself
/// when the revision is one, else the commit `refs/<revision>` records.
pub fn cached_snapshot(cache: &Path, repo: &RepoRef) -> Option<(String, PathBuf)> {
    let dir = repo_dir(cache, &repo.repo_id);
    let commit = if repo.is_commit() {
        repo.revision.clone()
    } else {
        let text = std::fs::read_to_string(dir.join("refs").join(&repo.revision)).ok()?;
        text.trim().to_string()
    };
    if commit.is_empty() || commit.contains(['/', '\\', '.']) {
        return None;
    }
    let snapshot = dir.join("snapshots").join(&commit);
    snapshot.is_dir().then_some((commit, snapshot))
}

/// Every file under a snapshot folder, as repo paths with `/`; links whose blob is gone are left out.
pub fn snapshot_files(snapshot: &Path) -> Vec<String> {
    let mut files = Vec::new();
    collect(snapshot, "", &mut files);
    files.sort();
    files
}

fn collect(dir: &Path, prefix: &str, files: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // `metadata` follows the link to the blob: a dangling link is not a cached file.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => collect(&path, &format!("{prefix}{name}/"), files),
            Ok(meta) if meta.is_file() => files.push(format!("{prefix}{name}")),
            _ => {}
        }
    }
}

/// One cached model repo, for `sdrs models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRepo {
    /// `org/name`.
    pub repo_id: String,
    /// `(revision, commit)` for each `refs/` entry.
    pub refs: Vec<(String, String)>,
    /// The commits with a snapshot folder.
    pub snapshots: Vec<String>,
    /// Bytes of the complete blobs (what the repo takes on disk).
    pub size_on_disk: u64,
    /// Bytes of interrupted downloads (`*.part`), resumed by the next download.
    pub partial_bytes: u64,
    /// The repo's folder in the cache.
    pub path: PathBuf,
}

/// The model repos in the cache folder, sorted by id; an empty list when the folder does not exist.
pub fn scan_cache(cache: &Path) -> Result<Vec<CachedRepo>> {
    let entries = match std::fs::read_dir(cache) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Io {
                path: cache.to_path_buf(),
                source,
            })
        }
    };
    let mut repos = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("models--") else {
            continue;
        };
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let mut refs = Vec::new();
        read_refs(&path.join("refs"), "", &mut refs);
        refs.sort();
        let mut snapshots: Vec<String> = std::fs::read_dir(path.join("snapshots"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        snapshots.sort();
        let (mut size_on_disk, mut partial_bytes) = (0, 0);
        if let Ok(blobs) = std::fs::read_dir(path.join("blobs")) {
            for blob in blobs.flatten() {
                let name = blob.file_name().to_string_lossy().into_owned();
                let size = blob.metadata().map(|m| m.len()).unwrap_or(0);
                if name.ends_with(".part") {
                    partial_bytes += size;
                } else if !name.ends_with(".lock") {
                    size_on_disk += size;
                }
            }
        }
        repos.push(CachedRepo {
            repo_id: id.replace("--", "/"),
            refs,
            snapshots,
            size_on_disk,
            partial_bytes,
            path,
        });
    }
    repos.sort_by(|a, b| a.repo_id.cmp(&b.repo_id));
    Ok(repos)
}

/// `refs/` entries; revisions with `/` (`refs/pr/1`) are nested folders.
fn read_refs(dir: &Path, prefix: &str, refs: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let path = entry.path();
        if path.is_dir() {
            read_refs(&path, &format!("{name}/"), refs);
        } else if let Ok(commit) = std::fs::read_to_string(&path) {
            refs.push((name, commit.trim().to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, contents: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    #[test]
    fn snapshots_resolve_through_refs_or_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = repo_dir(cache, "org/name");
        assert!(repo.ends_with("models--org--name"));
        write(&repo.join("refs/main"), commit);
        write(
            &repo.join("snapshots").join(commit).join("unet/config.json"),
            "{}",
        );
        write(
            &repo.join("snapshots").join(commit).join("model_index.json"),
            "{}",
        );
        let main = RepoRef::parse("org/name").unwrap();
        let (found, dir) = cached_snapshot(cache, &main).unwrap();
        assert_eq!(found, commit);
        assert_eq!(
            snapshot_files(&dir),
            ["model_index.json", "unet/config.json"]
        );
        let pinned = RepoRef::parse(&format!("org/name@{commit}")).unwrap();
        assert_eq!(cached_snapshot(cache, &pinned).unwrap().0, commit);
        assert!(cached_snapshot(cache, &RepoRef::parse("org/name@v2").unwrap()).is_none());
        assert!(cached_snapshot(cache, &RepoRef::parse("org/other").unwrap()).is_none());
    }

    #[test]
    fn scan_lists_repos_refs_and_blob_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path();
        assert_eq!(scan_cache(&cache.join("absent")).unwrap(), []);
        let repo = repo_dir(cache, "org/name");
        write(&repo.join("refs/main"), "abc\n");
        write(&repo.join("refs/refs/pr/1"), "def");
        write(&repo.join("blobs/abc"), "12345");
        write(&repo.join("blobs/def.part"), "12");
        write(&repo.join("blobs/abc.lock"), "");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        write(&cache.join("version.txt"), "1");
        let repos = scan_cache(cache).unwrap();
        assert_eq!(repos.len(), 1);
        let r = &repos[0];
        assert_eq!(r.repo_id, "org/name");
        assert_eq!(
            r.refs,
            [
                ("main".to_string(), "abc".to_string()),
                ("refs/pr/1".to_string(), "def".to_string())
            ]
        );
        assert_eq!(r.snapshots, ["abc"]);
        assert_eq!((r.size_on_disk, r.partial_bytes), (5, 2));
    }
}
