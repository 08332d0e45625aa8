"""The ``model:`` and ``train:`` sections of a recipe (``data:`` lives in ``pipeline/config.py``).

Every key a recipe may hold is a field below, with its default; anything else is
rejected with the closest valid name. Every number is checked generically (finite, in
the range its ``num(...)`` metadata gives, ``>= 0`` by default: ``pipeline.config.num``);
rules that involve several keys are checked in ``__post_init__``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import PATH, DataConfig, from_dict, load_recipe, num


@dataclass
class ModelConfig:
    """Embedding → GRU | LSTM | RNN → output layer (see ``lm.model.RNNLM``).

    Dropout: ``dropout_emb`` on embeddings, ``dropout_rnn`` between recurrent layers,
    ``dropout_out`` on the last layer's outputs; ``locked_dropout`` uses one mask per
    sequence for all its time steps (variational dropout) for emb/out.
    ``adaptive_cutoffs`` switches to ``nn.AdaptiveLogSoftmaxWithLoss`` (large vocabularies).
    """

    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    embed_dim: int = field(default=200, metadata=num(ge=1, le=65536))
    hidden_size: int = field(default=200, metadata=num(ge=1, le=65536))
    num_layers: int = field(default=2, metadata=num(ge=1, le=64))
    dropout_emb: float = field(default=0.2, metadata=num(lt=1))
    dropout_rnn: float = field(default=0.2, metadata=num(lt=1))
    dropout_out: float = field(default=0.2, metadata=num(lt=1))
    locked_dropout: bool = False
    tie_weights: bool = False
    adaptive_cutoffs: list[int] | None = field(default=None, metadata=num(ge=1, le=1 << 24))

    def __post_init__(self) -> None:
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

    Batches: ``max_tokens`` predicted tokens per batch (a packed RNN's real cost; keeps
    every batch's per-token loss weight equal) or a fixed ``batch_size`` of sequences.
    Optimisers: ``sgd`` (lr annealed by ``plateau_factor`` whenever validation does not
    improve, as in pytorch/examples) or ``adamw`` (linear ``warmup_steps``, then
    ``schedule``: ``cosine`` to ``min_lr`` over the run, ``plateau`` or ``constant``).
    Stopping: the first of ``epochs``, ``max_steps``, ``max_time`` (seconds) reached.
    """

    output_dir: Path = field(default=Path("runs/default"), metadata=PATH)
    device: str = "auto"
    seed: int = field(default=1234, metadata=num(le=2**32 - 1))  # numpy seeds are uint32
    max_tokens: int | None = field(default=4096, metadata=num(ge=1))
    batch_size: int | None = field(default=None, metadata=num(ge=1))
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = field(default=2e-3, metadata=num(gt=0, le=1e3))
    min_lr: float = field(default=0.0, metadata=num(le=1e3))
    weight_decay: float = field(default=0.0, metadata=num(le=100))
    warmup_steps: int = 0
    schedule: Literal["cosine", "plateau", "constant"] = "plateau"
    plateau_factor: float = field(default=0.25, metadata=num(gt=0, le=1))
    clip: float = field(default=0.25, metadata=num(le=1e9))  # 0: no clipping
    epochs: int | None = field(default=10, metadata=num(ge=1, le=10**6))
    max_steps: int | None = field(default=None, metadata=num(ge=1))
    max_time: float | None = field(default=None, metadata=num(gt=0, le=1e9))  # seconds
    eval_every: int | None = field(default=None, metadata=num(ge=1))
    log_every: int = field(default=50, metadata=num(ge=1))
    checkpoint_every: int | None = field(default=None, metadata=num(ge=1))
    keep_checkpoints: int = field(default=2, metadata=num(ge=1, le=10**6))
    resume: str | None = None
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    amp: bool = True
    num_workers: int = field(default=0, metadata=num(le=256))
    prompts: list[str] = field(default_factory=list)
    sample_tokens: int = field(default=20, metadata=num(le=10**6))
    max_nonfinite: int = field(default=5, metadata=num(ge=1))
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
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr}: must be <= lr={self.lr} (the floor of the learning rate)")
        if self.resume not in (None, "auto") and not Path(self.resume).expanduser().exists():
            raise ValueError(f"resume={self.resume}: no such checkpoint (use auto, null, or a path)")


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
