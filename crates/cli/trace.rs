//! `--trace <file.json>` (or `SDRS_TRACE=<file.json>`): the pipeline's `tracing` spans (text
//! encoding, each denoising step, the scheduler step, the autoencoders, model loading) written as
//! a Chrome trace, for chrome://tracing or https://ui.perfetto.dev. Without either, no subscriber
//! is installed and the spans cost next to nothing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tracing_chrome::{ChromeLayerBuilder, FlushGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that names a trace file when `--trace` is not given.
pub const TRACE_ENV: &str = "SDRS_TRACE";

/// The trace file to write: `--trace`, else `SDRS_TRACE` when set and not empty.
pub fn trace_path(flag: Option<&Path>, env: Option<OsString>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf)
        .or_else(|| env.filter(|value| !value.is_empty()).map(PathBuf::from))
}

/// Starts tracing into the file `--trace` (or `SDRS_TRACE`) names, if any. The trace is
/// complete once the returned guard is dropped (at the end of the command).
pub fn start(flag: Option<&Path>) -> Result<Option<FlushGuard>> {
    let Some(path) = trace_path(flag, std::env::var_os(TRACE_ENV)) else {
        return Ok(None);
    };
    let file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create the trace file {}", path.display()))?;
    let (layer, guard) = ChromeLayerBuilder::new()
        .writer(file)
        .include_args(true)
        .build();
    tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .context("cannot trace: a tracing subscriber is already installed")?;
    Ok(Some(guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_environment_and_empty_is_unset() {
        let flag = Path::new("flag.json");
        assert_eq!(
            trace_path(Some(flag), Some("env.json".into())),
            Some(PathBuf::from("flag.json"))
        );
        assert_eq!(
            trace_path(None, Some("env.json".into())),
            Some(PathBuf::from("env.json"))
        );
        assert_eq!(trace_path(None, Some(OsString::new())), None);
        assert_eq!(trace_path(None, None), None);
    }
}
