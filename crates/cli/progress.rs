//! The terminal progress bar for denoising steps, showing s/it (or it/s when faster than one a second).

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// A bar of `total` steps that prints to stderr (hidden when stderr is not a terminal).
pub fn step_bar(total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}<{eta_precise}, {speed}]",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key(
        "speed",
        |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}", speed_text(state.per_sec()));
        },
    )
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix("sampling");
    bar
}

/// `2.31s/it` below one step a second, `4.20it/s` above.
pub fn speed_text(per_sec: f64) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        "-".to_string()
    } else if per_sec < 1.0 {
        format!("{:.2}s/it", 1.0 / per_sec)
    } else {
        format!("{per_sec:.2}it/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_steps_show_seconds_per_step_and_fast_ones_steps_per_second() {
        assert_eq!(speed_text(0.5), "2.00s/it");
        assert_eq!(speed_text(4.2), "4.20it/s");
        assert_eq!(speed_text(0.0), "-");
        assert_eq!(speed_text(f64::NAN), "-");
    }
}
