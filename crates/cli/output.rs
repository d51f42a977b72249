//! Writing the generated image: an 8-bit RGB PNG with AUTOMATIC1111's `parameters` text chunk,
//! encoded in memory, then written to a temporary file beside the target and renamed into place,
//! so a failed or interrupted run never leaves a half-written image or a stray temporary file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// The generation settings as AUTOMATIC1111 records them, so other tools can read them back.
#[derive(Debug, Clone)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// AUTOMATIC1111's sampler label, e.g. `DPM++ 2M`.
    pub sampler: String,
    /// `Karras` or `Exponential`; `None` for the sampler's own (discrete) schedule.
    pub schedule_type: Option<String>,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// Only written when it is not 1 (AUTOMATIC1111 does the same).
    pub clip_skip: Option<usize>,
    /// Further `Key: value` fields (`Denoising strength`, `Refiner`, ...), written in order.
    pub extra: Vec<(String, String)>,
}

impl Parameters {
    /// The `parameters` text: prompt, `Negative prompt:` line, then the comma-separated settings.
    pub fn to_a1111(&self) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        let mut fields = vec![
            format!("Steps: {}", self.steps),
            format!("Sampler: {}", self.sampler),
        ];
        if let Some(schedule) = &self.schedule_type {
            fields.push(format!("Schedule type: {schedule}"));
        }
        fields.push(format!("CFG scale: {}", self.cfg_scale));
        fields.push(format!("Seed: {}", self.seed));
        fields.push(format!("Size: {}x{}", self.width, self.height));
        fields.push(format!("Model: {}", self.model));
        if let Some(skip) = self.clip_skip.filter(|&s| s > 1) {
            fields.push(format!("Clip skip: {skip}"));
        }
        for (key, value) in &self.extra {
            fields.push(format!("{key}: {value}"));
        }
        fields.push(format!("Version: sdrs {}", env!("CARGO_PKG_VERSION")));
        text.push('\n');
        text.push_str(&fields.join(", "));
        text
    }
}

/// A reserved output: the target is checked up front, so an unwritable path fails before any
/// work is done; the temporary file is only created once the image is encoded, so an interrupted
/// or aborted run leaves nothing behind.
pub struct PendingImage {
    target: PathBuf,
    folder: PathBuf,
}

/// Temporary files being written right now, removed by the signal handler (see
/// [`remove_temporary_files_on_signals`]).
static WRITING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Raised by the first Ctrl-C / SIGTERM / SIGHUP while a generation samples: the pipeline stops
/// at the end of its current step (`Request::cancel`).
static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// Whether a generation that watches [`STOP`] is running ([`Sampling`]).
static SAMPLING: AtomicBool = AtomicBool::new(false);

/// The flag a generation's `Request::cancel` watches: raised by the first signal while it runs.
pub fn stop_flag() -> Arc<AtomicBool> {
    STOP.clone()
}

/// Whether a signal asked the run to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// While alive, a signal stops the run at the end of a step instead of at once.
pub struct Sampling(());

impl Sampling {
    pub fn start() -> Self {
        SAMPLING.store(true, Ordering::SeqCst);
        Self(())
    }
}

impl Drop for Sampling {
    fn drop(&mut self) {
        SAMPLING.store(false, Ordering::SeqCst);
    }
}

/// Installs a Ctrl-C / SIGTERM / SIGHUP handler. While a generation samples ([`Sampling`]),
/// the first signal raises [`stop_flag`], so the run stops cleanly at the end of its step (the
/// caller reports it and exits with 130); any other signal removes the temporary output file
/// being written, if any, and exits at once with 130 and a message. Either way an interrupted run
/// leaves no stray file. A second call keeps the first handler.
pub fn remove_temporary_files_on_signals() {
    let _ = ctrlc::set_handler(|| {
        if SAMPLING.load(Ordering::SeqCst) && !STOP.swap(true, Ordering::SeqCst) {
            eprintln!(
                "\ninterrupted: stopping at the end of this step (press Ctrl-C again to stop at \
                 once)"
            );
            return;
        }
        let files = match WRITING.lock() {
            Ok(files) => files.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for file in files {
            let _ = std::fs::remove_file(file);
        }
        eprintln!("\ninterrupted: stopped before saving, no image written");
        std::process::exit(i32::from(INTERRUPTED_EXIT));
    });
}

/// The exit status of a run stopped by a signal (128 + SIGINT, as shells report Ctrl-C).
pub const INTERRUPTED_EXIT: u8 = 130;

impl PendingImage {
    /// Reserves `target` (a `.png` path in an existing, writable folder): a new path or a regular
    /// file, never a device, FIFO or folder (renaming over those would replace them).
    pub fn reserve(target: &Path) -> Result<Self> {
        let text = target.as_os_str().to_string_lossy();
        if target.is_dir() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
            bail!(
                "output path {} is a folder; give a file name such as out.png",
                target.display()
            );
        }
        if let Ok(metadata) = std::fs::metadata(target) {
            if !metadata.is_file() {
                bail!(
                    "output path {} exists and is not a regular file (a device, FIFO or socket): \
                     sdrs only replaces regular files; give a new file name such as out.png",
                    target.display()
                );
            }
        }
        let folder = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !folder.is_dir() {
            bail!(
                "cannot write {}: the folder {} does not exist",
                target.display(),
                folder.display()
            );
        }
        // A probe, removed at once: whether the folder takes new files is only known by trying.
        drop(temp_builder().tempfile_in(&folder).with_context(|| {
            format!("cannot write {} (folder not writable?)", target.display())
        })?);
        Ok(Self {
            target: target.to_path_buf(),
            folder,
        })
    }

    /// Encodes `image` (`[1, 3, H, W]` or `[3, H, W]` in `[0, 1]`) with `parameters` and moves it into place.
    pub fn write(self, image: &Tensor, parameters: &Parameters) -> Result<PathBuf> {
        let png = encode_png(image, Some(parameters.to_a1111()))?;
        self.put(&png)?;
        Ok(self.target)
    }

    /// Writes the encoded bytes to a temporary file beside the target and renames it into place.
    fn put(&self, bytes: &[u8]) -> Result<()> {
        let target = &self.target;
        if let Ok(metadata) = std::fs::metadata(target) {
            if !metadata.is_file() {
                bail!(
                    "output path {} is no longer a regular file; not replacing it",
                    target.display()
                );
            }
        }
        let mut file = temp_builder()
            .tempfile_in(&self.folder)
            .with_context(|| format!("cannot write {} (folder not writable?)", target.display()))?;
        let path = file.path().to_path_buf();
        lock_writing().push(path.clone());
        let written = file
            .write_all(bytes)
            .and_then(|()| file.flush())
            .with_context(|| format!("cannot write {}", target.display()))
            .and_then(|()| {
                file.persist(target).map(drop).with_context(|| {
                    format!("cannot move the image into place at {}", target.display())
                })
            });
        lock_writing().retain(|p| p != &path);
        written
    }
}

fn lock_writing() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    WRITING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn temp_builder() -> tempfile::Builder<'static, 'static> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".sdrs-").suffix(".png.tmp");
    // Temporary files are private by default; the finished image is an ordinary file.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    builder
}

/// Writes `image` as a PNG at `target` through a temporary file and a rename, so readers never
/// see a half-written file (used for previews, which are replaced while sampling runs).
pub fn write_png_atomically(target: &Path, image: &Tensor) -> Result<()> {
    PendingImage::reserve(target)
        .and_then(|pending| pending.put(&encode_png(image, None)?))
        .with_context(|| format!("cannot write {}", target.display()))
}

/// Encodes an 8-bit RGB PNG with an optional `parameters` text chunk.
fn encode_png(image: &Tensor, parameters: Option<String>) -> Result<Vec<u8>> {
    let (width, height, rgb) = to_rgb8(image)?;
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if let Some(text) = parameters {
        // Like PIL (which AUTOMATIC1111 uses): tEXt when the text is Latin-1, iTXt (UTF-8) otherwise.
        if text.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk("parameters".to_string(), text)
        } else {
            encoder.add_itxt_chunk("parameters".to_string(), text)
        }
        .context("cannot add the parameters text to the PNG")?;
    }
    let mut png = encoder.write_header()?;
    png.write_image_data(&rgb)?;
    png.finish()?;
    Ok(bytes)
}

/// `[0, 1]` floats to interleaved 8-bit RGB, rounding as diffusers' `numpy_to_pil` does.
pub fn to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let image = match image.rank() {
        4 => image.get(0)?,
        3 => image.clone(),
        rank => bail!("expected an image tensor of rank 3 or 4, got rank {rank}"),
    };
    let (channels, height, width) = image.dims3()?;
    if channels != 3 {
        bail!("expected 3 colour channels, got {channels}");
    }
    let pixels = ((image.permute((1, 2, 0))?.to_dtype(DType::F32)? * 255.0)?.round()?)
        .clamp(0f32, 255f32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((width, height, pixels.into_iter().map(|v| v as u8).collect()))
}

/// Writes `text` at `target` through a temporary file in the same folder and a rename: a failed
/// write leaves no file behind.
pub fn write_text_atomically(target: &Path, text: &str) -> Result<()> {
    let folder = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut file = tempfile::Builder::new()
        .prefix(".sdrs-")
        .suffix(".tmp")
        .tempfile_in(&folder)
        .with_context(|| format!("cannot write {}", target.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", target.display()))?;
    file.persist(target)
        .with_context(|| format!("cannot move {} into place", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameters() -> Parameters {
        Parameters {
            prompt: "a cat".into(),
            negative_prompt: "blurry".into(),
            steps: 25,
            sampler: "DPM++ 2M".into(),
            schedule_type: Some("Karras".into()),
            cfg_scale: 7.5,
            seed: 42,
            width: 512,
            height: 768,
            model: "tiny-sd15".into(),
            clip_skip: None,
            extra: Vec::new(),
        }
    }

    #[test]
    fn parameters_read_like_automatic1111() {
        let text = parameters().to_a1111();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("a cat"));
        assert_eq!(lines.next(), Some("Negative prompt: blurry"));
        let settings = lines.next().unwrap();
        assert!(
            settings.starts_with(
                "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: tiny-sd15"
            ),
            "{settings}"
        );
        assert!(lines.next().is_none());
    }

    #[test]
    fn empty_negative_prompt_and_clip_skip_one_are_left_out() {
        let mut p = parameters();
        p.negative_prompt.clear();
        p.clip_skip = Some(1);
        p.cfg_scale = 7.0;
        p.schedule_type = None;
        let text = p.to_a1111();
        assert!(!text.contains("Negative prompt"));
        assert!(!text.contains("Clip skip"));
        assert!(!text.contains("Schedule type"));
        assert!(text.contains("CFG scale: 7,"), "{text}");
        p.clip_skip = Some(2);
        assert!(p.to_a1111().contains("Clip skip: 2"));
        p.extra.push(("Denoising strength".into(), "0.6".into()));
        assert!(p
            .to_a1111()
            .contains("Clip skip: 2, Denoising strength: 0.6, Version"));
    }

    #[test]
    fn png_round_trips_pixels_and_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.png");
        let image = Tensor::from_vec(
            vec![0f32, 1.0, 0.5, 0.25, 0.0, 1.0],
            (1, 3, 1, 2),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        PendingImage::reserve(&target)
            .unwrap()
            .write(&image, &parameters())
            .unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&target).unwrap(),
        ));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        // pixel 0 = (r0, g0, b0) = (0, 0.5, 0), pixel 1 = (1, 0.25, 1)
        assert_eq!(&buf[..6], &[0, 128, 0, 255, 64, 255]);
        let text = &reader.info().uncompressed_latin1_text[0];
        assert_eq!(text.keyword, "parameters");
        assert_eq!(text.text, parameters().to_a1111());
        // Only the final file is left behind, readable like any other file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o044, 0o044, "mode {mode:o}");
        }
    }

    #[test]
    fn unwritable_targets_fail_before_any_work() {
        let err = PendingImage::reserve(Path::new("/nonexistent-dir/x.png"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent-dir"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = PendingImage::reserve(dir.path()).err().unwrap().to_string();
        assert!(err.contains("is a folder"), "{err}");
    }

    #[test]
    fn dev_null_as_output_is_refused_not_replaced_by_a_png() {
        let err = PendingImage::reserve(Path::new("/dev/null"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        assert!(!std::fs::metadata("/dev/null").unwrap().is_file());
    }

    #[test]
    fn output_path_ending_in_a_slash_fails_before_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("{}/newdir/", dir.path().display());
        let err = PendingImage::reserve(Path::new(&missing))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is a folder"), "{err}");
    }

    #[test]
    fn temporary_file_is_not_created_before_the_work_starts() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingImage::reserve(&dir.path().join("x.png")).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        drop(pending);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_dropped_reservation_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        drop(PendingImage::reserve(&dir.path().join("x.png")).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
