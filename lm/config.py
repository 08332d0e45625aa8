"""The ``model:`` and ``train:`` sections of a recipe (``data:`` lives in ``pipeline/config.py``).

Every key a recipe may hold is a field below, with its default; anything else is
rejected with the closest valid name. Values are checked once, in ``__post_init__``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import PATH, DataConfig, from_dict, load_recipe


@dataclass
class ModelConfig:
    """Embedding → GRU | LSTM | RNN → output layer (see ``lm.model.RNNLM``).

    Dropout: ``dropout_emb`` on embeddings, ``dropout_rnn`` between recurrent layers,
    ``dropout_out`` on the last layer's outputs; ``locked_dropout`` uses one mask per
    sequence for all its time steps (variational dropout) for emb/out.
    ``adaptive_cutoffs`` switches to ``nn.AdaptiveLogSoftmaxWithLoss`` (large vocabularies).
    """

    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    embed_dim: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout_emb: float = 0.2
    dropout_rnn: float = 0.2
    dropout_out: float = 0.2
    locked_dropout: bool = False
    tie_weights: bool = False
    adaptive_cutoffs: list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("dropout_emb", "dropout_rnn", "dropout_out"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1)")
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
    """

    schedule: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "constant"
    start: float = 1.0
    end: float = 0.0
    decay_steps: int = 10000
    k: float = 0.9999
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

    Batches: ``max_tokens`` predicted tokens per batch (a packed RNN's real cost; keeps
    every batch's per-token loss weight equal) or a fixed ``batch_size`` of sequences.
    Optimisers: ``sgd`` (lr annealed by ``plateau_factor`` whenever validation does not
    improve, as in pytorch/examples) or ``adamw`` (linear ``warmup_steps``, then
    ``schedule``: ``cosine`` to ``min_lr`` over the run, ``plateau`` or ``constant``).
    Stopping: the first of ``epochs``, ``max_steps``, ``max_time`` (seconds) reached.
    Precision: ``amp`` is ``auto`` (bf16 output layer on CUDA, fp32 elsewhere), ``off``,
    ``bf16`` or ``fp16`` (with loss scaling); ``true``/``false`` mean auto/off. The table
    of what runs in which dtype is in ``lm/precision.py``.
    """

    output_dir: Path = field(default=Path("runs/default"), metadata=PATH)
    device: str = "auto"
    seed: int = 1234
    max_tokens: int | None = 4096
    batch_size: int | None = None
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 2e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "plateau", "constant"] = "plateau"
    plateau_factor: float = 0.25
    clip: float = 0.25
    epochs: int | None = 10
    max_steps: int | None = None
    max_time: float | None = None
    eval_every: int | None = None
    log_every: int = 50
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: str | None = None
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    # auto | off | bf16 | fp16 (true/false: auto/off); what each runs in: lm/precision.py
    amp: Literal["auto", "off", "bf16", "fp16"] | bool = "auto"
    num_workers: int = 0
    prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 20
    max_nonfinite: int = 5
    plot: bool = True

    def __post_init__(self) -> None:
        if (self.max_tokens is None) == (self.batch_size is None):
            raise ValueError(f"max_tokens={self.max_tokens}, batch_size={self.batch_size}: set exactly one")
        for name in ("max_tokens", "batch_size", "epochs", "max_steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name}={v}: must be >= 1 (or null)")
        if self.epochs is None and self.max_steps is None and self.max_time is None:
            raise ValueError("epochs, max_steps and max_time are all null: the run would never stop")
        if self.lr <= 0 or self.clip < 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr}, clip={self.clip}, weight_decay={self.weight_decay}: lr must be > 0, others >= 0")
        if not 0.0 < self.plateau_factor <= 1.0:
            raise ValueError(f"plateau_factor={self.plateau_factor}: must be in (0, 1]")
        if self.resume not in (None, "auto") and not Path(self.resume).expanduser().exists():
            raise ValueError(f"resume={self.resume}: no such checkpoint (use auto, null, or a path)")
        if isinstance(self.amp, bool):  # the old boolean key (and YAML's on/off) as aliases
            self.amp = "auto" if self.amp else "off"
        if self.keep_checkpoints < 1 or self.log_every < 1 or self.num_workers < 0 or self.max_nonfinite < 1:
            raise ValueError("keep_checkpoints, log_every and max_nonfinite must be >= 1, num_workers >= 0")


@dataclass
class Recipe:
    """A whole recipe: ``data`` (pipeline.prepare), ``model`` and ``train`` (lm.train)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load and validate a full recipe (see ``pipeline.config`` for the rules).

    Raises:
        UserError: missing file, YAML error, unknown key, wrong type or invalid value.
    """
    raw, base_dir = load_recipe(path, overrides)
    return from_dict(Recipe, raw, "", base_dir)
