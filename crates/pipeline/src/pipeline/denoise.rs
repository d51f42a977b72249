//! The denoising loop of diffusers' Stable Diffusion pipelines (`__call__` in
//! `pipeline_stable_diffusion.py`, `..._img2img.py` and the SDXL ones): where it starts (the
//! text-to-image noise, an encoded and noised image, or another pipeline's latents) and each step
//! (classifier-free guidance, then the scheduler step). The generator is drawn from in diffusers'
//! order: the initial noise, or the VAE sample then the img2img noise, then each step's noise.
//! Inpainting (a request with a mask) starts and steps as [`super::inpaint`] says.

use candle_core::{DType, Device, Tensor};
use sdrs_schedulers::{NoiseSource, Scheduler, TorchGenerator};

use crate::error::{Error, Result};

use super::components::{Denoiser, LatentEncoder};
use super::conditioning::Conditioning;
use super::inpaint::{self, Inpainting};
use super::{InitImage, Request};

/// A latents shape `(batch, channels, height, width)`.
pub(super) type Shape4 = (usize, usize, usize, usize);

/// Where the loop starts: the timesteps left to run and the latents at the first of them.
pub(super) struct Start {
    pub timesteps: Vec<f64>,
    pub latents: Tensor,
    /// The mask and its latents, for an inpainting request.
    pub inpainting: Option<Inpainting>,
}

impl Start {
    /// The start of a batch from each image's own start (the same timesteps), latents stacked.
    pub fn batch(mut starts: Vec<Start>) -> Result<Start> {
        if starts.len() == 1 {
            return starts.pop().ok_or_else(unreachable_empty_batch);
        }
        let timesteps = starts
            .first()
            .map(|s| s.timesteps.clone())
            .ok_or_else(unreachable_empty_batch)?;
        let mut latents = Vec::with_capacity(starts.len());
        let mut inpainting = Vec::with_capacity(starts.len());
        for start in starts {
            latents.push(start.latents);
            inpainting.extend(start.inpainting);
        }
        let inpainting = match inpainting.len() {
            0 => None,
            n if n == latents.len() => Some(Inpainting::batch(inpainting)?),
            n => {
                return Err(Error::InvalidParameter {
                    name: "mask",
                    value: format!("on {n} of {} images", latents.len()),
                    expected: "one mask for every image of the batch".to_string(),
                })
            }
        };
        Ok(Start {
            timesteps,
            inpainting,
            latents: Tensor::cat(&latents, 0)?,
        })
    }
}

fn unreachable_empty_batch() -> Error {
    Error::InvalidParameter {
        name: "batch size",
        value: "0".to_string(),
        expected: "at least 1".to_string(),
    }
}

/// The timesteps to run and the latents to start from, for `request` on a fresh `scheduler`
/// (whose begin index it sets): pure noise for text-to-image, the image encoded by `encoder` and
/// noised to the strength for image-to-image, or the latents of another pipeline, continued
/// where its `denoising_end` stopped (`denoising_start`) or noised to the strength; with a mask,
/// what [`inpaint::prepare`] makes for a UNet of `unet_in_channels`.
#[allow(clippy::too_many_arguments)]
pub(super) fn start(
    request: &Request,
    scheduler: &mut dyn Scheduler,
    shape: Shape4,
    unet_in_channels: usize,
    generator: Option<&mut TorchGenerator>,
    encoder: &dyn LatentEncoder,
    device: &Device,
) -> Result<Start> {
    let num_train_timesteps = request.scheduler["num_train_timesteps"]
        .as_f64()
        .unwrap_or(1000.0);
    let all_timesteps = scheduler.timesteps().to_vec();
    let start = start_index(
        request,
        &all_timesteps,
        num_train_timesteps,
        scheduler.order(),
    )?;
    let first_timestep = all_timesteps.get(start).copied().unwrap_or_default();
    let mut inpainting = None;
    let latents = match &request.init_image {
        InitImage::None => {
            let noise = match (&request.latents, generator) {
                (Some(latents), _) => {
                    check_shape("latents", latents, shape)?;
                    latents.to_device(device)?.to_dtype(DType::F32)?
                }
                (None, Some(generator)) => generator.randn(&shape.into(), DType::F32, device)?,
                (None, None) => return Err(no_seed()),
            };
            (noise * scheduler.init_noise_sigma())?
        }
        InitImage::Pixels(image) if request.mask.is_some() => {
            let generator = generator.ok_or_else(no_seed)?;
            let prepared = inpaint::prepare(
                request,
                image,
                shape,
                unet_in_channels,
                scheduler,
                first_timestep,
                generator,
                encoder,
                device,
            )?;
            let latents = prepared.start_latents.clone();
            inpainting = Some(prepared);
            latents
        }
        InitImage::Pixels(image) => {
            let generator = generator.ok_or_else(no_seed)?;
            let image = image.to_device(device)?.to_dtype(DType::F32)?;
            check_shape("init image", &image, (1, 3, request.height, request.width))?;
            let init = encoder.encode(&image, &mut *generator)?;
            if request.denoising_start.is_some() {
                init
            } else {
                let noise = generator.randn(init.shape(), DType::F32, device)?;
                scheduler.add_noise(&init, &noise, first_timestep)?
            }
        }
        InitImage::Latents(init) => {
            check_shape("init latents", init, shape)?;
            let init = init.to_device(device)?.to_dtype(DType::F32)?;
            if request.denoising_start.is_some() {
                // Continue from another pipeline's latents: no noise is added.
                init
            } else {
                let generator = generator.ok_or_else(no_seed)?;
                let noise = generator.randn(init.shape(), DType::F32, device)?;
                scheduler.add_noise(&init, &noise, first_timestep)?
            }
        }
    };
    // diffusers' inpainting pipelines set the begin index even at 0 (their blending's
    // `add_noise` then takes the sigma of the step index).
    if start > 0 || inpainting.is_some() {
        scheduler.set_begin_index(start);
    }
    let timesteps = timesteps_to_run(
        &all_timesteps,
        start,
        request.denoising_end,
        num_train_timesteps,
    );
    if timesteps.is_empty() {
        return Err(Error::InvalidParameter {
            name: "strength",
            value: format!("{} with {} steps", request.strength, request.steps),
            expected: "a combination that leaves at least one denoising step".to_string(),
        });
    }
    Ok(Start {
        timesteps,
        latents,
        inpainting,
    })
}

/// Runs the denoiser and the scheduler over `start`'s timesteps, calling `progress` with the
/// 1-based step, its timestep and the new latents after each; returns the final latents.
pub(super) fn run(
    denoiser: &dyn Denoiser,
    scheduler: &mut dyn Scheduler,
    start: Start,
    conditioning: &Conditioning,
    guidance_scale: f64,
    noise: &mut dyn NoiseSource,
    // Called after each step; an error (a cancelled request) ends the loop with it.
    progress: &mut dyn FnMut(usize, f64, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let mut latents = start.latents;
    let inpainting = start.inpainting.as_ref();
    let extra_channels = inpainting.and_then(Inpainting::extra_channels);
    for (index, &t) in start.timesteps.iter().enumerate() {
        let span = tracing::info_span!("denoising_step", step = index + 1, timestep = t);
        let entered = span.enter();
        let prediction = guided_prediction(
            denoiser,
            scheduler,
            &latents,
            extra_channels,
            t,
            conditioning,
            guidance_scale,
        )?;
        latents = {
            let _span = tracing::info_span!("scheduler_step").entered();
            scheduler.step(&prediction, t, &latents, noise)?
        };
        if let Some(inpainting) = inpainting {
            let next = start.timesteps.get(index + 1).copied();
            latents = inpainting.blend(scheduler, &latents, next)?;
        }
        drop(entered);
        progress(index + 1, t, &latents)?;
    }
    Ok(latents)
}

/// The model output at `t`. With guidance (a scale above 1) the unconditional and the
/// conditional predictions come from one batch of two and are mixed as diffusers does:
/// `uncond + scale * (cond - uncond)`. An inpainting UNet's `extra_channels` (mask and
/// masked-image latents) follow the scaled latents in each row.
fn guided_prediction(
    denoiser: &dyn Denoiser,
    scheduler: &mut dyn Scheduler,
    latents: &Tensor,
    extra_channels: Option<&Tensor>,
    t: f64,
    conditioning: &Conditioning,
    guidance_scale: f64,
) -> Result<Tensor> {
    let guided = guidance_scale > 1.0;
    let images = latents.dim(0)?;
    let (model_input, batch) = if guided {
        (Tensor::cat(&[latents, latents], 0)?, 2 * images)
    } else {
        (latents.clone(), images)
    };
    let model_input = scheduler.scale_model_input(&model_input, t)?;
    let model_input = match extra_channels {
        Some(extra) => {
            let extra = if guided {
                Tensor::cat(&[extra, extra], 0)?
            } else {
                extra.clone()
            };
            Tensor::cat(&[model_input, extra], 1)?
        }
        None => model_input,
    };
    let t_batch = Tensor::full(t as f32, batch, denoiser.device())?;
    let prediction = denoiser
        .forward(
            &model_input.to_dtype(denoiser.dtype())?,
            &t_batch,
            &conditioning.embeddings,
            conditioning.added.as_ref(),
        )?
        .to_dtype(DType::F32)?;
    if !guided {
        return Ok(prediction);
    }
    let uncond = prediction.narrow(0, 0, images)?;
    let cond = prediction.narrow(0, images, images)?;
    Ok((&uncond + ((cond - &uncond)? * guidance_scale)?)?)
}

/// The index of the first timestep to run: 0 for text-to-image; for an init image or latents,
/// where `denoising_start` cuts the schedule, else where the strength does.
fn start_index(
    request: &Request,
    timesteps: &[f64],
    num_train_timesteps: f64,
    order: usize,
) -> Result<usize> {
    if matches!(request.init_image, InitImage::None) {
        return Ok(0);
    }
    match request.denoising_start {
        Some(fraction) => Ok(denoising_start_index(
            timesteps,
            fraction,
            num_train_timesteps,
            order,
        )),
        None => strength_start_index(request.steps, request.strength, order),
    }
}

/// The timesteps from `start` on, without those past diffusers' `denoising_end` cutoff.
fn timesteps_to_run(
    timesteps: &[f64],
    start: usize,
    denoising_end: Option<f64>,
    num_train_timesteps: f64,
) -> Vec<f64> {
    let mut run = timesteps[start.min(timesteps.len())..].to_vec();
    if let Some(fraction) = denoising_end {
        let cutoff = (num_train_timesteps - fraction * num_train_timesteps).round();
        run.retain(|&t| t >= cutoff);
    }
    run
}

/// diffusers' img2img `get_timesteps`: skip the first `steps - int(steps * strength)` steps.
fn strength_start_index(steps: usize, strength: f64, order: usize) -> Result<usize> {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    if init_timestep == 0 {
        return Err(Error::InvalidParameter {
            name: "strength",
            value: format!("{strength} with {steps} steps"),
            expected: "steps x strength of at least 1".to_string(),
        });
    }
    Ok((steps - init_timestep) * order)
}

/// diffusers' SDXL img2img `get_timesteps` with `denoising_start`: run the timesteps below the
/// cutoff (one more for second-order schedulers when the count is even).
fn denoising_start_index(
    timesteps: &[f64],
    fraction: f64,
    num_train_timesteps: f64,
    order: usize,
) -> usize {
    let cutoff = (num_train_timesteps - fraction * num_train_timesteps).round();
    let mut count = timesteps.iter().filter(|&&t| t < cutoff).count();
    if order == 2 && count % 2 == 0 {
        count += 1;
    }
    timesteps.len().saturating_sub(count)
}

pub(super) fn check_shape(what: &'static str, tensor: &Tensor, shape: Shape4) -> Result<()> {
    if tensor.dims() != [shape.0, shape.1, shape.2, shape.3] {
        return Err(Error::InvalidParameter {
            name: what,
            value: format!("of shape {:?}", tensor.dims()),
            expected: format!("shape {:?}", [shape.0, shape.1, shape.2, shape.3]),
        });
    }
    Ok(())
}

pub(super) fn no_seed() -> Error {
    Error::InvalidParameter {
        name: "seed",
        value: "none".to_string(),
        expected: "a seed (or explicit initial latents)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_skips_the_first_steps_like_diffusers() {
        assert_eq!(strength_start_index(10, 0.6, 1).unwrap(), 4);
        assert_eq!(strength_start_index(10, 1.0, 1).unwrap(), 0);
        assert_eq!(strength_start_index(25, 0.75, 1).unwrap(), 7);
        assert_eq!(strength_start_index(10, 0.6, 2).unwrap(), 8);
        assert!(strength_start_index(3, 0.2, 1).is_err());
    }

    #[test]
    fn denoising_start_runs_the_timesteps_below_the_cutoff() {
        let timesteps: Vec<f64> = (0..10).map(|i| 901.0 - 100.0 * i as f64).collect();
        // cutoff 200: 101 and 1 remain.
        assert_eq!(denoising_start_index(&timesteps, 0.8, 1000.0, 1), 8);
        // second-order schedulers take one more when the count is even.
        assert_eq!(denoising_start_index(&timesteps, 0.8, 1000.0, 2), 7);
    }

    #[test]
    fn denoising_end_keeps_the_timesteps_down_to_the_cutoff() {
        let timesteps: Vec<f64> = (0..10).map(|i| 901.0 - 100.0 * i as f64).collect();
        // cutoff 200: 901 ... 201 run, 101 and 1 are the refiner's.
        let run = timesteps_to_run(&timesteps, 0, Some(0.8), 1000.0);
        assert_eq!(run.len(), 8);
        assert_eq!(run.last(), Some(&201.0));
        // Together with the refiner's start the schedule is covered once.
        let start = denoising_start_index(&timesteps, 0.8, 1000.0, 1);
        assert_eq!(start, run.len());
        assert_eq!(
            timesteps_to_run(&timesteps, 3, None, 1000.0),
            &timesteps[3..]
        );
        assert!(timesteps_to_run(&timesteps, 12, None, 1000.0).is_empty());
    }
}
