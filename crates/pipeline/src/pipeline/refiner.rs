//! SDXL base then refiner, diffusers' "ensemble of expert denoisers": the base model runs the
//! high-noise part of the schedule (`StableDiffusionXLPipeline(denoising_end=f,
//! output_type="latent")`) and the refiner the rest from the base's latents
//! (`StableDiffusionXLImg2ImgPipeline(denoising_start=f)`), conditioned on aesthetic scores. Only
//! one of the two models is in memory at a time.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use sdrs_schedulers::{Sampler, SigmaSchedule};

use crate::error::{Error, Result};

use super::{InitImage, ModelFamily, Request, StableDiffusion, StepProgress};
use crate::loading::LoadOptions;

/// A refiner that finishes an SDXL base model's last steps: where it takes over, and how it is
/// loaded once the base is freed.
#[derive(Debug, Clone)]
pub struct Refiner {
    path: PathBuf,
    /// The fraction of the schedule the base runs: its `denoising_end`, the refiner's
    /// `denoising_start`.
    switch: f64,
    /// Applied to the refiner's own scheduler config; `None` samples with that config as is.
    sampler: Option<(Sampler, SigmaSchedule)>,
    options: LoadOptions,
}

impl Refiner {
    /// The refiner at `path` (a diffusers folder or a single checkpoint, loaded as
    /// [`StableDiffusion::open`] does with `options`), taking over at `switch`, a fraction of the
    /// schedule strictly between 0 and 1. Checks both before any model runs: the refiner's family
    /// from its configs (no weights are read).
    pub fn new(path: &Path, switch: f64, options: &LoadOptions) -> Result<Self> {
        if !(switch > 0.0 && switch < 1.0) {
            return Err(Error::InvalidParameter {
                name: "refiner switch",
                value: switch.to_string(),
                expected: "a fraction of the schedule strictly between 0 and 1".to_string(),
            });
        }
        let family = ModelFamily::detect_model(path)?;
        if family != ModelFamily::SdxlRefiner {
            return Err(Error::WrongFamily {
                role: "the refiner",
                path: path.to_path_buf(),
                found: family.name(),
                expected: "an SDXL refiner",
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            switch,
            sampler: None,
            options: options.clone(),
        })
    }

    /// The refiner samples with `sampler` and `schedule` on its own scheduler config (as the base
    /// does on its own), instead of with that config as is.
    pub fn with_sampler(mut self, sampler: Sampler, schedule: SigmaSchedule) -> Self {
        self.sampler = Some((sampler, schedule));
        self
    }

    /// The fraction of the schedule the base runs.
    pub fn switch(&self) -> f64 {
        self.switch
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `base` is a model this refiner finishes (an SDXL base).
    pub fn check_base(&self, base: &StableDiffusion) -> Result<()> {
        if base.family() != ModelFamily::SdxlBase {
            return Err(Error::WrongFamily {
                role: "the base model",
                path: base.root().to_path_buf(),
                found: base.family().name(),
                expected: "an SDXL base model, the only kind a refiner finishes",
            });
        }
        Ok(())
    }

    /// The base's part of `request`: the schedule up to the switch.
    pub fn base_request(&self, request: &Request) -> Request {
        let mut base = request.clone();
        base.denoising_end = Some(self.switch);
        base
    }

    /// The refiner's part of `request`: the schedule from the switch on, continuing from the
    /// base's `latents`, sampled with `scheduler` (the refiner's config).
    pub fn refiner_request(
        &self,
        request: &Request,
        latents: Tensor,
        scheduler: serde_json::Value,
    ) -> Request {
        let mut refine = request.clone();
        refine.scheduler = scheduler;
        refine.init_image = InitImage::Latents(latents);
        refine.latents = None;
        refine.denoising_end = None;
        refine.denoising_start = Some(self.switch);
        refine
    }

    /// Runs `base` up to the switch freeing it as it goes ([`StableDiffusion::denoise_once`]),
    /// then loads the refiner and runs it from the base's latents
    /// ([`StableDiffusion::generate_once`]); returns the image. `progress` sees both runs' steps.
    pub fn generate_once(
        &self,
        base: StableDiffusion,
        request: &Request,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        self.check_base(&base)?;
        if let Some(mask) = &request.mask {
            // Refused before the base runs, not after.
            return Err(Error::InvalidParameter {
                name: "mask",
                value: format!("of shape {:?}", mask.dims()),
                expected: "no refiner: a refiner cannot continue an inpainting".to_string(),
            });
        }
        let latents = base.denoise_once(&self.base_request(request), progress)?;
        let refiner = StableDiffusion::open(&self.path, None, &self.options)?;
        let scheduler = self.scheduler(&refiner)?;
        refiner.generate_once(&self.refiner_request(request, latents, scheduler), progress)
    }

    /// [`Self::generate_once`] for several requests (a batch count): the base runs them all, is
    /// freed, then the refiner finishes each; one model is in memory at a time and each is loaded
    /// once. Returns the images in the order of `requests`.
    pub fn generate_all_once(
        &self,
        base: StableDiffusion,
        requests: &[Request],
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Vec<Tensor>> {
        self.check_base(&base)?;
        let mut latents = Vec::with_capacity(requests.len());
        for request in requests {
            latents.push(base.denoise(&self.base_request(request), progress)?);
        }
        drop(base);
        sdrs_kernels::memory::release_freed_memory();
        let refiner = StableDiffusion::open(&self.path, None, &self.options)?;
        let scheduler = self.scheduler(&refiner)?;
        requests
            .iter()
            .zip(latents)
            .map(|(request, latents)| {
                refiner.generate(
                    &self.refiner_request(request, latents, scheduler.clone()),
                    progress,
                )
            })
            .collect()
    }

    /// The scheduler config the refiner samples with.
    fn scheduler(&self, refiner: &StableDiffusion) -> Result<serde_json::Value> {
        Ok(match self.sampler {
            Some((sampler, schedule)) => sampler.config(refiner.scheduler_config(), schedule)?,
            None => refiner.scheduler_config().clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn refiner(switch: f64) -> Refiner {
        Refiner {
            path: PathBuf::from("refiner"),
            switch,
            sampler: None,
            options: LoadOptions::default(),
        }
    }

    fn request() -> Request {
        Request {
            prompt: "a lighthouse".to_string(),
            prompt_2: None,
            negative_prompt: Some("fog".to_string()),
            negative_prompt_2: None,
            prompt_syntax: Default::default(),
            width: 64,
            height: 64,
            steps: 10,
            guidance_scale: 5.0,
            scheduler: serde_json::json!({"_class_name": "EulerDiscreteScheduler"}),
            clip_skip: None,
            seed: Some(3),
            latents: Some(Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap()),
            init_image: InitImage::None,
            mask: None,
            strength: 0.3,
            denoising_start: None,
            denoising_end: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            aesthetic_score: 7.0,
            negative_aesthetic_score: 2.0,
            batch_size: 1,
            cancel: None,
        }
    }

    #[test]
    fn the_base_stops_where_the_refiner_starts() {
        let plan = refiner(0.7);
        let base = plan.base_request(&request());
        assert_eq!(
            (base.denoising_start, base.denoising_end),
            (None, Some(0.7))
        );
        assert!(base.latents.is_some(), "the base keeps its initial noise");

        let latents = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let scheduler = serde_json::json!({"_class_name": "DDIMScheduler"});
        let refine = plan.refiner_request(&base, latents, scheduler.clone());
        assert_eq!(
            (refine.denoising_start, refine.denoising_end),
            (Some(0.7), None)
        );
        assert!(matches!(refine.init_image, InitImage::Latents(_)));
        assert!(refine.latents.is_none());
        assert_eq!(refine.scheduler, scheduler);
        // The prompts, seed and aesthetic scores carry over.
        assert_eq!(refine.negative_prompt.as_deref(), Some("fog"));
        assert_eq!((refine.seed, refine.steps), (Some(3), 10));
        assert_eq!(
            (refine.aesthetic_score, refine.negative_aesthetic_score),
            (7.0, 2.0)
        );
    }

    #[test]
    fn a_switch_outside_the_schedule_is_refused_before_reading_the_model() {
        for switch in [0.0, 1.0, 1.5, f64::NAN] {
            let error = Refiner::new(Path::new("/no/such/refiner"), switch, &Default::default())
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("refiner switch") && error.contains(&switch.to_string()),
                "{error}"
            );
        }
    }
}
