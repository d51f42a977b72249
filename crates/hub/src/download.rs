//! Resolving a repo to a snapshot folder in the cache: with no request at all when the cache
//! already holds every file the model needs (or when offline), else by listing the repo through
//! the Hub's model-info API and downloading the missing files with the `hf-hub` crate.
//!
//! `hf-hub` writes each download to `blobs/<etag>.part` and renames it into place only when the
//! body is complete (`ureq` fails on a body shorter than its `Content-Length`), so an interrupted
//! download leaves no file in the snapshot; the next run resumes the `.part` with a `Range`
//! request. Sizes are also checked against the listing, in case a server ends a body early
//! without saying how long it was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;
use serde_json::Value;

use crate::cache::{cached_snapshot, repo_dir, snapshot_files};
use crate::error::{Error, Result};
use crate::reference::RepoRef;
use crate::select::{select_files, shard_files, Layout, Missing, Selection};
use crate::settings::HubSettings;

/// Receives the progress of each file download (the binary draws bars from it).
pub trait DownloadProgress {
    /// A file starts, or resumes, downloading; `size` is its full size in bytes.
    fn start(&mut self, file: &str, size: u64);
    /// `bytes` more bytes of the current file arrived (on a resume, first the bytes already there).
    fn advance(&mut self, bytes: u64);
    /// The current file is complete.
    fn finish(&mut self, file: &str);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl DownloadProgress for NoProgress {
    fn start(&mut self, _file: &str, _size: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self, _file: &str) {}
}

/// `hf-hub`'s progress trait forwarded to ours, for one file.
struct Forward<'a> {
    inner: &'a mut dyn DownloadProgress,
    file: String,
}

impl hf_hub::api::Progress for Forward<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.inner.start(&self.file, size as u64);
    }
    fn update(&mut self, size: usize) {
        self.inner.advance(size as u64);
    }
    fn finish(&mut self) {
        self.inner.finish(&self.file);
    }
}

/// A model's files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub repo: RepoRef,
    /// The commit the files belong to.
    pub commit: String,
    /// `.../models--org--name/snapshots/<commit>`: a folder in the diffusers layout.
    pub path: PathBuf,
    /// The files downloaded this time (empty when everything came from the cache).
    pub downloaded: Vec<String>,
    /// True when no request was made.
    pub from_cache: bool,
}

/// The model-info answer (`/api/models/{repo}/revision/{revision}?blobs=true`), the fields we read.
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
}

/// Access to the Hub and its cache with fixed settings.
#[derive(Debug, Clone)]
pub struct Hub {
    settings: HubSettings,
}

impl Hub {
    pub fn new(mut settings: HubSettings) -> Self {
        // hf-hub links snapshot files to their blobs with paths made relative between two
        // absolute paths (and panics on a relative one): a relative `HF_HUB_CACHE` is made
        // absolute here.
        if let Ok(absolute) = std::path::absolute(&settings.cache_dir) {
            settings.cache_dir = absolute;
        }
        Self { settings }
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// The snapshot of `repo` with the files a model needs (`variant`: the weight variant to
    /// prefer, e.g. `fp16`): from the cache when it has them all, with no request; else from
    /// the Hub. Offline, the cache only, and an error naming what is missing.
    pub fn resolve(
        &self,
        repo: &RepoRef,
        variant: Option<&str>,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Snapshot> {
        if let Some(snapshot) = self.cached(repo, variant)? {
            return Ok(snapshot);
        }
        self.download(repo, variant, progress)
    }

    /// Asks the Hub which commit the revision is at now and downloads whatever of it the cache
    /// lacks (offline: the same as [`Self::resolve`]).
    pub fn pull(
        &self,
        repo: &RepoRef,
        variant: Option<&str>,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Snapshot> {
        if self.settings.offline {
            return self.resolve(repo, variant, progress);
        }
        self.download(repo, variant, progress)
    }

    /// The cached snapshot when it is complete. Online, an incomplete one (or one whose weights
    /// are only the fallback kind) is `None`, to be downloaded; offline it is an error.
    fn cached(&self, repo: &RepoRef, variant: Option<&str>) -> Result<Option<Snapshot>> {
        let offline = self.settings.offline;
        let not_cached = |missing: String| Error::NotCached {
            repo: repo.repo_id.clone(),
            revision: repo.revision.clone(),
            cache: self.settings.cache_dir.clone(),
            missing,
        };
        let Some((commit, dir)) = cached_snapshot(&self.settings.cache_dir, repo) else {
            if offline {
                return Err(not_cached(format!(
                    "every file (no snapshot of revision {} in {})",
                    repo.revision,
                    repo_dir(&self.settings.cache_dir, &repo.repo_id).display()
                )));
            }
            return Ok(None);
        };
        let files = snapshot_files(&dir);
        let checked =
            plan(&files, variant, |file| read_json(&dir.join(file))).and_then(|selection| {
                for index in &selection.indexes {
                    let shards = shards_of(&dir, index)?;
                    if let Some(shard) = shards.iter().find(|s| !files.contains(s)) {
                        return Err(Planned::Missing(Missing {
                            file: shard.clone(),
                            detail: format!(" (a shard listed in {index})"),
                        }));
                    }
                }
                Ok(selection)
            });
        match checked {
            Ok(selection) if offline || !selection.fell_back => Ok(Some(Snapshot {
                repo: repo.clone(),
                commit,
                path: dir,
                downloaded: Vec::new(),
                from_cache: true,
            })),
            Ok(_) => Ok(None),
            Err(Planned::Missing(missing)) if offline => {
                Err(not_cached(format!("{}{}", missing.file, missing.detail)))
            }
            Err(Planned::Error(error)) if offline => Err(error),
            Err(_) => Ok(None),
        }
    }

    /// Lists the repo, then downloads the needed files that its snapshot lacks.
    fn download(
        &self,
        repo: &RepoRef,
        variant: Option<&str>,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Snapshot> {
        let settings = &self.settings;
        let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
            .with_endpoint(settings.endpoint.clone())
            .with_token(settings.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| self.api_error(repo, None, e))?;
        let api_repo = api.repo(Repo::with_revision(
            repo.repo_id.clone(),
            RepoType::Model,
            repo.revision.clone(),
        ));
        let info = self.info(&api_repo, repo)?;
        let snapshot = repo_dir(&settings.cache_dir, &repo.repo_id)
            .join("snapshots")
            .join(&info.sha);
        let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        let sizes: HashMap<&str, u64> = info
            .siblings
            .iter()
            .filter_map(|s| Some((s.rfilename.as_str(), s.size?)))
            .collect();
        let mut fetcher = Fetcher {
            hub: self,
            api_repo: &api_repo,
            repo,
            snapshot: &snapshot,
            sizes: &sizes,
            progress,
            downloaded: Vec::new(),
        };
        let missing_in_repo = |missing: Missing| Error::MissingInRepo {
            repo: repo.repo_id.clone(),
            revision: repo.revision.clone(),
            file: missing.file,
            detail: missing.detail,
        };
        let selection = match plan(&files, variant, |file| {
            fetcher.fetch(file).map_err(Planned::Error)?;
            read_json(&snapshot.join(file))
        }) {
            Ok(selection) => selection,
            Err(Planned::Missing(missing)) => return Err(missing_in_repo(missing)),
            Err(Planned::Error(error)) => return Err(error),
        };
        for file in &selection.files {
            fetcher.fetch(file)?;
        }
        for index in &selection.indexes {
            let shards = shards_of(&snapshot, index).map_err(|planned| match planned {
                Planned::Missing(missing) => missing_in_repo(missing),
                Planned::Error(error) => error,
            })?;
            for shard in shards {
                if !files.contains(&shard) {
                    return Err(missing_in_repo(Missing {
                        file: shard,
                        detail: format!(" (a shard listed in {index})"),
                    }));
                }
                fetcher.fetch(&shard)?;
            }
        }
        let downloaded = fetcher.downloaded;
        if !repo.is_commit() {
            Cache::new(settings.cache_dir.clone())
                .repo(Repo::with_revision(
                    repo.repo_id.clone(),
                    RepoType::Model,
                    repo.revision.clone(),
                ))
                .create_ref(&info.sha)
                .map_err(|source| Error::Io {
                    path: repo_dir(&settings.cache_dir, &repo.repo_id).join("refs"),
                    source,
                })?;
        }
        Ok(Snapshot {
            repo: repo.clone(),
            commit: info.sha,
            path: snapshot,
            downloaded,
            from_cache: false,
        })
    }

    /// The repo's commit and file list.
    fn info(&self, api_repo: &ApiRepo, repo: &RepoRef) -> Result<RepoInfo> {
        let request = api_repo.info_request().query("blobs", "true");
        let url = request.url().to_string();
        let response = request
            .call()
            .map_err(|e| self.request_error(repo, None, e))?;
        response
            .into_json::<RepoInfo>()
            .map_err(|e| Error::BadResponse {
                url,
                reason: format!("not a model-info answer with `sha` and `siblings`: {e}"),
            })
    }

    fn api_error(&self, repo: &RepoRef, file: Option<&str>, error: ApiError) -> Error {
        match error {
            ApiError::RequestError(error) => self.request_error(repo, file, *error),
            other => Error::Download {
                repo: repo.repo_id.clone(),
                revision: repo.revision.clone(),
                file: file.unwrap_or("the file list").to_string(),
                reason: match other {
                    ApiError::LockAcquisition(path) => format!(
                        "{} is locked: another process is downloading it",
                        path.display()
                    ),
                    ApiError::IoError(error) => format!(
                        "{error}; the bytes received are kept in the cache and the next run resumes from there"
                    ),
                    ApiError::InvalidResume => {
                        "the partial download (`.part` in the cache's blobs/) is longer than the file; delete it and run again".to_string()
                    }
                    other => other.to_string(),
                },
            },
        }
    }

    /// Turns an HTTP failure into the error that says what to do, using the Hub's
    /// `X-Error-Code` header when it sends one.
    fn request_error(&self, repo: &RepoRef, file: Option<&str>, error: ureq::Error) -> Error {
        let (repo_id, revision) = (repo.repo_id.clone(), repo.revision.clone());
        let endpoint = self.settings.endpoint.clone();
        let response = match error {
            ureq::Error::Status(_, response) => response,
            ureq::Error::Transport(transport) => {
                return Error::Network {
                    repo: repo_id,
                    revision,
                    endpoint,
                    reason: transport.to_string(),
                }
            }
        };
        let status = response.status();
        let code = response.header("x-error-code").map(str::to_string);
        let message = response
            .header("x-error-message")
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let url = response.get_url().to_string();
        let token_hint = "set HF_TOKEN to a token from https://huggingface.co/settings/tokens, or run `huggingface-cli login`";
        match (code.as_deref(), status, file) {
            (Some("RevisionNotFound"), _, _) => Error::RevisionNotFound {
                repo: repo_id,
                revision,
                endpoint,
            },
            (Some("EntryNotFound"), _, Some(file)) | (None, 404, Some(file)) => {
                Error::MissingInRepo {
                    repo: repo_id,
                    revision,
                    file: file.to_string(),
                    detail: String::new(),
                }
            }
            (Some("RepoNotFound"), _, _) | (None, 404, None) => Error::RepoNotFound {
                repo: repo_id,
                revision,
                endpoint,
                hint: if self.settings.token.is_none() {
                    format!(" (if it is private or gated: {token_hint})")
                } else {
                    String::new()
                },
            },
            (Some("GatedRepo"), _, _) | (_, 401 | 403, _) => Error::Unauthorized {
                hint: if self.settings.token.is_none() {
                    format!("no token was given: accept the model's terms on {endpoint}/{repo_id}, then {token_hint}")
                } else {
                    format!("the token was refused or has no access: accept the model's terms on {endpoint}/{repo_id} and check the token's permissions")
                },
                repo: repo_id,
                revision,
                endpoint,
                status,
            },
            _ => Error::Http {
                repo: repo_id,
                revision,
                url,
                status,
                message,
            },
        }
    }
}

/// Downloads files into one snapshot, skipping those already there.
struct Fetcher<'a> {
    hub: &'a Hub,
    api_repo: &'a ApiRepo,
    repo: &'a RepoRef,
    snapshot: &'a Path,
    sizes: &'a HashMap<&'a str, u64>,
    progress: &'a mut dyn DownloadProgress,
    downloaded: Vec<String>,
}

impl Fetcher<'_> {
    fn fetch(&mut self, file: &str) -> Result<()> {
        let local = self.snapshot.join(file);
        if local.is_file() {
            return Ok(());
        }
        let forward = Forward {
            inner: &mut *self.progress,
            file: file.to_string(),
        };
        let path = self
            .api_repo
            .download_with_progress(file, forward)
            .map_err(|e| self.hub.api_error(self.repo, Some(file), e))?;
        let download_error = |reason: String| Error::Download {
            repo: self.repo.repo_id.clone(),
            revision: self.repo.revision.clone(),
            file: file.to_string(),
            reason,
        };
        if let Some(&expected) = self.sizes.get(file) {
            let found = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if found != expected {
                // Never leave a short file where the loader would take it for the real one.
                if let Ok(blob) = std::fs::canonicalize(&path) {
                    let _ = std::fs::remove_file(blob);
                }
                let _ = std::fs::remove_file(&path);
                return Err(download_error(format!(
                    "received {found} of {expected} bytes; run again to download it anew"
                )));
            }
        }
        if path != local {
            return Err(download_error(format!(
                "the revision moved to another commit during the download ({}); run again",
                path.display()
            )));
        }
        self.downloaded.push(file.to_string());
        Ok(())
    }
}

/// Why a plan could not be made: a file the model needs is absent, or something failed.
enum Planned {
    Missing(Missing),
    Error(Error),
}

/// The files to fetch for the repo files `files`; `first` provides the parsed first file
/// (`model_index.json` or `config.json`), downloading it when needed.
fn plan(
    files: &[String],
    variant: Option<&str>,
    mut first: impl FnMut(&str) -> std::result::Result<Value, Planned>,
) -> std::result::Result<Selection, Planned> {
    let (layout, first_file) = Layout::of(files).ok_or_else(|| {
        Planned::Missing(Missing {
            file: "model_index.json".to_string(),
            detail: " or config.json: it is not a diffusers model or component (for a single .safetensors checkpoint, download it and pass its path)".to_string(),
        })
    })?;
    let index = match layout {
        Layout::Pipeline => first(first_file)?,
        Layout::Component => Value::Null,
    };
    select_files(layout, &index, files, variant).map_err(Planned::Missing)
}

/// The shard files the index `index` (a repo path) in `snapshot` names.
fn shards_of(snapshot: &Path, index: &str) -> std::result::Result<Vec<String>, Planned> {
    let value = read_json(&snapshot.join(index))?;
    shard_files(index, &value).ok_or_else(|| {
        Planned::Error(Error::BadResponse {
            url: snapshot.join(index).display().to_string(),
            reason: "its weight_map must name .safetensors files in the same folder".to_string(),
        })
    })
}

fn read_json(path: &Path) -> std::result::Result<Value, Planned> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        Planned::Error(Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })?;
    serde_json::from_str(&text).map_err(|source| {
        Planned::Error(Error::Json {
            path: path.to_path_buf(),
            source,
        })
    })
}
