//! The Hugging Face side of the CLI: model references for `-m`, `--refiner` and `--vae`
//! (folders, files, short names, `org/name[@revision]`), a progress bar per downloaded file,
//! `sdrs pull` and `sdrs models`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sdrs_hub::{scan_cache, DownloadProgress, Hub, HubSettings, ModelRef, RepoRef, Snapshot};
use sdrs_pipeline::BuiltinModel;

/// Short names of the tiny autoencoders `--vae` takes.
const TINY_AUTOENCODERS: [(&str, &str); 2] = [
    ("taesd", "madebyollin/taesd"),
    ("taesdxl", "madebyollin/taesdxl"),
];

/// Every short name and the repo it stands for.
pub fn aliases() -> Vec<(&'static str, &'static str)> {
    BuiltinModel::ALL
        .iter()
        .map(|model| (model.name(), model.repo_id()))
        .chain(TINY_AUTOENCODERS)
        .collect()
}

/// clap's parser for `--variant`: a weight-file variant name such as `fp16`.
pub fn parse_variant(value: &str) -> std::result::Result<String, String> {
    let valid = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!(
            "expected a weight variant such as fp16 (the `fp16` of `model.fp16.safetensors`), got {value:?}"
        ))
    }
}

/// A model argument as a path on disk: the path itself, or the snapshot folder of a repo in the
/// Hugging Face cache, downloaded first when the cache lacks some of its files. `variant` is
/// the weight variant to fetch where the repo has it.
pub fn local_model(reference: &str, variant: Option<&str>) -> Result<PathBuf> {
    match ModelRef::parse(reference, &aliases())? {
        ModelRef::Local(path) => Ok(path),
        ModelRef::Hub(repo) => {
            let hub = Hub::new(HubSettings::from_env()?);
            let snapshot = hub.resolve(&repo, variant, &mut FileBars::default())?;
            report(&snapshot);
            Ok(snapshot.path)
        }
    }
}

/// Says what was downloaded (nothing when the cache had everything).
fn report(snapshot: &Snapshot) {
    if !snapshot.downloaded.is_empty() {
        eprintln!(
            "downloaded {} file(s) of {} (commit {})",
            snapshot.downloaded.len(),
            snapshot.repo,
            short_commit(&snapshot.commit)
        );
    }
}

fn short_commit(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

/// One progress bar per file, left on screen when the file is complete (hidden when stderr is
/// not a terminal).
#[derive(Default)]
struct FileBars {
    current: Option<(String, ProgressBar)>,
}

impl DownloadProgress for FileBars {
    fn start(&mut self, file: &str, size: u64) {
        if let Some((name, bar)) = &self.current {
            // A resume starts the same file again: keep its bar.
            if name == file {
                bar.set_length(size);
                bar.set_position(0);
                return;
            }
        }
        let bar = ProgressBar::new(size);
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}, {bytes_per_sec}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(file.to_string());
        if let Some((_, old)) = self.current.replace((file.to_string(), bar)) {
            old.abandon();
        }
    }

    fn advance(&mut self, bytes: u64) {
        if let Some((_, bar)) = &self.current {
            bar.inc(bytes);
        }
    }

    fn finish(&mut self, _file: &str) {
        if let Some((_, bar)) = self.current.take() {
            bar.finish();
        }
    }
}

impl Drop for FileBars {
    fn drop(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.abandon();
        }
    }
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The model to download: a short name (sd15, sdxl, sdxl-refiner, taesd, taesdxl) or a
    /// Hugging Face repo id `org/name`, optionally `org/name@revision`.
    pub model: String,

    /// Download this weight variant (`fp16`: `*.fp16.safetensors`, half the size) instead of
    /// the full-precision files, where the repo has it.
    #[arg(long, value_parser = parse_variant)]
    pub variant: Option<String>,
}

/// `sdrs pull`: asks the Hub for the revision's current commit, downloads what the cache lacks
/// and prints the snapshot folder.
pub fn run_pull(args: PullArgs) -> Result<ExitCode> {
    let repo = match ModelRef::parse(&args.model, &aliases())? {
        ModelRef::Hub(repo) => repo,
        ModelRef::Local(path) => bail!(
            "{} is already on disk: `sdrs pull` downloads short names and Hugging Face repo ids",
            path.display()
        ),
    };
    let hub = Hub::new(HubSettings::from_env()?);
    let snapshot = hub
        .pull(&repo, args.variant.as_deref(), &mut FileBars::default())
        .with_context(|| format!("cannot pull {repo}"))?;
    describe_pull(&repo, &snapshot);
    println!("{}", snapshot.path.display());
    Ok(ExitCode::SUCCESS)
}

fn describe_pull(repo: &RepoRef, snapshot: &Snapshot) {
    let commit = short_commit(&snapshot.commit);
    if snapshot.downloaded.is_empty() {
        eprintln!("{repo} (commit {commit}) is up to date in the cache");
    } else {
        eprintln!(
            "downloaded {} file(s) of {repo} (commit {commit})",
            snapshot.downloaded.len()
        );
    }
}

#[derive(Debug, Args)]
pub struct ModelsArgs {}

/// `sdrs models`: the model repos in the Hugging Face cache, with revisions and sizes on disk.
pub fn run_models(_args: ModelsArgs) -> Result<ExitCode> {
    let settings = HubSettings::from_env()?;
    let cache = &settings.cache_dir;
    if cache.exists() && !cache.is_dir() {
        anyhow::bail!(
            "the Hugging Face cache {} is not a folder (it comes from HF_HUB_CACHE, HF_HOME or \
             XDG_CACHE_HOME): point it at a folder",
            cache.display()
        );
    }
    if !cache.is_dir() {
        println!(
            "no models cached: {} does not exist yet (`sdrs pull <model>` downloads one)",
            cache.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let repos = scan_cache(cache)?;
    if repos.is_empty() {
        println!(
            "no models cached in {} (`sdrs pull <model>` downloads one)",
            cache.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("cache: {}", cache.display());
    let rows: Vec<[String; 3]> = repos
        .iter()
        .map(|repo| {
            let revisions = if repo.refs.is_empty() {
                let commits: Vec<&str> = repo.snapshots.iter().map(|c| short_commit(c)).collect();
                commits.join(", ")
            } else {
                let refs: Vec<String> = repo
                    .refs
                    .iter()
                    .map(|(name, commit)| format!("{name} ({})", short_commit(commit)))
                    .collect();
                refs.join(", ")
            };
            let mut size = human_size(repo.size_on_disk);
            if repo.partial_bytes > 0 {
                size.push_str(&format!(
                    " (+{} of interrupted downloads)",
                    human_size(repo.partial_bytes)
                ));
            }
            [repo.repo_id.clone(), revisions, size]
        })
        .collect();
    let header = ["MODEL", "REVISIONS", "SIZE ON DISK"].map(str::to_string);
    let widths: Vec<usize> = (0..2)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in [&header].into_iter().chain(&rows) {
        println!(
            "{:w0$}  {:w1$}  {}",
            row[0],
            row[1],
            row[2],
            w0 = widths[0],
            w1 = widths[1]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Bytes in decimal units, as `huggingface-cli scan-cache` shows them.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Pull {
        #[command(flatten)]
        args: PullArgs,
    }

    #[test]
    fn short_names_cover_the_builtin_models_and_the_tiny_autoencoders() {
        let names: Vec<&str> = aliases().iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["sd15", "sdxl", "sdxl-refiner", "taesd", "taesdxl"]);
        let parsed = ModelRef::parse_with("taesdxl", &aliases(), |_| false).unwrap();
        assert_eq!(
            parsed,
            ModelRef::Hub(RepoRef::parse("madebyollin/taesdxl").unwrap())
        );
    }

    #[test]
    fn pull_takes_a_model_and_an_optional_variant() {
        let args = Pull::try_parse_from(["x", "sd15"]).unwrap().args;
        assert_eq!((args.model.as_str(), args.variant), ("sd15", None));
        let args = Pull::try_parse_from(["x", "org/name@v1", "--variant", "fp16"])
            .unwrap()
            .args;
        assert_eq!(args.model, "org/name@v1");
        assert_eq!(args.variant.as_deref(), Some("fp16"));
        assert!(Pull::try_parse_from(["x"]).is_err());
        assert!(Pull::try_parse_from(["x", "sd15", "--variant", "fp 16"]).is_err());
    }

    #[test]
    fn sizes_are_shown_in_decimal_units() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_500), "1.5 kB");
        assert_eq!(human_size(4_265_000_000), "4.3 GB");
    }
}
