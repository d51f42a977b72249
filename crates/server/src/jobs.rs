//! The queue: one worker thread per loaded model runs its jobs one at a time; jobs wait in a
//! bounded queue, a job whose client went away before it started is dropped, and the running
//! jobs' progress (step, live preview) is shared with `/sdapi/v1/progress`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use candle_core::Tensor;
use sdrs_pipeline::{InitImage, Request, StableDiffusion, StepProgress};

use crate::a1111::Plan;
use crate::{png, Error, Result};

/// A loaded model and the alias requests name it by.
pub struct Model {
    pub alias: String,
    pub pipeline: StableDiffusion,
}

/// What the handlers know of a model without its worker.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub alias: String,
    /// Where it was loaded from (shown by `/sdapi/v1/sd-models`).
    pub path: String,
    pub vae_factor: usize,
    pub default_size: usize,
    pub default_cfg: f64,
}

/// A finished job.
pub struct Output {
    /// PNGs with their `parameters` chunk, one per image.
    pub images: Vec<Vec<u8>>,
    pub seeds: Vec<u64>,
    pub infotexts: Vec<String>,
    /// `/sdapi/v1/interrupt` stopped it before its last batch.
    pub interrupted: bool,
    pub queued_s: f64,
    pub generation_s: f64,
}

struct Job {
    id: u64,
    plan: Plan,
    init: Option<Tensor>,
    abandoned: Arc<AtomicBool>,
    submitted: Instant,
    reply: tokio::sync::oneshot::Sender<Result<Output>>,
}

/// A job waiting, as the queue lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Waiting {
    pub id: u64,
    pub model: String,
}

/// A job running.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Running {
    pub id: u64,
    pub model: String,
    /// Steps done over every batch of the job, and their total.
    pub step: usize,
    pub steps: usize,
    #[serde(skip)]
    pub started: Option<Instant>,
    /// The latest preview, a base64 PNG.
    #[serde(skip)]
    pub preview: Option<String>,
    #[serde(skip)]
    interrupt: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    next_id: u64,
    /// How long the latest job took, to estimate `Retry-After`.
    last_job_s: f64,
    finished: u64,
}

/// The queue shared by the handlers and the workers.
pub struct Queue {
    state: Mutex<State>,
    limit: usize,
    workers: Vec<(String, mpsc::Sender<Job>)>,
    /// Set by a progress request that wants the live preview: previews cost a decode per step,
    /// so they are only made while someone looks.
    pub preview_wanted: AtomicBool,
}

/// A job the handler waits on: dropping it (the client went away, or timed out) drops the job if
/// it has not started, and stops a running one after its current batch.
pub struct Ticket {
    pub id: u64,
    queue: Arc<Queue>,
    abandoned: Arc<AtomicBool>,
    pub reply: tokio::sync::oneshot::Receiver<Result<Output>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::SeqCst);
        let mut state = self.queue.lock();
        state.waiting.retain(|w| w.id != self.id);
        if let Some(running) = state.running.iter().find(|r| r.id == self.id) {
            running.interrupt.store(true, Ordering::SeqCst);
        }
    }
}

/// A snapshot for `/sdapi/v1/progress` and `/api/queue`.
pub struct Snapshot {
    pub waiting: Vec<Waiting>,
    pub running: Vec<Running>,
    pub limit: usize,
    pub finished: u64,
}

impl Queue {
    /// Starts one worker thread per model; returns the queue and what the handlers need of each.
    pub fn start(models: Vec<Model>, limit: usize) -> (Arc<Self>, Vec<ModelInfo>) {
        let mut infos = Vec::new();
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for model in models {
            let pipeline = &model.pipeline;
            infos.push(ModelInfo {
                alias: model.alias.clone(),
                path: pipeline.root().display().to_string(),
                vae_factor: pipeline.vae_scale_factor(),
                default_size: pipeline.default_size(),
                default_cfg: pipeline.family().default_guidance_scale(),
            });
            let (sender, receiver) = mpsc::channel();
            senders.push((model.alias.clone(), sender));
            receivers.push((model, receiver));
        }
        let queue = Arc::new(Self {
            state: Mutex::new(State::default()),
            limit,
            workers: senders,
            preview_wanted: AtomicBool::new(false),
        });
        for (model, receiver) in receivers {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("sdrs-{}", model.alias))
                .spawn(move || queue.work(model, receiver))
                .map_err(|e| e.to_string())
                .ok();
        }
        (queue, infos)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock left consistent data (every update is
        // one assignment), so the queue carries on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `plan`, or refuses with [`Error::QueueFull`] when `limit` jobs wait already.
    pub fn submit(self: &Arc<Self>, plan: Plan, init: Option<Tensor>) -> Result<Ticket> {
        let Some((_, sender)) = self.workers.iter().find(|(alias, _)| *alias == plan.model) else {
            return Err(Error::WorkerGone(plan.model));
        };
        let mut state = self.lock();
        if state.waiting.len() >= self.limit {
            let ahead = state.waiting.len() + state.running.len();
            let retry_after = (state.last_job_s * ahead as f64).ceil().clamp(1.0, 3600.0) as u64;
            return Err(Error::QueueFull {
                limit: self.limit,
                retry_after,
            });
        }
        state.next_id += 1;
        let id = state.next_id;
        let abandoned = Arc::new(AtomicBool::new(false));
        let (reply, receiver) = tokio::sync::oneshot::channel();
        let model = plan.model.clone();
        let job = Job {
            id,
            plan,
            init,
            abandoned: abandoned.clone(),
            submitted: Instant::now(),
            reply,
        };
        sender
            .send(job)
            .map_err(|_| Error::WorkerGone(model.clone()))?;
        state.waiting.push_back(Waiting { id, model });
        drop(state);
        Ok(Ticket {
            id,
            queue: self.clone(),
            abandoned,
            reply: receiver,
        })
    }

    /// Asks every running job to stop after its current batch.
    pub fn interrupt(&self) {
        for running in &self.lock().running {
            running.interrupt.store(true, Ordering::SeqCst);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        Snapshot {
            waiting: state.waiting.iter().cloned().collect(),
            running: state.running.clone(),
            limit: self.limit,
            finished: state.finished,
        }
    }

    fn work(&self, mut model: Model, jobs: mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            let interrupt = Arc::new(AtomicBool::new(false));
            {
                let mut state = self.lock();
                state.waiting.retain(|w| w.id != job.id);
                if job.abandoned.load(Ordering::SeqCst) {
                    continue;
                }
                state.running.push(Running {
                    id: job.id,
                    model: model.alias.clone(),
                    step: 0,
                    steps: job.plan.steps.saturating_mul(job.plan.n_iter),
                    started: Some(Instant::now()),
                    preview: None,
                    interrupt: interrupt.clone(),
                });
            }
            let queued_s = job.submitted.elapsed().as_secs_f64();
            let started = Instant::now();
            // A bug that panics inside a generation fails that request, not the whole model.
            let run =
                std::panic::AssertUnwindSafe(|| self.run(&mut model.pipeline, &job, &interrupt));
            let result = std::panic::catch_unwind(run)
                .unwrap_or_else(|_| Err(Error::WorkerGone(model.alias.clone())));
            let generation_s = started.elapsed().as_secs_f64();
            let mut state = self.lock();
            state.running.retain(|r| r.id != job.id);
            state.last_job_s = generation_s;
            state.finished += 1;
            drop(state);
            let result = result.map(|mut output| {
                output.queued_s = queued_s;
                output.generation_s = generation_s;
                output
            });
            // The client may be gone; then nobody wants the images.
            let _ = job.reply.send(result);
        }
    }

    fn run(
        &self,
        pipeline: &mut StableDiffusion,
        job: &Job,
        interrupt: &Arc<AtomicBool>,
    ) -> Result<Output> {
        let plan = &job.plan;
        // The request's LoRAs merged into the loaded weights (rebuilding only what they touch);
        // the next request without them goes back to the model's own weights.
        if pipeline.loras() != plan.loras.as_slice() {
            pipeline.set_loras(&plan.loras)?;
        }
        let scheduler = plan
            .sampler
            .config(pipeline.scheduler_config(), plan.schedule)?;
        let mut request = Request::new(pipeline, &plan.prompt, scheduler);
        request.negative_prompt = Some(plan.negative_prompt.clone());
        request.width = plan.width;
        request.height = plan.height;
        request.steps = plan.steps;
        request.guidance_scale = plan.cfg_scale;
        request.clip_skip = plan.clip_skip;
        request.batch_size = plan.batch_size;
        // An interrupt stops the image being denoised at its next step, not only between images.
        request.cancel = Some(interrupt.clone());
        if let Some(strength) = plan.strength {
            request.strength = strength;
        }
        if let Some(init) = &job.init {
            let init = init.to_device(pipeline.device())?;
            request.init_image = InitImage::Pixels(init);
        }
        let mut output = Output {
            images: Vec::new(),
            seeds: Vec::new(),
            infotexts: Vec::new(),
            interrupted: false,
            queued_s: 0.0,
            generation_s: 0.0,
        };
        let mut last_preview = Instant::now();
        for batch in 0..plan.n_iter {
            if interrupt.load(Ordering::SeqCst) {
                output.interrupted = true;
                break;
            }
            let first = batch.saturating_mul(plan.batch_size);
            request.seed = Some(plan.image_seed(first));
            let done = batch.saturating_mul(plan.steps);
            let mut on_step = |p: &StepProgress| {
                let wanted = self.preview_wanted.load(Ordering::Relaxed);
                let preview = if wanted && last_preview.elapsed().as_millis() >= 200 {
                    last_preview = Instant::now();
                    p.preview()
                        .ok()
                        .and_then(|image| png::encode(&image, None).ok())
                        .map(|bytes| png::to_base64(&bytes))
                } else {
                    None
                };
                let mut state = self.lock();
                if let Some(running) = state.running.iter_mut().find(|r| r.id == job.id) {
                    running.step = done.saturating_add(p.step);
                    if preview.is_some() {
                        running.preview = preview;
                    }
                }
            };
            let images = match pipeline.generate(&request, &mut on_step) {
                Err(sdrs_pipeline::Error::Cancelled) => {
                    output.interrupted = true;
                    break;
                }
                other => other?,
            };
            for position in 0..plan.batch_size {
                let seed = plan.image_seed(first + position);
                let text = plan.infotext(seed, position);
                output
                    .images
                    .push(png::encode(&images.get(position)?, Some(&text))?);
                output.seeds.push(seed);
                output.infotexts.push(text);
            }
        }
        Ok(output)
    }
}
