//! Inpainting as diffusers' `StableDiffusionInpaintPipeline` (`pipeline_stable_diffusion_inpaint.py`)
//! and `StableDiffusionXLInpaintPipeline` do it: the mask processor (`VaeImageProcessor` with
//! `do_binarize`), the masked image, the latent mask, and the start latents with the generator
//! drawn in diffusers' order. Both kinds of UNet are served: an inpainting UNet (in channels
//! `2C + 1`) takes `[latents, mask, masked-image latents]` at every step; a regular one
//! (`C` channels) has the region outside the mask replaced by the re-noised image latents after
//! every scheduler step (diffusers' latent blending).
//!
//! SDXL's inpainting pipeline follows the same scheme; what it adds (`denoising_start` for a
//! refiner continuing an inpainting, `padding_mask_crop`, a default strength of 0.9999) is not
//! part of a request here: a mask with `denoising_start` is refused.

use candle_core::{DType, Device, Tensor};
use sdrs_schedulers::{NoiseSource, Scheduler, TorchGenerator};

use crate::error::{Error, Result};

use super::components::LatentEncoder;
use super::denoise::{check_shape, Shape4};
use super::Request;

/// What an inpainting request starts from: the mask and masked image as diffusers' pipeline
/// computes them, the latents its denoising loop uses, and the start latents. Every tensor is
/// f32 on the pipeline's device.
#[derive(Debug, Clone)]
pub struct Inpainting {
    /// The mask after the mask processor, `[1, 1, H, W]`: 1 where the image is repainted
    /// (the mask was at least 0.5), 0 where it is kept.
    pub mask_condition: Tensor,
    /// The init image in `[-1, 1]` with the repainted region zeroed: `init * (mask < 0.5)`,
    /// `[1, 3, H, W]`.
    pub masked_image: Tensor,
    /// The processed mask at latent resolution (nearest), `[1, 1, h, w]`.
    pub mask_latent: Tensor,
    /// The masked image sampled from the VAE and scaled, `[1, C, h, w]` (what an inpainting
    /// UNet takes after the latents).
    pub masked_image_latents: Tensor,
    /// The init image sampled from the VAE and scaled, when diffusers encodes it: for a regular
    /// UNet always (its blending needs it), for an inpainting UNet only to noise it below strength 1.
    pub image_latents: Option<Tensor>,
    /// The noise the start latents were made from (the request's explicit `latents` when given).
    pub noise: Tensor,
    /// Where the denoising starts: `noise * init_noise_sigma` at strength 1 or with explicit
    /// latents, else the image latents noised to the first timestep.
    pub start_latents: Tensor,
    pub(super) unet_input: UnetInput,
}

/// How the denoising loop feeds the mask to the UNet.
#[derive(Debug, Clone)]
pub(super) enum UnetInput {
    /// An inpainting UNet: these channels (the latent mask, then the masked-image latents) are
    /// concatenated after the scaled latents at every step.
    Concat(Tensor),
    /// A regular UNet: after each step the latents outside the mask are these image latents,
    /// re-noised to the next timestep with the start noise.
    Blend { image_latents: Tensor },
}

/// diffusers' mask processor (`VaeImageProcessor(do_normalize=False, do_binarize=True,
/// do_convert_grayscale=True)`) for a mask tensor `[1, 1, h, w]` in `[0, 1]`: resized to
/// `height` x `width` only when its size differs (nearest, as `F.interpolate` resizes tensors;
/// a picture is resized before it becomes a tensor, as the processor resizes PIL images), then
/// binarised: 1 where it is at least 0.5, 0 elsewhere.
pub fn process_mask(mask: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let dims = mask.dims();
    if dims.len() != 4 || dims[0] != 1 || dims[1] != 1 || dims[2] == 0 || dims[3] == 0 {
        return Err(Error::InvalidParameter {
            name: "mask",
            value: format!("of shape {dims:?}"),
            expected: "a grayscale mask of shape [1, 1, H, W] in [0, 1] (white: repaint)"
                .to_string(),
        });
    }
    let mask = mask.to_dtype(DType::F32)?;
    let mask = if (dims[2], dims[3]) == (height, width) {
        mask
    } else {
        resize_nearest(&mask, height, width)?
    };
    Ok(mask.ge(0.5f64)?.to_dtype(DType::F32)?)
}

/// `torch.nn.functional.interpolate(x, size=(height, width))` (mode `nearest`) for `[B, C, h, w]`:
/// output row `i` takes input row `floor(i * h / height)`, in float32 as torch computes it.
pub fn resize_nearest(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    let rows = nearest_indices(in_h, height);
    let cols = nearest_indices(in_w, width);
    let device = x.device();
    let rows = Tensor::from_vec(rows, height, device)?;
    let cols = Tensor::from_vec(cols, width, device)?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// The input index torch's nearest interpolation reads for each of `output` positions.
fn nearest_indices(input: usize, output: usize) -> Vec<u32> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
        .collect()
}

/// The masked image in `[-1, 1]` (`(2 * init - 1) * (mask < 0.5)`) and the same picture in
/// `[0, 1]` for the latent encoder (0.5 where the mask repaints, which the encoder's `2x - 1`
/// maps to exactly 0), for an init image `[1, 3, H, W]` in `[0, 1]` and a processed mask.
fn masked_image(init: &Tensor, mask_condition: &Tensor) -> Result<(Tensor, Tensor)> {
    let keep = mask_condition.lt(0.5f64)?.to_dtype(DType::F32)?;
    let signed = ((init * 2.0)? - 1.0)?.broadcast_mul(&keep)?;
    let unit =
        (init.broadcast_mul(&keep)? + ((1.0 - &keep)? * 0.5)?.broadcast_as(init.shape())?)?;
    Ok((signed, unit))
}

/// Everything an inpainting `request` (with a mask, and `image` its init image) starts from,
/// the generator drawn as diffusers' inpainting pipelines draw it (see [`Inpainting`]): the init
/// image's VAE sample (when diffusers encodes it), then the noise (unless the request's explicit
/// latents stand in for it), then the masked image's VAE sample. `shape` is the latents' shape;
/// `unet_in_channels` says which kind of UNet runs.
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare(
    request: &Request,
    image: &Tensor,
    shape: Shape4,
    unet_in_channels: usize,
    scheduler: &dyn Scheduler,
    first_timestep: f64,
    generator: &mut TorchGenerator,
    encoder: &dyn LatentEncoder,
    device: &Device,
) -> Result<Inpainting> {
    let (_, channels, latent_h, latent_w) = shape;
    let (height, width) = (request.height, request.width);
    let image = image.to_device(device)?.to_dtype(DType::F32)?;
    check_shape("init image", &image, (1, 3, height, width))?;
    let mask = request
        .mask
        .as_ref()
        .ok_or_else(|| Error::InvalidParameter {
            name: "mask",
            value: "none".to_string(),
            expected: "a mask for an inpainting request".to_string(),
        })?;
    let explicit = request.latents.as_ref();
    if let Some(latents) = explicit {
        check_shape("latents", latents, shape)?;
    }
    let mask_condition = process_mask(&mask.to_device(device)?, height, width)?;
    let (masked_image, masked_unit) = masked_image(&image, &mask_condition)?;
    let mask_latent = resize_nearest(&mask_condition, latent_h, latent_w)?;

    let blending = unet_in_channels == channels;
    // diffusers' `is_strength_max`: at strength 1 the start is pure noise.
    let noised_image = explicit.is_none() && request.strength < 1.0;
    let image_latents = if blending || noised_image {
        Some(encoder.encode(&image, &mut *generator)?)
    } else {
        None
    };
    let noise = match explicit {
        Some(latents) => latents.to_device(device)?.to_dtype(DType::F32)?,
        None => generator.randn(&shape.into(), DType::F32, device)?,
    };
    // With explicit latents diffusers starts from them as noise even below strength 1.
    let start_latents = match image_latents.as_ref().filter(|_| noised_image) {
        Some(image_latents) => scheduler.add_noise(image_latents, &noise, first_timestep)?,
        None => (&noise * scheduler.init_noise_sigma())?,
    };
    // Drawn for a regular UNet too, which does not use it: the later draws stay diffusers'.
    let masked_image_latents = encoder.encode(&masked_unit, &mut *generator)?;

    let unet_input = match (&image_latents, blending) {
        (Some(image_latents), true) => UnetInput::Blend {
            image_latents: image_latents.clone(),
        },
        _ => UnetInput::Concat(Tensor::cat(&[&mask_latent, &masked_image_latents], 1)?),
    };
    Ok(Inpainting {
        mask_condition,
        masked_image,
        mask_latent,
        masked_image_latents,
        image_latents,
        noise,
        start_latents,
        unet_input,
    })
}

impl Inpainting {
    /// The inpainting of a batch from each image's own (the same mask and image, each image's
    /// own noise and VAE samples), stacked along the batch.
    pub(super) fn batch(images: Vec<Inpainting>) -> Result<Inpainting> {
        let stack = |pick: &dyn Fn(&Inpainting) -> Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = images.iter().map(pick).collect();
            Ok(Tensor::cat(&rows, 0)?)
        };
        let image_latents = if images.iter().all(|i| i.image_latents.is_some()) {
            Some(stack(&|i| {
                i.image_latents.clone().unwrap_or_else(|| i.noise.clone())
            })?)
        } else {
            None
        };
        let unet_input = match images.first().map(|i| &i.unet_input) {
            Some(UnetInput::Concat(_)) => UnetInput::Concat(stack(&|i| match &i.unet_input {
                UnetInput::Concat(extra) => extra.clone(),
                UnetInput::Blend { image_latents } => image_latents.clone(),
            })?),
            _ => UnetInput::Blend {
                image_latents: stack(&|i| match &i.unet_input {
                    UnetInput::Blend { image_latents } => image_latents.clone(),
                    UnetInput::Concat(extra) => extra.clone(),
                })?,
            },
        };
        Ok(Inpainting {
            mask_condition: stack(&|i| i.mask_condition.clone())?,
            masked_image: stack(&|i| i.masked_image.clone())?,
            mask_latent: stack(&|i| i.mask_latent.clone())?,
            masked_image_latents: stack(&|i| i.masked_image_latents.clone())?,
            image_latents,
            noise: stack(&|i| i.noise.clone())?,
            start_latents: stack(&|i| i.start_latents.clone())?,
            unet_input,
        })
    }

    /// The channels an inpainting UNet takes after the scaled latents, `[1, 1 + C, h, w]`.
    pub(super) fn extra_channels(&self) -> Option<&Tensor> {
        match &self.unet_input {
            UnetInput::Concat(extra) => Some(extra),
            UnetInput::Blend { .. } => None,
        }
    }

    /// A regular UNet's latent blending after a scheduler step: `latents` inside the mask, the
    /// image latents outside it, noised to `next` (the following timestep) or, after the last
    /// step, as they are. An inpainting UNet's latents are returned unchanged.
    pub(super) fn blend(
        &self,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        next: Option<f64>,
    ) -> Result<Tensor> {
        let UnetInput::Blend { image_latents } = &self.unet_input else {
            return Ok(latents.clone());
        };
        let known = match next {
            Some(t) => scheduler.add_noise(image_latents, &self.noise, t)?,
            None => image_latents.clone(),
        };
        let mask = &self.mask_latent;
        Ok((known.broadcast_mul(&(1.0 - mask)?)? + latents.broadcast_mul(mask)?)?)
    }
}

/// diffusers' inpainting UNets take the latents, one mask channel and the masked-image latents:
/// whether a UNet of `in_channels` is one, for latents of `latent_channels`; an error for a UNet
/// that is neither that nor a regular one.
pub(super) fn is_inpainting_unet(in_channels: usize, latent_channels: usize) -> Result<bool> {
    if in_channels == latent_channels {
        Ok(false)
    } else if in_channels == 2 * latent_channels + 1 {
        Ok(true)
    } else {
        Err(Error::InvalidParameter {
            name: "unet in_channels",
            value: in_channels.to_string(),
            expected: format!(
                "{latent_channels} (the VAE's latent channels) or {} (an inpainting UNet: \
                 latents, mask, masked-image latents)",
                2 * latent_channels + 1
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn the_mask_is_binarised_at_one_half() {
        let mask = Tensor::new(&[0.0f32, 0.49, 0.5, 0.51, 1.0, 0.25], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let processed = process_mask(&mask, 2, 3).unwrap();
        assert_eq!(values(&processed), [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn a_mask_of_another_size_is_resized_nearest_as_torch_does() {
        // 4 x 4 -> 2 x 2 reads rows and columns 0 and 2; 2 -> 3 reads 0, 0, 1.
        let mask = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        assert_eq!(
            values(&resize_nearest(&mask, 2, 2).unwrap()),
            [0.0, 2.0, 8.0, 10.0]
        );
        assert_eq!(nearest_indices(2, 3), [0, 0, 1]);
        assert_eq!(
            nearest_indices(128, 16),
            (0..16).map(|i| i * 8).collect::<Vec<_>>()
        );
        let white_left = Tensor::new(&[[1f32, 0.0]], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 2))
            .unwrap();
        let processed = process_mask(&white_left, 2, 4).unwrap();
        assert_eq!(processed.dims(), [1, 1, 2, 4]);
        assert_eq!(values(&processed), [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn masks_that_are_not_one_grayscale_channel_are_refused_with_the_shape() {
        let rgb = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let message = process_mask(&rgb, 4, 4).unwrap_err().to_string();
        assert!(message.contains("[1, 3, 4, 4]"), "{message}");
        assert!(message.contains("[1, 1, H, W]"), "{message}");
    }

    #[test]
    fn the_masked_image_zeroes_the_repainted_region_in_both_ranges() {
        let init = Tensor::new(&[0.25f32, 1.0, 0.0, 0.75], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap()
            .repeat((1, 3, 1, 1))
            .unwrap();
        let mask = Tensor::new(&[1f32, 0.0, 0.0, 1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap();
        let (signed, unit) = masked_image(&init, &mask).unwrap();
        assert_eq!(signed.dims(), [1, 3, 2, 2]);
        assert_eq!(&values(&signed)[..4], [0.0, 1.0, -1.0, 0.0]);
        assert_eq!(&values(&unit)[..4], [0.5, 1.0, 0.0, 0.5]);
        // The encoder's 2x - 1 of the unit picture is the signed one, exactly.
        let encoded = ((unit * 2.0).unwrap() - 1.0).unwrap();
        assert_eq!(values(&encoded), values(&signed));
    }

    #[test]
    fn blending_keeps_the_masked_latents_and_the_image_elsewhere() {
        let device = Device::Cpu;
        let mask_latent = Tensor::new(&[1f32, 0.0], &device)
            .unwrap()
            .reshape((1, 1, 1, 2))
            .unwrap();
        let image_latents = Tensor::full(3f32, (1, 2, 1, 2), &device).unwrap();
        let noise = Tensor::full(1f32, (1, 2, 1, 2), &device).unwrap();
        let inpainting = Inpainting {
            mask_condition: mask_latent.clone(),
            masked_image: mask_latent.clone(),
            mask_latent,
            masked_image_latents: image_latents.clone(),
            image_latents: Some(image_latents.clone()),
            noise: noise.clone(),
            start_latents: noise,
            unet_input: UnetInput::Blend { image_latents },
        };
        let config = serde_json::json!({
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        });
        let scheduler = sdrs_schedulers::from_config(&config, 4).unwrap();
        let latents = Tensor::full(-7f32, (1, 2, 1, 2), &device).unwrap();
        // After the last step: the image latents themselves outside the mask.
        let last = inpainting
            .blend(scheduler.as_ref(), &latents, None)
            .unwrap();
        assert_eq!(values(&last), [-7.0, 3.0, -7.0, 3.0]);
        // Before: re-noised to the next timestep with the start noise.
        let t = scheduler.timesteps()[1];
        let noised = scheduler
            .add_noise(
                &Tensor::full(3f32, (1, 2, 1, 2), &device).unwrap(),
                &Tensor::full(1f32, (1, 2, 1, 2), &device).unwrap(),
                t,
            )
            .unwrap();
        let expected = values(&noised)[1];
        let mid = values(
            &inpainting
                .blend(scheduler.as_ref(), &latents, Some(t))
                .unwrap(),
        );
        assert_eq!(mid, [-7.0, expected, -7.0, expected]);
        assert_ne!(expected, 3.0);
        assert!(inpainting.extra_channels().is_none());
    }

    #[test]
    fn unets_are_regular_inpainting_or_refused() {
        assert!(!is_inpainting_unet(4, 4).unwrap());
        assert!(is_inpainting_unet(9, 4).unwrap());
        assert!(is_inpainting_unet(33, 16).unwrap());
        let message = is_inpainting_unet(8, 4).unwrap_err().to_string();
        assert!(message.contains('8') && message.contains("9"), "{message}");
    }
}
