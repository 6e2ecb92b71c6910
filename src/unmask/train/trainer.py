"""The training loop: one process, DDP or FSDP2, pretraining or SFT, resumable bit for bit.

Launch one process for a single device, or the same command under
`torchrun --nproc_per_node=N` for data parallelism (DDP; `fsdp=True` shards parameters with
FSDP2 instead). Every rank builds the same initial model from the seed, reads its own slice of
each global batch, and only rank 0 writes logs and checkpoints.

Exact resumption rests on three things: the model, optimizer and data position are restored from
the checkpoint; the learning rate is a pure function of the step; and the noise of each
micro-batch comes from a generator seeded by (seed, step, micro-batch, rank), so nothing about it
has to be saved at all.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..models import (PRESETS, CheckpointError, MaskedDiffusionLM, ModelConfig, check_quantize, load_model,
                      quantize_model, save_model)
from ..sampling.blocks import BLOCK_DIFFUSION_LAYOUTS
from . import checkpoint as ckpt_io
from .data import BatchStream, build_rows, heldout_batches
from .objective import batch_loss, mdm_bound

LLADA2_BLOCK_LENGTH = 32  # LLaDA2.x's block size (its generate's default and dFactory's block_size)


def _f(default, help: str, **extra):
    """A config field with its command-line help next to it (commands/train.py builds flags from these)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # data
    data: list[str] = _f([], "training files (.txt paragraphs, .jsonl with text or prompt/response/messages)", nargs="+")
    eval_data: list[str] = _f([], "held-out files (default: a hashed heldout_frac of the training documents)", nargs="+")
    tokenizer: str = _f("", "Hugging Face tokenizer directory (needs EOS and mask tokens)")
    out_dir: str = _f("runs/unmask", "run directory: checkpoints, metrics.jsonl, loss_curve.png", aliases=["--out"])
    cache_dir: str | None = _f(None, "token cache directory (default: OUT_DIR/cache)")
    heldout_frac: float = _f(0.01, "fraction of documents held out for evaluation")
    seq_len: int = _f(256, "tokens per training row")
    doc_attention: bool = _f(False, "pretraining: packed documents attend only within themselves, positions "
                                    "restarting at each (no facts of a neighbouring document to confuse)")
    sft: bool = _f(False, "supervised fine-tuning: the data is prompt/response pairs, prompts never masked")
    cond_drop: float = _f(0.0, "SFT only: probability of replacing a row's prompt by mask tokens")
    block_length: int | None = _f(None, "block diffusion (LLaDA2.x): attention bidirectional within blocks of this "
                                        "many tokens and causal across them, each block denoised given the clean "
                                        "blocks before it (BD3-LM's objective, twice the sequence per forward pass); "
                                        "0: off; default: 32 for the llada2_moe layout, off otherwise")
    # model
    init_from: str | None = _f(None, "start from this checkpoint's weights (e.g. SFT from a pretrained model)")
    preset: str | None = _f(None, f"model shape preset: {', '.join(PRESETS)} (vocabulary taken from the tokenizer)")
    layout: str = _f("llada", "checkpoint layout: llada, lladamoe or llada2_moe (LLaDA2's block: q/k norm, RoPE on "
                              "half of each head, sigmoid routing with an expert bias)")
    d_model: int = _f(256, "model width")
    n_layers: int = _f(4, "transformer blocks")
    n_heads: int = _f(4, "attention heads")
    n_kv_heads: int = _f(0, "key/value heads (0: same as n_heads)")
    mlp_hidden_size: int = _f(0, "SwiGLU hidden size (0: 8/3·d_model rounded up to 32)")
    rope_theta: float = _f(10000.0, "RoPE base")
    n_experts: int = _f(0, "routed experts per MoE layer (0: dense; layouts lladamoe, llada2_moe)")
    experts_per_token: int = _f(2, "MoE: experts each token is routed to")
    expert_hidden_size: int = _f(0, "MoE: each expert's SwiGLU hidden size (0: mlp_hidden_size / experts_per_token)")
    shared_experts: int = _f(0, "MoE: shared experts of the routed width that every token goes through")
    dense_layers: int = _f(0, "MoE: the first layers keep a dense MLP (LLaDA2.0-mini: 1)")
    tie_embeddings: bool = _f(False, "share the input embedding and the output projection (helps small models "
                                     "learn to copy tokens from their context)")
    # LoRA (docs/lora.md)
    lora: bool = _f(False, "train a LoRA adapter (through peft) on the frozen --init-from model; checkpoints "
                           "hold the adapter, which --adapter DIR loads and unmask merge folds in")
    lora_rank: int = _f(16, "LoRA rank r")
    lora_alpha: float = _f(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_quantize: str | None = _f(None, "QLoRA-style: int8 stores the frozen base's linear layers in 8 bits "
                                         "(torchao, as --quantize int8 at inference) under the float adapter")
    lora_targets: list[str] = _f([], "matrices to adapt: qkv, out, gate_up, down, router, lm_head, and on MoE "
                                     "layouts the routed experts w_gate, w_up, w_down (default: qkv out gate_up "
                                     "down, every linear of attention and the dense and shared MLPs)", nargs="+")
    # optimisation
    batch_size: int = _f(16, "rows per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(3e-5, "final learning rate")
    warmup: int = _f(100, "linear warmup steps")
    schedule: str = _f("cosine", "cosine, or wsd (warmup-stable-decay: linear decay over the last decay_frac)")
    decay_frac: float = _f(0.2, "wsd: fraction of max_steps spent decaying")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)")
    max_steps: int = _f(1000, "optimizer steps of the whole run (sets the schedule)")
    stop_at: int = _f(0, "checkpoint and stop after this step, as if interrupted (0: run to max_steps)")
    max_minutes: float = _f(0.0, "checkpoint and stop once this much wall time has passed in this call, as if "
                                 "interrupted (0: no limit); for a lent machine's per-command limit")
    seed: int = _f(0, "seed of the initial weights, data order and noise")
    # evaluation, checkpoints
    eval_every: int = _f(100, "steps between held-out evaluations (0: never)")
    eval_batches: int = _f(8, "held-out batches per evaluation")
    eval_mc_samples: int = _f(8, "Monte-Carlo samples (stratified t) per held-out row")
    save_every: int = _f(500, "steps between checkpoints (the last step is always saved)")
    keep_last: int = _f(3, "checkpoints to keep (0: all)")
    resume: str | None = _f(None, "resume: 'auto' (latest in out_dir, or start fresh) or a checkpoint directory")
    # hardware
    device: str | None = _f(None, "device (default: the local CUDA device, else cpu)")
    bf16: bool = _f(True, "bfloat16 autocast on GPU (weights and optimizer stay float32)")
    activation_checkpointing: bool = _f(False, "recompute block activations in the backward pass")
    fsdp: bool = _f(False, "shard parameters with FSDP2 (needs torchrun)")
    compile: bool = _f(False, "torch.compile the model")
    progress: bool = _f(True, "show a progress bar")
    dry_run: bool = _f(False, "print the estimated and measured memory of one step of this shape (weights, "
                              "gradients, optimizer, activations; docs/lora.md) and exit; needs no data")

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule must be 'cosine' or 'wsd', not {self.schedule!r}")
        if not 0 <= self.cond_drop < 1:
            raise ValueError("cond_drop must be in [0, 1)")
        if not (math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise ValueError(f"max_minutes must be >= 0 (0: no limit), not {self.max_minutes}")
        if self.cond_drop and not self.sft:
            raise ValueError("cond_drop applies to SFT only (add --sft)")
        if self.doc_attention and self.sft:
            raise ValueError("doc_attention applies to packed pretraining rows; SFT rows hold one example each")
        if self.block_length is not None and self.block_length < 0:
            raise ValueError("block_length must be at least 1, or 0 for off")
        if self.lora and not (self.init_from or self.dry_run):
            raise ValueError("--lora adapts a trained model: pass it as --init-from DIR")
        if self.lora_quantize is not None:
            if not self.lora:
                raise ValueError("--lora-quantize quantizes the frozen base under a LoRA adapter: add --lora")
            check_quantize(self.lora_quantize)
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose from {', '.join(PRESETS)}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "experts_per_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float]
    evals: dict[int, float]
    checkpoint: Path | None
    interrupted: bool


# ---- pieces ----------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = cfg.max_steps - int(cfg.decay_frac * cfg.max_steps)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, progress)


def noise_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _special_id(tokenizer, names: tuple[str, ...]) -> int | None:
    vocab = tokenizer.get_vocab()
    return next((vocab[n] for n in names if n in vocab), None)


def model_config(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """The shape from the preset or the config fields; vocabulary and special ids from the tokenizer.

    With n_experts, layers after the first dense_layers are MoE. The llada2_moe layout takes
    LLaDA2's fixed choices (q/k RMSNorm, RoPE on half of each head, sigmoid routing with an expert
    bias, weights renormalised when experts_per_token > 1); its expert groups and routed scale
    stay off (1 group, scale 1), which a from-scratch model has no use for.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token (mask_token); a masked diffusion LM needs one")
    ids = dict(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               eot_token_id=_special_id(tokenizer, ("<|eot|>", "<|eot_id|>", "<|im_end|>")))
    if cfg.preset:
        preset = PRESETS[cfg.preset]
        return preset.with_(**ids, max_seq_len=max(cfg.seq_len, preset.max_seq_len))
    hidden = cfg.mlp_hidden_size or -(-8 * cfg.d_model // 3 // 32) * 32
    moe = {}
    if cfg.n_experts:
        width = cfg.expert_hidden_size or max(1, hidden // cfg.experts_per_token)
        moe = dict(n_experts=cfg.n_experts, experts_per_token=cfg.experts_per_token, expert_hidden_size=width,
                   shared_expert_hidden_size=cfg.shared_experts * width or None,
                   moe_layers=[i >= cfg.dense_layers for i in range(cfg.n_layers)])
    if cfg.layout == "llada2_moe":
        moe.update(qk_norm=True, partial_rotary_factor=0.5)
        if cfg.n_experts:
            moe.update(router="sigmoid", expert_bias=True, norm_topk_prob=cfg.experts_per_token > 1)
    return ModelConfig(layout=cfg.layout, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads or cfg.n_heads, mlp_hidden_size=hidden,
                       rope_theta=cfg.rope_theta, max_seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings,
                       **moe, **ids)


def block_length_for(cfg: TrainConfig, model_cfg: ModelConfig) -> int | None:
    """The block length of block-diffusion training, None for none: the config's (0: off), else
    LLaDA2's 32 for a block-diffusion layout (which decodes block-causally)."""
    if cfg.block_length is not None:
        return cfg.block_length or None
    return LLADA2_BLOCK_LENGTH if model_cfg.layout in BLOCK_DIFFUSION_LAYOUTS else None


def init_weights(model: MaskedDiffusionLM) -> None:
    """N(0, 0.02) matrices; projections into the residual stream scaled by 1/sqrt(2·layers) (GPT-2)."""
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("attn.out.weight", "mlp.down.weight", "w_down"))
                p.normal_(0.0, residual_std if residual else 0.02)


def build_model(cfg: TrainConfig, tokenizer) -> MaskedDiffusionLM:
    if cfg.init_from:
        model = load_model(cfg.init_from, dtype=torch.float32, device="cpu")
        if model.config.vocab_size < len(tokenizer) or model.config.mask_token_id != tokenizer.mask_token_id:
            raise ValueError(f"{cfg.init_from} does not match the tokenizer (vocabulary or mask id differ)")
        return model.train()
    torch.manual_seed(cfg.seed)
    model = MaskedDiffusionLM(model_config(cfg, tokenizer))
    init_weights(model)
    return model.train()


def apply_lora(model: MaskedDiffusionLM, cfg: TrainConfig, bf16: bool = False):
    """Insert LoRA layers into `model` (loaded from cfg.init_from) and freeze the rest (`models.adapters`);
    returns their peft config, which records init_from as the base.

    Under bfloat16 autocast (bf16) the frozen base is stored in bfloat16: autocast computes in it
    anyway, and float32 would hold twice the bytes plus a bfloat16 copy per layer. With
    cfg.lora_quantize ("int8") its linear layers are then quantized as `quantize_model` does for
    inference (QLoRA-style; peft puts its torchao LoRA layer on them). peft keeps the adapter
    itself in float32, so the optimizer updates it at full precision.
    """
    from ..models import resolve_checkpoint_dir
    from ..models.adapters import add_lora, lora_config

    if bf16:
        model.to(torch.bfloat16)
    quantize_model(model, cfg.lora_quantize)
    config = lora_config(model.config, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                         base=str(resolve_checkpoint_dir(cfg.init_from).resolve()))
    torch.manual_seed(cfg.seed)  # the same initial A on every rank and in every run (B starts at zero)
    add_lora(model, config)
    return config


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """Join the torchrun process group when launched by torchrun (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "--device cuda": this process's local GPU
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, dev)


def _all_ranks(d: Dist, value):
    """Rank 0's picklable value on every rank (used to share one verdict and avoid a hang)."""
    if d.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """First SIGINT/SIGTERM: finish the step, checkpoint and stop. A second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nunmask train: stopping after this step (checkpointing); Ctrl-C again to abort", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and loss_curve.png in the run directory.

    Each row is appended with one write, so a crash can tear only the last line; on resume a torn
    last line is dropped (and reported through `log`) before anything is appended after it, so it
    never ends up inside the file. A line that is not JSON anywhere else is an error naming it."""

    def __init__(self, out_dir: Path, resume_step: int, log=lambda msg: None):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # drop lines past the resumed step: they belong to an abandoned future
            kept = [ln for ln, row in self._rows(log) if row["step"] <= resume_step]
            ckpt_io.write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))

    def _rows(self, log) -> list[tuple[str, dict]]:
        """Each line with its row; a torn last line (a crash mid-write) is left out and reported."""
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line else None
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append((line, row))
            elif number == len(lines) and line:
                log(f"{self.path}: dropped its torn last line (a crash while it was written): {line[:60]!r}")
            elif line:
                raise ValueError(f"{self.path}, line {number}, is not a metrics row ({line[:60]!r}): delete or fix "
                                 "that line, then rerun")
        return rows

    def write(self, **row) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)

    def plot(self) -> None:
        try:
            from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed
        except ImportError:
            return
        rows = [row for _, row in self._rows(log=lambda msg: None)]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        held = [(r["step"], r["eval_nats_per_token"]) for r in rows if "eval_nats_per_token" in r]
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for points, label in ((train, "train loss"), (held, "held-out bound (nats/token)")):
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.path.with_name("loss_curve.png"), dpi=100)


# ---- the loop --------------------------------------------------------------------------------

class Trainer:
    """Holds one run's state; `run()` trains until max_steps, stop_at or a stop request."""

    def __init__(self, cfg: TrainConfig):
        from ..models import load_tokenizer

        if not cfg.data:
            raise ValueError("no training data: pass --data FILE ...")
        if not cfg.tokenizer:
            raise ValueError("no tokenizer: pass --tokenizer DIR")
        self.cfg = cfg
        self.dist = setup_distributed(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        if not cfg.resume and (self.out_dir / ckpt_io.LATEST).exists():
            raise ValueError(f"{self.out_dir} already holds a run: pass --resume to continue it, or another --out")
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        cache = cfg.cache_dir or self.out_dir / "cache"
        if self.dist.main:  # the inputs are read before the run directory is made
            train_rows, held_rows, info = build_rows(cfg.data, self.tokenizer, cfg.seq_len, cfg.heldout_frac,
                                                     cache, cfg.eval_data, cfg.doc_attention)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()  # rank 0 filled the token cache; the others read it
        if not self.dist.main:
            train_rows, held_rows, info = build_rows(cfg.data, self.tokenizer, cfg.seq_len, cfg.heldout_frac,
                                                     cache, cfg.eval_data, cfg.doc_attention)
        if info["sft"] != cfg.sft:
            raise ValueError("the data holds prompt/response pairs: add --sft" if info["sft"]
                             else "--sft needs prompt/response (or messages) rows, the data has plain text")
        self.log(f"data: {info['train_rows']} training rows, {info['heldout_rows']} held-out rows of "
                 f"{cfg.seq_len} tokens" + (f"; {info['dropped']} examples too long, dropped" if info["dropped"] else ""))
        self.stream = BatchStream(train_rows, cfg.batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        self.heldout = [b.to(self.dist.device) for b in heldout_batches(held_rows, cfg.batch_size, cfg.eval_batches)] \
            if held_rows is not None and cfg.eval_every else []
        if cfg.eval_every and not self.heldout:
            self.log("no held-out rows (raise heldout_frac or pass --eval-data): evaluation is off")

        self.core = build_model(cfg, self.tokenizer).to(self.dist.device)
        self.lora = apply_lora(self.core, cfg, bf16=self._bf16()) if cfg.lora else None
        if self.lora is not None:
            trainable = sum(p.numel() for p in self.core.parameters() if p.requires_grad)
            targets = sorted(self.lora.target_modules) + list(self.lora.target_parameters or [])
            self.log(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha} on {', '.join(targets)}: "
                     f"{trainable / 1e6:.3f}M trainable parameters")
        self.core.gradient_checkpointing = cfg.activation_checkpointing
        self.mask_id = self.core.config.mask_token_id
        self.block_length = block_length_for(cfg, self.core.config)
        self.log(f"model: {self.core.num_parameters() / 1e6:.2f}M parameters ({self.core.config.layout}), "
                 f"world size {self.dist.world_size}")
        if self.block_length:
            self.log(f"block diffusion: blocks of {self.block_length} tokens, each denoised given the clean blocks "
                     "before it (a forward pass runs [noisy | clean], twice the row)")
            if self.core.config.layout not in BLOCK_DIFFUSION_LAYOUTS:
                self.log(f"note: unmask.generate decodes a {self.core.config.layout!r} model bidirectionally; "
                         "decode this one with unmask.sampling.block_generate")
        self.model = self._wrap(self.core)
        self.optimizer = make_optimizer(self.core, cfg)
        self.step = 0
        self._resume()
        self.metrics = MetricsLog(self.out_dir, self.step, self.log) if self.dist.main else None

    def log(self, msg: str) -> None:
        if self.dist.main:
            from tqdm import tqdm

            tqdm.write(f"unmask train: {msg}", file=sys.stderr)

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    def _wrap(self, core: MaskedDiffusionLM) -> torch.nn.Module:
        model: torch.nn.Module = core
        self.ddp = None
        if self.cfg.fsdp:
            if self.dist.world_size == 1 and not dist.is_initialized():
                raise ValueError("--fsdp needs a distributed launch: torchrun --nproc_per_node=N ...")
            from torch.distributed.fsdp import fully_shard

            for block in core.blocks:
                fully_shard(block)
            fully_shard(core)
        elif self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            model = self.ddp = DistributedDataParallel(core, device_ids=device_ids)
        return torch.compile(model) if self.cfg.compile else model

    # -- checkpoints --

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        ckpt = _all_ranks(self.dist, ckpt_io.resolve_resume(self.cfg.resume, self.out_dir) if self.dist.main else None)
        if ckpt is None:
            if self.cfg.resume:
                self.log(f"no checkpoint in {self.out_dir} yet: starting from scratch")
            return
        problem = None
        if self.dist.main:
            try:
                ckpt_io.verify(ckpt)
            except CheckpointError as e:
                problem = str(e)
        problem = _all_ranks(self.dist, problem)
        if problem:
            raise CheckpointError(problem)
        state = ckpt_io.load_state(ckpt, verified=True)
        if self.lora is not None:  # the frozen base came from init_from; only the adapter was trained
            set_model_state_dict(self.core, self._adapter_weights(ckpt),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            weights = load_model(ckpt, dtype=torch.float32, device="cpu").state_dict()
            set_model_state_dict(self.core, weights, options=StateDictOptions(full_state_dict=True))
        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.core, self.optimizer, state["optimizer"], options=full)
        self.stream.load_state_dict(state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
        self.step = state["step"]
        self.log(f"resumed from {ckpt} at step {self.step}")

    def _adapter_weights(self, ckpt: Path) -> dict:
        """The LoRA weights a checkpoint holds, under the model's names, checked to be exactly the model's."""
        from safetensors.torch import load_file

        from ..models.adapters import ADAPTER_WEIGHTS, check_adapter_names, model_tensors

        if not (ckpt / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"{ckpt} holds no LoRA adapter ({ADAPTER_WEIGHTS}): it is a full-model "
                                  "checkpoint; resume it without --lora")
        weights = model_tensors(load_file(ckpt / ADAPTER_WEIGHTS))
        check_adapter_names(self.core, weights, ckpt / ADAPTER_WEIGHTS, "resume with the run's own --lora-targets")
        return weights

    def save(self) -> Path | None:
        """Checkpoint the current step (collective: every rank calls it; rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        gather = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.core, options=gather) if self.cfg.fsdp else None
        optim = get_optimizer_state_dict(self.core, self.optimizer, options=gather)
        rngs = [None] * self.dist.world_size
        if self.dist.world_size > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        path = None
        if self.dist.main:
            state = {"step": self.step, "optimizer": optim, "rng": rngs, "data": self.stream.state_dict(),
                     "config": asdict(self.cfg), "world_size": self.dist.world_size}

            def write(d: Path) -> None:
                if self.lora is not None:
                    from ..models.adapters import adapter_tensors, save_adapter

                    save_adapter(self.lora, adapter_tensors(self.core.state_dict() if weights is None else weights), d)
                else:
                    save_model(self.core if weights is None else _cpu_model(self.core.config, weights), d)
                self.tokenizer.save_pretrained(d)
                torch.save(state, d / ckpt_io.STATE)

            path = ckpt_io.write_checkpoint(self.out_dir, self.step, write, self.cfg.keep_last)
            self.metrics.plot()
        self._barrier()
        return path

    # -- steps --

    def evaluate(self) -> float:
        autocast = self._autocast()
        with autocast:
            bound = mdm_bound(self.core, self.heldout, self.mask_id, self.cfg.eval_mc_samples, seed=0,
                              block_length=self.block_length)
        return bound.nats_per_token

    def _bf16(self) -> bool:
        return self.dist.device.type == "cuda" and self.cfg.bf16

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self._bf16() else contextlib.nullcontext()

    def _sync_context(self, last: bool):
        if self.cfg.fsdp:
            self.core.set_requires_gradient_sync(last)
        elif self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (loss averaged over ranks, grad norm, tokens seen by all ranks)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens
        for micro in range(cfg.grad_accum):
            batch = self.stream.next().to(self.dist.device)
            gen = noise_generator(cfg.seed, self.step, micro, self.dist.rank)
            with self._sync_context(micro == cfg.grad_accum - 1), self._autocast():
                loss = batch_loss(self.model, batch, self.mask_id, gen, cfg.cond_drop,
                                  self.block_length) / cfg.grad_accum
                loss.backward()
            totals += torch.tensor([loss.item(), batch.input_ids.numel()], dtype=torch.float64)
        norm = torch.nn.utils.clip_grad_norm_(self.core.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.dist.world_size > 1:
            dist.all_reduce(totals)
            totals[0] /= self.dist.world_size
        return float(totals[0]), float(norm), int(totals[1])

    def _stop_everywhere(self, requested: bool) -> bool:
        if self.dist.world_size == 1:
            return requested
        flag = torch.tensor([int(requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def run(self) -> TrainResult:
        from tqdm import tqdm

        cfg = self.cfg
        result = TrainResult(self.step, {}, {}, None, False)
        if self.dist.main:
            ckpt_io.write_text_atomic(self.out_dir / "train_config.json", json.dumps(asdict(cfg), indent=2))
        last = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.dist.main and cfg.progress))
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
        with StopRequest() as stop:
            while self.step < last:
                t0 = time.perf_counter()
                loss, norm, tokens = self.train_step()
                tok_s = tokens / (time.perf_counter() - t0)
                result.losses[self.step] = loss
                row = {"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, cfg), "grad_norm": norm,
                       "tokens_per_s": tok_s}
                if self.heldout and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    row["eval_nats_per_token"] = result.evals[self.step] = self.evaluate()
                    row["eval_ppl_bound"] = math.exp(row["eval_nats_per_token"])
                    self.log(f"step {self.step}: held-out bound {row['eval_nats_per_token']:.4f} nats/token "
                             f"(perplexity <= {row['eval_ppl_bound']:.2f})")
                if self.dist.main:
                    self.metrics.write(**row)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
                stopping = self._stop_everywhere(stop.requested or time.monotonic() > deadline)
                if stopping or self.step % cfg.save_every == 0 or self.step == last:
                    result.checkpoint = self.save()
                if stopping:
                    result.interrupted = True
                    break
        bar.close()
        result.step = self.step
        if result.checkpoint is not None:
            self.log(f"checkpoint {result.checkpoint}" + (" (interrupted: continue with --resume)" if result.interrupted else ""))
        return result

    def close(self) -> None:
        """Leave the process group. DDP's reducer holds the group too, and frees it while holding
        the GIL: had it the last reference (the trainer collected after destroy_process_group),
        gloo's destructor would join worker threads that may need the GIL to free a finished
        collective's tensors, a deadlock seen once in a two-process test. So the wrapper goes
        first, and the group is freed by destroy_process_group, whose holder releases the GIL."""
        if self.dist.world_size > 1 and dist.is_initialized():
            self.model = self.ddp = None
            gc.collect()   # DDP's module hooks form reference cycles; free its reducer now
            dist.destroy_process_group()


def _cpu_model(model_cfg: ModelConfig, weights: dict) -> MaskedDiffusionLM:
    """A plain CPU model holding a gathered full state dict, for save_model."""
    with torch.device("meta"):
        model = MaskedDiffusionLM(model_cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(weights)
    return model


def train(cfg: TrainConfig) -> TrainResult:
    """Train per `cfg` (see TrainConfig); under torchrun every rank calls this."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
