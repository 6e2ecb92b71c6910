"""How much memory one training step takes: a formula from the shape, and a measured step.

`unmask train --dry-run` prints both, so a user knows before renting a GPU whether a run fits.
The step measured is the worst case of the objective, every position masked (t = 1), so the
loss's vocabulary-wide tensors are as large as they ever get.

The formula (`estimate_step_memory`) counts bytes in four parts:
    weights      every parameter and buffer: float32 for full training; a frozen LoRA base in its
                 storage dtype (bfloat16 under autocast), its linear layers in int8 for qlora;
                 the adapter in float32
    gradients    4 bytes per trainable parameter (float32)
    optimizer    AdamW's two float32 moments per trainable parameter
    activations  what autograd keeps from the forward pass (`activation_bytes`)
and the peak is weights + optimizer + the larger of the gradients and the most the backward pass
holds at once. Without activation checkpointing that is the activations plus the logits'
gradient: activations are freed block by block as the backward pass fills the gradients, and the
optimizer step runs once they are gone. With it, the larger of the head's phase (the same sum)
and a block's recomputation, which holds the earlier blocks' inputs, the block's values, its
backward pass's largest temporary and the gradients already made (`_recompute_bytes`). The
per-token counts are those of unmask's own modules (float32 norms and RoPE, fused q|k|v and
gate|up, SDPA without a T×T score matrix), read off autograd's saved tensors; tests/test_memory.py
checks the formula against measured CPU steps of all three layouts, with and without activation
checkpointing (within 10 %).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..models import ModelConfig, weight_bytes
from ..models.adapters import EXPERT_TARGETS, default_targets

ADAMW_STATES = 2


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step, by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int


@dataclass(frozen=True)
class StepShape:
    """What a step's memory depends on besides the model: rows, their length, precision, method."""

    batch_size: int
    seq_len: int
    method: str = "full"              # full, lora or qlora (LoRA on an int8 base, --lora-quantize int8)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ()  # () : the layout's default targets
    activation_checkpointing: bool = False
    bf16: bool = False                # bfloat16 autocast (GPU): 2-byte activations, a bfloat16 frozen base
    block_length: int | None = None   # block diffusion runs [noisy | clean], twice the row

    def __post_init__(self):
        if self.method not in ("full", "lora", "qlora"):
            raise ValueError(f"method must be full, lora or qlora, not {self.method!r}")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len * (2 if self.block_length else 1)


def quantized_linears(cfg: ModelConfig) -> tuple[list[int], int, int]:
    """What `quantize_model` turns to int8 (every nn.Linear but routers and a tied head; not the
    stacked experts): (weight values per block, the head's weight values, output rows of them all)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    D, F, S = cfg.d_model, cfg.mlp_hidden_size, cfg.shared_expert_hidden_size or 0
    per_block, rows = [], 0
    for moe in cfg.moe_layers:
        hidden = S if moe else F
        per_block.append(D * (q + 2 * kv) + q * D + 3 * D * hidden)
        rows += q + 2 * kv + D + (2 * hidden + D if hidden else 0)
    head = 0 if cfg.tie_embeddings else D * cfg.vocab_size
    return per_block, head, rows + (0 if cfg.tie_embeddings else cfg.vocab_size)


def lora_parameters(cfg: ModelConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable LoRA parameters: r·(in + out) per adapted linear, and per expert of a stacked weight."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    D, E, He = cfg.d_model, cfg.n_experts, cfg.expert_hidden_size or 0
    moe = sum(cfg.moe_layers)
    dense = cfg.n_layers - moe
    shared = cfg.shared_expert_hidden_size or 0
    per = {"qkv": cfg.n_layers * (D + q + 2 * kv), "out": cfg.n_layers * (q + D),
           "gate_up": dense * (D + 2 * cfg.mlp_hidden_size) + (moe * (D + 2 * shared) if shared else 0),
           "down": dense * (cfg.mlp_hidden_size + D) + (moe * (shared + D) if shared else 0),
           "router": moe * (D + E), "lm_head": D + cfg.vocab_size,
           "w_gate": moe * E * (D + He), "w_up": moe * E * (D + He), "w_down": moe * E * (He + D)}
    return rank * sum(per[t] for t in targets)


def _layer_values(cfg: ModelConfig, moe: bool, shape: StepShape, targets: tuple[str, ...]) -> float:
    """Values autograd saves per token in one block (full training, or LoRA on a frozen block)."""
    D, H, Hkv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, kv = H * hd, Hkv * hd
    full = shape.method == "full"
    r = shape.lora_rank

    def adapted(*names: str) -> int:
        return 0 if full else r * sum(n in targets for n in names)

    v = 6 * D + 3 * q + 3 * kv + 2 + H + adapted("qkv", "out")  # norm, q|k|v, RoPE, SDPA, out
    if cfg.qk_norm:
        v += (q + kv if full else 0) + H + Hkv
    v += (q + kv) * (1 - cfg.rotary_dim / hd)          # a partial RoPE cuts and concatenates
    if not full:
        v -= 2 * D                                     # a frozen norm gain needs not its input kept
    if not moe:
        return v + 4 * cfg.mlp_hidden_size + adapted("gate_up", "down")
    k, He, shared = cfg.experts_per_token, cfg.expert_hidden_size, cfg.shared_expert_hidden_size or 0
    if full or set(EXPERT_TARGETS) & set(targets):     # each token-expert pair: its input, gate, up, product, output
        v += k * (4 * He + 3 * D + 7) + cfg.n_experts
    else:                                              # frozen experts keep no input for their weights' gradient
        v += k * (3 * He + 2 * D + 7) + cfg.n_experts - D
    if shared:
        v += 4 * shared + (0 if full else D + adapted("gate_up", "down"))
    return v


def activation_bytes(cfg: ModelConfig, shape: StepShape) -> tuple[int, int]:
    """(bytes the forward pass leaves for the backward pass, the most the backward pass holds at
    once besides the weights and the optimizer's moments).

    Per token: each block's saved values (`_layer_values`), or with activation checkpointing only
    each block's input; the rotary tables; at the positions that get logits (the noisy half of
    block diffusion's [noisy | clean]) the final norm's input and the head's log-softmax over the
    vocabulary (float32 whatever the autocast). LoRA on stacked experts adds, per MoE layer, the
    merged weights W + ΔW that peft materialises; an int8 base (qlora), the float copy of each
    quantized weight that torchao's matmul makes and autograd keeps.

    Without checkpointing the backward pass adds the float32 gradient of the logits at its start,
    and frees the saved values as it fills the gradients. With checkpointing it holds, at its
    largest, either that (the head's phase) or one block recomputed (`_recompute_bytes`).
    """
    targets = _targets(cfg, shape)
    width = 2 if shape.bf16 else 4
    full = shape.method == "full"
    positions, with_logits = shape.tokens, shape.batch_size * shape.seq_len
    layers = [_layer_values(cfg, moe, shape, targets) for moe in cfg.moe_layers]
    vocab = 4 * cfg.vocab_size * with_logits
    rotary = width * positions * (2 * cfg.rotary_dim + 2)
    head = width * with_logits * (3 * cfg.d_model + 1 if full else cfg.d_model + 1) + vocab
    if shape.method == "qlora":   # the head's float weight, kept whatever the checkpointing
        head += width * quantized_linears(cfg)[1]
    held = _weight_copies(cfg, shape, targets, width)
    if not shape.activation_checkpointing:
        saved = width * positions * sum(layers) + sum(held) + rotary + head
        return int(saved), int(saved + vocab)
    inputs = width * positions * cfg.d_model
    saved = cfg.n_layers * inputs + rotary + head
    return int(saved), int(max(saved + vocab, _recompute_bytes(cfg, shape, layers, held, inputs) + rotary))


def _weight_copies(cfg: ModelConfig, shape: StepShape, targets: tuple[str, ...], width: int) -> list[int]:
    """Bytes of weight-sized tensors each block's forward pass creates and autograd keeps: torchao's
    float copy of every int8 weight (qlora), and peft's W + ΔW of the adapted stacked experts."""
    copies = [0] * cfg.n_layers
    if shape.method == "qlora":
        copies = [width * n for n in quantized_linears(cfg)[0]]
    if shape.method != "full" and set(EXPERT_TARGETS) & set(targets):
        experts = sum(t in targets for t in EXPERT_TARGETS) * cfg.n_experts * cfg.expert_hidden_size * cfg.d_model
        copies = [c + (width * experts if moe else 0) for c, moe in zip(copies, cfg.moe_layers)]
    return copies


def _recompute_bytes(cfg: ModelConfig, shape: StepShape, layers: list[float], held: list[int], inputs: int) -> int:
    """The most the backward pass holds while it recomputes a checkpointed block, over the blocks
    (last to first), but the rotary tables: the inputs of the blocks not done yet; the block's
    saved values but its input (already kept as the checkpoint's), its weight copies, and the
    backward pass's largest temporary (the gradient of the SwiGLU hidden, or for full training of
    an MoE layer the stacked experts' gradient, made whole at once); and the gradients of the
    blocks and head done so far (measured: tests/test_memory.py)."""
    width = 2 if shape.bf16 else 4
    gradients = _gradient_bytes_after(cfg, shape)
    worst = 0
    for i, (values, moe) in enumerate(zip(layers, cfg.moe_layers)):
        hidden = (cfg.shared_expert_hidden_size or 0) if moe else cfg.mlp_hidden_size
        temporary = width * shape.tokens * hidden
        if moe and shape.method == "full":
            temporary = max(temporary, 4 * 3 * cfg.n_experts * cfg.expert_hidden_size * cfg.d_model)
        block = width * shape.tokens * (values - cfg.d_model) + held[i] + temporary
        worst = max(worst, (i + 1) * inputs + block + gradients[i])
    return worst


def _gradient_bytes_after(cfg: ModelConfig, shape: StepShape) -> list[int]:
    """For each block, the gradient bytes the backward pass has made before reaching it: the head's
    and the later blocks' (full training: their parameters'; LoRA: the adapter's, pro rata)."""
    L = cfg.n_layers
    if shape.method != "full":
        total = 4 * lora_parameters(cfg, shape.lora_rank, _targets(cfg, shape))
        return [total * (L - 1 - i) // L for i in range(L)]
    from ..models import MaskedDiffusionLM

    with torch.device("meta"):
        model = MaskedDiffusionLM(cfg)
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    head = sum(p.numel() for p in model.norm.parameters()) + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    return [4 * (head + sum(blocks[i + 1:])) for i in range(L)]


def _targets(cfg: ModelConfig, shape: StepShape) -> tuple[str, ...]:
    return tuple(shape.lora_targets) or tuple(default_targets(cfg))


def estimate_step_memory(cfg: ModelConfig, shape: StepShape) -> StepMemory:
    """The formula of the module docstring for a model of `cfg` trained at `shape`."""
    params = _count_parameters(cfg)
    buffers = 4 * _count_parameters(cfg, buffers=True)   # float32 router biases
    if shape.method == "full":
        trainable, weights = params, 4 * params + buffers
    else:
        trainable = lora_parameters(cfg, shape.lora_rank, _targets(cfg, shape))
        base = 2 if shape.bf16 else 4
        if shape.method == "qlora":   # one byte per weight and a scale per output row
            per_block, head, rows = quantized_linears(cfg)
            linear = sum(per_block) + head
            weights = linear + base * rows + base * (params - linear)
        else:
            weights = base * params
        weights += 4 * trainable + buffers
    gradients, optimizer = 4 * trainable, 4 * ADAMW_STATES * trainable
    saved, backward = activation_bytes(cfg, shape)
    return StepMemory(weights=weights, gradients=gradients, optimizer=optimizer, activations=saved,
                      peak=weights + optimizer + max(backward, gradients))


def _count_parameters(cfg: ModelConfig, buffers: bool = False) -> int:
    """Parameters (or buffer values) of a model of `cfg`, counted on the meta device (no memory)."""
    from ..models import MaskedDiffusionLM

    with torch.device("meta"):
        model = MaskedDiffusionLM(cfg)
    return sum(t.numel() for t in (model.buffers() if buffers else model.parameters()))


def measure_step_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer, shape: StepShape,
                        device: torch.device) -> StepMemory:
    """Measure a worst-case step (every position masked) of `model` at `shape`: the second of two,
    once the optimizer holds its moments. weights, gradients, optimizer: the bytes of the tensors
    themselves; activations: what the forward pass (through the loss) leaves allocated; peak:
    weights + optimizer + the most allocated at any moment of the step. The weights change by two
    optimizer steps."""
    from .objective import attention_for

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (shape.batch_size, shape.seq_len), generator=g).to(device)
    noisy = torch.full_like(ids, cfg.mask_token_id)
    attention = attention_for(ids, block_length=shape.block_length)

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=shape.bf16):
            logits = attention.logits(model, noisy, ids)
            return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())

    forward().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with Allocations(device) as step:
        loss = forward()
        forward_end = step.mark()
        loss.backward()
        gradients = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    weights = weight_bytes(model)
    states = _bytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim())
    return StepMemory(weights=weights, gradients=gradients, optimizer=states, activations=step.net_at(forward_end),
                      peak=weights + states + step.peak)


def _bytes(tensors) -> int:
    """Bytes of distinct storages (views and tied weights count once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class Allocations:
    """Bytes allocated on `device` inside the block above its start: `peak` at most, and
    `net_at(mark)` at a moment `mark()` noted.

    On CUDA torch's allocator statistics; on the CPU, which keeps none, the profiler's memory
    events (each op's own allocations and the frees, in time order)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.marks = device, 0, []

    def __enter__(self) -> "Allocations":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profile.__enter__()
        return self

    def mark(self):
        """Note this moment (for `net_at`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) - self.start
        from torch.profiler import record_function

        with record_function("unmask.mark") as marker:
            pass
        return marker

    def net_at(self, mark) -> int:
        if self.device.type == "cuda":
            return mark
        end = next(e.time_range.start for e in self.profile.events() if e.name == "unmask.mark")
        return sum(change for start, change in self._changes() if start <= end)

    def _changes(self) -> list[tuple[float, int]]:
        return sorted((e.time_range.start, e.self_cpu_memory_usage) for e in self.profile.events()
                      if e.self_cpu_memory_usage)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self.profile.__exit__(*exc)
        net = 0
        for _, change in self._changes():
            net += change
            self.peak = max(self.peak, net)


def format_report(estimated: StepMemory, measured: StepMemory | None, why_not: str = "") -> str:
    """The dry run's table: each part and the peak, estimated and measured, and their ratio."""
    lines = [f"{'':<12} {'estimated':>12} {'measured':>12}"]
    for f in fields(StepMemory):
        got = _gib(getattr(measured, f.name)) if measured else "-"
        lines.append(f"{f.name:<12} {_gib(getattr(estimated, f.name)):>12} {got:>12}")
    lines.append(f"estimated / measured peak: {estimated.peak / measured.peak:.3f}" if measured
                 else f"not measured: {why_not}")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def dry_run(cfg) -> str:
    """`unmask train --dry-run`: the memory of one step of `cfg`'s run, estimated, and measured on
    its device when the estimate fits there (a model is built with random or --init-from weights;
    no data is read and nothing is written)."""
    from .trainer import apply_lora, block_length_for, init_weights, make_optimizer

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_cfg, tokenizer = _model_config(cfg)
    method = ("qlora" if cfg.lora_quantize else "lora") if cfg.lora else "full"
    shape = StepShape(batch_size=cfg.batch_size, seq_len=cfg.seq_len, method=method,
                      lora_rank=cfg.lora_rank, lora_targets=tuple(cfg.lora_targets),
                      activation_checkpointing=cfg.activation_checkpointing,
                      bf16=cfg.bf16 and device.type == "cuda", block_length=block_length_for(cfg, model_cfg))
    estimated = estimate_step_memory(model_cfg, shape)
    header = (f"dry run: {model_cfg.layout}, {_count_parameters(model_cfg) / 1e6:,.1f}M parameters, "
              f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora else 'full training'}, {cfg.batch_size} × "
              f"{shape.tokens // cfg.batch_size} tokens per step, activation checkpointing "
              f"{'on' if cfg.activation_checkpointing else 'off'}, {'bfloat16' if shape.bf16 else 'float32'} on {device}")
    free = free_bytes(device)
    if free is not None and estimated.peak > 0.8 * free:
        return header + "\n" + format_report(estimated, None, f"it needs about {_gib(estimated.peak)}, {device} has "
                                              f"{_gib(free)} free")
    if cfg.init_from:
        from .trainer import build_model

        model = build_model(cfg, tokenizer)
    else:
        from ..models import MaskedDiffusionLM

        torch.manual_seed(cfg.seed)
        model = MaskedDiffusionLM(model_cfg)
        init_weights(model)
    model = model.to(device).train()
    if cfg.lora:
        apply_lora(model, cfg, bf16=shape.bf16)
    model.gradient_checkpointing = cfg.activation_checkpointing
    measured = measure_step_memory(model, make_optimizer(model, cfg), shape, device)
    return header + "\n" + format_report(estimated, measured)


def _model_config(cfg):
    """(model config, tokenizer or None) of a run, without its data: from --init-from, else the
    shape fields or --preset with the tokenizer's vocabulary, else the preset's own."""
    from ..models import PRESETS, load_config, load_tokenizer
    from .trainer import model_config

    source = cfg.tokenizer or cfg.init_from
    tokenizer = load_tokenizer(source) if source else None
    if cfg.init_from:
        return load_config(cfg.init_from), tokenizer
    if tokenizer is not None:
        return model_config(cfg, tokenizer), tokenizer
    if cfg.preset:
        preset = PRESETS[cfg.preset]
        return preset.with_(max_seq_len=max(cfg.seq_len, preset.max_seq_len)), None
    raise ValueError("--dry-run needs the model's vocabulary: pass --tokenizer DIR, --init-from DIR or --preset NAME")


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` (CUDA's free memory, the CPU's MemAvailable), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None
