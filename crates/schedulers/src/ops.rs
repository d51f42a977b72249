//! Tensor helpers shared by the schedulers: torch-style elementwise arithmetic with float32
//! scalars, step-index bookkeeping, dynamic thresholding and noise drawing.

use candle_core::{DType, Tensor};

use crate::{Error, NoiseSource, Result};

/// `x * c` with a float32 scalar, as torch multiplies by a 0-dim float32 tensor or Python float.
pub(crate) fn mul(x: &Tensor, c: f32) -> Result<Tensor> {
    Ok(x.affine(c as f64, 0.0)?)
}

/// `x / c` as a true division (torch divides by a float32 scalar; it does not multiply by the
/// reciprocal, which can differ in the last bit).
pub(crate) fn div(x: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&c)?)
}

/// Schedulers compute in float32 whatever the model's dtype (diffusers upcasts in the
/// sigma-based schedulers; float32 is at least as accurate for the others).
pub(crate) fn f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}

/// diffusers' `index_for_timestep`: the position of `t` in the schedule, taking the second match
/// when the value occurs twice (so img2img starting mid-schedule does not skip a sigma).
pub(crate) fn index_for_timestep(timesteps: &[f64], t: f64) -> Option<usize> {
    let mut matches = timesteps.iter().enumerate().filter(|(_, &v)| v == t);
    let first = matches.next().map(|(i, _)| i);
    matches.next().map(|(i, _)| i).or(first)
}

/// The `_step_index` / `_begin_index` pair of the index-based diffusers schedulers.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepIndex {
    pub step: Option<usize>,
    pub begin: Option<usize>,
}

impl StepIndex {
    /// diffusers' `_init_step_index`: the begin index when set, else the timestep's position.
    /// `missing_is_last` is DPM-Solver/UniPC's rule for a timestep not in the schedule.
    pub fn current(
        &mut self,
        class: &str,
        timesteps: &[f64],
        t: f64,
        missing_is_last: bool,
    ) -> Result<usize> {
        if let Some(step) = self.step {
            return Ok(step);
        }
        let index = match self.begin {
            Some(begin) => begin,
            None => match index_for_timestep(timesteps, t) {
                Some(i) => i,
                None if missing_is_last && !timesteps.is_empty() => timesteps.len() - 1,
                None => {
                    return Err(Error::UnknownTimestep {
                        class: class.to_string(),
                        timestep: t,
                    })
                }
            },
        };
        self.step = Some(index);
        Ok(index)
    }

    /// Like [`StepIndex::current`] but refuses to step past the end of the schedule.
    pub fn for_step(
        &mut self,
        class: &str,
        timesteps: &[f64],
        t: f64,
        missing_is_last: bool,
    ) -> Result<usize> {
        let index = self.current(class, timesteps, t, missing_is_last)?;
        if index >= timesteps.len() {
            return Err(Error::TooManySteps {
                class: class.to_string(),
                calls: index + 1,
                available: timesteps.len(),
            });
        }
        Ok(index)
    }

    /// The index `add_noise` uses: diffusers takes the timestep's position unless a begin index was set.
    pub fn for_add_noise(
        &self,
        class: &str,
        timesteps: &[f64],
        t: f64,
        missing_is_last: bool,
    ) -> Result<usize> {
        match (self.begin, self.step) {
            (None, _) => match index_for_timestep(timesteps, t) {
                Some(i) => Ok(i),
                None if missing_is_last && !timesteps.is_empty() => Ok(timesteps.len() - 1),
                None => Err(Error::UnknownTimestep {
                    class: class.to_string(),
                    timestep: t,
                }),
            },
            (Some(_), Some(step)) => Ok(step),
            (Some(begin), None) => Ok(begin),
        }
    }

    pub fn advance(&mut self) {
        self.step = self.step.map(|s| s + 1);
    }
}

/// diffusers' `_threshold_sample` (dynamic thresholding, Saharia et al. 2022): per batch item, the
/// `ratio` quantile `s` of |x| (torch.quantile, linear interpolation), clamped to `[1, max]`, then
/// `clamp(x, -s, s) / s`.
pub(crate) fn threshold_sample(x: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let batch = dims.first().copied().unwrap_or(1);
    let rows = x
        .to_dtype(DType::F32)?
        .reshape((batch, ()))?
        .to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(x.elem_count());
    for row in rows {
        let mut sorted: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let s = quantile_sorted(&sorted, ratio as f32).clamp(1.0, max_value as f32);
        out.extend(row.iter().map(|v| v.clamp(-s, s) / s));
    }
    Ok(Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())?)
}

/// `torch.quantile(sorted, q)` with linear interpolation, in float32 as torch computes it.
fn quantile_sorted(sorted: &[f32], q: f32) -> f32 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f32::NAN;
    };
    let rank = q * last as f32;
    let below = rank as usize;
    let above = (rank.ceil() as usize).min(last);
    let weight = rank - below as f32;
    let (start, end) = (sorted[below.min(last)], sorted[above]);
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// Draws noise of `like`'s shape in float32 on its device from the pipeline's generator.
pub(crate) fn draw_noise(
    class: &str,
    noise: &mut dyn NoiseSource,
    like: &Tensor,
) -> Result<Tensor> {
    let drawn = noise
        .randn(like.shape(), DType::F32, like.device())
        .map_err(|e| match e {
            Error::NoNoiseSource { .. } => Error::NoNoiseSource {
                class: class.to_string(),
            },
            other => other,
        })?;
    if drawn.dims() != like.dims() {
        return Err(Error::NoiseShape {
            expected: like.dims().to_vec(),
            found: drawn.dims().to_vec(),
        });
    }
    f32(&drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_match_wins() {
        assert_eq!(index_for_timestep(&[3.0, 2.0, 2.0, 1.0], 2.0), Some(2));
        assert_eq!(index_for_timestep(&[3.0, 2.0, 1.0], 1.0), Some(2));
        assert_eq!(index_for_timestep(&[3.0, 2.0, 1.0], 5.0), None);
    }

    #[test]
    fn quantile_interpolates() {
        let v = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.5), 2.0);
        assert!((quantile_sorted(&v, 0.995) - 3.98).abs() < 1e-6);
    }

    #[test]
    fn thresholding_clamps_to_quantile() -> Result<()> {
        let x = Tensor::new(&[[[[-4f32, 0.5], [2.0, 0.25]]]], &candle_core::Device::Cpu)?;
        let y = threshold_sample(&x, 0.5, 10.0)?;
        // |x| sorted: 0.25 0.5 2 4 -> median 1.25.
        let y = y.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![-1.0, 0.4, 1.0, 0.2]);
        Ok(())
    }
}
