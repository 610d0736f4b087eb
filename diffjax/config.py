"""The config schema: every field the training job reads, with defaults (the digits run, except that
``experiments/configs/digits.py`` trains on the cosine schedule where ``base()`` keeps VP-linear).

Experiment configs under ``experiments/configs/`` start from ``base()`` and change what they need.

Names that scripts and users rely on: ``seed``, ``data.dataset``, ``training.batch_size``,
``training.num_steps``.
"""

import re

import ml_collections
from ml_collections import config_dict


def base():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "diffusion": a denoiser (eps/x0/v/score/flow); "classifier": a noise-conditional classifier
    # p(y | x_t, t) for classifier guidance, trained by cross-entropy on x_t ~ q(x_t | x_0); few-step
    # generators: "progressive_distillation", "consistency_distillation", "consistency_training", "reflow";
    # "autoencoder" (LDM's KL autoencoder, config.autoencoder) and "latent_diffusion" (a denoiser on its latents,
    # config.latent) (diffjax.training.tasks)
    c.task = "diffusion"

    c.data = d = ml_collections.ConfigDict()
    d.dataset = "digits"
    d.data_dir = config_dict.placeholder(str)  # None: $DIFFJAX_DATA_DIR or ~/.cache/diffjax/tensorflow_datasets
    d.dequantize = True
    d.random_flip = False

    c.model = m = ml_collections.ConfigDict()
    m.name = "unet"
    m.ch = 32
    m.ch_mult = (1, 2)
    m.num_res_blocks = 2
    m.attn_resolutions = (4,)
    m.dropout = 0.1
    # residual sums not divided by sqrt(2) (DDPM/ADM; DDPM++ divides): lower FD on digits, see
    # BENCHMARKS.md, section "Training recipe on digits"
    m.skip_rescale = False
    m.num_classes = config_dict.placeholder(int)  # an int: class-conditional, with a learned null class
    # compute dtype: None / "float32", or "bfloat16" (activations and matmuls in bfloat16; parameters,
    # gradients, optimizer state and EMA stay float32)
    m.dtype = config_dict.placeholder(str)
    # kernel implementations: "auto" (the model's choice for the backend), "xla" (plain XLA ops) or
    # "cpu" (the hand-written XLA:CPU ones)
    m.kernels = "auto"

    c.diffusion = f = ml_collections.ConfigDict()
    f.schedule = "vp_linear"  # digits.py: vp_cosine, see BENCHMARKS.md, section "Training recipe on digits"
    f.beta_min, f.beta_max = 0.1, 20.0  # VP / sub-VP
    f.sigma_min, f.sigma_max = 0.01, 50.0  # VE
    f.num_timesteps = 1000  # discrete DDPM chains
    # v (or x0) keeps x0_hat well conditioned at t ~ 1, where eps-prediction multiplies its error by
    # sigma/alpha (~150 for VP) and deterministic samplers send tail points far off
    f.prediction = "v"
    f.objective = "v"
    f.weighting = "likelihood"  # objective "dsm" only
    # Min-SNR-gamma weighting (objectives eps/x0/v; None: off): lower FD on digits, see BENCHMARKS.md,
    # section "Training recipe on digits"; it costs test NLL (README), so switch it off for likelihood work
    f.min_snr_gamma = config_dict.FieldReference(5.0, field_type=float)
    f.antithetic = True
    # how training draws t: "uniform", or "logit_normal" (t = sigmoid(m + s n), Esser et al. 2024; m, s below)
    f.time_sampling = "uniform"
    f.logit_normal = (0.0, 1.0)
    f.cond_drop_prob = 0.1  # used when model.num_classes is set
    f.learned_variance = False

    # few-step tasks (progressive_distillation, consistency_distillation, reflow): the teacher run they learn
    # from (its latest checkpoint's EMA weights); the task's own fields live in config.<progressive|consistency|reflow>
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher_workdir = config_dict.placeholder(str)

    c.optim = o = ml_collections.ConfigDict()
    o.optimizer = "adam"
    o.learning_rate = 2e-3
    o.warmup_steps = 100
    o.grad_clip = 1.0
    o.weight_decay = 0.0
    o.ema_decay = 0.995  # a ~200-step horizon: the default run is short
    # EMA warm-up: decay min(ema_decay, (1 + step) / (10 + step)) (TF ExponentialMovingAverage's
    # num_updates, as in score_sde / diffusers), so early EMA weights are not dominated by the init
    o.ema_warmup = False

    c.training = t = ml_collections.ConfigDict()
    t.batch_size = 128
    t.num_steps = 600
    t.max_train_seconds = config_dict.placeholder(float)  # also stop after this wall time (equal-compute runs)
    t.steps_per_call = 1
    # gradient accumulation: each step averages the gradients of k micro-batches of batch_size / k
    # (one optimizer update, the same as the batch_size update up to float rounding)
    t.grad_accum_steps = 1
    t.log_every = 50  # loss history, TensorBoard and a log line (step, loss, steps/s) every this many steps
    # every this many steps (0: off): a sample grid (samples/step_N.png, TensorBoard "samples") and the
    # test NLL (TensorBoard "eval/...", eval_history.csv) with the EMA weights during training
    t.sample_every = 0
    t.eval_every = 0
    t.checkpoint_every = 500
    t.max_to_keep = 3
    # JAX's persistent compilation cache ('' or None: off): compiled programs kept in this directory and
    # loaded by later runs of the same job (BENCHMARKS.md "Quality per compute" measures the saving); set by
    # diffjax.main (the CLI) only, not by importing diffjax
    t.compilation_cache_dir = config_dict.FieldReference("~/.cache/diffjax/jax", field_type=str)
    # device mesh (diffjax.sharding): batch split over data x fsdp; large parameters (and their Adam
    # moments and EMA) split over fsdp (ZeRO-3) and on their output features over model; -1 fills
    t.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    t.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated
    t.num_devices = config_dict.placeholder(int)  # None: every device of every process

    # multi-host (diffjax.distributed): the --coordinator_address/--num_processes/--process_id flags,
    # DIFFJAX_COORDINATOR_ADDRESS/..._NUM_PROCESSES/..._PROCESS_ID, SLURM or a TPU pod are detected
    c.distributed = dd = ml_collections.ConfigDict()
    dd.heartbeat_timeout_seconds = 100  # a process silent this long is declared dead; the others stop
    dd.initialization_timeout = 300

    c.sample = s = ml_collections.ConfigDict()
    s.method = "dpm_solver++_2m"
    s.num_steps = 20
    # time grid of `method` (None: the method's own, logSNR for DPM-Solver; a sampler named at call
    # time other than `method` uses its own). Uniform in t: lower FD on digits at NFE 20, see
    # BENCHMARKS.md, section "Training recipe on digits"
    s.grid = config_dict.FieldReference("time_uniform", field_type=str)
    s.num_samples = 100
    s.png_scale = 4

    c.eval = e = ml_collections.ConfigDict()
    e.split = "test"
    e.num_examples = 297
    e.batch_size = 297
    e.trace = "hutchinson"  # exact costs D = 64 network passes per evaluation
    e.rtol = 1e-3
    e.atol = 1e-3
    e.classifier_times = (0.0, 0.25, 0.5, 0.75)  # task "classifier": test accuracy at these t (0: t_min)
    return c


def get_config():
    """The default config (``--config`` may point at this file or at any experiments/configs/*.py)."""
    return base()


def load(path: str):
    """``get_config()`` of a config file given by path (how one experiment config builds on another)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


_NONE_OVERRIDE = re.compile(r"^--?config\.([\w.]+)=(?i:none)$")


def split_none_overrides(argv):
    """``argv`` without its ``--config.<field>=none`` arguments, and those fields' paths.

    ml_collections parses an override with the field's type (``float("None")`` fails), so an optional
    field (a ``placeholder`` or ``FieldReference``, e.g. ``diffusion.min_snr_gamma``) could not be
    switched off from the command line; ``diffjax.main`` applies them after parsing with
    ``apply_none_overrides``.
    """
    kept, paths = [], []
    for arg in argv:
        m = _NONE_OVERRIDE.match(arg)
        (paths.append(m.group(1)) if m else kept.append(arg))
    return kept, paths


def apply_none_overrides(config, paths):
    """Set each dotted ``paths`` field of ``config`` to None; only optional fields may be None."""
    for path in paths:
        *parents, name = path.split(".")
        node = config
        for i, key in enumerate(parents):
            if key not in node:
                raise ValueError(f"--config.{path}=none: config.{'.'.join(parents[:i + 1])} does not exist")
            node = node[key]
        if name not in node:
            raise ValueError(f"--config.{path}=none: config.{path} does not exist")
        if node[name] is not None and not _optional(node, name):
            raise ValueError(f"--config.{path}=none: config.{path} is not optional (it is "
                             f"{type(node[name]).__name__}; optional fields are declared with "
                             f"config_dict.placeholder or FieldReference)")
        node[name] = None


def _optional(node, name):
    from ml_collections.config_dict import FieldReference

    return isinstance(node._fields[name], FieldReference)  # noqa: SLF001 (ConfigDict keeps no public view)
