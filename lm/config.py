"""The ``model:`` and ``train:`` sections of a recipe (``data:`` lives in ``pipeline/config.py``).

Every key a recipe may hold is a field below, with its default; anything else is
rejected with the closest valid name. Every number is checked generically (finite, in
the range its ``num(...)`` metadata gives, ``>= 0`` by default: ``pipeline.typed_yaml.num``);
rules that involve several keys are checked in ``__post_init__``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import DataConfig, load_recipe
from pipeline.errors import UserError
from pipeline.typed_yaml import PATH, Override, from_dict, num


@dataclass
class ModelConfig:
    """Embedding → GRU | LSTM | RNN → output layer (see ``lm.model.RNNLM``).

    Dropout: ``dropout_emb`` on embeddings, ``dropout_rnn`` between recurrent layers,
    ``dropout_out`` on the last layer's outputs; ``locked_dropout`` uses one mask per
    sequence for all its time steps (variational dropout) for emb/out.
    ``adaptive_cutoffs`` switches to ``nn.AdaptiveLogSoftmaxWithLoss`` (large vocabularies).

    The AWD-LSTM regularisers (Merity et al. 2017), all off by default:
    ``locked_dropout_rnn`` makes ``dropout_rnn`` locked too (the layers then run one
    kernel call each; AWD-LSTM on PTB: 0.25); ``weight_drop`` is DropConnect on the
    hidden-to-hidden matrices (0.5), one mask per batch; ``dropout_words`` drops whole
    words from the embedding (0.1); ``ar`` and ``tar`` weight the activation and temporal
    activation penalties the trainer adds to the loss (2 and 1).

    Attributes:
        cell: the recurrent cell: lstm, gru or rnn (Elman, tanh).
        embed_dim: size of the token embeddings.
        hidden_size: units per recurrent layer.
        num_layers: stacked recurrent layers.
        dropout_emb: dropout on the embeddings.
        dropout_rnn: dropout between recurrent layers (ignored with one layer).
        dropout_out: dropout on the last layer's outputs, before the softmax.
        locked_dropout: one dropout mask per sequence for all its steps (emb and out).
        locked_dropout_rnn: dropout_rnn locked too (one mask per sequence between layers; layers run one call each).
        weight_drop: DropConnect on the hidden-to-hidden matrices, one mask per batch (AWD-LSTM: 0.5).
        dropout_words: drop whole words from the embedding, one mask per batch (AWD-LSTM: 0.1).
        ar: activation regularisation weight on the dropped top-layer outputs (AWD-LSTM: 2).
        tar: temporal activation regularisation weight on successive raw outputs (AWD-LSTM: 1).
        tie_weights: share the embedding matrix with the output layer (needs embed_dim == hidden_size).
        init_range: every parameter uniform in [-init_range, init_range] (Zaremba et al.: 0.1); null = torch's RNN init, 0.1 for embedding and output.
        adaptive_cutoffs: ids where the adaptive softmax's clusters start, e.g. [2000, 10000]; null = full softmax.
    """

    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    embed_dim: int = field(default=200, metadata=num(ge=1, le=65536))
    hidden_size: int = field(default=200, metadata=num(ge=1, le=65536))
    num_layers: int = field(default=2, metadata=num(ge=1, le=64))
    dropout_emb: float = field(default=0.2, metadata=num(lt=1))
    dropout_rnn: float = field(default=0.2, metadata=num(lt=1))
    dropout_out: float = field(default=0.2, metadata=num(lt=1))
    locked_dropout: bool = False
    locked_dropout_rnn: bool = False
    weight_drop: float = field(default=0.0, metadata=num(lt=1))
    dropout_words: float = field(default=0.0, metadata=num(lt=1))
    ar: float = field(default=0.0, metadata=num(le=1e6))
    tar: float = field(default=0.0, metadata=num(le=1e6))
    tie_weights: bool = False
    init_range: float | None = field(default=None, metadata=num(gt=0, le=10))
    adaptive_cutoffs: list[int] | None = field(default=None, metadata=num(ge=1, le=1 << 24))

    def __post_init__(self) -> None:
        if self.locked_dropout_rnn and (self.num_layers < 2 or self.dropout_rnn == 0.0):
            raise ValueError(f"locked_dropout_rnn=true needs num_layers >= 2 and dropout_rnn > 0 "
                             f"(got num_layers={self.num_layers}, dropout_rnn={self.dropout_rnn})")
        if self.adaptive_cutoffs is not None:
            c = self.adaptive_cutoffs
            if not c or any(b <= a for a, b in zip(c, c[1:])) or c[0] < 1:
                raise ValueError(f"adaptive_cutoffs={c}: must be increasing positive ids")
            if self.hidden_size // 4 ** len(c) < 1:  # nn.AdaptiveLogSoftmaxWithLoss shrinks each tail by 4
                raise ValueError(f"adaptive_cutoffs={c}: hidden_size={self.hidden_size} is too small for "
                                 f"{len(c)} tail clusters (needs >= {4 ** len(c)})")
            if self.tie_weights:
                raise ValueError("tie_weights=true cannot be combined with adaptive_cutoffs")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ValueError(
                f"tie_weights=true needs embed_dim == hidden_size (got embed_dim={self.embed_dim}, "
                f"hidden_size={self.hidden_size})"
            )


@dataclass
class TeacherForcingConfig:
    """Probability of feeding the ground-truth token, per training step ``i``.

    ``constant``: ``start`` (1.0 = full teacher forcing, one fused RNN call per batch).
    Scheduled sampling (Bengio et al. 2015), never below ``end``:
    ``linear``: ``start - (start - end) * i / decay_steps``;
    ``exponential``: ``start * k**i`` (``k`` < 1);
    ``inverse_sigmoid``: ``k / (k + exp(i / k))`` (``k`` >= 1).
    Below 1.0 the model steps through each batch and otherwise feeds its own argmax
    (or a sample from its softmax with ``sample: true``).

    Attributes:
        schedule: constant, linear, exponential or inverse_sigmoid (see above).
        start: the probability at step 0 (1.0 = always the ground truth).
        end: the floor the decaying schedules never go below.
        decay_steps: steps the linear schedule takes from start to end.
        k: the decay constant of the exponential (< 1) and inverse_sigmoid (>= 1) schedules.
        sample: feed a sample from the model's softmax instead of its argmax.
    """

    schedule: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "constant"
    start: float = field(default=1.0, metadata=num(le=1))
    end: float = field(default=0.0, metadata=num(le=1))
    decay_steps: int = field(default=10000, metadata=num(ge=1))
    k: float = field(default=0.9999, metadata=num(gt=0, le=1e9))
    sample: bool = False

    def __post_init__(self) -> None:
        if not (0.0 <= self.end <= 1.0 and 0.0 <= self.start <= 1.0):
            raise ValueError(f"start={self.start}, end={self.end}: probabilities must be in [0, 1]")
        if self.schedule == "linear" and self.decay_steps < 1:
            raise ValueError(f"decay_steps={self.decay_steps}: must be >= 1")
        if self.schedule == "exponential" and not 0.0 < self.k < 1.0:
            raise ValueError(f"k={self.k}: the exponential schedule needs 0 < k < 1")
        if self.schedule == "inverse_sigmoid" and self.k < 1.0:
            raise ValueError(f"k={self.k}: the inverse_sigmoid schedule needs k >= 1")


@dataclass
class TrainConfig:
    """How to train: batching, optimiser, stopping, evaluation, checkpoints.

    Protocol (``mode``): ``sequence`` models every prepared row (line, document) on its
    own from a zero state; ``stream`` reads each split as one continuous text in
    ``batch_size`` parallel streams and windows of ``bptt`` tokens, carrying the state
    across windows — the protocol of published WikiText-2 / PTB perplexities.
    ``variable_bptt`` draws window lengths as AWD-LSTM does (lr scaled by length / bptt);
    evaluation uses ``eval_batch_size`` streams.
    Batches (sequence mode): ``max_tokens`` predicted tokens per batch (a packed RNN's
    real cost; keeps every batch's per-token loss weight equal; 4096 when neither is set)
    or a fixed ``batch_size`` of sequences.
    Optimisers: ``sgd`` (lr annealed by ``plateau_factor`` whenever validation does not
    improve, as in pytorch/examples) or ``adamw`` (linear ``warmup_steps``, then
    ``schedule``: ``cosine`` to ``min_lr`` over the run, ``plateau`` or ``constant``);
    ``epoch_decay`` keeps ``lr`` for ``decay_start`` epochs, then multiplies it by
    ``decay_factor`` every epoch (Zaremba et al. 2014).
    Stopping: the first of ``epochs``, ``max_steps``, ``max_time`` (seconds) reached.
    Precision: ``amp`` is ``auto`` (bf16 output layer on CUDA, fp32 elsewhere), ``off``,
    ``bf16`` or ``fp16`` (with loss scaling); ``true``/``false`` mean auto/off. The table
    of what runs in which dtype is in ``lm/precision.py``.
    Averaged weights (NT-ASGD, Merity et al. 2017): ``average: nonmono`` starts a running
    mean of the weights once validation is worse than the best from before the last
    ``nonmono`` evaluations; ``always`` from step 0. Validation, ``best.pt`` and the test
    then use the averaged weights.

    Attributes:
        output_dir: the run's folder: metrics.jsonl, result.json, recipe.yaml, checkpoints/.
        device: auto (cuda > mps > cpu), or cpu, cuda, cuda:N, mps.
        seed: seed of the initial weights, dropout and the batch order.
        mode: sequence (every prepared row on its own) or stream (one continuous text, state carried).
        max_tokens: sequence mode: predicted tokens per batch; null = use batch_size (4096 tokens if both are null).
        batch_size: sequence mode: sequences per batch; stream mode: parallel streams (null = 20).
        bptt: stream mode: tokens per window (truncated backpropagation through time).
        variable_bptt: stream mode: draw window lengths around bptt as AWD-LSTM does (lr scaled by length / bptt).
        eval_batch_size: stream mode: parallel streams when evaluating.
        optimizer: sgd or adamw.
        lr: the peak learning rate.
        min_lr: the floor of the cosine and plateau schedules.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD); biases excluded with AdamW.
        warmup_steps: steps of linear warmup up to lr (0 = none).
        schedule: the learning rate after warmup: cosine (down to min_lr at the end of the budget), plateau or constant.
        plateau_factor: the plateau schedule multiplies lr by this when validation does not improve.
        decay_start: epoch_decay: epochs trained at the full rate (Zaremba et al.: 4).
        decay_factor: epoch_decay: lr is multiplied by this at every later epoch (Zaremba et al.: 0.5).
        clip: the gradient-norm clipping threshold; 0 = no clipping.
        epochs: stop after this many epochs (null = no epoch limit).
        max_steps: stop after this many optimizer steps (null = no step limit).
        max_time: stop after this many seconds of the training loop, validation included (null = no limit).
        eval_every: validate every this many steps too (null = once per epoch only).
        log_every: write a train record to metrics.jsonl every this many steps.
        progress_every: a train record (and, without a terminal, a progress line) at least every this many seconds.
        checkpoint_every: write step-N.pt every this many steps (null = at epoch ends and the stop only).
        keep_checkpoints: the newest step checkpoints kept; best.pt is kept besides.
        resume: auto (the newest good checkpoint in output_dir), a checkpoint path, or null (a new run).
        amp: mixed precision: auto (bf16 output layer on CUDA, fp32 elsewhere), off, bf16 or fp16 (with loss scaling).
        num_workers: DataLoader worker processes (0 = load in the training process).
        prompts: texts continued greedily each epoch, printed and logged as samples.
        sample_tokens: tokens generated per prompt sample.
        max_nonfinite: abort after this many steps in a row with a non-finite gradient.
        plot: write curves.png (needs matplotlib).
        average: averaged weights for evaluation: off, nonmono (NT-ASGD's trigger) or always.
        nonmono: with average=nonmono, evaluations that may fail to improve before averaging starts.
    """

    output_dir: Path = field(default=Path("runs/default"), metadata=PATH)
    device: str = "auto"
    seed: int = field(default=1234, metadata=num(le=2**32 - 1))  # numpy seeds are uint32
    mode: Literal["sequence", "stream"] = "sequence"
    max_tokens: int | None = field(default=None, metadata=num(ge=1))
    batch_size: int | None = field(default=None, metadata=num(ge=1))
    bptt: int = field(default=35, metadata=num(ge=2, le=10**6))
    variable_bptt: bool = False
    eval_batch_size: int = field(default=10, metadata=num(ge=1, le=10**6))
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = field(default=2e-3, metadata=num(gt=0, le=1e3))
    min_lr: float = field(default=0.0, metadata=num(le=1e3))
    weight_decay: float = field(default=0.0, metadata=num(le=100))
    warmup_steps: int = 0
    schedule: Literal["cosine", "plateau", "constant", "epoch_decay"] = "plateau"
    plateau_factor: float = field(default=0.25, metadata=num(gt=0, le=1))
    clip: float = field(default=0.25, metadata=num(le=1e9))  # 0: no clipping
    epochs: int | None = field(default=10, metadata=num(ge=1, le=10**6))
    max_steps: int | None = field(default=None, metadata=num(ge=1))
    max_time: float | None = field(default=None, metadata=num(gt=0, le=1e9))  # seconds
    eval_every: int | None = field(default=None, metadata=num(ge=1))
    log_every: int = field(default=50, metadata=num(ge=1))
    progress_every: float = field(default=30.0, metadata=num(gt=0, le=1e9))  # seconds
    checkpoint_every: int | None = field(default=None, metadata=num(ge=1))
    keep_checkpoints: int = field(default=2, metadata=num(ge=1, le=10**6))
    decay_start: int = field(default=4, metadata=num(ge=1, le=10**6))
    decay_factor: float = field(default=0.5, metadata=num(gt=0, le=1))
    resume: str | None = None
    average: Literal["off", "nonmono", "always"] = "off"
    nonmono: int = field(default=5, metadata=num(ge=1, le=10**6))
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    # auto | off | bf16 | fp16 (true/false: auto/off); what each runs in: lm/precision.py
    amp: Literal["auto", "off", "bf16", "fp16"] | bool = "auto"
    num_workers: int = field(default=0, metadata=num(le=256))
    prompts: list[str] = field(default_factory=list)
    sample_tokens: int = field(default=20, metadata=num(le=10**6))
    max_nonfinite: int = field(default=5, metadata=num(ge=1))
    plot: bool = True

    def __post_init__(self) -> None:
        if self.mode == "stream":
            if self.max_tokens is not None:
                raise ValueError(f"max_tokens={self.max_tokens}: stream mode batches batch_size streams of bptt "
                                 f"tokens; set max_tokens: null")
            if self.batch_size is None:
                self.batch_size = 20  # pytorch/examples' and Zaremba et al.'s
        elif self.max_tokens is not None and self.batch_size is not None:
            raise ValueError(f"max_tokens={self.max_tokens}, batch_size={self.batch_size}: set one, not both")
        elif self.max_tokens is None and self.batch_size is None:
            self.max_tokens = 4096
        if self.epochs is None and self.max_steps is None and self.max_time is None:
            raise ValueError("epochs, max_steps and max_time are all null: the run would never stop")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr}: must be <= lr={self.lr} (the floor of the learning rate)")
        if self.resume not in (None, "auto") and not Path(self.resume).expanduser().exists():
            raise ValueError(f"resume={self.resume}: no such checkpoint (use auto, null, or a path)")
        if isinstance(self.amp, bool):  # the old boolean key (and YAML's on/off) as aliases
            self.amp = "auto" if self.amp else "off"


@dataclass
class Recipe:
    """A whole recipe: ``data`` (pipeline.prepare), ``model`` and ``train`` (lm.train)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load and validate a full recipe (see ``pipeline.typed_yaml`` for the rules).

    A recipe may hold ``profiles:`` — per device type (``cpu``, ``cuda``, ``mps``), partial
    ``model:`` / ``train:`` sections applied when ``train.device`` resolves to that type
    (``auto``: cuda > mps > cpu). So one command trains the model each machine can afford.
    Command-line overrides win over the profile, the profile over the recipe's sections.

    Raises:
        UserError: missing file, YAML error, unknown key, wrong type or invalid value.
    """
    raw, base_dir = load_recipe(path, overrides)
    profiles = raw.pop("profiles", None)
    if profiles is not None:
        _apply_profile(raw, profiles, path)
    return from_dict(Recipe, raw, "", base_dir)


PROFILE_DEVICES = ("cpu", "cuda", "mps")


def _device_type(name: str) -> str:
    if name != "auto":
        return name.split(":")[0]
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return "mps"
    return "cpu"


def _apply_profile(raw: dict, profiles, path) -> None:
    """Merge ``profiles[<device type>]`` into ``raw`` under the command-line overrides."""
    if not isinstance(profiles, dict) or any(k not in PROFILE_DEVICES for k in profiles):
        raise UserError(f"{path}: profiles: must map device types ({', '.join(PROFILE_DEVICES)}) to sections")
    train = raw.get("train") or {}
    kind = _device_type(str(train.get("device", "auto")))
    profile = profiles.get(kind)
    if not profile:
        return
    if not isinstance(profile, dict) or any(k not in ("model", "train") for k in profile):
        raise UserError(f"{path}: profiles.{kind} may hold model: and train: sections only")

    def merge(into: dict, extra: dict, where: str) -> None:
        for key, value in extra.items():
            if isinstance(into.get(key), Override):
                continue  # typed on the command line: it wins
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value, f"{where}.{key}")
            else:
                into[key] = value

    for section, values in profile.items():
        if not isinstance(values, dict):
            raise UserError(f"{path}: profiles.{kind}.{section} must be a section (a mapping of keys)")
        if raw.get(section) is None:  # absent, or an empty section
            raw[section] = {}
        merge(raw[section], values, section)
    if os.environ.get("RANK", "0") == "0":
        print(f"device {kind}: applying the recipe's profiles.{kind} ({', '.join(sorted(profile))})",
              file=sys.stderr)
