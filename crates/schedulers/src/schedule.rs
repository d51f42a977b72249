//! Noise-schedule tables shared by all schedulers (betas, `alphas_cumprod`, sigmas, timestep
//! spacing, Karras / exponential sigmas, sigma-to-timestep interpolation).
//!
//! diffusers builds these with torch float32 tensors in some places and numpy float64 arrays in
//! others (`diffusers/schedulers/scheduling_*.py`); each function here says which width it mirrors,
//! and reproduces the arithmetic of the torch/numpy kernel it stands for (`torch.linspace`'s two-sided
//! fill, `torch.cumprod`'s double accumulator, `np.linspace`, `np.arange`, `np.interp`, round-half-even)
//! so the tables agree with diffusers' to the last bit or close to it.

use crate::config::BetaSchedule;

/// The beta-schedule part of every scheduler config.
pub(crate) struct BetaParams<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

/// The [`BetaParams`] of a scheduler config with diffusers' shared beta-schedule fields; the second
/// argument replaces `rescale_betas_zero_snr` for the schedulers that lack that option.
macro_rules! beta_params {
    ($config:expr) => {
        $crate::schedule::beta_params!($config, $config.rescale_betas_zero_snr)
    };
    ($config:expr, $rescale:expr) => {
        $crate::schedule::BetaParams {
            num_train_timesteps: $config.num_train_timesteps,
            beta_start: $config.beta_start,
            beta_end: $config.beta_end,
            beta_schedule: $config.beta_schedule,
            trained_betas: $config.trained_betas.as_deref(),
            rescale_betas_zero_snr: $rescale,
        }
    };
}
pub(crate) use beta_params;

impl BetaParams<'_> {
    /// `alphas_cumprod` of these betas, in float32.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        alphas_cumprod(&betas(self))
    }

    /// [`BetaParams::alphas_cumprod`] with the zero-terminal-SNR pin of
    /// [`pin_terminal_alpha_cumprod`].
    pub fn pinned_alphas_cumprod(&self) -> Vec<f32> {
        let mut alphas_cumprod = self.alphas_cumprod();
        pin_terminal_alpha_cumprod(&mut alphas_cumprod, self.rescale_betas_zero_snr);
        alphas_cumprod
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)`: the CPU kernel fills the first half
/// forwards from `start` and the second half backwards from `end`, in float32. torch's x86-64
/// kernels are compiled with FMA contraction, so `start + step * i` is one fused operation.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// The training betas (float32), as every diffusers scheduler's `__init__` builds them.
pub(crate) fn betas(p: &BetaParams) -> Vec<f32> {
    let betas = match (p.trained_betas, p.beta_schedule) {
        (Some(trained), _) => trained.iter().map(|&b| b as f32).collect(),
        (None, BetaSchedule::Linear) => {
            torch_linspace_f32(p.beta_start, p.beta_end, p.num_train_timesteps)
        }
        (None, BetaSchedule::ScaledLinear) => torch_linspace_f32(
            p.beta_start.powf(0.5),
            p.beta_end.powf(0.5),
            p.num_train_timesteps,
        )
        .into_iter()
        .map(|b| b * b)
        .collect(),
        (None, BetaSchedule::SquaredcosCapV2) => {
            betas_for_alpha_bar(p.num_train_timesteps, AlphaBar::Cosine)
        }
        (None, BetaSchedule::Exp) => betas_for_alpha_bar(p.num_train_timesteps, AlphaBar::Exp),
    };
    if p.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    }
}

/// The `alpha_transform_type` of `betas_for_alpha_bar`.
#[derive(Clone, Copy)]
enum AlphaBar {
    /// Nichol & Dhariwal (2021): `cos((t + 0.008) / 1.008 * pi / 2)^2`.
    Cosine,
    /// `exp(-12 t)`.
    Exp,
}

/// diffusers' `betas_for_alpha_bar`, computed in Python floats (f64) and stored as float32.
fn betas_for_alpha_bar(n: usize, transform: AlphaBar) -> Vec<f32> {
    const MAX_BETA: f64 = 0.999;
    let alpha_bar = |t: f64| match transform {
        AlphaBar::Cosine => ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2),
        AlphaBar::Exp => (t * -12.0).exp(),
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA) as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
/// Steps are Flawed", algorithm 1), in float32 as diffusers runs it on the betas tensor.
pub(crate) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
    let mut sqrt_bar: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return betas.to_vec();
    };
    let factor = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v -= last;
        *v *= factor;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut alphas = Vec::with_capacity(bar.len());
    alphas.push(bar[0]);
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// `torch.cumprod` on a float32 CPU tensor: the running product is kept in double and each
/// element is rounded to float32 on store.
pub(crate) fn cumprod(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// `alphas_cumprod = cumprod(1 - betas)` in float32.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>())
}

/// diffusers quirk (Euler, Euler ancestral, DPM-Solver, UniPC): with zero-terminal-SNR betas the last
/// `alphas_cumprod` is exactly 0 and its sigma infinite, so those schedulers pin it to `2**-24`.
pub(crate) fn pin_terminal_alpha_cumprod(alphas_cumprod: &mut [f32], rescaled: bool) {
    if rescaled {
        if let Some(last) = alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32: the sigma of each training step.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.log` of the float32 training sigmas (numpy keeps float32).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| numpy_log_f32(s)).collect()
}

/// numpy's float32 `np.log` on x86-64 (its AVX2 / AVX512F kernel in
/// `numpy/_core/src/umath/loops_exponent_log.dispatch.c.src`), which is not correctly rounded:
/// reduce to `m * 2^e` with `m` in `(sqrt(1/2), sqrt(2)]`, then a fused-multiply-add Pade
/// approximation of `log(m)` in `m - 1`, plus `e * ln 2`. Reproducing it moves the interpolated
/// Karras timesteps onto diffusers' values to the last float32 bit.
// The constants are the upstream decimal literals, rounded to f32 as the C compiler does.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
pub(crate) fn numpy_log_f32(x: f32) -> f32 {
    const P: [f32; 6] = [
        0.0,
        9.999999999999998702752e-01,
        2.112677543073053063722e+00,
        1.480000633576506585156e+00,
        3.808837741388407920751e-01,
        2.589979117907922693523e-02,
    ];
    const Q: [f32; 6] = [
        1.0,
        2.612677543073109236779e+00,
        2.453006071784736363091e+00,
        9.864942958519418960339e-01,
        1.546476374983906719538e-01,
        5.875095403124574342950e-03,
    ];
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    // Denormals are scaled by 2^100 first, as the kernel does.
    let (x, bias) = if x < f32::MIN_POSITIVE {
        (x * f32::from_bits(0x7180_0000), 100.0f32)
    } else {
        (x, 0.0)
    };
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 126) as f32 - bias;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m += m;
        e -= 1.0;
    }
    let y = m - 1.0;
    let mut num = P[5];
    let mut den = Q[5];
    for k in (0..5).rev() {
        num = num.mul_add(y, P[k]);
        den = den.mul_add(y, Q[k]);
    }
    e.mul_add(std::f32::consts::LN_2, num / den)
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start`, with the end point set exactly.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for float arguments: numpy computes the first two values and then
/// fills `start + i * (second - start)`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one `x` (fp float32, result float64).
pub(crate) fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    // numpy divides by `xp[j + 1] - xp[j]`, which is exactly 1 here.
    let slope = hi - lo;
    let y = slope * (x - j as f64) + lo;
    if y.is_nan() {
        let y = slope * (x - (j + 1) as f64) + hi;
        if y.is_nan() && lo == hi {
            return lo;
        }
        return y;
    }
    y
}

/// Karras et al. (2022) sigmas, `rho = 7`, in float64 as diffusers' `_convert_to_karras`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Log-uniform sigmas, as diffusers' `_convert_to_exponential`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep whose log-sigma matches, by linear
/// interpolation in log-sigma. `log_sigmas` is numpy float32; the query and weights are float64.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of `log_sigma >= log_sigmas[i]`: the last such index (0 if none).
    let low_idx = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - ls as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    // `low - high` is a float32 difference; the rest promotes to float64.
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Descending "leading" spacing: `arange(0, n) * (train // n)` reversed, plus `steps_offset`.
pub(crate) fn leading(num_train_timesteps: usize, n: usize, steps_offset: i64) -> Vec<i64> {
    let ratio = (num_train_timesteps / n.max(1)) as i64;
    (0..n as i64)
        .rev()
        .map(|i| i * ratio + steps_offset)
        .collect()
}

/// Descending "trailing" spacing: `round(arange(start, 0, -train / n)) - 1`.
pub(crate) fn trailing(start: f64, num_train_timesteps: usize, n: usize) -> Vec<i64> {
    let ratio = num_train_timesteps as f64 / n as f64;
    np_arange(start, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() as i64 - 1)
        .collect()
}

/// The float32 timesteps of the sigma-based (Euler-family) schedulers for a spacing, descending.
pub(crate) fn euler_family_timesteps(
    spacing: crate::config::TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f32> {
    use crate::config::TimestepSpacing;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train_timesteps - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => leading(num_train_timesteps, n, 0)
            .into_iter()
            .map(|t| t as f32 + steps_offset as f32)
            .collect(),
        TimestepSpacing::Trailing => trailing(num_train_timesteps as f64, num_train_timesteps, n)
            .into_iter()
            .map(|t| t as f32)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_linspace_is_two_sided() {
        let v = torch_linspace_f32(-1.0, 1.0, 4);
        assert_eq!(v, vec![-1.0, -1.0 + 2.0f32 / 3.0, 1.0 - 2.0f32 / 3.0, 1.0]);
        assert_eq!(torch_linspace_f32(0.0, 1.0, 1), vec![0.0]);
    }

    #[test]
    fn numpy_linspace_and_arange() {
        assert_eq!(
            np_linspace(0.0, 999.0, 5),
            vec![0.0, 249.75, 499.5, 749.25, 999.0]
        );
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn spacings_match_diffusers() {
        assert_eq!(leading(1000, 4, 1), vec![751, 501, 251, 1]);
        assert_eq!(trailing(1000.0, 1000, 4), vec![999, 749, 499, 249]);
        // 1000/3 steps: round(666.67) = 667, round(333.33) = 333.
        assert_eq!(trailing(1000.0, 1000, 3), vec![999, 666, 332]);
    }

    #[test]
    fn interp_hits_table_values_exactly() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(np_interp_index(1.0, &fp), 2.0);
        assert_eq!(np_interp_index(1.5, &fp), 3.0);
        assert_eq!(np_interp_index(7.0, &fp), 4.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let logs = log_sigmas(&sigmas);
        assert_eq!(sigma_to_t(1.0, &logs), 0.0);
        // ln(10) in f64 is below its f32 table entry, so the weight lands just short of 9.
        assert!((sigma_to_t(10.0, &logs) - 9.0).abs() < 1e-6);
        assert!((sigma_to_t(5.0, &logs) - 4.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.0, &logs), 0.0);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let betas = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000)
            .into_iter()
            .map(|b| b * b)
            .collect::<Vec<_>>();
        let rescaled = rescale_zero_terminal_snr(&betas);
        assert_eq!(*rescaled.last().unwrap(), 1.0);
        assert!((rescaled[0] - betas[0]).abs() < 1e-6);
    }
}
