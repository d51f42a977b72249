//! The error type of the schedulers crate.

/// Everything that can go wrong while building or running a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (device, dtype or shape problem).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The config's `_class_name` names a scheduler this crate does not implement.
    #[error("unknown scheduler class {name:?}; implemented: {}", accepted.join(", "))]
    UnknownClass { name: String, accepted: Vec<String> },

    /// The config has no `_class_name` (or it is not a string).
    #[error("scheduler config has no \"_class_name\" string")]
    MissingClassName,

    /// A sampler name that neither stable-diffusion.cpp nor AUTOMATIC1111 uses for a sampler we implement.
    #[error("unknown sampler {name:?}; accepted names: {}", accepted.join(", "))]
    UnknownSampler { name: String, accepted: Vec<String> },

    /// A sigma schedule name other than discrete / karras / exponential.
    #[error("unknown sigma schedule {name:?}; accepted names: {}", accepted.join(", "))]
    UnknownSchedule { name: String, accepted: Vec<String> },

    /// A config key holds a value the scheduler does not support.
    #[error("{class}: config key {key:?} has value {value}, accepted: {}", accepted.join(", "))]
    BadConfigValue {
        class: String,
        key: String,
        value: String,
        accepted: Vec<String>,
    },

    /// The config is not a JSON object or a key has the wrong JSON type.
    #[error("{class}: invalid scheduler config: {source}")]
    InvalidConfig {
        class: String,
        #[source]
        source: serde_json::Error,
    },

    /// The text is not JSON (even allowing Python's `Infinity` / `NaN`).
    #[error("invalid scheduler config JSON: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },

    /// `set_timesteps` was asked for a number of steps the scheduler cannot produce.
    #[error("{class}: cannot sample with {steps} inference steps: {reason}")]
    InvalidSteps {
        class: String,
        steps: usize,
        reason: String,
    },

    /// `step`/`scale_model_input`/`add_noise` was given a timestep that is not in the schedule.
    #[error("{class}: timestep {timestep} is not one of the scheduler's timesteps")]
    UnknownTimestep { class: String, timestep: f64 },

    /// `step` was called more often than the schedule has timesteps.
    #[error("{class}: step called {calls} times but the schedule has only {available} steps")]
    TooManySteps {
        class: String,
        calls: usize,
        available: usize,
    },

    /// A scheduler that draws noise was given a [`crate::NoiseSource`] that has none.
    #[error("{class} draws random noise during sampling but no random generator was given")]
    NoNoiseSource { class: String },

    /// The noise source returned a tensor of the wrong shape.
    #[error("noise source returned shape {found:?}, expected {expected:?}")]
    NoiseShape {
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A parity fixture is missing a tensor or field, or holds a malformed one.
    #[error("reference fixture {case:?}: {what}")]
    Fixture { case: String, what: String },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
